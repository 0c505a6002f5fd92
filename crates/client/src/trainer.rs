//! The trainer port: given the round's global model (a file), produce a
//! local model (a file) and a report. The built-in and the external
//! trainer implement it; [`output_check`](crate::output_check) then checks
//! whatever came back, so a trainer cannot smuggle in a bad update.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::builtin_trainer::BuiltinTrainer;
use crate::external_trainer::ExternalTrainer;
use crate::scaffold::ScaffoldFiles;

/// One round's training job. The files live in a fresh per-message
/// directory; the trainer writes `output_model` (and, if it reports through
/// a file, `metrics_out`).
#[derive(Debug, Clone)]
pub struct TrainRequest {
    pub job_id: String,
    pub round: u32,
    pub global_model: PathBuf,
    pub output_model: PathBuf,
    pub metrics_out: PathBuf,
    /// The job's `[round_config]`, untouched.
    pub round_config: Map<String, Value>,
    /// SCAFFOLD rounds (the message named a server variate): the control
    /// variates to read and where to write Δc_i.
    pub scaffold: Option<ScaffoldFiles>,
}

/// What the trainer says about the model it wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// The FedAvg weight.
    pub num_examples: u64,
    /// Used by type-aware weighting; absent for a plain model.
    pub llm_type: Option<String>,
    pub metrics: BTreeMap<String, f64>,
}

/// A training failure, worded for the operator (names the command/file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TrainError(pub String);

pub trait Trainer: Send + Sync {
    fn train(
        &self,
        req: TrainRequest,
    ) -> impl Future<Output = Result<TrainReport, TrainError>> + Send;
}

/// The trainer a `client.toml` asks for.
pub enum AnyTrainer {
    Builtin(BuiltinTrainer),
    External(ExternalTrainer),
}

impl Trainer for AnyTrainer {
    async fn train(&self, req: TrainRequest) -> Result<TrainReport, TrainError> {
        match self {
            AnyTrainer::Builtin(t) => t.train(req).await,
            AnyTrainer::External(t) => t.train(req).await,
        }
    }
}

impl AnyTrainer {
    /// Builds the configured trainer; the built-in one loads and splits
    /// its dataset here, once, so a bad dataset path fails at start-up.
    pub fn from_config(cfg: &crate::config::TrainerConfig) -> Result<AnyTrainer, TrainError> {
        Ok(match cfg {
            crate::config::TrainerConfig::Builtin(b) => {
                AnyTrainer::Builtin(BuiltinTrainer::from_config(b)?)
            }
            crate::config::TrainerConfig::External(e) => {
                AnyTrainer::External(ExternalTrainer::from_config(e))
            }
        })
    }
}
