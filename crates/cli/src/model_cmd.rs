//! `fedstep model ...`: create, look inside, list and pull model files.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use fedstep_core::model;
use fedstep_core::Limits;

use crate::aggregate_cmd::human_bytes;

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Print a model's tensors (name, dtype, shape, bytes) and header metadata.
    Inspect {
        file: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write a fresh built-in-trainer model (the MLP fedstep-client's built-in
    /// trainer trains), to use as a job's `initial_model`.
    Init {
        /// Output safetensors file.
        #[arg(long, short)]
        out: PathBuf,
        /// The dataset the clients train on: sets the input width (digits:
        /// 64 pixels, mnist: 784) and the 10 classes.
        #[arg(long, value_enum, default_value_t = InitDataset::Digits)]
        dataset: InitDataset,
        /// Hidden layer width.
        #[arg(long, default_value_t = fedstep_trainer::TrainConfig::default().hidden)]
        hidden: usize,
        /// Seed of the random initial weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// List registered models (artifacts), newest first.
    List(crate::model_store_cmd::ListArgs),
    /// Download a registered model, verifying its SHA-256.
    Pull(crate::model_store_cmd::PullArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum InitDataset {
    Digits,
    Mnist,
}

pub fn run(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Init {
            out,
            dataset,
            hidden,
            seed,
        } => init(&out, dataset, hidden, seed),
        ModelCommand::Inspect { file, json } => inspect(file, json),
        ModelCommand::List(args) => crate::model_store_cmd::list(args),
        ModelCommand::Pull(args) => crate::model_store_cmd::pull(args),
    }
}

fn init(out: &std::path::Path, dataset: InitDataset, hidden: usize, seed: u64) -> Result<()> {
    let input = match dataset {
        InitDataset::Digits => 64,
        InitDataset::Mnist => 28 * 28,
    };
    if hidden == 0 {
        anyhow::bail!("--hidden must be at least 1");
    }
    let bytes =
        fedstep_trainer::init_model(input, hidden, 10, seed).context("initialising the model")?;
    std::fs::write(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "wrote {} ({input}-{hidden}-10 MLP, {})",
        out.display(),
        human_bytes(bytes.len() as u64)
    );
    Ok(())
}

fn inspect(file: PathBuf, json: bool) -> Result<()> {
    let (_, header) =
        model::open(&file, &Limits::default()).with_context(|| format!("{}", file.display()))?;
    let params: usize = header.tensors.iter().map(|t| t.elements()).sum();
    if json {
        let tensors: Vec<_> = header
            .tensors
            .iter()
            .map(|t| {
                serde_json::json!({"name": t.name, "dtype": format!("{:?}", t.dtype),
                                   "shape": t.shape, "bytes": t.byte_len()})
            })
            .collect();
        let v = serde_json::json!({"file": file, "metadata": header.metadata, "tensors": tensors,
                                   "parameters": params, "bytes": header.file_len});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{}", file.display());
    for (k, v) in &header.metadata {
        println!("  metadata {k} = {v}");
    }
    let width = header
        .tensors
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "  {:<width$}  {:<5}  {:<20}  {:>12}",
        "name", "dtype", "shape", "bytes"
    );
    for t in &header.tensors {
        println!(
            "  {:<width$}  {:<5}  {:<20}  {:>12}",
            t.name,
            format!("{:?}", t.dtype),
            format!("{:?}", t.shape),
            t.byte_len()
        );
    }
    println!(
        "  {} tensors · {} parameters · {}",
        header.tensors.len(),
        params,
        human_bytes(header.file_len)
    );
    Ok(())
}
