//! fedstep-client: one federated-learning participant (docs/design.md §3 step 2).
//!
//! The client long-polls its queue for `global_model_ready`, downloads the
//! round's global model (checksum verified), trains locally, uploads its
//! model to its own S3 prefix and writes its `updates` row. The message is
//! deleted only after the row is written, and kept invisible while the
//! client works, so a crash anywhere means redelivery, never a lost round.
//!
//! Everything is written against the ports of `fedstep-cloud`
//! ([`ClientQueue`](fedstep_cloud::ports::ClientQueue),
//! [`ObjectStore`](fedstep_cloud::ports::ObjectStore),
//! [`Ledger`](fedstep_cloud::ports::Ledger)), so the same [`Worker`] runs
//! over SQS/S3/DynamoDB (the `fedstep-client` binary) and over in-process
//! adapters (the simulator and the tests).
//!
//! Map: [`config`] (client.toml) · [`message`] (untrusted queue bodies) ·
//! [`worker`] (the loop, one message at a time) · [`round`] (one round:
//! download, train, upload, record) · [`trainer`] (the trainer port) with
//! [`builtin_trainer`] and [`external_trainer`] ([`external_report`] is its
//! JSON contract) · [`output_check`] (what any trainer hands back) ·
//! [`personalize`] (FedSelect's personal file) · [`scaffold`] (SCAFFOLD's
//! variate files) ·
//! [`heartbeat`] (visibility extension) · [`retry`] (backoff + jitter) ·
//! [`progress`] (spinner on a TTY, log lines otherwise) · [`workdir`] (private
//! to this user).

pub mod builtin_trainer;
pub mod config;
pub mod error;
pub mod external_report;
pub mod external_trainer;
pub mod heartbeat;
pub mod message;
pub mod output_check;
pub mod personalize;
pub mod progress;
pub mod retry;
pub mod round;
pub mod scaffold;
pub mod trainer;
pub mod version;
pub mod workdir;
pub mod worker;

pub use config::ClientConfig;
pub use error::ClientError;
pub use trainer::{AnyTrainer, TrainError, TrainReport, TrainRequest, Trainer};
pub use worker::{Outcome, RunEnd, Worker, WorkerOptions};
