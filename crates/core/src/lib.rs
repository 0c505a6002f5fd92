//! fedstep-core: the numeric heart of fedstep.
//!
//! Everything here is synchronous and free of AWS: models are safetensors
//! read through positioned reads from any byte source (a file, an S3
//! object: `bytes.rs`), aggregation streams them block by block so that
//! memory stays at "one block per client" whatever the model size, and the
//! pipeline of stages (clipping, zeroing, robust combiners, DP noise, server
//! optimizers) is configured from TOML. The cloud crate and the CLI call
//! [`aggregate::aggregate`] and nothing below it; clients that personalize
//! (FedSelect) call [`personalization`]'s `split_update` and `merge_personal`.

pub mod aggregate;
pub mod bytes;
pub mod combine;
pub mod config;
pub mod error;
pub mod float;
pub mod limits;
pub mod manifest;
pub mod measurements;
pub mod model;
pub mod personalization;
pub mod quality;
pub mod share_cap;
pub mod stages;
pub mod statistics;
pub mod stream;
pub mod weighting;
pub mod writer;

pub use aggregate::{aggregate, AggregationOutcome, AggregationRequest};
pub use bytes::{ByteSink, ByteSource, FileTarget, Input, OutputTarget};
pub use config::PipelineConfig;
pub use error::{AggregateError, ModelError};
pub use limits::Limits;
pub use manifest::{UpdateMeta, UpdateSource};
