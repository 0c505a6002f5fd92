//! `fedstep bench clients`: a federation of N clients on the emulators,
//! measured (issue #20). It deploys its own stack (scripts/local-deploy.sh
//! under a fresh prefix), runs the aggregator's local mode and N clients in
//! this one process, runs one job of R rounds through the state machine,
//! and removes the stack afterwards.
//!
//! Each client is the real client loop ([`fedstep_client::Worker`]: long
//! poll, download and verify the global model, upload, write the row,
//! delete the message) over the real SQS/S3/DynamoDB adapters; only the
//! training is a copy of the global model, so the figures are the
//! protocol's, not a trainer's. The aggregator is the real engine and
//! handlers behind the same pollers `fedstep-lambda local` runs.
//!
//! Wrappers around the ports ([`observed`]) note when rows are written,
//! rounds close and messages arrive (one monotonic clock: one process),
//! and count the aggregator's ledger calls. The figures ([`figures`]):
//! - `round_close_p50_s` / `_p99_s`: a round's last row written → the
//!   round's CLOSED write;
//! - `fanout_p99_s`: CLOSED → a client's long poll returns the next
//!   announcement (next round, or `training_complete`), over every client
//!   and round; the path is SendTaskSuccess → the workflow → StartRound →
//!   SNS → SQS (`workflow_p99_s` is its first part, to the publish
//!   returning; `delivery_p99_s` the second, from the publish to each
//!   client);
//! - `ledger_calls_per_update`: the aggregator's ledger (DynamoDB) calls
//!   made while handling stream records, per record handled (the last
//!   record of a round carries its aggregation);
//! - `lost_updates`: rows written that their round never counted;
//! - `double_aggregations`: CLOSED writes beyond one per round, plus
//!   versions beyond one of any round's output model in the versioned
//!   bucket.
//!
//! The run fails (non-zero exit) when anything is lost or done twice, when
//! a client misses an announcement, when an (honest) update is rejected, or
//! when the execution does not succeed.

pub(crate) mod deploy;
mod figures;
mod observed;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fedstep_aws::{AwsConfig, DynamoLedger, S3Store, SfnCallback, SnsNotifier, SqsQueue};
use fedstep_client::retry::Backoff;
use fedstep_client::{
    RunEnd, TrainError, TrainReport, TrainRequest, Trainer, Worker, WorkerOptions,
};
use fedstep_cloud::ports::{Ledger, ObjectStore, SystemClock};
use fedstep_cloud::{keys, EngineConfig, JobSpec, RoundEngine, DEFAULT_READ_AHEAD_BYTES};
use fedstep_core::Limits;
use fedstep_lambda::emulator_worker::{self, LocalOptions, StreamStart};
use safetensors::Dtype;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::bench::{generate, layout, parse_count};
use deploy::Deployment;
use observed::{
    CountingRoundTasks, LedgerCalls, ObservedLedger, ObservedNotifier, ObservedQueue, Timeline,
};

#[derive(clap::Args)]
pub struct ClientsBench {
    /// Number of clients, each with its own queue.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Rounds of the job.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Parameters of the model (f32; suffixes k, M allowed).
    #[arg(long, default_value = "10k", value_parser = parse_count)]
    params: u64,
    /// Give up on the job after this many seconds.
    #[arg(long, default_value_t = 1200)]
    timeout: u64,
    /// Leave the stack deployed afterwards (its prefix is printed).
    #[arg(long)]
    keep: bool,
    /// Write the figures as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The model "training": the global model, copied. Cheap, so that N
/// clients fit in one process and the figures measure the protocol.
struct CopyTrainer;

impl Trainer for CopyTrainer {
    async fn train(&self, req: TrainRequest) -> Result<TrainReport, TrainError> {
        tokio::fs::copy(&req.global_model, &req.output_model)
            .await
            .map_err(|e| TrainError(format!("copying the global model: {e}")))?;
        Ok(TrainReport {
            num_examples: 100,
            llm_type: None,
            metrics: Default::default(),
        })
    }
}

#[derive(Debug, serde::Serialize)]
struct Report {
    clients: usize,
    rounds: usize,
    round_close_p50_s: f64,
    round_close_p99_s: f64,
    fanout_p50_s: f64,
    fanout_p99_s: f64,
    fanout_missing: usize,
    /// Round closed → next announcement published (the workflow's part).
    workflow_p99_s: f64,
    /// Published → a client holds it (SNS → SQS → long poll).
    delivery_p99_s: f64,
    ledger_calls_per_update: f64,
    stream_records: u64,
    lost_updates: usize,
    double_aggregations: usize,
    rejected_updates: usize,
    execution: String,
    job_seconds: f64,
}

pub fn run(b: ClientsBench) -> Result<()> {
    if b.clients < 2 || b.rounds == 0 {
        bail!("--clients must be at least 2 and --rounds at least 1");
    }
    let dir = tempfile::tempdir()?;
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let prefix = format!("bc{unix}-{}", std::process::id());
    let ids: Vec<String> = (0..b.clients).map(|i| format!("bench-{i:04}")).collect();
    let t0 = Instant::now();
    let deployment = Deployment::create(&prefix, &ids, dir.path())?;
    eprintln!(
        "bench clients: deployed {} clients under prefix {prefix} in {:.1}s",
        ids.len(),
        t0.elapsed().as_secs_f64()
    );
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let measured = rt.block_on(measure(&b, &deployment, dir.path()));
    if b.keep {
        eprintln!("bench clients: kept the stack: scripts/local-deploy.sh --prefix {prefix} --delete removes it");
    } else if let Err(e) = deployment.delete(dir.path()) {
        eprintln!("bench clients: removing the stack {prefix}: {e:#}");
    }
    let report = measured?;
    print(&report);
    if let Some(path) = &b.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    let mut wrong = Vec::new();
    if report.lost_updates > 0 {
        wrong.push(format!("{} updates lost", report.lost_updates));
    }
    if report.double_aggregations > 0 {
        wrong.push(format!(
            "{} double aggregations",
            report.double_aggregations
        ));
    }
    if report.fanout_missing > 0 {
        wrong.push(format!(
            "{} announcements never arrived",
            report.fanout_missing
        ));
    }
    if report.rejected_updates > 0 {
        wrong.push(format!(
            "{} honest updates rejected",
            report.rejected_updates
        ));
    }
    if report.execution != "SUCCEEDED" || report.rounds != b.rounds as usize {
        wrong.push(format!(
            "the execution is {} after {} of {} rounds",
            report.execution, report.rounds, b.rounds
        ));
    }
    if !wrong.is_empty() {
        bail!("bench clients: {}", wrong.join("; "));
    }
    Ok(())
}

fn print(r: &Report) {
    println!("clients: {}", r.clients);
    println!("rounds: {}", r.rounds);
    println!("round_close_p50_s: {:.3}", r.round_close_p50_s);
    println!("round_close_p99_s: {:.3}", r.round_close_p99_s);
    println!("fanout_p50_s: {:.3}", r.fanout_p50_s);
    println!("fanout_p99_s: {:.3}", r.fanout_p99_s);
    println!("workflow_p99_s: {:.3}", r.workflow_p99_s);
    println!("delivery_p99_s: {:.3}", r.delivery_p99_s);
    println!("ledger_calls_per_update: {:.2}", r.ledger_calls_per_update);
    println!("stream_records: {}", r.stream_records);
    println!("lost_updates: {}", r.lost_updates);
    println!("double_aggregations: {}", r.double_aggregations);
    println!("rejected_updates: {}", r.rejected_updates);
    println!("execution: {}", r.execution);
    println!("job_seconds: {:.1}", r.job_seconds);
}

fn need(v: &Option<String>, what: &str) -> Result<String> {
    v.clone()
        .ok_or_else(|| anyhow!("the deployment has no {what}"))
}

async fn measure(b: &ClientsBench, d: &Deployment, dir: &Path) -> Result<Report> {
    let sdk = fedstep_aws::sdk_defaults().load().await;
    let cfg = AwsConfig::new(sdk, d.settings.clone());
    let bucket = need(&cfg.settings.bucket, "bucket")?;
    let updates_table = need(&cfg.settings.updates_table, "updates table")?;
    let state_machine = need(&cfg.settings.state_machine_arn, "state machine")?;
    let timeline = Timeline::new();
    let job = JobSpec {
        job_id: format!("{}-job", d.prefix),
        rounds: b.rounds,
        clients: d.clients.clone(),
        min_clients: d.clients.len() as u32,
        // Generous: every client is honest, so rounds close on the stream.
        round_timeout_seconds: b.timeout,
        initial_model: None,
        stop: None,
        aggregation: Default::default(),
        round_config: Default::default(),
        sharding: Default::default(),
        mode: Default::default(),
        asynchronous: None,
        secure_aggregation: None,
    }
    .check()
    .map_err(|e| anyhow!("the bench's job: {e}"))?;

    let model = dir.join("init.safetensors");
    generate(&model, &layout(b.params, Dtype::F32), 0)?;
    S3Store::from_config(&cfg)?
        .put_file(&keys::global_model(&job.job_id, 1), &model)
        .await?;

    // The aggregator: the real engine behind the local-mode pollers.
    let calls = Arc::new(LedgerCalls::default());
    let engine = RoundEngine::new(
        S3Store::from_config(&cfg)?,
        ObservedLedger::new(
            DynamoLedger::from_config(&cfg)?,
            Arc::clone(&timeline),
            Arc::clone(&calls),
        ),
        ObservedNotifier::new(SnsNotifier::from_config(&cfg)?, Arc::clone(&timeline)),
        SfnCallback::from_config(&cfg),
        SystemClock,
        EngineConfig {
            read_ahead_bytes: DEFAULT_READ_AHEAD_BYTES,
            owner: format!("bench-clients:{}", std::process::id()),
            lease_seconds: 960,
        },
    );
    let aggregator = Arc::new(CountingRoundTasks::new(engine));
    let (stop_tx, stop_rx) = watch::channel(false);
    let aggregator_task = tokio::spawn({
        let (aggregator, cfg, stop) = (Arc::clone(&aggregator), cfg.clone(), stop_rx.clone());
        async move {
            let opts = LocalOptions {
                stream_start: StreamStart::TrimHorizon,
                worker_name: "bench".into(),
                idle_poll: Duration::from_millis(100),
            };
            emulator_worker::run(aggregator, &cfg, opts, stop).await
        }
    });

    // The clients: one worker each, sharing the SDK clients.
    let (sqs, s3, dynamodb) = (cfg.sqs(), cfg.s3(), cfg.dynamodb());
    let mut clients = JoinSet::new();
    for (id, url) in &d.queue_urls {
        let workdir = dir.join("clients").join(id);
        std::fs::create_dir_all(&workdir)?;
        let opts = WorkerOptions {
            client_id: id.clone(),
            jobs: Some(vec![job.job_id.clone()]),
            visibility_timeout_seconds: 120,
            heartbeat_every: Duration::from_secs(40),
            wait_seconds: 20,
            exit_on_complete: true,
            workdir,
            limits: Limits::default(),
            backoff: Backoff::default(),
            failure_retry_seconds: 5,
            personalization: None,
        };
        let worker = Worker::new(
            opts,
            Arc::new(ObservedQueue::new(
                SqsQueue::new(sqs.clone(), url),
                id.clone(),
                Arc::clone(&timeline),
            )),
            Arc::new(S3Store::new(s3.clone(), &bucket)),
            Arc::new(ObservedLedger::new(
                DynamoLedger::new(dynamodb.clone(), "", &updates_table),
                Arc::clone(&timeline),
                Arc::new(LedgerCalls::default()),
            )),
            Arc::new(CopyTrainer),
        );
        let stop = stop_rx.clone();
        clients.spawn(async move { worker.run(stop).await });
    }

    let started = Instant::now();
    let input = serde_json::to_string(&job)?;
    cfg.sfn()
        .start_execution()
        .state_machine_arn(&state_machine)
        .name(&job.job_id)
        .input(input)
        .send()
        .await
        .map_err(|e| {
            anyhow!(
                "StartExecution: {}",
                fedstep_aws::sdk_error("StartExecution", e)
            )
        })?;
    eprintln!("bench clients: job {} started", job.job_id);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(b.timeout);
    let mut completed = 0usize;
    loop {
        tokio::select! {
            next = clients.join_next() => match next {
                None => break,
                Some(Ok(Ok(RunEnd::JobComplete(_)))) => completed += 1,
                Some(other) => eprintln!("bench clients: a client ended early: {other:?}"),
            },
            _ = tokio::time::sleep_until(deadline) => {
                eprintln!("bench clients: timed out after {} s with {completed} clients done", b.timeout);
                break;
            }
        }
    }
    let job_seconds = started.elapsed().as_secs_f64();
    let execution = execution_status(&cfg, &state_machine, &job.job_id).await?;
    let _ = stop_tx.send(true);
    clients.shutdown().await;
    match aggregator_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("bench clients: the aggregator's pollers: {e}"),
        Err(e) => eprintln!("bench clients: the aggregator panicked: {e}"),
    }

    let rounds = DynamoLedger::from_config(&cfg)?
        .list_rounds(&job.job_id)
        .await?;
    let mut extra_versions = 0;
    for r in &rounds {
        if let Some(result) = &r.result {
            extra_versions += versions(&s3, &bucket, &result.global_model_key)
                .await?
                .saturating_sub(1);
        }
    }
    let events = timeline.events();
    let close = figures::round_close_seconds(&events);
    let (fanout, fanout_missing) = figures::fanout_seconds(&events, &d.clients);
    let (workflow, delivery) = figures::fanout_parts(&events);
    let records = aggregator.records.load(Ordering::Relaxed);
    let pct = |v: &[f64], p| figures::percentile(v, p).unwrap_or(f64::NAN);
    Ok(Report {
        clients: d.clients.len(),
        rounds: rounds.iter().filter(|r| r.result.is_some()).count(),
        round_close_p50_s: pct(&close, 50.0),
        round_close_p99_s: pct(&close, 99.0),
        fanout_p50_s: pct(&fanout, 50.0),
        fanout_p99_s: pct(&fanout, 99.0),
        fanout_missing,
        workflow_p99_s: pct(&workflow, 99.0),
        delivery_p99_s: pct(&delivery, 99.0),
        ledger_calls_per_update: calls.for_updates.load(Ordering::Relaxed) as f64
            / records.max(1) as f64,
        stream_records: records,
        lost_updates: figures::lost_updates(&events, &rounds),
        double_aggregations: figures::extra_closes(&events) + extra_versions,
        rejected_updates: rounds.iter().map(|r| r.rejections.len()).sum(),
        execution,
        job_seconds,
    })
}

/// The execution's status, waiting up to a minute for it to end (the last
/// client hears `training_complete` before Finalize has returned).
async fn execution_status(cfg: &AwsConfig, state_machine: &str, job_id: &str) -> Result<String> {
    let until = Instant::now() + Duration::from_secs(60);
    let out = deploy::execution_when_done(cfg, state_machine, job_id, until).await?;
    Ok(out.status().as_str().to_string())
}

/// How many versions of `key` the versioned bucket holds.
async fn versions(s3: &fedstep_aws::aws_sdk_s3::Client, bucket: &str, key: &str) -> Result<usize> {
    let out = s3
        .list_object_versions()
        .bucket(bucket)
        .prefix(key)
        .send()
        .await
        .map_err(|e| {
            anyhow!(
                "ListObjectVersions {key}: {}",
                fedstep_aws::sdk_error("ListObjectVersions", e)
            )
        })?;
    Ok(out
        .versions()
        .iter()
        .filter(|v| v.key() == Some(key))
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_trainer_hands_back_the_global_model() {
        let dir = tempfile::tempdir().unwrap();
        let global = dir.path().join("g.safetensors");
        std::fs::write(&global, b"model bytes").unwrap();
        let req = TrainRequest {
            job_id: "j".into(),
            round: 1,
            global_model: global,
            output_model: dir.path().join("out.safetensors"),
            metrics_out: dir.path().join("m.json"),
            round_config: serde_json::Map::new(),
            scaffold: None,
        };
        let out = req.output_model.clone();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let report = rt.block_on(CopyTrainer.train(req)).unwrap();
        assert_eq!(report.num_examples, 100);
        assert_eq!(std::fs::read(out).unwrap(), b"model bytes");
    }
}
