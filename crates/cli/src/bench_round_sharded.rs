//! `fedstep bench round --mode sharded`: the round's aggregation cut into
//! K shards, as the workflow's shard tasks will run it: a plan step (the
//! inputs' headers, the decision, one upload in parts for the next global
//! model), then K shard workers at once, each its own process (a Lambda of
//! the Map), each reading only its stripes of every input and uploading its
//! own parts, then the commit (the upload completed from every shard's
//! receipts). FedAvg needs no statistics pass, so there is no statistics
//! map here.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use fedstep_aws::{S3Parts, S3Store};
use fedstep_cloud::ports::ObjectReader;
use fedstep_cloud::ports::{PartReceipt, UploadParts};
use fedstep_core::aggregate::{prepare, Decision, Sharding};
use fedstep_core::shard::{PartDest, MIN_PART_BYTES};
use fedstep_core::UpdateSource;
use fedstep_core::{AggregationRequest, FileTarget, Input, OutputTarget, PipelineConfig};

use crate::bench_round::{open_inputs, out_key, update_sources, RoundMode, RoundWorker};

/// What the sharded round measured.
pub(crate) struct ShardedFigures {
    pub aggregate_s: f64,
    /// The largest peak RSS of any shard worker.
    pub peak_rss: u64,
    /// Bytes all shard workers wrote to local disk.
    pub disk_bytes: u64,
    /// Shards the plan made (at most the requested number).
    pub shards: usize,
    /// The largest share of the round's reads any one shard did (1/K at
    /// best).
    pub max_read_share: f64,
}

/// Plan, K shard workers at once, commit.
pub(crate) fn run(
    rt: &tokio::runtime::Runtime,
    store: &S3Store,
    prefix: &str,
    clients: usize,
    shards: usize,
    dir: &Path,
) -> Result<ShardedFigures> {
    let start = Instant::now();
    let key = out_key(prefix, RoundMode::Sharded);
    let decision_path = dir.join("decision.json");
    let shards = rt.block_on(plan(store, prefix, clients, shards, &decision_path))?;
    let upload_id = rt.block_on(store.start_upload(&key))?;
    let children: Vec<Child> = (0..shards)
        .map(|shard| {
            spawn_worker(
                store.bucket(),
                prefix,
                clients,
                shard,
                shards,
                &upload_id,
                &decision_path,
            )
        })
        .collect::<Result<_>>()?;
    let mut receipts: Vec<PartReceipt> = Vec::new();
    let (mut peak_rss, mut disk_bytes, mut reads) = (0u64, 0u64, Vec::new());
    for child in children {
        let (out, rss) = crate::bench_round::wait_worker(child, RoundMode::Sharded)?;
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).with_context(|| format!("worker output: {out}"))?;
        peak_rss = peak_rss.max(rss);
        disk_bytes += v["disk_bytes"].as_u64().context("disk_bytes")?;
        reads.push(v["bytes_read"].as_u64().context("bytes_read")?);
        receipts.extend(serde_json::from_value::<Vec<PartReceipt>>(
            v["receipts"].clone(),
        )?);
    }
    rt.block_on(store.complete_parts(&key, &upload_id, receipts))?;
    let total: u64 = reads.iter().sum();
    Ok(ShardedFigures {
        aggregate_s: start.elapsed().as_secs_f64(),
        peak_rss,
        disk_bytes,
        shards,
        max_read_share: reads.iter().copied().max().unwrap_or(0) as f64 / total.max(1) as f64,
    })
}

/// The plan step: headers read, the round decided; returns the shards.
async fn plan(
    store: &S3Store,
    prefix: &str,
    clients: usize,
    shards: usize,
    decision_path: &Path,
) -> Result<usize> {
    let (global, readers) = open_inputs(store, prefix, clients).await?;
    let decision_path = decision_path.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<usize> {
        let updates = update_sources(&readers);
        let config = PipelineConfig::default();
        // Never written: the plan only reads headers and decides.
        let unused = FileTarget::new(decision_path.with_extension("unused"));
        let req = request(&updates, &global, &config, &unused);
        let attempt = prepare(&req, sharding(shards), &Default::default())?;
        let decision = attempt.decide(&[]).map_err(step_error)?;
        std::fs::write(&decision_path, serde_json::to_vec(&decision)?)?;
        Ok(attempt.shards().len())
    })
    .await?
}

fn sharding(shards: usize) -> Sharding {
    Sharding {
        shards,
        min_shard_bytes: MIN_PART_BYTES,
    }
}

fn request<'a>(
    updates: &'a [UpdateSource],
    global: &Arc<dyn ObjectReader>,
    config: &'a PipelineConfig,
    out: &'a dyn OutputTarget,
) -> AggregationRequest<'a> {
    AggregationRequest {
        updates,
        global: Some(Input::new(global.clone())),
        config,
        out,
        state_in: None,
        state_out: None,
        round: 1,
    }
}

fn step_error(e: fedstep_core::aggregate::StepError) -> anyhow::Error {
    match e {
        fedstep_core::aggregate::StepError::Reject { input, reason } => {
            anyhow::anyhow!("update {input} rejected: {reason}")
        }
        fedstep_core::aggregate::StepError::Fatal(e) => e.into(),
    }
}

fn spawn_worker(
    bucket: &str,
    prefix: &str,
    clients: usize,
    shard: usize,
    shards: usize,
    upload_id: &str,
    decision: &Path,
) -> Result<Child> {
    let exe = std::env::current_exe().context("finding the fedstep binary")?;
    Command::new(exe)
        .args([
            "bench",
            "round-worker",
            "--bucket",
            bucket,
            "--prefix",
            prefix,
        ])
        .args(["--clients", &clients.to_string(), "--mode", "sharded"])
        .args([
            "--shard",
            &shard.to_string(),
            "--shards",
            &shards.to_string(),
        ])
        .args(["--upload-id", upload_id])
        .arg("--decision")
        .arg(decision)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting a shard worker")
}

/// One shard worker: its combine pass, its parts uploaded; prints its
/// reads and its parts' receipts.
pub(crate) async fn worker(store: &S3Store, w: &RoundWorker) -> Result<serde_json::Value> {
    let (Some(shard), Some(upload_id), Some(decision)) = (w.shard, &w.upload_id, &w.decision)
    else {
        bail!("a sharded worker needs --shard, --upload-id and --decision");
    };
    let decision: Decision = serde_json::from_slice(&std::fs::read(decision)?)?;
    let (global, readers) = open_inputs(store, &w.prefix, w.clients).await?;
    let key = out_key(&w.prefix, RoundMode::Sharded);
    let parts: Arc<S3Parts> = Arc::new(store.part_writer(&key, upload_id)?);
    let shards = w.shards;
    let dest = parts.clone();
    let bytes_read = tokio::task::spawn_blocking(move || -> Result<u64> {
        let updates = update_sources(&readers);
        let config = PipelineConfig::default();
        let unused = FileTarget::new("/nonexistent/fedstep-unused");
        let req = request(&updates, &global, &config, &unused);
        let attempt = prepare(&req, sharding(shards), &Default::default())?;
        let outputs = attempt.outputs(&decision)?;
        let done = attempt
            .combine_shard(&decision, &outputs, shard, PartDest::Whole(dest), None)
            .map_err(step_error)?;
        Ok(done.bytes_read)
    })
    .await??;
    Ok(serde_json::json!({"bytes_read": bytes_read, "receipts": parts.receipts()}))
}
