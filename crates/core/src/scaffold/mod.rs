//! SCAFFOLD's server side (Karimireddy et al. 2020, issue #19): the
//! server control variate c, kept from round to round, and its update from
//! the clients' Δc_i.
//!
//! Each round the clients receive c beside the global model, train with
//! the drift correction c − c_i, and send Δc_i (the change of their own
//! variate, which they keep) beside their update. The server then sets
//!
//! `c ← c + (|S|/N)·mean_{i∈S} Δc_i = c + (1/N)·Σ_{i∈S} Δc_i`
//!
//! over the S clients whose Δc_i it accepted out of the job's N, so that
//! c stays the mean of all N client variates when only some take part.
//!
//! One idea a file: [`variate`] (a control variate: F32 tensors named and
//! shaped like the model's float tensors, parsed and checked once from
//! untrusted bytes), [`server_update`] (the update above, rejecting a
//! client's Δc_i with a bounded reason rather than failing), [`state`]
//! (c between rounds, one safetensors file like the optimizers' state),
//! [`pipeline_rule`] (which aggregation pipelines it runs with, and why).
//!
//! The model itself is aggregated by [`crate::aggregate()`] unchanged; c
//! is updated beside it, in memory, not by the streaming combine pass:
//! [`VariateSum`] takes the Δc_i one at a time (c, the f64 running sum and
//! one Δc_i are held), which is how the round engine's commit feeds it.

pub mod pipeline_rule;
pub mod server_update;
pub mod state;
pub mod variate;

pub use pipeline_rule::check_pipeline;
pub use server_update::{
    update_server_variate, ServerUpdate, ServerUpdateMeasurement, VariateDelta, VariateSum,
};
pub use state::{read_state, write_state, ServerState};
pub use variate::{ControlVariate, VariateLayout};
