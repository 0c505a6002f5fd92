//! SCAFFOLD's server side in the simulation: what the aggregator does
//! beside the model's aggregation (issue #19). Round 1's server variate is
//! zeros; after each close, the accepted clients' Δc_i go through
//! fedstep-core's `update_server_variate` and the new c is stored as
//! round r+1's `keys::server_variate`, where round r+1's clients read it
//! and the next update reads it back (`read_state` checks it).

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use fedstep_cloud::keys;
use fedstep_cloud::local::FsStore;
use fedstep_cloud::ports::ObjectStore;
use fedstep_core::scaffold::{
    read_state, update_server_variate, write_state, ServerState, VariateDelta, VariateLayout,
};
use fedstep_core::Limits;
use serde_json::Value;

/// Stores round 1's c (zeros, shaped like `model`'s float tensors).
pub async fn publish_initial(
    store: &FsStore,
    job_id: &str,
    model: &[u8],
    clients: usize,
    scratch: &Path,
) -> Result<()> {
    let layout = VariateLayout::of_model_bytes(model, &Limits::default())
        .map_err(|e| anyhow!("the initial model: {e}"))?;
    let state = ServerState::initial(&layout, clients);
    put(store, &keys::server_variate(job_id, 1), &state, scratch).await
}

/// After round `round` closed with `accepted`: c ← c + (|S|/N)·mean Δc_i,
/// stored for round `round + 1`. Returns the update's measurement.
pub async fn update_after_close(
    store: &FsStore,
    job_id: &str,
    round: u32,
    accepted: &[String],
    clients: usize,
    scratch: &Path,
) -> Result<Value> {
    let limits = Limits::default();
    std::fs::create_dir_all(scratch)?;
    let read = |key: String, name: &str| {
        let path = scratch.join(name);
        async move {
            store.get_file(&key, &path).await?;
            let bytes = std::fs::read(&path)?;
            std::fs::remove_file(&path).ok();
            anyhow::Ok(bytes)
        }
    };
    let model = read(keys::global_model(job_id, round), "model.safetensors").await?;
    let layout = VariateLayout::of_model_bytes(&model, &limits)
        .map_err(|e| anyhow!("round {round}'s global model: {e}"))?;
    let current = read(keys::server_variate(job_id, round), "c.safetensors").await?;
    let state = read_state(&current, &layout, clients, &limits)
        .map_err(|e| anyhow!("round {round}'s server variate: {e}"))?;
    let mut received: Vec<(String, Vec<u8>)> = Vec::with_capacity(accepted.len());
    let mut missing: Vec<(String, String)> = Vec::new();
    for id in accepted {
        match read(keys::variate_delta(job_id, round, id), "delta.safetensors").await {
            Ok(bytes) => received.push((id.clone(), bytes)),
            Err(e) => missing.push((id.clone(), format!("scaffold Δc: not readable: {e:#}"))),
        }
    }
    let deltas: Vec<VariateDelta<'_>> = received
        .iter()
        .map(|(id, bytes)| VariateDelta {
            client_id: id,
            bytes,
        })
        .collect();
    let mut update = update_server_variate(&state.variate, &deltas, clients, &limits)
        .map_err(|e| anyhow!("round {round}'s server variate update: {e}"))?;
    update.measurement.rejected.extend(missing);
    let next = ServerState {
        variate: update.variate,
        step: state.step + 1,
        total_clients: clients,
    };
    put(
        store,
        &keys::server_variate(job_id, round + 1),
        &next,
        scratch,
    )
    .await?;
    Ok(serde_json::to_value(&update.measurement)?)
}

async fn put(store: &FsStore, key: &str, state: &ServerState, scratch: &Path) -> Result<()> {
    std::fs::create_dir_all(scratch)?;
    let path = scratch.join("server_variate.safetensors");
    std::fs::write(&path, write_state(state).map_err(|e| anyhow!(e))?)?;
    store
        .put_file(key, &path)
        .await
        .with_context(|| format!("storing {key}"))?;
    std::fs::remove_file(&path).ok();
    Ok(())
}
