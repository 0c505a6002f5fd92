//! Joins what each client reported with how the aggregation treated it
//! into report.json's per-client rows.
//!
//! How the aggregation treated each client (status, reason, quality
//! multiplier, normalized weight) is read from the measurements the engine
//! stored beside the round's output model (`fedstep_cloud::keys::
//! round_measurements`), exactly as the numeric core measured them.
//! (Unweighted combiners — median, trimmed mean, Krum — ignore the
//! weights; the round's `combiner` says which ran.)

use std::path::Path;

use anyhow::{Context, Result};
use fedstep_cloud::keys;
use fedstep_cloud::local::FsStore;
use fedstep_cloud::ports::ObjectStore;
use fedstep_cloud::records::RoundResult;
use fedstep_cloud::round_measurements::RoundMeasurements;
use fedstep_core::PipelineConfig;
use serde_json::{json, Value};

use super::client::ClientRound;
use super::data::SimData;
use super::report::ClientRoundReport;

/// Reads back the measurements the engine stored for the aggregation of
/// `round` of `job_id` (beside round `round + 1`'s model).
pub async fn stored(
    store: &FsStore,
    job_id: &str,
    round: u32,
    scratch: &Path,
) -> Result<RoundMeasurements> {
    let key = keys::round_measurements(job_id, round + 1);
    std::fs::create_dir_all(scratch)?;
    let path = scratch.join("measurements.json");
    store
        .get_file(&key, &path)
        .await
        .with_context(|| format!("reading round {round}'s measurements"))?;
    let bytes = std::fs::read(&path)?;
    std::fs::remove_file(&path).ok();
    Ok(RoundMeasurements::from_json_bytes(&key, &bytes)?)
}

/// The round-level aggregation record: what ran and what it reported.
pub fn aggregation_summary(config: &PipelineConfig, result: &RoundResult) -> Value {
    let combiner = config.pipeline().combiner_name();
    json!({
        "weighting": format!("{:?}", config.weighting()).to_lowercase(),
        "llm_type": config.type_filter_name(),
        "combiner": combiner,
        "closed_by": result.closed_by,
        "metrics": result.metrics,
    })
}

/// One row per client that ran the round, in client order. A client the
/// stored measurements do not list (its update never reached the round) is
/// `missing`.
pub fn client_reports(
    rounds: &[ClientRound],
    data: &SimData,
    measured: &RoundMeasurements,
) -> Vec<ClientRoundReport> {
    rounds
        .iter()
        .map(|cr| {
            let rec = &cr.record;
            let id = rec.client_id.as_str();
            let share = data.clients.iter().find(|c| c.id == id);
            let m = measured.client(id);
            let status = match m {
                // The status's own JSON name: accepted, rejected, excluded,
                // zeroed, not_selected.
                Some(m) => serde_json::to_value(m.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_else(|| format!("{:?}", m.status)),
                None => "missing".to_string(),
            };
            ClientRoundReport {
                client_id: id.to_string(),
                num_examples: rec.num_examples.as_u64().unwrap_or(0),
                llm_type: rec.llm_type.clone(),
                metrics: rec
                    .metrics
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                    .collect(),
                status,
                reason: m.and_then(|m| m.reason.clone()),
                weight: m.and_then(|m| m.weight),
                quality: m.and_then(|m| m.quality),
                noisy: share.is_some_and(|s| s.noisy),
                byzantine: share.is_some_and(|s| s.byzantine),
                seconds: cr.seconds,
            }
        })
        .collect()
}
