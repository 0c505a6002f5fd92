//! What can go wrong while taking part in a round. The worker turns every
//! error into a logged outcome: the message is left for redelivery unless
//! the error says the message itself is hopeless.

use std::path::PathBuf;

use fedstep_cloud::CloudError;

use crate::trainer::TrainError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A port failed (after retries, if it was transient).
    #[error(transparent)]
    Cloud(#[from] CloudError),
    /// The downloaded global model is not the one the message announced.
    #[error("global model {key}: SHA-256 {actual} does not match the announced {expected}")]
    Checksum {
        key: String,
        expected: String,
        actual: String,
    },
    /// The downloaded global model is not a usable safetensors file.
    #[error("global model {key}: {reason}")]
    BadGlobalModel { key: String, reason: String },
    #[error("trainer failed: {0}")]
    Train(#[from] TrainError),
    /// The trainer ran but handed back something unusable.
    #[error("trainer output rejected: {0}")]
    Output(String),
    /// Merging or splitting for FedSelect failed (names the file and rule).
    #[error("personalization: {0}")]
    Personalization(String),
    /// SCAFFOLD's variate files could not be made (names the rule).
    #[error("scaffold: {0}")]
    Scaffold(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ClientError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ClientError {
        let path = path.into();
        move |source| ClientError::Io { path, source }
    }
}
