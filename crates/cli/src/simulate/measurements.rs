//! Joins what each client reported with how the aggregation treated it
//! into report.json's per-client rows.
//!
//! The engine's `RoundResult` names the accepted clients and every other
//! client's reason (rejected, excluded, zeroed, not selected by Krum) but
//! not the weights. Those are recomputed here with fedstep-core's own
//! weighting plan on the very rows the engine aggregated, normalized over
//! the accepted clients — the same arithmetic as the core's
//! `ClientMeasurement::weight`. (Unweighted combiners — median, trimmed
//! mean, Krum — ignore them; the round's `combiner` says which ran.)

use std::collections::BTreeMap;

use fedstep_cloud::records::RoundResult;
use fedstep_core::share_cap;
use fedstep_core::weighting::{self, Verdict};
use fedstep_core::{PipelineConfig, UpdateMeta};
use serde_json::{json, Value};

use super::client::ClientRound;
use super::data::SimData;
use super::report::ClientRoundReport;

/// Quality multiplier and normalized weight per client.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Weight {
    pub quality: Option<f64>,
    pub weight: Option<f64>,
}

pub fn weights(
    config: &PipelineConfig,
    rounds: &[ClientRound],
    result: &RoundResult,
) -> BTreeMap<String, Weight> {
    let metas: Vec<UpdateMeta> = rounds
        .iter()
        .map(|cr| UpdateMeta {
            client_id: cr.record.client_id.clone(),
            num_examples: cr.record.num_examples.clone(),
            llm_type: cr.record.llm_type.clone(),
            metrics: cr.record.metrics.clone(),
        })
        .collect();
    let Ok(plan) = weighting::plan(
        &metas,
        config.weighting(),
        &config.type_filter(),
        config.limits(),
    ) else {
        return BTreeMap::new();
    };
    let raw: Vec<(String, Option<f64>, Option<f64>)> = metas
        .iter()
        .zip(&plan.entries)
        .map(|(m, e)| {
            let w = match e.verdict {
                Verdict::Weighted(w) if result.accepted.contains(&m.client_id) => Some(w),
                _ => None,
            };
            (m.client_id.clone(), e.multiplier, w)
        })
        .collect();
    let total: f64 = raw.iter().filter_map(|r| r.2).sum();
    let mut shares: Vec<Option<f64>> = raw
        .iter()
        .map(|r| r.2.filter(|_| total > 0.0).map(|w| w / total))
        .collect();
    // The aggregation capped the shares the same way (max_client_share).
    if let Some(cap) = config.max_client_share().filter(|_| total > 0.0) {
        let weighted: Vec<usize> = (0..shares.len()).filter(|&i| shares[i].is_some()).collect();
        let weights: Vec<f64> = weighted.iter().filter_map(|&i| shares[i]).collect();
        let capped = share_cap::cap_shares(&weights, cap);
        for (&i, share) in weighted.iter().zip(capped.shares) {
            shares[i] = Some(share);
        }
    }
    raw.into_iter()
        .zip(shares)
        .map(|((id, quality, _), weight)| (id, Weight { quality, weight }))
        .collect()
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

pub fn client_reports(
    rounds: &[ClientRound],
    data: &SimData,
    weights: &BTreeMap<String, Weight>,
    result: &RoundResult,
    engine_rejected: &BTreeMap<String, String>,
) -> Vec<ClientRoundReport> {
    rounds
        .iter()
        .map(|cr| {
            let rec = &cr.record;
            let id = rec.client_id.as_str();
            let share = data.clients.iter().find(|c| c.id == id);
            let (status, reason) = if let Some(reason) = engine_rejected.get(id) {
                ("rejected".to_string(), Some(reason.clone()))
            } else if let Some(reason) = result.rejected.get(id) {
                // The engine words it "<status>: <reason>".
                let status = reason.split(':').next().unwrap_or("rejected").trim();
                (status.to_string(), Some(reason.clone()))
            } else if result.accepted.iter().any(|a| a == id) {
                ("accepted".to_string(), None)
            } else {
                ("missing".to_string(), None)
            };
            let w = weights.get(id).copied().unwrap_or_default();
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
                reason,
                weight: w.weight,
                quality: w.quality,
                noisy: share.is_some_and(|s| s.noisy),
                byzantine: share.is_some_and(|s| s.byzantine),
                seconds: cr.seconds,
            }
        })
        .collect()
}
