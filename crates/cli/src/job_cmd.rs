//! `fedstep job start|status|watch`: start a federated training job on the
//! deployed state machine and follow its rounds.
//!
//! AWS settings come from the standard chain plus `FEDSTEP_*` variables
//! (`FEDSTEP_BUCKET`, `FEDSTEP_ROUNDS_TABLE`, `FEDSTEP_UPDATES_TABLE`,
//! `FEDSTEP_STATE_MACHINE_ARN`, `FEDSTEP_S3_FORCE_PATH_STYLE`; for the
//! emulators `scripts/local-deploy.sh --print-env` prints them).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use fedstep_aws::aws_sdk_sfn::error::ProvideErrorMetadata;
use fedstep_aws::aws_sdk_sfn::operation::describe_execution::DescribeExecutionError;
use fedstep_aws::aws_sdk_sfn::operation::start_execution::StartExecutionError;
use fedstep_aws::aws_sdk_sfn::primitives::{DateTime, DateTimeFormat};
use fedstep_aws::{AwsConfig, DynamoLedger, S3Store};
use fedstep_cloud::keys;
use fedstep_cloud::ports::{Ledger, ObjectStore};
use fedstep_cloud::records::{RoundRecord, RoundStatus};
use fedstep_cloud::secure::SecureSettings;
use fedstep_cloud::{Job, JobSpec};
use fedstep_core::{model, Limits};

#[derive(Subcommand)]
pub enum JobCommand {
    /// Upload the job's initial model as round 1's global model and start
    /// the state machine (execution name = job_id, so a job starts once).
    Start {
        /// The job file (see examples/job.toml).
        #[arg(long)]
        config: PathBuf,
        /// State machine ARN (default: $FEDSTEP_STATE_MACHINE_ARN).
        #[arg(long)]
        state_machine: Option<String>,
    },
    /// The job's rounds (status, clients in, rejections, metrics) and its
    /// execution status.
    Status {
        job_id: String,
        #[arg(long)]
        state_machine: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Refresh the status every few seconds until the execution ends; exits
    /// non-zero unless it succeeded.
    Watch {
        job_id: String,
        #[arg(long)]
        state_machine: Option<String>,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 5)]
        interval: u64,
    },
    /// Write the job as one self-contained HTML page with charts
    /// (aggregated and per-client metrics, weights, participation,
    /// timings), plus the SVGs and report.json.
    Report {
        job_id: String,
        #[arg(long)]
        state_machine: Option<String>,
        /// Output directory (default: report-<job_id>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub fn run(cmd: JobCommand) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async {
        match cmd {
            JobCommand::Start {
                config,
                state_machine,
            } => start(&config, state_machine).await,
            JobCommand::Status {
                job_id,
                state_machine,
                json,
            } => status(&job_id, state_machine, json).await,
            JobCommand::Watch {
                job_id,
                state_machine,
                interval,
            } => watch(&job_id, state_machine, interval.max(1)).await,
            JobCommand::Report {
                job_id,
                state_machine,
                out,
            } => report(&job_id, state_machine, out).await,
        }
    })
}

// ------------------------------------------------------------------ start

/// Everything `start` checks before touching AWS.
#[derive(Debug)]
pub struct PreparedStart {
    pub job: Job,
    /// The initial model, resolved against the job file's directory.
    pub model: PathBuf,
    /// The execution input (statemachine/README.md "Execution input").
    pub input: String,
}

pub fn prepare_start(config: &Path) -> Result<PreparedStart> {
    let shown = config.display();
    let text = std::fs::read_to_string(config).with_context(|| format!("reading {shown}"))?;
    let job = JobSpec::from_toml(&text).map_err(|e| anyhow!("{shown}: {e}"))?;
    if job.secure_aggregation().is_some() {
        bail!("{shown}: {}", SecureSettings::NOT_RUNNABLE_YET);
    }
    let Some(initial) = &job.initial_model else {
        bail!(
            "{shown}: initial_model is required: the path of the round-1 global model \
             (safetensors), relative to the job file. fedstep does not invent one: the \
             architecture is whatever the clients train (for the built-in trainer, \
             `fedstep simulate` or fedstep-trainer's init_model produce one)"
        );
    };
    let base = config.parent().unwrap_or(Path::new("."));
    let model = base.join(initial);
    model::open(&model, &Limits::default())
        .with_context(|| format!("{shown}: initial_model {}", model.display()))?;
    // The local path means nothing to the workflow; keep it out of the
    // input. Its size was checked with the job (JobSpec::check: the job and
    // a round's largest result must fit Step Functions' state together).
    let input = serde_json::to_string(&JobSpec {
        initial_model: None,
        ..job.spec().clone()
    })?;
    Ok(PreparedStart { job, model, input })
}

/// `arn:aws:states:R:A:stateMachine:NAME` → `arn:aws:states:R:A:execution:NAME:EXEC`.
pub fn execution_arn(state_machine_arn: &str, execution: &str) -> Result<String> {
    let parts: Vec<&str> = state_machine_arn.split(':').collect();
    match parts.as_slice() {
        ["arn", partition, "states", region, account, "stateMachine", name] => Ok(format!(
            "arn:{partition}:states:{region}:{account}:execution:{name}:{execution}"
        )),
        _ => bail!("`{state_machine_arn}` is not a state machine ARN (arn:aws:states:REGION:ACCOUNT:stateMachine:NAME)"),
    }
}

fn state_machine(aws: &AwsConfig, arg: Option<String>) -> Option<String> {
    arg.or_else(|| aws.settings.state_machine_arn.clone())
}

fn need_state_machine(aws: &AwsConfig, arg: Option<String>) -> Result<String> {
    state_machine(aws, arg).ok_or_else(|| {
        anyhow!("no state machine: pass --state-machine or set FEDSTEP_STATE_MACHINE_ARN")
    })
}

async fn start(config: &Path, sm_arg: Option<String>) -> Result<()> {
    let prepared = prepare_start(config)?;
    let job_id = &prepared.job.job_id;
    let aws = AwsConfig::from_env().await;
    let sm = need_state_machine(&aws, sm_arg)?;
    let store = S3Store::from_config(&aws)?;
    let sfn = aws.sfn();

    // Refuse before uploading: overwriting round 1's global model under a
    // running (or finished) job would change the model its clients verify.
    if let Some(e) = describe(&sfn, &execution_arn(&sm, job_id)?).await? {
        bail!(
            "job {job_id} was already started (execution {}, started {}): job ids are single-use, pick a new job_id",
            e.status,
            e.started
        );
    }
    let key = keys::global_model(job_id, 1);
    let info = store
        .put_file(&key, &prepared.model)
        .await
        .with_context(|| format!("uploading {} to {key}", prepared.model.display()))?;
    let out = sfn
        .start_execution()
        .state_machine_arn(&sm)
        .name(job_id)
        .input(&prepared.input)
        .send()
        .await
        .map_err(|e| match e.into_service_error() {
            StartExecutionError::ExecutionAlreadyExists(_) => anyhow!(
                "job {job_id} was already started: an execution named {job_id} exists; job ids are single-use"
            ),
            other => anyhow!("StartExecution on {sm}: {}", describe_error(&other)),
        })?;
    println!("started job {job_id}");
    println!("  execution     {}", out.execution_arn());
    println!(
        "  global model  {key} ({} bytes, sha256 {})",
        info.bytes, info.sha256
    );
    println!(
        "  {} clients, {} rounds at most, {} s per round",
        prepared.job.clients.len(),
        prepared.job.rounds,
        prepared.job.round_timeout_seconds
    );
    println!("follow it with: fedstep job watch {job_id}");
    Ok(())
}

fn describe_error<E: ProvideErrorMetadata + std::fmt::Display>(e: &E) -> String {
    match (e.code(), e.message()) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        _ => e.to_string(),
    }
}

// ------------------------------------------------------------ execution

/// What `DescribeExecution` says, as text.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Execution {
    pub status: String,
    pub started: String,
    pub stopped: Option<String>,
    pub error: Option<String>,
    pub cause: Option<String>,
}

fn when(t: &DateTime) -> String {
    t.fmt(DateTimeFormat::DateTime)
        .unwrap_or_else(|_| t.to_string())
}

/// `None` when no such execution exists.
async fn describe(sfn: &fedstep_aws::aws_sdk_sfn::Client, arn: &str) -> Result<Option<Execution>> {
    match sfn.describe_execution().execution_arn(arn).send().await {
        Ok(out) => Ok(Some(Execution {
            status: out.status().as_str().to_string(),
            started: when(out.start_date()),
            stopped: out.stop_date().map(when),
            error: out.error().map(str::to_string),
            cause: out.cause().map(str::to_string),
        })),
        Err(e) => match e.into_service_error() {
            DescribeExecutionError::ExecutionDoesNotExist(_) => Ok(None),
            other => bail!("DescribeExecution {arn}: {}", describe_error(&other)),
        },
    }
}

// ------------------------------------------------------------ status/watch

struct Snapshot {
    rounds: Vec<RoundRecord>,
    execution: Option<Execution>,
}

async fn snapshot(aws: &AwsConfig, sm: Option<&str>, job_id: &str) -> Result<Snapshot> {
    let ledger = DynamoLedger::from_config(aws)?;
    let rounds = ledger
        .list_rounds(job_id)
        .await
        .with_context(|| format!("listing the rounds of {job_id}"))?;
    let execution = match sm {
        Some(sm) => describe(&aws.sfn(), &execution_arn(sm, job_id)?).await?,
        None => None,
    };
    Ok(Snapshot { rounds, execution })
}

async fn status(job_id: &str, sm_arg: Option<String>, json: bool) -> Result<()> {
    keys::check_id("job id", job_id).map_err(anyhow::Error::msg)?;
    let aws = AwsConfig::from_env().await;
    let sm = state_machine(&aws, sm_arg);
    let snap = snapshot(&aws, sm.as_deref(), job_id).await?;
    if json {
        let v = serde_json::json!({"job_id": job_id, "execution": snap.execution, "rounds": snap.rounds});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print!("{}", render_status(job_id, &snap, sm.is_some(), now()));
    Ok(())
}

async fn report(job_id: &str, sm_arg: Option<String>, out: Option<PathBuf>) -> Result<()> {
    keys::check_id("job id", job_id).map_err(anyhow::Error::msg)?;
    let aws = AwsConfig::from_env().await;
    let execution = match state_machine(&aws, sm_arg) {
        Some(sm) => describe(&aws.sfn(), &execution_arn(&sm, job_id)?)
            .await?
            .map(|e| e.status),
        None => None,
    };
    let out = out.unwrap_or_else(|| PathBuf::from(format!("report-{job_id}")));
    let scratch = tempfile::tempdir()?;
    let store = S3Store::from_config(&aws)?;
    let ledger = DynamoLedger::from_config(&aws)?;
    let report =
        crate::job_report::collect(&store, &ledger, job_id, execution, scratch.path()).await?;
    let files = crate::job_report::write(&report, &out, "report.json")?;
    println!(
        "wrote {} ({} charts) and {}",
        files.html.display(),
        files.charts.len(),
        files.json.display()
    );
    Ok(())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn render_status(job_id: &str, snap: &Snapshot, know_sm: bool, now: i64) -> String {
    let mut out = format!("job {job_id}\n");
    match (&snap.execution, know_sm) {
        (Some(e), _) => {
            out += &format!("  execution {} (started {}", e.status, e.started);
            if let Some(s) = &e.stopped {
                out += &format!(", stopped {s}");
            }
            out += ")\n";
            if let Some(err) = &e.error {
                out += &format!("  error {err}: {}\n", e.cause.as_deref().unwrap_or(""));
            }
        }
        (None, true) => out += "  execution: none (the job was never started)\n",
        (None, false) => {
            out += "  execution: unknown (set FEDSTEP_STATE_MACHINE_ARN or --state-machine)\n"
        }
    }
    out += &render_rounds(&snap.rounds, now);
    out
}

/// The rounds as a table, with rejection reasons and failures under their round.
pub fn render_rounds(rounds: &[RoundRecord], now: i64) -> String {
    if rounds.is_empty() {
        return "  no rounds recorded yet\n".into();
    }
    let mut out = format!(
        "  {:>5}  {:<11}  {:>7}  {}\n",
        "round", "status", "clients", "result"
    );
    for r in rounds {
        let clients = format!("{}/{}", r.received.len(), r.expected_clients.len());
        let detail = match (&r.status, &r.result) {
            (_, Some(res)) => {
                let metrics: Vec<String> = res
                    .metrics
                    .iter()
                    .map(|(k, v)| format!("{k}={v:.4}"))
                    .collect();
                format!("{} (closed by {})", metrics.join(" "), res.closed_by)
            }
            (RoundStatus::Open, None) if r.deadline > now => {
                format!("deadline in {} s", r.deadline - now)
            }
            (RoundStatus::Open, None) => "deadline passed".into(),
            _ => String::new(),
        };
        out += &format!(
            "  {:>5}  {:<11}  {:>7}  {detail}\n",
            r.round,
            status_name(r.status),
            clients
        );
        let missing: Vec<&str> = r
            .expected_clients
            .iter()
            .filter(|c| !r.received.contains(*c))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() && r.status == RoundStatus::Open {
            out += &format!("         waiting for {}\n", missing.join(", "));
        }
        let rejected = r
            .result
            .as_ref()
            .map(|x| &x.rejected)
            .unwrap_or(&r.rejections);
        for (client, reason) in rejected {
            out += &format!("         rejected {client}: {reason}\n");
        }
        if let Some(f) = &r.failure {
            out += &format!("         failed: {f}\n");
        }
    }
    out
}

fn status_name(s: RoundStatus) -> &'static str {
    match s {
        RoundStatus::Open => "OPEN",
        RoundStatus::Aggregating => "AGGREGATING",
        RoundStatus::Closed => "CLOSED",
        RoundStatus::Failed => "FAILED",
    }
}

/// One line for `watch`.
fn summary(snap: &Snapshot) -> String {
    let exec = snap
        .execution
        .as_ref()
        .map_or("no execution", |e| e.status.as_str());
    let Some(last) = snap.rounds.last() else {
        return format!("execution {exec} · no round yet");
    };
    let mut s = format!(
        "execution {exec} · round {} {} {}/{}",
        last.round,
        status_name(last.status),
        last.received.len(),
        last.expected_clients.len()
    );
    let latest = snap.rounds.iter().rev().find_map(|r| r.result.as_ref());
    if let Some(res) = latest {
        let m: Vec<String> = res
            .metrics
            .iter()
            .map(|(k, v)| format!("{k}={v:.4}"))
            .collect();
        s += &format!(" · after round {}: {}", res.round, m.join(" "));
    }
    s
}

async fn watch(job_id: &str, sm_arg: Option<String>, interval: u64) -> Result<()> {
    keys::check_id("job id", job_id).map_err(anyhow::Error::msg)?;
    let aws = AwsConfig::from_env().await;
    let sm = need_state_machine(&aws, sm_arg)?;
    let mut view = crate::job_watch::WatchView::new();
    loop {
        let snap = snapshot(&aws, Some(&sm), job_id).await?;
        let progress = snap
            .rounds
            .last()
            .map(|r| crate::job_watch::RoundProgress::of(r, now()));
        view.show(progress.as_ref(), &summary(&snap));
        let Some(exec) = &snap.execution else {
            view.finish();
            bail!("job {job_id} has no execution on {sm} (not started?)");
        };
        if exec.status != "RUNNING" {
            view.finish();
            print!("{}", render_status(job_id, &snap, true, now()));
            if exec.status == "SUCCEEDED" {
                return Ok(());
            }
            bail!(
                "job {job_id}: execution {}{}",
                exec.status,
                exec.error
                    .as_ref()
                    .map(|e| format!(": {e}: {}", exec.cause.as_deref().unwrap_or("")))
                    .unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_secs(interval)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedstep_cloud::records::{ClosedBy, RoundResult};

    const JOB: &str = r#"
job_id = "digits-001"
rounds = 3
clients = ["site-a", "site-b", "site-c"]
min_clients = 2
round_timeout_seconds = 60
initial_model = "init.safetensors"
[round_config]
local_epochs = 2
"#;

    #[test]
    fn execution_arns() {
        assert_eq!(
            execution_arn(
                "arn:aws:states:us-east-1:123:stateMachine:fedstep-federated-training",
                "j1"
            )
            .unwrap(),
            "arn:aws:states:us-east-1:123:execution:fedstep-federated-training:j1"
        );
        assert!(execution_arn("arn:aws:lambda:us-east-1:123:function:x", "j1").is_err());
    }

    #[test]
    fn start_checks_the_job_and_the_model_before_aws() {
        let dir = tempfile::tempdir().unwrap();
        let job = dir.path().join("job.toml");
        std::fs::write(&job, JOB).unwrap();
        let err = prepare_start(&job).unwrap_err();
        assert!(format!("{err:#}").contains("init.safetensors"), "{err:#}");

        std::fs::write(dir.path().join("init.safetensors"), b"not a model").unwrap();
        let err = prepare_start(&job).unwrap_err();
        assert!(format!("{err:#}").contains("initial_model"), "{err:#}");

        let model = fedstep_trainer::init_model(64, 8, 10, 0).unwrap();
        std::fs::write(dir.path().join("init.safetensors"), model).unwrap();
        let p = prepare_start(&job).unwrap();
        let input: serde_json::Value = serde_json::from_str(&p.input).unwrap();
        assert_eq!(input["job_id"], "digits-001");
        assert_eq!(input["round_timeout_seconds"], 60);
        assert_eq!(input["round_config"]["local_epochs"], 2);
        assert!(input.get("initial_model").is_none());
        for reserved in ["round", "result", "next", "final", "error"] {
            assert!(input.get(reserved).is_none(), "{reserved}");
        }

        std::fs::write(
            &job,
            JOB.replace("initial_model = \"init.safetensors\"\n", ""),
        )
        .unwrap();
        let err = prepare_start(&job).unwrap_err();
        assert!(
            err.to_string().contains("initial_model is required"),
            "{err}"
        );
        std::fs::write(&job, JOB.replace("min_clients = 2", "min_clients = 5")).unwrap();
        let err = prepare_start(&job).unwrap_err();
        assert!(err.to_string().contains("min_clients"), "{err}");

        // A secure job: checked first (a contradiction is named), then
        // refused, before any AWS call, since no round can run it yet.
        let secure = format!("{JOB}[secure_aggregation]\n");
        std::fs::write(&job, secure.replace("min_clients = 2", "min_clients = 3")).unwrap();
        let err = prepare_start(&job).unwrap_err();
        assert!(err.to_string().contains("does not run SecAgg+"), "{err}");
        std::fs::write(&job, format!("{secure}neighbours = 1\n")).unwrap();
        let err = prepare_start(&job).unwrap_err();
        assert!(err.to_string().contains("neighbours = 1"), "{err}");
    }

    #[test]
    fn rounds_render_with_reasons() {
        let mut closed = RoundRecord {
            job_id: "j".into(),
            round: 1,
            status: RoundStatus::Closed,
            task_token: None,
            expected_clients: vec!["a".into(), "b".into(), "c".into()],
            min_clients: 2,
            deadline: 100,
            received: ["a".to_string(), "b".to_string()].into(),
            rejections: Default::default(),
            lease_owner: None,
            lease_expires_at: None,
            global_model_key: "jobs/j/rounds/1/global.safetensors".into(),
            global_checksum: "0".repeat(64),
            global_store_checksum: None,
            result: None,
            failure: None,
            buffer: None,
            secure_closed: Vec::new(),
            secure_received: Default::default(),
            secure_awaiting: None,
        };
        closed.result = Some(RoundResult {
            job_id: "j".into(),
            round: 1,
            global_model_key: "jobs/j/rounds/2/global.safetensors".into(),
            metrics: [("accuracy".to_string(), 0.875)].into(),
            continue_training: true,
            closed_by: ClosedBy::Deadline,
            accepted: vec!["a".into()],
            rejected: [(
                "b".to_string(),
                "non-finite value in fc1.weight".to_string(),
            )]
            .into(),
        });
        let mut open = closed.clone();
        open.round = 2;
        open.status = RoundStatus::Open;
        open.result = None;
        open.deadline = 130;
        open.received = ["c".to_string()].into();
        let text = render_rounds(&[closed, open], 100);
        assert!(text.contains("CLOSED"), "{text}");
        assert!(text.contains("2/3"), "{text}");
        assert!(
            text.contains("accuracy=0.8750 (closed by deadline)"),
            "{text}"
        );
        assert!(
            text.contains("rejected b: non-finite value in fc1.weight"),
            "{text}"
        );
        assert!(text.contains("deadline in 30 s"), "{text}");
        assert!(text.contains("waiting for a, b"), "{text}");
    }
}
