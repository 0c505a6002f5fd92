//! `fedstep aggregate`: one aggregation from a manifest, file in → file out.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use fedstep_core::measurements::ClientStatus;
use fedstep_core::update_meta::parse_manifest;
use fedstep_core::{
    aggregate, AggregationRequest, FileTarget, Input, OutputTarget, PipelineConfig,
};

#[derive(clap::Args)]
pub struct Args {
    /// ROUND.json: {"updates": [{"path", "num_examples", "llm_type"?, "metrics"?, "client_id"?}]}
    #[arg(long)]
    manifest: PathBuf,
    /// Where to write the new global model.
    #[arg(long)]
    out: PathBuf,
    /// Pipeline TOML (weighting, llm_type, limits, stages). Default: FedAvg.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The global model the clients trained from (needed by clip, zeroing
    /// and server optimizers).
    #[arg(long)]
    global: Option<PathBuf>,
    /// Write the measurements (per client, per stage) as JSON here.
    #[arg(long)]
    measurements: Option<PathBuf>,
    /// Server-optimizer state from the previous round.
    #[arg(long)]
    state_in: Option<PathBuf>,
    /// Where to write the server-optimizer state.
    #[arg(long)]
    state_out: Option<PathBuf>,
    /// Round number (keys the DP noise stream).
    #[arg(long, default_value_t = 1)]
    round: u64,
}

pub fn run(args: Args) -> Result<()> {
    let text = std::fs::read_to_string(&args.manifest)
        .with_context(|| format!("reading manifest {}", args.manifest.display()))?;
    let base = args.manifest.parent().unwrap_or(Path::new("."));
    let updates = parse_manifest(&text, base)
        .map_err(|e| anyhow::anyhow!("manifest {}: {e}", args.manifest.display()))?;
    let config = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading config {}", p.display()))?;
            PipelineConfig::from_toml(&text)
                .map_err(|e| anyhow::anyhow!("config {}: {e}", p.display()))?
        }
        None => PipelineConfig::default(),
    };
    if args.state_in.is_some() && args.state_out.is_none() {
        bail!("--state-in needs --state-out: the optimizer's new state must go somewhere");
    }
    let state_out = args.state_out.as_ref().map(FileTarget::new);
    let outcome = aggregate(&AggregationRequest {
        updates: &updates,
        global: args.global.clone().map(Input::file),
        config: &config,
        out: &FileTarget::new(&args.out),
        state_in: args.state_in.clone().map(Input::file),
        state_out: state_out.as_ref().map(|t| t as &dyn OutputTarget),
        round: args.round,
    })?;
    let m = &outcome.measurements;
    for c in &m.clients {
        if c.status != ClientStatus::Accepted {
            let status = serde_json::to_value(c.status).unwrap_or_default();
            eprintln!(
                "{} {}: {}",
                status.as_str().unwrap_or("dropped"),
                c.client_id,
                c.reason.as_deref().unwrap_or("")
            );
        }
    }
    if let Some(p) = &args.measurements {
        let json = serde_json::to_string_pretty(&m.to_json())?;
        std::fs::write(p, json).with_context(|| format!("writing measurements {}", p.display()))?;
    }
    println!(
        "aggregated {} of {} updates ({} rejected, {} excluded, {} dropped by stages) · {} in · {} out · {:.3} s → {}",
        m.accepted,
        m.clients.len(),
        m.rejected,
        m.excluded,
        m.clients.len() - m.accepted - m.rejected - m.excluded,
        human_bytes(m.bytes_read),
        human_bytes(m.bytes_written),
        m.seconds,
        args.out.display()
    );
    Ok(())
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
