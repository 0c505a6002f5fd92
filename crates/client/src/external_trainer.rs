//! The external trainer: runs a command with the file contract of
//! docs/design.md §5 (env FEDSTEP_GLOBAL_MODEL, FEDSTEP_OUTPUT_MODEL,
//! FEDSTEP_METRICS_OUT, FEDSTEP_ROUND, FEDSTEP_ROUND_CONFIG; in SCAFFOLD
//! rounds also FEDSTEP_SERVER_VARIATE and FEDSTEP_CLIENT_VARIATE to read
//! and FEDSTEP_VARIATE_DELTA_OUT to write Δc_i) and reads back the model
//! it wrote, its JSON report and, SCAFFOLD, its Δc_i.

use std::time::Duration;

use tokio::process::Command;

use crate::config::ExternalConfig;
use crate::external_report;
use crate::trainer::{TrainError, TrainReport, TrainRequest, Trainer};

pub struct ExternalTrainer {
    command: Vec<String>,
    timeout: Option<Duration>,
}

impl ExternalTrainer {
    pub fn from_config(c: &ExternalConfig) -> ExternalTrainer {
        ExternalTrainer::new(
            c.command.clone(),
            c.timeout_seconds.map(Duration::from_secs),
        )
    }

    pub fn new(command: Vec<String>, timeout: Option<Duration>) -> ExternalTrainer {
        ExternalTrainer { command, timeout }
    }

    fn shown(&self) -> String {
        self.command.join(" ")
    }
}

impl Trainer for ExternalTrainer {
    async fn train(&self, req: TrainRequest) -> Result<TrainReport, TrainError> {
        let Some((program, args)) = self.command.split_first() else {
            return Err(TrainError("trainer.command is empty".into()));
        };
        let round_config = serde_json::Value::Object(req.round_config.clone()).to_string();
        let mut command = Command::new(program);
        // SCAFFOLD rounds only: c and c_i to read, where to write Δc_i.
        if let Some(f) = &req.scaffold {
            command
                .env("FEDSTEP_SERVER_VARIATE", &f.server_variate)
                .env("FEDSTEP_CLIENT_VARIATE", &f.client_variate)
                .env("FEDSTEP_VARIATE_DELTA_OUT", &f.delta_out);
        }
        let mut child = command
            .args(args)
            .env("FEDSTEP_GLOBAL_MODEL", &req.global_model)
            .env("FEDSTEP_OUTPUT_MODEL", &req.output_model)
            .env("FEDSTEP_METRICS_OUT", &req.metrics_out)
            .env("FEDSTEP_ROUND", req.round.to_string())
            .env("FEDSTEP_JOB_ID", &req.job_id)
            .env("FEDSTEP_ROUND_CONFIG", round_config)
            .stdin(std::process::Stdio::null())
            // If the client abandons the round (shutdown, timeout) the
            // trainer must not keep burning CPU behind its back.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| TrainError(format!("cannot start `{}`: {e}", self.shown())))?;
        let status = match self.timeout {
            None => child.wait().await,
            Some(t) => match tokio::time::timeout(t, child.wait()).await {
                Ok(s) => s,
                Err(_) => {
                    let _ = child.kill().await;
                    return Err(TrainError(format!(
                        "`{}` did not finish within {t:?}; killed",
                        self.shown()
                    )));
                }
            },
        }
        .map_err(|e| TrainError(format!("waiting for `{}`: {e}", self.shown())))?;
        if !status.success() {
            return Err(TrainError(format!("`{}` failed: {status}", self.shown())));
        }
        if !req.output_model.is_file() {
            return Err(TrainError(format!(
                "`{}` exited 0 but wrote no model at FEDSTEP_OUTPUT_MODEL ({})",
                self.shown(),
                req.output_model.display()
            )));
        }
        if let Some(f) = req.scaffold.as_ref().filter(|f| !f.delta_out.is_file()) {
            return Err(TrainError(format!(
                "`{}` exited 0 but wrote no Δc_i at FEDSTEP_VARIATE_DELTA_OUT ({}) in a SCAFFOLD round",
                self.shown(),
                f.delta_out.display()
            )));
        }
        external_report::read(&req.metrics_out)
    }
}
