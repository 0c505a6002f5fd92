//! Errors the ports return. Adapters map their SDK errors onto these so the
//! engine can decide what is retryable without knowing about AWS.

#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// The thing asked for does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A conditional write lost (someone else changed the item first).
    #[error("condition failed: {0}")]
    ConditionFailed(String),
    /// Worth retrying (throttling, timeouts, 5xx).
    #[error("transient: {0}")]
    Transient(String),
    /// Bad data from outside (a row, a message, a config); not retryable.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The round cannot be aggregated: fewer than min_clients updates. The
    /// text is the whole cause, starting "quorum not met: " (it is what the
    /// state machine shows as the Cause of error `QuorumNotMet`).
    #[error("{0}")]
    QuorumNotMet(String),
    #[error("aggregation failed: {0}")]
    Aggregate(#[from] fedstep_core::AggregateError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

impl CloudError {
    pub fn is_transient(&self) -> bool {
        matches!(self, CloudError::Transient(_))
    }
}

pub type Result<T, E = CloudError> = std::result::Result<T, E>;
