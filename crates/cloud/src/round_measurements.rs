//! The measurements of one aggregation as stored beside the model it wrote
//! (at [`crate::keys::round_measurements`] of the next round), so a reader
//! (`fedstep simulate`'s report, an operator) sees the weights, norms and
//! reasons without recomputing them. The round result in the ledger and in
//! Step Functions keeps only counts and reasons: per-client figures grow
//! with the clients and live in this object only.
//!
//! Every participant appears exactly once in `measurements.clients`:
//! - each update the numeric core aggregated, as the core measured it
//!   (accepted, rejected, excluded, zeroed or not selected);
//! - each client the engine itself rejected before the core read it (at
//!   `on_update`, when checking its row and object, or when its object did
//!   not hash to its row's checksum): `rejected`, with the engine's reason.
//!
//! Clients that never sent an update are not participants and are absent,
//! as are rows rejected as late once the round was claimed (they are in
//! the round's rejections, but the aggregation never saw them).
//! Every reason is [`bounded`](crate::bounded::reason): it may quote what a
//! client sent. Sorted by client id, so a rerun of the same aggregation
//! writes the same file (but for what is measured: `seconds`, and the bytes
//! the shard tasks fetched, which depend on the store's read-ahead).

use std::collections::BTreeMap;

use fedstep_core::measurements::{ClientMeasurement, ClientStatus, Measurements};
use fedstep_core::scaffold::ServerUpdateMeasurement;
use serde::{Deserialize, Serialize};

use crate::bounded;
use crate::error::{CloudError, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundMeasurements {
    pub job_id: String,
    /// The round that was aggregated; its output is round `round + 1`'s
    /// global model.
    pub round: u32,
    pub measurements: Measurements,
    /// SCAFFOLD jobs: the server variate's update (which Δc_i went into c,
    /// which were left out and why). The clients' models are in
    /// `measurements` as for any job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaffold: Option<ServerUpdateMeasurement>,
    /// Bytes each shard task fetched from the store, in shard order:
    /// headers, its ranges of every input, and whatever it read to hash
    /// the inputs it verifies (none when the store's checksums bound them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shard_bytes_fetched: Vec<u64>,
}

impl RoundMeasurements {
    /// The core's measurements of the last aggregation run, joined with the
    /// clients the engine rejected before it (`engine_rejected`, reasons as
    /// recorded in the round). A client in both keeps the core's entry: the
    /// core measured it, so it reached the core.
    pub fn new(
        job_id: &str,
        round: u32,
        mut measurements: Measurements,
        engine_rejected: &BTreeMap<String, String>,
    ) -> Self {
        for c in &mut measurements.clients {
            c.reason = c.reason.as_deref().map(bounded::reason);
        }
        for (client, reason) in engine_rejected {
            if measurements.clients.iter().any(|c| &c.client_id == client) {
                continue;
            }
            measurements.rejected += 1;
            measurements.clients.push(ClientMeasurement {
                client_id: client.clone(),
                status: ClientStatus::Rejected,
                reason: Some(bounded::reason(reason)),
                num_examples: None,
                llm_type: None,
                quality: None,
                weight: None,
                update_norm: None,
                scale: None,
            });
        }
        measurements
            .clients
            .sort_by(|a, b| a.client_id.cmp(&b.client_id));
        RoundMeasurements {
            job_id: job_id.to_string(),
            round,
            measurements,
            scaffold: None,
            shard_bytes_fetched: Vec::new(),
        }
    }

    pub fn to_json_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self).map_err(|e| {
            CloudError::Other(format!("encoding round {}'s measurements: {e}", self.round))
        })
    }

    /// Parses a stored file; `key` names it in the error.
    pub fn from_json_bytes(key: &str, bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes)
            .map_err(|e| CloudError::Invalid(format!("`{key}` is not a round's measurements: {e}")))
    }

    /// The entry of `client_id`, if it took part.
    pub fn client(&self, client_id: &str) -> Option<&ClientMeasurement> {
        self.measurements
            .clients
            .iter()
            .find(|c| c.client_id == client_id)
    }
}
