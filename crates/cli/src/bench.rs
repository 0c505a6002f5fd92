//! `fedstep bench aggregate`: file → file aggregation throughput, measured
//! against the time to merely read the same input bytes once, in the same
//! run (the machine is shared and noisy, so only ratios within one run are
//! meaningful). The aggregation runs as a child `fedstep aggregate` process
//! so that its peak RSS is its own, not the generator's.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Subcommand, ValueEnum};
use fedstep_core::writer::{ModelWriter, TensorSpec};
use safetensors::Dtype;

use crate::aggregate_cmd::human_bytes;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Aggregation throughput, peak memory, and the read-once baseline.
    Aggregate(AggregateBench),
    /// One round's aggregation against S3 (the running emulators): in
    /// place (streamed) and staged on disk, beside reading every input once.
    Round(crate::bench_round::RoundBench),
    /// The measured child of `bench round`.
    #[command(hide = true)]
    RoundWorker(crate::bench_round::RoundWorker),
    /// A federation of N clients on the emulators (its own stack): round
    /// close and fan-out latency, ledger calls per update, lost/double.
    Clients(crate::bench_clients::ClientsBench),
    /// SecAgg+'s cost per round (client and aggregator time and bytes)
    /// against plain FedAvg over the same vectors, in process.
    Secagg(crate::bench_secagg::SecaggBench),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum BenchDtype {
    F32,
    Bf16,
}

impl BenchDtype {
    pub fn dtype(self) -> Dtype {
        match self {
            BenchDtype::F32 => Dtype::F32,
            BenchDtype::Bf16 => Dtype::BF16,
        }
    }
}

#[derive(clap::Args)]
pub struct AggregateBench {
    /// Number of client updates.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Parameters per model (suffixes k, M, G allowed: 25M).
    #[arg(long, default_value = "25M", value_parser = parse_count)]
    params: u64,
    #[arg(long, value_enum, default_value_t = BenchDtype::F32)]
    dtype: BenchDtype,
    /// Repetitions of each measurement; the best is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Pipeline TOML for the aggregation (default: plain FedAvg).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Also pass a global model (needed by clip/zeroing/optimizers).
    #[arg(long)]
    with_global: bool,
    /// Directory for the synthetic files (default: a temp dir, removed after).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write the figures as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub(crate) fn parse_count(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1_000),
        Some('m' | 'M') => (&s[..s.len() - 1], 1_000_000),
        Some('g' | 'G') => (&s[..s.len() - 1], 1_000_000_000),
        _ => (s, 1),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a count like 25M"))?;
    if v.is_nan() || v < 1.0 {
        return Err(format!("`{s}` must be at least 1"));
    }
    Ok((v * mult as f64) as u64)
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Aggregate(b) => aggregate_bench(b),
        BenchCommand::Round(b) => crate::bench_round::run(b),
        BenchCommand::RoundWorker(w) => crate::bench_round::worker(w),
        BenchCommand::Clients(b) => crate::bench_clients::run(b),
        BenchCommand::Secagg(b) => crate::bench_secagg::run(b),
    }
}

fn aggregate_bench(b: AggregateBench) -> Result<()> {
    if b.clients == 0 || b.runs == 0 {
        bail!("--clients and --runs must be at least 1");
    }
    let tmp;
    let dir = match &b.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let dtype = b.dtype.dtype();
    let t0 = Instant::now();
    let specs = layout(b.params, dtype);
    let mut inputs = Vec::new();
    for i in 0..b.clients {
        let p = dir.join(format!("client-{i:03}.safetensors"));
        generate(&p, &specs, i as u64 + 1)?;
        inputs.push(p);
    }
    let global = dir.join("global.safetensors");
    if b.with_global {
        generate(&global, &specs, 0)?;
    }
    let manifest = dir.join("round.json");
    let updates: Vec<_> = inputs
        .iter()
        .enumerate()
        .map(|(i, p)| serde_json::json!({"path": p, "num_examples": 100 + i, "client_id": format!("c{i}")}))
        .collect();
    std::fs::write(
        &manifest,
        serde_json::to_vec(&serde_json::json!({ "updates": updates }))?,
    )?;
    let model_bytes = std::fs::metadata(&inputs[0])?.len();
    let input_bytes = model_bytes * b.clients as u64 + if b.with_global { model_bytes } else { 0 };
    eprintln!(
        "generated {} in {:.1} s",
        human_bytes(input_bytes),
        t0.elapsed().as_secs_f64()
    );

    let mut reads = Vec::new();
    let mut aggs = Vec::new();
    let mut rss = 0u64;
    let out = dir.join("out.safetensors");
    for _ in 0..b.runs {
        // Alternate so that both see the same cache and machine conditions.
        let mut all = inputs.clone();
        if b.with_global {
            all.push(global.clone());
        }
        reads.push(read_once(&all)?);
        let (secs, peak) = aggregate_child(
            &manifest,
            &out,
            b.config.as_deref(),
            b.with_global.then_some(&global),
        )?;
        aggs.push(secs);
        rss = rss.max(peak);
    }
    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let (read_s, agg_s) = (best(&reads), best(&aggs));
    let gbps = |secs: f64| input_bytes as f64 / secs / 1e9;
    let ratio = agg_s / read_s;
    let target_rss = 1.5 * model_bytes as f64 + 64e6;
    println!(
        "bench aggregate: {} clients × {} params ({:?}) = {} in, {} per model (page cache warm; best of {})",
        b.clients,
        b.params,
        dtype,
        human_bytes(input_bytes),
        human_bytes(model_bytes),
        b.runs
    );
    println!(
        "  read inputs once      : {read_s:.3} s  ({:.2} GB/s)",
        gbps(read_s)
    );
    println!(
        "  aggregate file → file : {agg_s:.3} s  ({:.2} GB/s of input)",
        gbps(agg_s)
    );
    // Issue #14's targets: F32 within 1.5× of reading the inputs once,
    // BF16 (decoded and re-encoded per element) within 2×.
    let target_ratio = if dtype == Dtype::BF16 { 2.0 } else { 1.5 };
    println!("  ratio aggregate/read  : {ratio:.2}×  (target ≤ {target_ratio}×)");
    println!(
        "  peak RSS (aggregation): {}  (target ≤ 1.5 × model + 64 MB = {})",
        human_bytes(rss),
        human_bytes(target_rss as u64)
    );
    if let Some(p) = &b.json {
        let v = serde_json::json!({
            "clients": b.clients, "params": b.params, "dtype": format!("{dtype:?}"),
            "input_bytes": input_bytes, "model_bytes": model_bytes,
            "read_once_seconds": reads, "aggregate_seconds": aggs,
            "best_read_once_seconds": read_s, "best_aggregate_seconds": agg_s,
            "ratio": ratio, "throughput_gbps": gbps(agg_s), "peak_rss_bytes": rss,
            "rss_target_bytes": target_rss,
        });
        std::fs::write(p, serde_json::to_vec_pretty(&v)?)?;
    }
    Ok(())
}

/// Splits `params` into tensors of at most 4M elements, as real models
/// spread their weights over many tensors.
pub(crate) fn layout(params: u64, dtype: Dtype) -> Vec<TensorSpec> {
    const MAX: u64 = 4 << 20;
    let mut specs = Vec::new();
    let mut left = params;
    let mut i = 0;
    while left > 0 {
        let n = left.min(MAX);
        specs.push(TensorSpec {
            name: format!("layers.{i}.weight"),
            dtype,
            shape: vec![n as usize],
        });
        left -= n;
        i += 1;
    }
    specs
}

/// Writes a model of pseudo-random values in 1M-element pieces (so the
/// generator itself never holds a model in memory).
pub(crate) fn generate(path: &Path, specs: &[TensorSpec], seed: u64) -> Result<()> {
    let w = ModelWriter::create(
        &fedstep_core::FileTarget::new(path),
        specs,
        &Default::default(),
    )?;
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut values = Vec::new();
    let mut bytes = Vec::new();
    for s in specs {
        let n = s.shape[0];
        let eb = s.dtype.bitsize() / 8;
        let mut done = 0;
        while done < n {
            let m = (n - done).min(1 << 20);
            values.clear();
            for _ in 0..m {
                // xorshift64: cheap, deterministic, good enough for timing.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                values.push((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5);
            }
            bytes.resize(m * eb, 0);
            fedstep_core::float::encode_from(s.dtype, &values, &mut bytes);
            w.write_at(&s.name, (done * eb) as u64, &bytes)?;
            done += m;
        }
    }
    w.finish()?;
    Ok(())
}

fn read_once(paths: &[PathBuf]) -> Result<f64> {
    let start = Instant::now();
    let mut buf = vec![0u8; 8 << 20];
    let mut total = 0u64;
    for p in paths {
        let mut f = std::fs::File::open(p)?;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    std::hint::black_box(total);
    Ok(start.elapsed().as_secs_f64())
}

/// Runs `fedstep aggregate` as a child; returns wall seconds and its peak RSS.
#[allow(unsafe_code)] // libc::wait4: the child's peak RSS
fn aggregate_child(
    manifest: &Path,
    out: &Path,
    config: Option<&Path>,
    global: Option<&PathBuf>,
) -> Result<(f64, u64)> {
    let exe = std::env::current_exe().context("finding the fedstep binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("aggregate")
        .arg("--manifest")
        .arg(manifest)
        .arg("--out")
        .arg(out);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    if let Some(g) = global {
        cmd.arg("--global").arg(g);
    }
    cmd.stdout(Stdio::null());
    let start = Instant::now();
    let child = cmd.spawn().context("starting fedstep aggregate")?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in; we wait on our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals of the right types.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let secs = start.elapsed().as_secs_f64();
    if r != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("fedstep aggregate failed (status {status})");
    }
    // ru_maxrss is in kilobytes on Linux.
    Ok((secs, usage.ru_maxrss as u64 * 1024))
}
