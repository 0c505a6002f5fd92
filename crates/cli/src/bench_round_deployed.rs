//! `fedstep bench round --mode deployed`: one round through the stack as
//! users deploy it, on the emulators. The bench deploys its own stack
//! (scripts/local-deploy.sh under a fresh prefix), starts `--workers`
//! aggregator processes (`fedstep-lambda local`, the worker the e2e suite
//! runs: it serves the workflow's PlanRound, AggregateShard and CommitRound
//! tasks and reads the updates stream), starts a one-round job through the
//! state machine, plays the N clients itself (upload, then the row), and
//! removes the stack afterwards.
//!
//! The figures are the workers' own: the aggregation's duration is the
//! round's measurements (PlanRound's start to CommitRound's, across
//! processes), each worker's peak RSS comes from `wait4`, and its disk
//! writes from `/proc/<pid>/io`, read before it is stopped. The workers run
//! with a `TMPDIR` that does not exist and an empty working directory, and
//! the run fails if either is written to.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fedstep_aws::{AwsConfig, DynamoLedger, S3Store};
use fedstep_cloud::job::ShardingSpec;
use fedstep_cloud::keys;
use fedstep_cloud::ports::{Ledger, ObjectStore, PutUpdate};
use fedstep_cloud::records::{RoundStatus, UpdateRecord, SCHEMA};
use fedstep_cloud::round_measurements::RoundMeasurements;
use fedstep_cloud::JobSpec;
use fedstep_core::{AggregationRequest, FileTarget, Input, UpdateMeta, UpdateSource};
use safetensors::Dtype;

use crate::bench::{generate, layout};
use crate::bench_clients::deploy::{self, Deployment};

/// What the deployed round is asked to do.
pub(crate) struct DeployedRound {
    pub clients: usize,
    pub params: u64,
    pub dtype: Dtype,
    /// Shards the job asks for (`[sharding] shard_mib` is chosen for it;
    /// the plan may make fewer, never more).
    pub shards: usize,
    pub workers: usize,
    pub timeout: Duration,
}

/// What it measured.
pub(crate) struct DeployedFigures {
    pub read_floor_s: f64,
    /// PlanRound's start → CommitRound's end (the round's measurements).
    pub aggregate_s: f64,
    /// The last client row written → the round CLOSED in the ledger: the
    /// stream's hand-over and the workflow's transitions on top.
    pub row_to_closed_s: f64,
    pub peak_rss: u64,
    pub disk_bytes: u64,
    /// Shards the round's plan made.
    pub shards: usize,
    /// The most any one shard task fetched from S3, as a share of the
    /// inputs' bytes (the updates and the global model, which plain FedAvg
    /// does not read): its slice, 64 KiB of each input for the header and
    /// at most a read-ahead window past each edge of the slice, when no
    /// shard has to read inputs through to hash them.
    pub max_read_share: f64,
    pub identical: bool,
}

pub(crate) fn run(r: &DeployedRound) -> Result<DeployedFigures> {
    if r.workers == 0 || r.shards == 0 {
        bail!("--workers and --shards must be at least 1");
    }
    let lambda = lambda_binary()?;
    let dir = tempfile::tempdir()?;
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let prefix = format!("br{unix}-{}", std::process::id());
    let ids: Vec<String> = (0..r.clients).map(|i| format!("bench-{i:04}")).collect();
    let t0 = Instant::now();
    let deployment = Deployment::create(&prefix, &ids, dir.path())?;
    eprintln!(
        "bench round: deployed {} clients under prefix {prefix} in {:.1} s",
        ids.len(),
        t0.elapsed().as_secs_f64()
    );
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let mut workers = Workers::default();
    let measured = (|| {
        for i in 0..r.workers {
            workers.start(&lambda, &deployment, dir.path(), i)?;
        }
        rt.block_on(measure(r, &deployment, dir.path(), &mut workers))
    })();
    let stopped = workers.stop();
    if let Err(e) = deployment.delete(dir.path()) {
        eprintln!("bench round: removing the stack {prefix}: {e:#}");
    }
    let (mut figures, stopped) = match (measured, stopped) {
        (Ok(f), Ok(stopped)) => (f, stopped),
        (Err(e), stopped) => {
            let logs = stopped.map(|s| s.logs).unwrap_or_default();
            return Err(e.context(format!("the workers' logs:\n{}", tail(&logs))));
        }
        (Ok(_), Err(e)) => return Err(e),
    };
    figures.peak_rss = stopped.peak_rss;
    figures.disk_bytes = stopped.disk_bytes;
    for (i, scratch) in workers.scratch.iter().enumerate() {
        let left = std::fs::read_dir(&scratch.cwd)?.count();
        if left > 0 || scratch.tmpdir.exists() {
            bail!(
                "worker {i} wrote to its working directory or created its TMPDIR: \
                 the aggregation must not need local disk"
            );
        }
    }
    Ok(figures)
}

/// `fedstep-lambda` beside this binary (`cargo build --release --bins`
/// builds both).
fn lambda_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the fedstep binary")?;
    let lambda = exe.with_file_name("fedstep-lambda");
    if !lambda.is_file() {
        bail!(
            "{} not found: `cargo build --release --workspace --bins` builds the aggregator's worker beside fedstep",
            lambda.display()
        );
    }
    Ok(lambda)
}

async fn measure(
    r: &DeployedRound,
    d: &Deployment,
    dir: &Path,
    workers: &mut Workers,
) -> Result<DeployedFigures> {
    let sdk = fedstep_aws::sdk_defaults().load().await;
    let cfg = AwsConfig::new(sdk, d.settings.clone());
    let bucket = cfg
        .settings
        .bucket
        .clone()
        .ok_or_else(|| anyhow!("the deployment has no bucket"))?;
    let state_machine = cfg
        .settings
        .state_machine_arn
        .clone()
        .ok_or_else(|| anyhow!("the deployment has no state machine"))?;
    let store = S3Store::from_config(&cfg)?;
    let ledger = DynamoLedger::from_config(&cfg)?;

    let specs = layout(r.params, r.dtype);
    let global = dir.join("global.safetensors");
    generate(&global, &specs, 0)?;
    let model_bytes = std::fs::metadata(&global)?.len();
    let job = JobSpec {
        job_id: format!("{}-job", d.prefix),
        rounds: 1,
        clients: d.clients.clone(),
        min_clients: d.clients.len() as u32,
        round_timeout_seconds: r.timeout.as_secs(),
        initial_model: None,
        stop: None,
        aggregation: Default::default(),
        round_config: Default::default(),
        sharding: sharding_for(model_bytes, r.shards),
        mode: Default::default(),
        asynchronous: None,
        secure_aggregation: None,
    }
    .check()
    .map_err(|e| anyhow!("the bench's job: {e}"))?;
    let job_id = job.spec().job_id.clone();
    store
        .put_file(&keys::global_model(&job_id, 1), &global)
        .await?;
    let mut files = Vec::new();
    for i in 0..r.clients {
        let p = dir.join(format!("c{i:04}.safetensors"));
        generate(&p, &specs, i as u64 + 1)?;
        files.push(p);
    }

    cfg.sfn()
        .start_execution()
        .state_machine_arn(&state_machine)
        .name(&job_id)
        .input(serde_json::to_string(&job)?)
        .send()
        .await
        .map_err(|e| {
            anyhow!(
                "StartExecution: {}",
                fedstep_aws::sdk_error("StartExecution", e)
            )
        })?;
    let deadline = Instant::now() + r.timeout;
    while ledger.get_round(&job_id, 1).await?.is_none() {
        workers.check_alive()?;
        if Instant::now() > deadline {
            bail!("round 1 never opened");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The clients: every update uploaded first, then the rows one after
    // another, so the hand-over follows the last row and nothing else.
    let mut uploaded = Vec::new();
    for (id, path) in d.clients.iter().zip(&files) {
        let key = keys::update(&job_id, 1, id);
        uploaded.push((key.clone(), store.put_update_file(&key, path).await?));
    }
    for (i, (id, (key, up))) in d.clients.iter().zip(uploaded).enumerate() {
        let row = UpdateRecord {
            client_id: id.clone(),
            job_round: keys::job_round(&job_id, 1),
            job_id: job_id.clone(),
            round: 1,
            model_key: key,
            checksum: up.sha256,
            store_checksum: up.store_checksum,
            num_examples: num_examples(i).into(),
            llm_type: None,
            metrics: Default::default(),
            bytes: up.bytes,
            trained_at: "2026-12-02T00:00:00Z".into(),
            schema: Some(SCHEMA),
            variate_delta_checksum: None,
            base_round: None,
        };
        if ledger.put_update(&row).await? != PutUpdate::Created {
            bail!("the row of {id} was not created");
        }
    }
    let last_row = Instant::now();
    let round = loop {
        let round = ledger
            .get_round(&job_id, 1)
            .await?
            .ok_or_else(|| anyhow!("round 1 vanished"))?;
        if round.status == RoundStatus::Closed {
            break round;
        }
        workers.check_alive()?;
        if Instant::now() > deadline {
            bail!("round 1 is still {:?} after {:?}", round.status, r.timeout);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let row_to_closed_s = last_row.elapsed().as_secs_f64();
    let result = round
        .result
        .ok_or_else(|| anyhow!("round 1 closed without a result"))?;
    if result.accepted.len() != r.clients {
        bail!(
            "{} of {} updates accepted: {:?}",
            result.accepted.len(),
            r.clients,
            result.rejected
        );
    }
    // The measurements sit beside the model they describe (round 2's).
    let path = dir.join("measurements.json");
    store
        .get_file(&keys::round_measurements(&job_id, 2), &path)
        .await?;
    let stored: RoundMeasurements =
        serde_json::from_slice(&std::fs::read(&path)?).context("reading round 1's measurements")?;
    let aggregate_s = stored.measurements.seconds;
    let input_bytes = model_bytes * (r.clients as u64 + 1);
    let max_read_share = stored
        .shard_bytes_fetched
        .iter()
        .max()
        .map(|&b| b as f64 / input_bytes as f64)
        .ok_or_else(|| anyhow!("round 1's measurements name no shard"))?;

    // What `fedstep aggregate` computes from the same files and pipeline.
    let expected = dir.join("expected.safetensors");
    let updates: Vec<UpdateSource> = files
        .iter()
        .zip(&d.clients)
        .enumerate()
        .map(|(i, (p, id))| UpdateSource::file(p, UpdateMeta::new(id.clone(), num_examples(i))))
        .collect();
    fedstep_core::aggregate(&AggregationRequest {
        updates: &updates,
        global: Some(Input::file(&global)),
        config: job.pipeline(),
        out: &FileTarget::new(&expected),
        state_in: None,
        state_out: None,
        round: 1,
    })?;
    let committed = dir.join("committed.safetensors");
    store.get_file(&result.global_model_key, &committed).await?;
    let identical = std::fs::read(&committed)? == std::fs::read(&expected)?;

    let shards = plan_shards(&cfg, &state_machine, &job_id, deadline).await?;

    let mut keys: Vec<String> = d
        .clients
        .iter()
        .map(|id| keys::update(&job_id, 1, id))
        .collect();
    keys.push(keys::global_model(&job_id, 1));
    let read_floor_s = crate::bench_round::read_all_once(&cfg.s3(), &bucket, &keys).await?;
    Ok(DeployedFigures {
        read_floor_s,
        aggregate_s,
        row_to_closed_s,
        peak_rss: 0,
        disk_bytes: 0,
        shards,
        max_read_share,
        identical,
    })
}

/// Waits for the one-round execution to end; it must have succeeded.
/// Returns how many shards its plan made.
async fn plan_shards(
    cfg: &AwsConfig,
    state_machine: &str,
    job_id: &str,
    deadline: Instant,
) -> Result<usize> {
    let out = deploy::execution_when_done(cfg, state_machine, job_id, deadline).await?;
    match out.status().as_str() {
        "SUCCEEDED" => {
            let output: serde_json::Value = serde_json::from_str(out.output().unwrap_or("{}"))?;
            output["plan"]["shards"]
                .as_array()
                .map(Vec::len)
                .ok_or_else(|| anyhow!("the execution's output has no plan: {output}"))
        }
        status => bail!("the execution is {status}: {:?}", out.cause()),
    }
}

fn num_examples(i: usize) -> u64 {
    100 + i as u64
}

/// `[sharding]` that cuts a model of `model_bytes` into `shards` (each at
/// least S3's 5 MiB part), the Map running them all at once.
fn sharding_for(model_bytes: u64, shards: usize) -> ShardingSpec {
    let mib = model_bytes.div_ceil(1 << 20);
    ShardingSpec {
        shard_mib: mib.div_ceil(shards as u64).max(5),
        concurrency: (shards as u32).clamp(1, 40),
    }
}

/// The aggregator's worker processes, each with its output drained into
/// memory (a log file would count as the worker's own disk writes).
#[derive(Default)]
struct Workers {
    children: Vec<Child>,
    drains: Vec<JoinHandle<String>>,
    scratch: Vec<Scratch>,
}

struct Scratch {
    cwd: PathBuf,
    tmpdir: PathBuf,
}

/// What the stopped workers left: their figures and their logs.
#[derive(Default)]
struct Stopped {
    peak_rss: u64,
    disk_bytes: u64,
    logs: String,
}

impl Workers {
    fn start(&mut self, lambda: &Path, d: &Deployment, dir: &Path, i: usize) -> Result<()> {
        let scratch = Scratch {
            cwd: dir.join(format!("worker-{i}-cwd")),
            tmpdir: dir.join(format!("worker-{i}-no-tmp-here")),
        };
        std::fs::create_dir_all(&scratch.cwd)?;
        let mut child = Command::new(lambda)
            .arg("local")
            .arg("--deploy")
            .arg(&d.json_path)
            .args(["--worker-name", &format!("bench-worker-{i}")])
            .args(["--idle-ms", "50"])
            .current_dir(&scratch.cwd)
            .env("TMPDIR", &scratch.tmpdir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", lambda.display()))?;
        let mut stderr = child.stderr.take().expect("piped");
        self.drains.push(std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        }));
        self.children.push(child);
        self.scratch.push(scratch);
        Ok(())
    }

    fn check_alive(&mut self) -> Result<()> {
        for (i, c) in self.children.iter_mut().enumerate() {
            if let Some(status) = c.try_wait()? {
                bail!("worker {i} exited ({status})");
            }
        }
        Ok(())
    }

    /// Reads each worker's disk writes, stops it (SIGTERM) and reaps it
    /// with its peak RSS.
    fn stop(&mut self) -> Result<Stopped> {
        let mut stopped = Stopped::default();
        let mut failure = None;
        for (i, child) in self.children.drain(..).enumerate() {
            let pid = child.id() as libc::pid_t;
            match proc_write_bytes(pid) {
                Ok(b) => stopped.disk_bytes += b,
                Err(e) => failure = failure.or(Some(e)),
            }
            match stop_and_reap(pid) {
                Ok(rss) => stopped.peak_rss = stopped.peak_rss.max(rss),
                Err(e) => failure = failure.or(Some(e.context(format!("worker {i}")))),
            }
        }
        for (i, drain) in self.drains.drain(..).enumerate() {
            let text = drain.join().unwrap_or_default();
            stopped.logs.push_str(&format!("--- worker {i}\n{text}"));
        }
        match failure {
            Some(e) => Err(e.context(format!("the workers' logs:\n{}", tail(&stopped.logs)))),
            None => Ok(stopped),
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The bytes `pid` caused to be written to storage (`write_bytes` of
/// `/proc/<pid>/io`: page-cache writes count when dirtied).
fn proc_write_bytes(pid: libc::pid_t) -> Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .with_context(|| format!("reading /proc/{pid}/io"))?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("no write_bytes in /proc/{pid}/io"))
}

/// SIGTERM, then `wait4`: the worker's peak RSS. A worker that does not
/// exit cleanly is an error.
#[allow(unsafe_code)] // kill and wait4 on our own child
fn stop_and_reap(pid: libc::pid_t) -> Result<u64> {
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals of the right types.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("the worker did not exit cleanly (status {status})");
    }
    // ru_maxrss is in kilobytes on Linux.
    Ok(usage.ru_maxrss as u64 * 1024)
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharding_cuts_the_model_into_the_shards_asked_for() {
        let mib = 1u64 << 20;
        for (model, shards) in [
            (100 * mib, 4),
            (100 * mib, 1),
            (95 * mib + 3, 4),
            (40 * mib, 3),
        ] {
            let s = sharding_for(model, shards);
            assert_eq!(
                s.shards_for(model),
                shards,
                "{model} bytes, {shards} shards"
            );
            assert_eq!(s.concurrency as usize, shards);
        }
        // Never below S3's smallest part: a small model makes fewer shards.
        assert_eq!(sharding_for(8 * mib, 4).shard_mib, 5);
    }
}
