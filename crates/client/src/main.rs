//! `fedstep-client`: takes part in federated training over SQS, S3 and
//! DynamoDB until stopped (SIGINT/SIGTERM) or, with `exit_on_complete`,
//! until its job completes (exit status 0) or fails (exit status 3).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fedstep_client::{AnyTrainer, ClientConfig, RunEnd, Worker, WorkerOptions};

mod aws_setup;
mod signals;

/// The exit status when the job this client waited for failed (with
/// `exit_on_complete`); 1 is this client's own error.
const JOB_FAILED_EXIT: u8 = 3;

#[derive(Parser)]
#[command(
    name = "fedstep-client",
    version,
    about = "fedstep federated-learning client"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Wait for global models on the queue, train, upload, repeat.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a client.toml and load its trainer's dataset, without AWS.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a human at a terminal, not in service logs.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fedstep-client: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run { config } => run(config).await,
            Command::Check { config } => check(config).map(|()| ExitCode::SUCCESS),
        }
    });
    // A built-in training step cannot be interrupted; do not wait for it
    // after a shutdown (its message was released for redelivery).
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fedstep-client: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(config: &Path) -> Result<(ClientConfig, AnyTrainer)> {
    let cfg = ClientConfig::load(config).map_err(anyhow::Error::msg)?;
    let trainer = AnyTrainer::from_config(&cfg.trainer)
        .with_context(|| format!("{}: [trainer]", config.display()))?;
    Ok((cfg, trainer))
}

fn check(config: PathBuf) -> Result<()> {
    let (cfg, trainer) = load(&config)?;
    let what = match &trainer {
        AnyTrainer::Builtin(t) => format!("built-in trainer, {} local examples", t.examples()),
        AnyTrainer::External(_) => "external trainer".to_string(),
    };
    println!("{}: client {} OK ({what})", config.display(), cfg.client_id);
    Ok(())
}

async fn run(config: PathBuf) -> Result<ExitCode> {
    let (cfg, trainer) = load(&config)?;
    let (queue, store, ledger) = aws_setup::connect(&cfg).await;
    let worker = Worker::new(
        WorkerOptions::from_config(&cfg),
        Arc::new(queue),
        Arc::new(store),
        Arc::new(ledger),
        Arc::new(trainer),
    );
    tracing::info!(
        "client {} polling {} (jobs: {})",
        cfg.client_id,
        cfg.queue_url,
        cfg.jobs
            .as_ref()
            .map_or("any".to_string(), |j| j.join(", "))
    );
    let shutdown = signals::shutdown_on_signal()?;
    match worker.run(shutdown).await? {
        RunEnd::Shutdown => tracing::info!("stopped"),
        RunEnd::JobComplete(job) => tracing::info!("job {job} is complete; exiting"),
        // Not this client's error, but the job it was to finish did not:
        // a non-zero exit lets a scheduler or script see that.
        RunEnd::JobFailed { job_id, reason } => {
            eprintln!("fedstep-client: job {job_id} failed: {reason}");
            return Ok(ExitCode::from(JOB_FAILED_EXIT));
        }
    }
    Ok(ExitCode::SUCCESS)
}
