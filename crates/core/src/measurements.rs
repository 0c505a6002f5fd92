//! What one aggregation did, as a JSON-able record: per client (weight,
//! norm, scale, and why it was rejected, excluded, zeroed or not selected),
//! per stage, and totals. Every input update appears exactly once.
//! Deserialize too: the cloud engine stores it beside each round's output
//! model, and readers (`fedstep simulate`) parse it back as typed data.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientStatus {
    /// Took part with a non-zero weight.
    Accepted,
    /// Broken claims or model; `reason` says which rule.
    Rejected,
    /// Valid, but not of the round's target llm_type.
    Excluded,
    /// Valid, dropped by the zeroing stage for its norm.
    Zeroed,
    /// Valid, not chosen by Krum.
    NotSelected,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientMeasurement {
    pub client_id: String,
    pub status: ClientStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub num_examples: Option<u64>,
    pub llm_type: Option<String>,
    /// Type-aware quality multiplier, when `quality` weighting applied one.
    pub quality: Option<f64>,
    /// Normalized weight in the combination (sums to 1 over accepted).
    pub weight: Option<f64>,
    /// L2 norm of local − global (when a statistics pass ran with a global).
    pub update_norm: Option<f64>,
    /// Factor the update was scaled by (clipping).
    pub scale: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurements {
    pub weighting: String,
    pub llm_type: String,
    pub target_llm_type: Option<String>,
    pub combiner: String,
    pub accepted: usize,
    pub rejected: usize,
    pub excluded: usize,
    pub clients: Vec<ClientMeasurement>,
    pub stages: BTreeMap<String, Value>,
    pub tensors: usize,
    pub parameters: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Passes over the data (2 when statistics were needed); restarts after
    /// a mid-stream rejection count too.
    pub passes: u32,
    pub seconds: f64,
}

impl Measurements {
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}
