//! FedSelect's yardstick: per client, on that client's own test
//! distribution (the held-out test split drawn with its sel_prob/def_prob
//! rule), the accuracy of
//!
//! - the **global** model of the last round,
//! - its **personalized** model: that global model with the client's
//!   personal values merged in (what the client would serve),
//! - **local** training alone: the same initial model trained only on the
//!   client's data for the same epochs (rounds × local epochs), no
//!   federation.
//!
//! Personalization pays when the personalized mean beats both: the global
//! model is a compromise across clients, and local training alone has too
//! little data for the classes a client rarely sees.

use std::path::Path;

use anyhow::{Context, Result};
use fedstep_core::personalization::merge_personal;
use fedstep_core::Limits;
use fedstep_trainer::{evaluate, TrainConfig};
use serde::Serialize;

use super::baselines;
use super::client::SimClient;
use super::data::SimData;

#[derive(Debug, Clone, Serialize)]
pub struct ClientAccuracy {
    pub client_id: String,
    pub test_examples: usize,
    pub global_accuracy: f64,
    pub personalized_accuracy: f64,
    pub local_accuracy: f64,
}

/// report.json's `personalization`: means over clients, and the rows.
#[derive(Debug, Clone, Serialize)]
pub struct PersonalizationReport {
    pub method: &'static str,
    pub global_accuracy: f64,
    pub personalized_accuracy: f64,
    pub local_accuracy: f64,
    pub clients: Vec<ClientAccuracy>,
}

/// Local training alone, per client, on the federation's epoch budget.
pub fn local_only(
    init: &[u8],
    data: &SimData,
    cfg: &TrainConfig,
    rounds: u32,
) -> Result<Vec<Vec<f64>>> {
    data.clients
        .iter()
        .enumerate()
        .map(|(k, c)| {
            // Streams 1 and 2 are the single-agent and centralized baselines.
            let curve = baselines::curve(init, &c.train, &c.test, cfg, rounds, 10 + k as u64)
                .with_context(|| format!("{}: local-only training", c.id))?;
            Ok(curve.iter().map(|p| p.accuracy).collect())
        })
        .collect()
}

/// Scores the final global model, each client's personalized model and
/// its local-only model on the client's own test distribution.
/// `local_curves` are [`local_only`]'s; `rounds_run` picks the point with
/// the same epoch budget.
pub fn evaluate_clients(
    global_path: &Path,
    clients: &[std::sync::Arc<SimClient>],
    data: &SimData,
    local_curves: &[Vec<f64>],
    rounds_run: u32,
    scratch: &Path,
) -> Result<PersonalizationReport> {
    let global = std::fs::read(global_path)?;
    let mut rows = Vec::with_capacity(clients.len());
    for ((client, share), curve) in clients.iter().zip(&data.clients).zip(local_curves) {
        let id = &share.id;
        if share.test.is_empty() {
            anyhow::bail!(
                "{id} has no examples in its own test distribution: raise --test-fraction"
            );
        }
        let personal = client.personal_path();
        // A byzantine client never splits, so it has no personal values.
        let merged = if personal.exists() {
            let merged_path = scratch.join(format!("{id}-personalized.safetensors"));
            merge_personal(global_path, &personal, &merged_path, &Limits::default()).with_context(
                || format!("{id}: merging its personal values into the final model"),
            )?;
            std::fs::read(&merged_path)?
        } else {
            global.clone()
        };
        rows.push(ClientAccuracy {
            client_id: id.clone(),
            test_examples: share.test.len(),
            global_accuracy: evaluate(&global, &share.test)?.accuracy,
            personalized_accuracy: evaluate(&merged, &share.test)?.accuracy,
            local_accuracy: curve[rounds_run as usize - 1],
        });
    }
    let mean = |f: fn(&ClientAccuracy) -> f64| rows.iter().map(f).sum::<f64>() / rows.len() as f64;
    Ok(PersonalizationReport {
        method: "fedselect",
        global_accuracy: mean(|r| r.global_accuracy),
        personalized_accuracy: mean(|r| r.personalized_accuracy),
        local_accuracy: mean(|r| r.local_accuracy),
        clients: rows,
    })
}

/// The per-client table `fedstep simulate` prints.
pub fn table(r: &PersonalizationReport) -> String {
    let mut out = format!(
        "accuracy on each client's own test distribution (FedSelect):\n  {:<9} {:>5}  {:>7}  {:>12}  {:>10}\n",
        "client", "tests", "global", "personalized", "local only"
    );
    for c in &r.clients {
        out += &format!(
            "  {:<9} {:>5}  {:>7.4}  {:>12.4}  {:>10.4}\n",
            c.client_id,
            c.test_examples,
            c.global_accuracy,
            c.personalized_accuracy,
            c.local_accuracy
        );
    }
    out += &format!(
        "  {:<9} {:>5}  {:>7.4}  {:>12.4}  {:>10.4}",
        "mean", "", r.global_accuracy, r.personalized_accuracy, r.local_accuracy
    );
    out
}
