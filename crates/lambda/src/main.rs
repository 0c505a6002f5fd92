//! fedstep-lambda: the aggregator.
//!
//! * `fedstep-lambda` (no arguments): the AWS Lambda bootstrap. It serves
//!   the Step Functions tasks (start_round, plan_round, the shard tasks,
//!   commit_round, finalize) and the
//!   updates table's DynamoDB stream; the event's shape picks the handler.
//!   The CDK app deploys it twice: the aggregator (the tasks) and a small
//!   stream function (counting and the hand-over; no S3 access).
//! * `fedstep-lambda local --deploy .emu/deploy-<prefix>.json`: the same
//!   handlers, fed by polling Step Functions activities and the DynamoDB
//!   stream, for the emulators (where Lambdas cannot run).

// The Lambda runtime's service future, built from the library's generic
// handlers, nests deeper than rustc's default layout query limit (128)
// once it crosses the crate boundary; this is rustc's own suggested fix.
#![recursion_limit = "256"]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use fedstep_aws::{AwsConfig, Settings};
use fedstep_lambda::{allocator, aws_engine, emulator_worker, lambda, logging};
use serde_json::Value;

#[derive(Parser)]
#[command(
    name = "fedstep-lambda",
    version,
    about = "fedstep's aggregator: the Lambda bootstrap, or a local worker for the emulators"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Poll the Step Functions activities and the updates stream (emulators).
    Local {
        /// A deploy JSON of scripts/local-deploy.sh; its `aggregator_env`
        /// gives the resource names, its endpoints and region fill in unset
        /// AWS_* variables. Without it, the FEDSTEP_* environment is used.
        #[arg(long)]
        deploy: Option<PathBuf>,
        /// Where to start reading the stream's existing shards.
        #[arg(long, value_enum, default_value_t = Start::TrimHorizon)]
        stream_start: Start,
        /// Worker name reported to Step Functions.
        #[arg(long, default_value = "fedstep-local")]
        worker_name: String,
        /// Milliseconds between empty stream polls.
        #[arg(long, default_value_t = 300)]
        idle_ms: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Start {
    TrimHorizon,
    Latest,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init();
    allocator::return_large_blocks_to_the_os();
    let result = match cli.command {
        None => run_lambda(),
        Some(Command::Local {
            deploy,
            stream_start,
            worker_name,
            idle_ms,
        }) => run_local(deploy, stream_start, worker_name, idle_ms),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "fedstep-lambda failed");
            eprintln!("fedstep-lambda: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))
}

fn run_lambda() -> Result<(), String> {
    runtime()?.block_on(async {
        let cfg = AwsConfig::from_env().await;
        // One owner per execution environment: the log stream name is
        // unique to it (plus the pid, for local runs of the bootstrap).
        let owner = format!(
            "lambda:{}:{}",
            std::env::var("AWS_LAMBDA_LOG_STREAM_NAME").unwrap_or_else(|_| "unknown".into()),
            std::process::id()
        );
        let engine = aws_engine::build(&cfg, owner)?;
        lambda::run(Arc::new(engine))
            .await
            .map_err(|e| e.to_string())
    })
}

fn run_local(
    deploy: Option<PathBuf>,
    start: Start,
    worker_name: String,
    idle_ms: u64,
) -> Result<(), String> {
    let settings = match &deploy {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let json: Value =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            // Safe here: no other thread exists yet (the runtime is built
            // below), and the SDK reads these when it loads its config.
            emulator_env_defaults(&json);
            let env = json.get("aggregator_env").cloned().unwrap_or(Value::Null);
            let mut settings = Settings::from_lookup(|k| {
                env.get(k)
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .or_else(|| std::env::var(k).ok())
            });
            // A deploy file describes emulators: path-style S3 unless the
            // environment says otherwise.
            if std::env::var_os("FEDSTEP_S3_FORCE_PATH_STYLE").is_none() {
                settings.s3_force_path_style = true;
            }
            settings
        }
        None => Settings::from_env(),
    };
    let opts = emulator_worker::LocalOptions {
        stream_start: match start {
            Start::TrimHorizon => emulator_worker::StreamStart::TrimHorizon,
            Start::Latest => emulator_worker::StreamStart::Latest,
        },
        worker_name,
        idle_poll: Duration::from_millis(idle_ms.max(10)),
    };
    runtime()?.block_on(async move {
        let sdk = fedstep_aws::sdk_defaults().load().await;
        let cfg = AwsConfig::new(sdk, settings);
        let owner = format!("local:{}:{}", opts.worker_name, std::process::id());
        let engine = Arc::new(aws_engine::build(&cfg, owner)?);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down: finishing in-flight work");
            let _ = stop_tx.send(true);
        });
        emulator_worker::run(engine, &cfg, opts, stop_rx).await
    })
}

/// SIGTERM (what `kill` and service managers send) or SIGINT (Ctrl-C).
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Fills unset AWS_* variables from a deploy JSON (its endpoints and
/// region), and uses the emulators' dummy credentials when none are
/// configured at all. Set variables always win.
fn emulator_env_defaults(deploy: &Value) {
    let mut defaults = vec![
        ("AWS_ENDPOINT_URL", deploy.pointer("/endpoints/default")),
        (
            "AWS_ENDPOINT_URL_DYNAMODB",
            deploy.pointer("/endpoints/dynamodb"),
        ),
        (
            "AWS_ENDPOINT_URL_DYNAMODB_STREAMS",
            deploy.pointer("/endpoints/dynamodb_streams"),
        ),
        ("AWS_REGION", deploy.get("region")),
    ];
    let has_credentials = ["AWS_ACCESS_KEY_ID", "AWS_PROFILE"]
        .iter()
        .any(|k| std::env::var_os(k).is_some());
    let test = Value::String("test".into());
    if !has_credentials {
        defaults.push(("AWS_ACCESS_KEY_ID", Some(&test)));
        defaults.push(("AWS_SECRET_ACCESS_KEY", Some(&test)));
    }
    for (name, value) in defaults {
        if std::env::var_os(name).is_none() {
            if let Some(v) = value.and_then(Value::as_str) {
                std::env::set_var(name, v);
            }
        }
    }
}
