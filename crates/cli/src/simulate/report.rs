//! `report.json`: everything a run measured, in one file that scripts
//! (scripts/simulate-targets.sh) and tests read.
//!
//! ```json
//! {"config": {...}, "dataset": {...},
//!  "rounds": [{"round": 1, "accuracy": .., "loss": .., "seconds": ..,
//!              "accepted": [..], "rejected": {"agent-3": "reason"},
//!              "clients": [{"client_id", "num_examples", "metrics", "weight", ...}],
//!              "aggregation": {...}, "single_agent_accuracy": .., "centralized_accuracy": ..}],
//!  "final": {"federated_accuracy", "single_agent_accuracy", "centralized_accuracy", ...},
//!  "personalization": {"global_accuracy", "personalized_accuracy", "local_accuracy",
//!                      "clients": [..]}   (only with --personalization fedselect),
//!  "files": {...}}
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::args::Settings;
use super::data::ShareSummary;
use super::personal::PersonalizationReport;

/// One client in one round, as the client reported it and as the
/// aggregation treated it.
#[derive(Debug, Clone, Serialize)]
pub struct ClientRoundReport {
    pub client_id: String,
    pub num_examples: u64,
    pub llm_type: Option<String>,
    /// What the client reported (validation loss/accuracy/perplexity,
    /// train_loss/train_accuracy).
    pub metrics: BTreeMap<String, f64>,
    /// accepted | rejected | excluded | zeroed | not_selected, as the
    /// measurements stored with the round's output recorded it (`missing`
    /// if they do not list the client).
    pub status: String,
    pub reason: Option<String>,
    /// Normalized aggregation weight (sums to 1 over accepted clients), as
    /// the numeric core measured it.
    pub weight: Option<f64>,
    /// Quality multiplier, when `quality` weighting applied one.
    pub quality: Option<f64>,
    pub noisy: bool,
    pub byzantine: bool,
    /// Wall time of the client's round (receive → delete).
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: u32,
    /// Global model after this round, on the global test split.
    pub accuracy: f64,
    pub loss: f64,
    pub accepted: Vec<String>,
    pub rejected: BTreeMap<String, String>,
    pub clients: Vec<ClientRoundReport>,
    /// Weighting, combiner, how the round closed, and the round result's
    /// metrics (each client metric's median over the accepted clients, and
    /// its weighted mean as `<name>:mean`).
    pub aggregation: Value,
    /// --algorithm scaffold: the server variate's update this round
    /// (clients used and refused, |S|/N, ‖c⁺ − c‖).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaffold: Option<Value>,
    /// The baselines after the same number of epochs.
    pub single_agent_accuracy: f64,
    pub centralized_accuracy: f64,
    /// Wall time of the round (start_round → aggregated).
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Final {
    /// --algorithm: fedavg, fedprox or scaffold.
    pub algorithm: &'static str,
    /// FedProx's μ (fedprox only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mu: Option<f64>,
    pub federated_accuracy: f64,
    pub federated_loss: f64,
    pub single_agent_accuracy: f64,
    pub centralized_accuracy: f64,
    /// federated / centralized (target ≥ 0.9 on the defaults).
    pub federated_vs_centralized: f64,
    /// single agent / centralized (target ≤ 0.5 on the defaults).
    pub single_agent_vs_centralized: f64,
    pub rounds_run: u32,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatasetReport {
    pub name: String,
    pub train_examples: usize,
    pub test_examples: usize,
    pub features: usize,
    pub classes: usize,
    pub clients: Vec<ShareSummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Files {
    pub report: PathBuf,
    pub plot: PathBuf,
    /// The local model registry (FsStore): every round's global model and updates.
    pub store: PathBuf,
    pub final_model_key: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: Settings,
    /// The aggregation pipeline as run (the --aggregation file's table).
    pub aggregation: toml::Table,
    /// What the simulated clients report, and why (see simulate::client).
    pub client_reporting: &'static str,
    pub dataset: DatasetReport,
    pub rounds: Vec<RoundReport>,
    #[serde(rename = "final")]
    pub final_: Final,
    /// --personalization fedselect: per-client accuracy on each client's
    /// own test distribution (global / personalized / local only), means.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub personalization: Option<PersonalizationReport>,
    /// The engine's finalize output.
    pub finalize: Value,
    /// --mode async: the async run beside the sync one, on simulated time.
    #[serde(rename = "async", skip_serializing_if = "Option::is_none")]
    pub asynchronous: Option<AsyncReport>,
    /// --secure-aggregation: the same federation with SecAgg+ computing
    /// each round's mean, beside the plain run above.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<super::secure::SecureReport>,
    pub files: Files,
}

/// --mode async's comparison (simulated seconds throughout).
#[derive(Debug, Clone, Serialize)]
pub struct AsyncReport {
    pub target_accuracy: f64,
    /// When each first reached the target (null: never within the run).
    pub sync_time_to_target: Option<f64>,
    pub async_time_to_target: Option<f64>,
    /// async / sync time to target, when both reached it.
    pub time_to_target_ratio: Option<f64>,
    pub sync_final_accuracy: f64,
    pub async_final_accuracy: f64,
    /// The simulated time both runs had: the sync rounds × the slowest
    /// client's seconds.
    pub simulated_seconds: f64,
    pub buffer_size: u32,
    pub client_speeds: Vec<f64>,
    pub staleness_exponent: f64,
    pub max_staleness: u32,
    pub updates_submitted: u32,
    /// "client: rule" → rows the stream rejected (e.g. stale).
    pub rejected_at_stream: std::collections::BTreeMap<String, u32>,
    /// The sync run: (simulated seconds, accuracy) after each round.
    pub sync: Vec<(f64, f64)>,
    pub versions: Vec<super::asynchronous::VersionReport>,
    pub plot: PathBuf,
}

pub const CLIENT_REPORTING: &str =
    "llm_type SpikingEvoTextLM; loss = cross-entropy on the client's \
     held-out validation slice, perplexity = exp(loss), so quality weighting gives 1/(1+loss); \
     accuracy = validation accuracy; train_loss/train_accuracy on its training data. \
     Byzantine clients report their honest model's metrics.";

impl Report {
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }
}
