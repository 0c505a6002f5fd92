//! `fedstep`: the operator CLI. Each subcommand lives in its own module and
//! stays thin: parse arguments, call the library, print.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod aggregate_cmd;
mod bench;
mod bench_clients;
mod bench_round;
mod bench_round_deployed;
mod bench_round_sharded;
mod bench_secagg;
mod infra_cmd;
mod job_cmd;
mod job_report;
mod job_watch;
mod model_cmd;
mod model_store_cmd;
mod simulate;

#[derive(Parser)]
#[command(
    name = "fedstep",
    version,
    about = "Serverless federated learning on AWS: operator CLI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Aggregate client updates (safetensors files) into a new global model.
    Aggregate(aggregate_cmd::Args),
    /// Start a training job on the deployed state machine and follow it.
    #[command(subcommand)]
    Job(job_cmd::JobCommand),
    /// Deployment helpers: a client.toml from the CDK stack's outputs.
    #[command(subcommand)]
    Infra(infra_cmd::InfraCommand),
    /// Inspect model files; list and pull registered models.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// Benchmarks (synthetic data in a temp dir).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run a whole federation in one process (round engine + local adapters):
    /// non-IID clients on the bundled digits, baselines, report and plot.
    // Boxed: its many flags make it several times any other command.
    Simulate(Box<simulate::Args>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Aggregate(args) => aggregate_cmd::run(args),
        Command::Job(cmd) => job_cmd::run(cmd),
        Command::Infra(cmd) => infra_cmd::run(cmd),
        Command::Model(cmd) => model_cmd::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Simulate(args) => simulate::run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fedstep: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
