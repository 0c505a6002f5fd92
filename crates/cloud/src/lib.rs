//! fedstep-cloud: the round protocol of docs/design.md §3, written once against
//! small ports so that the same code runs in the Lambda (AWS adapters), in
//! the emulator worker, and in `fedstep simulate` (local adapters).

pub mod asynchronous;
pub mod bounded;
pub mod capacity;
pub mod checksum;
pub mod engine;
pub mod error;
pub mod job;
pub mod job_failure;
pub mod keys;
pub mod local;
pub mod ports;
pub mod records;
pub mod round_failure;
pub mod round_figures;
pub mod round_measurements;
pub mod secure;
pub mod secure_replay;
pub mod task_error_name;
pub mod timefmt;

pub use engine::{EngineConfig, RoundEngine, UpdateOutcome, DEFAULT_READ_AHEAD_BYTES};
pub use error::CloudError;
pub use job::{Job, JobSpec};
pub use job_failure::JobFailure;
pub use round_failure::RoundFailure;
pub use round_figures::RoundFigures;
pub use task_error_name::TaskErrorName;
