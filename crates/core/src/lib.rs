//! fedstep-core: the numeric heart of fedstep.
//!
//! Everything here is synchronous and free of AWS: models are safetensors
//! read through positioned reads from any byte source (a file, an S3
//! object: `bytes.rs`), aggregation streams them block by block so that
//! memory stays at "one block per client" whatever the model size, and the
//! pipeline of stages (clipping, adaptive clipping, zeroing, robust
//! combiners, DP noise, server optimizers; one file each, see `stages`) is
//! configured from TOML or JSON as a [`PipelineConfig`], checked when it is
//! parsed. The cloud crate and the CLI call [`aggregate()`]; a sharded
//! aggregation runs its steps (`aggregate::prepare` and `Prepared`'s
//! methods, over the grid of [`shard`]) one task at a time. Clients that
//! personalize (FedSelect) call [`personalization`]'s `split_update` and
//! `merge_personal`; SCAFFOLD's server variate is updated by [`scaffold`],
//! beside the aggregation; asynchronous mode's staleness discount and
//! rebased inputs are [`staleness`]. The other public modules are the model format
//! and the records other crates read or write.

pub mod aggregate;
pub mod bytes;
mod combine;
mod config;
mod error;
pub mod float;
mod limits;
pub mod measurements;
pub mod model;
pub mod personalization;
mod quality;
pub mod scaffold;
pub mod shard;
pub mod share_cap;
mod stages;
pub mod staleness;
mod statistics;
mod stream;
pub mod update_meta;
pub mod weighting;
pub mod writer;

pub use aggregate::{aggregate, AggregationOutcome, AggregationRequest};
pub use bytes::{ByteSink, ByteSource, FileTarget, Input, OutputTarget};
pub use config::PipelineConfig;
pub use error::{AggregateError, ModelError};
pub use limits::Limits;
pub use stages::Pipeline;
pub use update_meta::{UpdateMeta, UpdateSource};
