//! Every error name a task of the aggregator fails with: the Step Functions
//! error names (Lambda `Diagnostic.error_type`, `SendTaskFailure.error`)
//! the state machine's Retry and Catch match on. They are written here and
//! nowhere else; statemachine/README.md says which are retried, and
//! tests/statemachine/test_asl.py reads this file to check that every one
//! is classified in the ASL.

use crate::error::CloudError;
use crate::round_failure::RoundFailure;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskErrorName {
    /// CloseRound: fewer than min_clients usable updates at the deadline.
    QuorumNotMet,
    /// A retried StartRound that finds its round FAILED for want of a
    /// usable update (CloseRound reports that as `AggregationFailed`).
    NoUsableUpdate,
    /// A StartRound that finds its round FAILED because the job failed
    /// while the round was open (ReportFailure): a new execution of a
    /// failed job does not reopen it.
    JobFailed,
    /// Bad data the engine refused ([`CloudError::Invalid`]).
    InvalidInput,
    /// A task payload the handlers cannot run (no token, no job, ...).
    InvalidTaskInput,
    NotFound,
    ConditionFailed,
    /// Worth a retry (throttling, timeouts, a stream batch to redo).
    Transient,
    /// The numeric core refused the round ([`CloudError::Aggregate`]).
    AggregationFailed,
    /// Anything unclassified: a system failure, retried.
    AggregatorError,
    /// The Lambda got an event that is neither a stream batch nor a task.
    UnknownEvent,
}

impl TaskErrorName {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskErrorName::QuorumNotMet => "QuorumNotMet",
            TaskErrorName::NoUsableUpdate => "NoUsableUpdate",
            TaskErrorName::JobFailed => "JobFailed",
            TaskErrorName::InvalidInput => "InvalidInput",
            TaskErrorName::InvalidTaskInput => "InvalidTaskInput",
            TaskErrorName::NotFound => "NotFound",
            TaskErrorName::ConditionFailed => "ConditionFailed",
            TaskErrorName::Transient => "Transient",
            TaskErrorName::AggregationFailed => "AggregationFailed",
            TaskErrorName::AggregatorError => "AggregatorError",
            TaskErrorName::UnknownEvent => "UnknownEvent",
        }
    }
}

impl CloudError {
    /// The name a task that failed with this error reports.
    pub fn task_error_name(&self) -> TaskErrorName {
        match self {
            CloudError::QuorumNotMet(_) => TaskErrorName::QuorumNotMet,
            CloudError::Invalid(_) => TaskErrorName::InvalidInput,
            CloudError::NotFound(_) => TaskErrorName::NotFound,
            CloudError::ConditionFailed(_) => TaskErrorName::ConditionFailed,
            CloudError::Transient(_) => TaskErrorName::Transient,
            CloudError::Aggregate(_) => TaskErrorName::AggregationFailed,
            CloudError::Io(_) | CloudError::Other(_) => TaskErrorName::AggregatorError,
        }
    }
}

impl RoundFailure {
    /// The name a retried StartRound task is failed with when it finds its
    /// round FAILED: a quorum failure (a secure round's too few survivors is one) and a
    /// job's failure keep their name,
    /// anything else is "no usable update".
    pub fn start_round_error_name(&self) -> TaskErrorName {
        match self {
            RoundFailure::QuorumNotMet { .. } | RoundFailure::SecureAggregation { .. } => {
                TaskErrorName::QuorumNotMet
            }
            RoundFailure::JobFailed { .. } => TaskErrorName::JobFailed,
            RoundFailure::NoUsableUpdate { .. } | RoundFailure::Other(_) => {
                TaskErrorName::NoUsableUpdate
            }
        }
    }
}
