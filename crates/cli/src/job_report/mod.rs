//! `fedstep job report`: a job as one self-contained HTML page (inline SVG
//! charts, no network, no script) plus the SVGs and a `report.json`, read
//! from the ledger and the measurements stored beside each round's model.
//! `fedstep simulate` writes the same report over its local adapters, with
//! its baselines added.
//!
//! - `collect.rs` — the ledger and the store → [`JobReport`] (any ports);
//! - `charts.rs` — line charts as SVG (plotters);
//! - `html.rs` — the page.

mod charts;
mod collect;
mod html;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fedstep_cloud::records::ClosedBy;
use serde::Serialize;
use serde_json::Value;

pub use charts::{line_chart, Legend, Series, XAxis};
pub use collect::collect;

/// Everything the page shows, as `report.json` holds it.
#[derive(Debug, Clone, Serialize)]
pub struct JobReport {
    pub job_id: String,
    /// The job as it was started (its TOML, as JSON).
    pub job: Value,
    /// The execution's status (RUNNING, SUCCEEDED, FAILED, ...), when known.
    pub execution: Option<String>,
    /// The job's expected clients, in the job's order.
    pub clients: Vec<String>,
    pub rounds: Vec<RoundView>,
    /// Extra curves per round (`fedstep simulate`: test accuracy of the
    /// federated model and of its baselines).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub baselines: Vec<Curve>,
    /// Curves against time rather than rounds (`fedstep simulate --mode
    /// async`: sync and async accuracy against simulated seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub against_time: Option<TimeCurves>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimeCurves {
    pub title: String,
    /// The x axis runs from 0 to this many seconds.
    pub seconds: f64,
    pub curves: Vec<TimeCurve>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimeCurve {
    pub label: String,
    /// (seconds, value), in time order.
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Curve {
    pub label: String,
    /// The value after rounds 1, 2, ...
    pub values: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoundView {
    pub round: u32,
    /// OPEN, AGGREGATING, CLOSED or FAILED.
    pub status: String,
    pub closed_by: Option<ClosedBy>,
    /// The round result's metrics (each reported metric's median over the
    /// accepted clients, `<name>:mean` its weighted mean, client counts).
    pub metrics: BTreeMap<String, f64>,
    /// Whether the job went on after this round.
    pub continue_training: Option<bool>,
    pub failure: Option<String>,
    /// One per expected client, in the job's order.
    pub clients: Vec<ClientView>,
    pub timings: Timings,
}

/// What became of one expected client in one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Participation {
    Accepted,
    Rejected,
    /// Its row arrived after the round was claimed or closed.
    Late,
    /// Counted, and the round is not closed yet.
    Received,
    /// No row (yet).
    Silent,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClientView {
    pub client_id: String,
    pub participation: Participation,
    /// Why it was rejected or late (bounded client text).
    pub reason: Option<String>,
    pub num_examples: Option<f64>,
    /// What the client reported in its row (numbers only).
    pub reported: BTreeMap<String, f64>,
    /// Its normalized weight in the aggregation, as the core measured it.
    pub weight: Option<f64>,
    /// When the client says it finished training (its row's `trained_at`).
    pub trained_at: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    /// When StartRound opened the round (epoch seconds).
    pub opened_at: i64,
    pub deadline: i64,
    /// The latest `trained_at` of the round's rows (client clocks).
    pub last_update_at: Option<String>,
    /// The aggregation, as the numeric core timed it (all passes).
    pub aggregation_seconds: Option<f64>,
    pub bytes_read: Option<u64>,
    pub bytes_written: Option<u64>,
}

/// The files [`write()`] made.
#[derive(Debug, Clone, Serialize)]
pub struct ReportFiles {
    pub html: PathBuf,
    pub json: PathBuf,
    pub charts: Vec<PathBuf>,
}

/// Writes `report.html`, `report.json` (unless `json_name` is another
/// name: simulate keeps its own report.json) and the charts into `out`.
pub fn write(report: &JobReport, out: &Path, json_name: &str) -> Result<ReportFiles> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let charts = charts::draw_all(report, out)?;
    let json = out.join(json_name);
    std::fs::write(&json, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    let html = out.join("report.html");
    std::fs::write(&html, html::page(report, &charts)?)
        .with_context(|| format!("writing {}", html.display()))?;
    Ok(ReportFiles {
        html,
        json,
        charts: charts.into_iter().map(|c| c.path).collect(),
    })
}
