//! `fedstep bench round`: one round's aggregation against S3 (the running
//! emulators, or an account), as the aggregator does it, in one run beside
//! the time to GET every input once. The aggregation runs in a child
//! process (`fedstep bench round-worker`) so its peak RSS and the bytes it
//! wrote to local disk are its own.
//!
//! Three modes, measured the same way:
//! - `streamed` — what the engine does now: HEAD every input, read them in
//!   place with ranged, pinned, read-ahead GETs, write the global model as
//!   a multipart upload while it is produced, verify each input's SHA-256;
//! - `staged` — what it did before: download every input to a scratch
//!   directory one after another, aggregate the files, upload the result;
//! - `sharded` — the aggregation cut into `--shards` shards, each its own
//!   worker process writing its own parts of one upload
//!   (`bench_round_sharded.rs`);
//! - `deployed` — the whole path users deploy: its own stack on the
//!   emulators, `--workers` aggregator workers serving the workflow's
//!   plan, shard and commit tasks, the round handed over by the stream
//!   (`bench_round_deployed.rs`). It runs alone.
//!
//! Only ratios within one run mean something: the machine is shared.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use fedstep_aws::{aws_sdk_s3, AwsConfig, S3Store};
use fedstep_cloud::ports::{ObjectReader, ObjectStore, StreamingStore};
use fedstep_core::{AggregationRequest, FileTarget, Input, OutputTarget, PipelineConfig};
use fedstep_core::{UpdateMeta, UpdateSource};

use crate::bench::{generate, layout, parse_count, BenchDtype};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
pub enum RoundMode {
    Streamed,
    Staged,
    /// Cut into shards, each its own worker process (`--shards`).
    Sharded,
    /// Through a stack of its own, its workflow and `--workers` workers.
    Deployed,
}

#[derive(clap::Args)]
pub struct RoundBench {
    /// Number of client updates.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Parameters per model (suffixes k, M, G allowed: 25M).
    #[arg(long, default_value = "25M", value_parser = parse_count)]
    params: u64,
    #[arg(long, value_enum, default_value_t = BenchDtype::F32)]
    dtype: BenchDtype,
    /// Which aggregation to measure (repeat for both).
    #[arg(long, value_enum, default_values_t = [RoundMode::Streamed, RoundMode::Staged, RoundMode::Sharded])]
    mode: Vec<RoundMode>,
    /// Shards of the sharded and deployed modes (fewer when a shard would
    /// hold less than the 5 MiB of an upload part).
    #[arg(long, default_value_t = 4)]
    shards: usize,
    /// Deployed mode: aggregator workers (`fedstep-lambda local`) serving
    /// the workflow's tasks side by side.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Deployed mode: give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Write the figures as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The child: one aggregation of the bench's objects.
#[derive(clap::Args)]
pub struct RoundWorker {
    #[arg(long)]
    bucket: String,
    #[arg(long)]
    pub(crate) prefix: String,
    #[arg(long)]
    pub(crate) clients: usize,
    #[arg(long, value_enum)]
    mode: RoundMode,
    /// Sharded mode: this worker's shard, out of `--shards`.
    #[arg(long)]
    pub(crate) shard: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub(crate) shards: usize,
    /// Sharded mode: the upload in parts of the next global model.
    #[arg(long)]
    pub(crate) upload_id: Option<String>,
    /// Sharded mode: the plan's decision (JSON).
    #[arg(long)]
    pub(crate) decision: Option<PathBuf>,
}

fn update_key(prefix: &str, i: usize) -> String {
    format!("{prefix}/updates/c{i:03}.safetensors")
}
fn global_key(prefix: &str) -> String {
    format!("{prefix}/global.safetensors")
}
pub(crate) fn out_key(prefix: &str, mode: RoundMode) -> String {
    format!("{prefix}/next-{mode:?}.safetensors").to_lowercase()
}
fn num_examples(i: usize) -> u64 {
    100 + i as u64
}

async fn s3_config() -> AwsConfig {
    let mut cfg = AwsConfig::from_env().await;
    // The emulators serve buckets by path, not by host name.
    if std::env::var_os("AWS_ENDPOINT_URL").is_some() {
        cfg.settings.s3_force_path_style = true;
    }
    cfg
}

pub fn run(b: RoundBench) -> Result<()> {
    if b.clients == 0 {
        bail!("--clients must be at least 1");
    }
    if b.mode.contains(&RoundMode::Deployed) {
        if b.mode.len() > 1 {
            bail!("--mode deployed runs alone: it deploys a stack of its own");
        }
        return deployed(&b);
    }
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let dir = tempfile::tempdir()?;
    let cfg = rt.block_on(s3_config());
    let s3 = cfg.s3();
    let bucket = format!("fedstep-bench-{}-{}", std::process::id(), unix_now());
    rt.block_on(create_bucket(&s3, &bucket))?;
    let result = measure(&rt, &b, &cfg, &bucket, dir.path());
    if let Err(e) = rt.block_on(delete_bucket(&s3, &bucket)) {
        eprintln!("bench round: removing bucket {bucket}: {e:#}");
    }
    result
}

fn measure(
    rt: &tokio::runtime::Runtime,
    b: &RoundBench,
    cfg: &AwsConfig,
    bucket: &str,
    dir: &Path,
) -> Result<()> {
    let dtype = b.dtype.dtype();
    let specs = layout(b.params, dtype);
    let prefix = "jobs/bench/rounds/1";
    let store = S3Store::new(cfg.s3(), bucket);
    let t0 = Instant::now();
    let mut files = Vec::new();
    let global = dir.join("global.safetensors");
    generate(&global, &specs, 0)?;
    rt.block_on(store.put_file(&global_key(prefix), &global))?;
    for i in 0..b.clients {
        let p = dir.join(format!("c{i:03}.safetensors"));
        generate(&p, &specs, i as u64 + 1)?;
        rt.block_on(store.put_file(&update_key(prefix, i), &p))?;
        files.push(p);
    }
    let model_bytes = std::fs::metadata(&global)?.len();
    let input_bytes = model_bytes * (b.clients as u64 + 1);
    eprintln!(
        "bench round: {} inputs of {} uploaded in {:.1} s",
        b.clients + 1,
        crate::aggregate_cmd::human_bytes(model_bytes),
        t0.elapsed().as_secs_f64()
    );

    // The floor: every input (updates and the global model) GET once,
    // all at once, bodies drained and dropped.
    let mut keys: Vec<String> = (0..b.clients).map(|i| update_key(prefix, i)).collect();
    keys.push(global_key(prefix));
    let read_floor = rt.block_on(read_all_once(&cfg.s3(), bucket, &keys))?;

    // What `fedstep aggregate` computes from the same files.
    let expected = dir.join("expected.safetensors");
    let updates: Vec<UpdateSource> = files
        .iter()
        .enumerate()
        .map(|(i, p)| UpdateSource::file(p, UpdateMeta::new(format!("c{i:03}"), num_examples(i))))
        .collect();
    fedstep_core::aggregate(&AggregationRequest {
        updates: &updates,
        global: Some(Input::file(&global)),
        config: &PipelineConfig::default(),
        out: &FileTarget::new(&expected),
        state_in: None,
        state_out: None,
        round: 1,
    })?;
    let expected = std::fs::read(&expected)?;

    println!("clients: {}", b.clients);
    println!("params: {}", b.params);
    println!("dtype: {:?}", dtype);
    println!("input_bytes: {input_bytes}");
    println!("read_floor_s: {read_floor:.3}");
    let mut json = serde_json::json!({
        "clients": b.clients, "params": b.params, "dtype": format!("{dtype:?}"),
        "input_bytes": input_bytes, "read_floor_s": read_floor,
    });
    for &mode in &b.mode {
        let mut sharded = None;
        let child = if mode == RoundMode::Sharded {
            let f = crate::bench_round_sharded::run(rt, &store, prefix, b.clients, b.shards, dir)?;
            let child = ChildFigures {
                aggregate_s: f.aggregate_s,
                peak_rss: f.peak_rss,
                disk_bytes: f.disk_bytes,
            };
            sharded = Some(f);
            child
        } else {
            worker_child(bucket, prefix, b.clients, mode)?
        };
        let dst = dir.join("committed.safetensors");
        rt.block_on(store.get_file(&out_key(prefix, mode), &dst))?;
        let identical = std::fs::read(&dst)? == expected;
        let tag = format!("{mode:?}").to_lowercase();
        let ratio = child.aggregate_s / read_floor;
        println!("{tag}.aggregate_s: {:.3}", child.aggregate_s);
        println!("{tag}.ratio: {ratio:.2}");
        println!("{tag}.peak_rss_mb: {:.1}", child.peak_rss as f64 / 1e6);
        println!("{tag}.local_disk_bytes: {}", child.disk_bytes);
        println!("{tag}.identical: {identical}");
        json[&tag] = serde_json::json!({
            "aggregate_s": child.aggregate_s, "ratio": ratio,
            "peak_rss_bytes": child.peak_rss, "local_disk_bytes": child.disk_bytes,
            "identical": identical,
        });
        if let Some(f) = sharded {
            println!("{tag}.shards: {}", f.shards);
            println!("{tag}.max_read_share: {:.3}", f.max_read_share);
            json[&tag]["shards"] = f.shards.into();
            json[&tag]["max_read_share"] = f.max_read_share.into();
        }
    }
    if let Some(p) = &b.json {
        std::fs::write(p, serde_json::to_vec_pretty(&json)?)?;
    }
    Ok(())
}

fn deployed(b: &RoundBench) -> Result<()> {
    let dtype = b.dtype.dtype();
    let f = crate::bench_round_deployed::run(&crate::bench_round_deployed::DeployedRound {
        clients: b.clients,
        params: b.params,
        dtype,
        shards: b.shards,
        workers: b.workers,
        timeout: std::time::Duration::from_secs(b.timeout),
    })?;
    let ratio = f.aggregate_s / f.read_floor_s;
    println!("clients: {}", b.clients);
    println!("params: {}", b.params);
    println!("dtype: {dtype:?}");
    println!("read_floor_s: {:.3}", f.read_floor_s);
    println!("deployed.workers: {}", b.workers);
    println!("deployed.shards: {}", f.shards);
    println!("deployed.max_read_share: {:.3}", f.max_read_share);
    println!("deployed.aggregate_s: {:.3}", f.aggregate_s);
    println!("deployed.ratio: {ratio:.2}");
    println!("deployed.row_to_closed_s: {:.3}", f.row_to_closed_s);
    println!("deployed.peak_rss_mb: {:.1}", f.peak_rss as f64 / 1e6);
    println!("deployed.local_disk_bytes: {}", f.disk_bytes);
    println!("deployed.identical: {}", f.identical);
    if let Some(p) = &b.json {
        let json = serde_json::json!({
            "clients": b.clients, "params": b.params, "dtype": format!("{dtype:?}"),
            "read_floor_s": f.read_floor_s,
            "deployed": {
                "workers": b.workers, "shards": f.shards, "max_read_share": f.max_read_share,
                "aggregate_s": f.aggregate_s,
                "ratio": ratio, "row_to_closed_s": f.row_to_closed_s,
                "peak_rss_bytes": f.peak_rss, "local_disk_bytes": f.disk_bytes,
                "identical": f.identical,
            },
        });
        std::fs::write(p, serde_json::to_vec_pretty(&json)?)?;
    }
    if !f.identical {
        bail!("bench round: the committed model differs from what `fedstep aggregate` computes");
    }
    Ok(())
}

struct ChildFigures {
    aggregate_s: f64,
    peak_rss: u64,
    disk_bytes: u64,
}

/// Runs `fedstep bench round-worker` and reads its figures: its own
/// timing and disk writes on stdout, its peak RSS from wait4.
fn worker_child(
    bucket: &str,
    prefix: &str,
    clients: usize,
    mode: RoundMode,
) -> Result<ChildFigures> {
    let exe = std::env::current_exe().context("finding the fedstep binary")?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "bench",
        "round-worker",
        "--bucket",
        bucket,
        "--prefix",
        prefix,
    ])
    .args(["--clients", &clients.to_string()])
    .args(["--mode", &format!("{mode:?}").to_lowercase()])
    .stdout(Stdio::piped());
    let child = cmd.spawn().context("starting the round worker")?;
    let (out, peak_rss) = wait_worker(child, mode)?;
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("worker output: {out}"))?;
    Ok(ChildFigures {
        aggregate_s: v["aggregate_s"].as_f64().context("aggregate_s")?,
        disk_bytes: v["disk_bytes"].as_u64().context("disk_bytes")?,
        peak_rss,
    })
}

/// Waits for a worker: its stdout, and its peak RSS from wait4.
#[allow(unsafe_code)] // libc::wait4: the worker's peak RSS
pub(crate) fn wait_worker(
    mut child: std::process::Child,
    mode: RoundMode,
) -> Result<(String, u64)> {
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().expect("piped"), &mut out)?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in; we wait on our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals of the right types.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("the {mode:?} round worker failed (status {status})");
    }
    // ru_maxrss is in kilobytes on Linux.
    Ok((out, usage.ru_maxrss as u64 * 1024))
}

pub fn worker(w: RoundWorker) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cfg = rt.block_on(s3_config());
    let store = S3Store::new(cfg.s3(), &w.bucket);
    let disk_before = disk_write_bytes()?;
    let start = Instant::now();
    let mut figures = match w.mode {
        RoundMode::Streamed => rt
            .block_on(streamed(&store, &w))
            .map(|()| serde_json::json!({}))?,
        RoundMode::Staged => rt
            .block_on(staged(&store, &w))
            .map(|()| serde_json::json!({}))?,
        RoundMode::Sharded => rt.block_on(crate::bench_round_sharded::worker(&store, &w))?,
        RoundMode::Deployed => bail!("the deployed mode's workers are fedstep-lambda's"),
    };
    figures["aggregate_s"] = start.elapsed().as_secs_f64().into();
    figures["disk_bytes"] = (disk_write_bytes()? - disk_before).into();
    println!("{figures}");
    Ok(())
}

/// The round's inputs in place on S3: the global model and every update,
/// stat'ed and opened for pinned, read-ahead reads.
pub(crate) async fn open_inputs(
    store: &S3Store,
    prefix: &str,
    clients: usize,
) -> Result<(Arc<dyn ObjectReader>, Vec<Arc<dyn ObjectReader>>)> {
    let budget = fedstep_cloud::DEFAULT_READ_AHEAD_BYTES / (clients as u64 + 2);
    let open = |key: String| async move {
        let stat = store
            .stat(&key)
            .await?
            .with_context(|| format!("no `{key}`"))?;
        anyhow::Ok(store.reader(&key, &stat, budget)?)
    };
    let global = open(global_key(prefix)).await?;
    let mut readers = Vec::new();
    for i in 0..clients {
        readers.push(open(update_key(prefix, i)).await?);
    }
    Ok((global, readers))
}

/// The updates the bench's clients would have sent, read through `readers`.
pub(crate) fn update_sources(readers: &[Arc<dyn ObjectReader>]) -> Vec<UpdateSource> {
    readers
        .iter()
        .enumerate()
        .map(|(i, r)| UpdateSource {
            input: Input::new(r.clone()),
            meta: UpdateMeta::new(format!("c{i:03}"), num_examples(i)),
        })
        .collect()
}

/// What the engine does (`crates/cloud/src/engine/aggregation.rs`), minus
/// the ledger: stat, pinned readers, a streamed output, hashes checked.
async fn streamed(store: &S3Store, w: &RoundWorker) -> Result<()> {
    let (global, readers) = open_inputs(store, &w.prefix, w.clients).await?;
    let out = store.writer(&out_key(&w.prefix, RoundMode::Streamed))?;
    let (o, g, rs) = (out.clone(), global.clone(), readers.clone());
    tokio::task::spawn_blocking(move || -> Result<()> {
        let updates = update_sources(&rs);
        let target: &dyn OutputTarget = o.as_ref();
        fedstep_core::aggregate(&AggregationRequest {
            updates: &updates,
            global: Some(Input::new(g.clone())),
            config: &PipelineConfig::default(),
            out: target,
            state_in: None,
            state_out: None,
            round: 1,
        })?;
        g.sha256()?;
        for r in &rs {
            r.sha256()?;
        }
        o.commit()?.context("the output was not finished")?;
        Ok(())
    })
    .await??;
    Ok(())
}

/// What the engine did before: every input downloaded, one after another,
/// to a scratch directory; the files aggregated; the result uploaded.
async fn staged(store: &S3Store, w: &RoundWorker) -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let global = scratch.path().join("global.safetensors");
    store.get_file(&global_key(&w.prefix), &global).await?;
    let mut updates = Vec::new();
    for i in 0..w.clients {
        let p = scratch.path().join(format!("c{i:03}.safetensors"));
        store.get_file(&update_key(&w.prefix, i), &p).await?;
        updates.push(UpdateSource::file(
            p,
            UpdateMeta::new(format!("c{i:03}"), num_examples(i)),
        ));
    }
    let out = scratch.path().join("next.safetensors");
    let (g, o) = (global.clone(), out.clone());
    tokio::task::spawn_blocking(move || {
        fedstep_core::aggregate(&AggregationRequest {
            updates: &updates,
            global: Some(Input::file(&g)),
            config: &PipelineConfig::default(),
            out: &FileTarget::new(&o),
            state_in: None,
            state_out: None,
            round: 1,
        })
    })
    .await??;
    store
        .put_file(&out_key(&w.prefix, RoundMode::Staged), &out)
        .await?;
    Ok(())
}

/// Bytes this process caused to be written to storage (Linux
/// /proc/self/io `write_bytes`: page-cache writes count when dirtied).
fn disk_write_bytes() -> Result<u64> {
    let io = std::fs::read_to_string("/proc/self/io").context("reading /proc/self/io")?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no write_bytes in /proc/self/io")
}

pub(crate) async fn read_all_once(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    keys: &[String],
) -> Result<f64> {
    let start = Instant::now();
    let mut jobs = Vec::new();
    for key in keys {
        let req = s3.get_object().bucket(bucket).key(key);
        jobs.push(tokio::spawn(async move {
            let out = req.send().await?;
            let mut body = out.body;
            let mut n = 0u64;
            while let Some(chunk) = body.try_next().await? {
                n += chunk.len() as u64;
            }
            anyhow::Ok(n)
        }));
    }
    for j in jobs {
        j.await??;
    }
    Ok(start.elapsed().as_secs_f64())
}

async fn create_bucket(s3: &aws_sdk_s3::Client, bucket: &str) -> Result<()> {
    s3.create_bucket().bucket(bucket).send().await?;
    // Versioned like the deployed bucket: reads are pinned to versions.
    s3.put_bucket_versioning()
        .bucket(bucket)
        .versioning_configuration(
            aws_sdk_s3::types::VersioningConfiguration::builder()
                .status(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await?;
    Ok(())
}

async fn delete_bucket(s3: &aws_sdk_s3::Client, bucket: &str) -> Result<()> {
    let versions = s3.list_object_versions().bucket(bucket).send().await?;
    for v in versions.versions() {
        s3.delete_object()
            .bucket(bucket)
            .key(v.key().unwrap_or_default())
            .set_version_id(v.version_id().map(str::to_string))
            .send()
            .await?;
    }
    for m in versions.delete_markers() {
        s3.delete_object()
            .bucket(bucket)
            .key(m.key().unwrap_or_default())
            .set_version_id(m.version_id().map(str::to_string))
            .send()
            .await?;
    }
    s3.delete_bucket().bucket(bucket).send().await?;
    Ok(())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
