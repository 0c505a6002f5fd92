//! Why a round is FAILED, as a type. The round row stores it as one line of
//! text (`failure`, the DynamoDB attribute and JSON key), and that text is
//! also what operators read in `fedstep job status` and in the workflow's
//! Cause: its wording is part of the stored schema. This module is the only
//! place that writes that text and the only place that reads it back (when a
//! row is decoded); the engine matches on the variants.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::bounded;
use crate::error::CloudError;
use crate::job_failure::JobFailure;

const QUORUM_NOT_MET: &str = "quorum not met: ";
const NO_USABLE_UPDATE: &str = "no usable update: ";
const JOB_FAILED: &str = "job failed: ";
const SECURE_AGGREGATION: &str = "secure aggregation failed: ";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum RoundFailure {
    /// The deadline passed with fewer than min_clients usable updates.
    QuorumNotMet { detail: String },
    /// Every update was rejected (before or by the aggregation); `detail`
    /// joins the clients' reasons.
    NoUsableUpdate { detail: String },
    /// The job's execution failed while the round was open or being
    /// aggregated (ReportFailure); `detail` is the error and its cause.
    JobFailed { detail: String },
    /// A secure round's phase closed with too few survivors, or too few
    /// shares arrived to remove the masks (`fedstep_secagg::RoundError`);
    /// `detail` names the phase and the missing clients.
    SecureAggregation { detail: String },
    /// Text this version does not recognize (a row written by another
    /// version, or by hand); reported as is.
    Other(String),
}

impl RoundFailure {
    /// `detail` is the text after "quorum not met: " (built by the engine
    /// from ids the job check bounded, so it is not cut here).
    pub fn quorum_not_met(detail: String) -> RoundFailure {
        RoundFailure::QuorumNotMet { detail }
    }

    /// `detail` joins client reasons; the whole stored text is bounded to
    /// [`bounded::FAILURE_BYTES`] (the prefix needs no escaping, so cutting
    /// the detail to the rest of the budget is the same cut).
    pub fn no_usable_update(detail: &str) -> RoundFailure {
        RoundFailure::NoUsableUpdate {
            detail: bounded::bound(detail, bounded::FAILURE_BYTES - NO_USABLE_UPDATE.len()),
        }
    }

    /// The round was still open (or aggregating) when the job failed.
    pub fn job_failed(failure: &JobFailure) -> RoundFailure {
        RoundFailure::JobFailed {
            detail: bounded::bound(
                &failure.to_string(),
                bounded::FAILURE_BYTES - JOB_FAILED.len(),
            ),
        }
    }

    /// `detail`: the protocol's error, bounded like every stored failure.
    pub fn secure_aggregation(detail: &str) -> RoundFailure {
        RoundFailure::SecureAggregation {
            detail: bounded::bound(detail, bounded::FAILURE_BYTES - SECURE_AGGREGATION.len()),
        }
    }

    /// The failure a stored row's text describes.
    fn from_stored(text: String) -> RoundFailure {
        if let Some(detail) = text.strip_prefix(QUORUM_NOT_MET) {
            RoundFailure::QuorumNotMet {
                detail: detail.to_string(),
            }
        } else if let Some(detail) = text.strip_prefix(NO_USABLE_UPDATE) {
            RoundFailure::NoUsableUpdate {
                detail: detail.to_string(),
            }
        } else if let Some(detail) = text.strip_prefix(JOB_FAILED) {
            RoundFailure::JobFailed {
                detail: detail.to_string(),
            }
        } else if let Some(detail) = text.strip_prefix(SECURE_AGGREGATION) {
            RoundFailure::SecureAggregation {
                detail: detail.to_string(),
            }
        } else {
            RoundFailure::Other(text)
        }
    }
}

impl fmt::Display for RoundFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoundFailure::QuorumNotMet { detail } => write!(f, "{QUORUM_NOT_MET}{detail}"),
            RoundFailure::NoUsableUpdate { detail } => write!(f, "{NO_USABLE_UPDATE}{detail}"),
            RoundFailure::JobFailed { detail } => write!(f, "{JOB_FAILED}{detail}"),
            RoundFailure::SecureAggregation { detail } => {
                write!(f, "{SECURE_AGGREGATION}{detail}")
            }
            RoundFailure::Other(text) => f.write_str(text),
        }
    }
}

impl From<String> for RoundFailure {
    fn from(text: String) -> RoundFailure {
        RoundFailure::from_stored(text)
    }
}

impl From<RoundFailure> for String {
    fn from(failure: RoundFailure) -> String {
        failure.to_string()
    }
}

/// The error a FAILED round is reported as by CloseRound (a retried one
/// reports the stored failure again).
impl From<RoundFailure> for CloudError {
    fn from(failure: RoundFailure) -> CloudError {
        match failure {
            // Too few survivors is the secure round's quorum failure: the
            // workflow treats both alike (the job's retry policy applies).
            RoundFailure::QuorumNotMet { .. } | RoundFailure::SecureAggregation { .. } => {
                CloudError::QuorumNotMet(failure.to_string())
            }
            RoundFailure::NoUsableUpdate { detail } => {
                CloudError::Aggregate(fedstep_core::AggregateError::NoUsableUpdate(detail))
            }
            RoundFailure::JobFailed { .. } | RoundFailure::Other(_) => {
                CloudError::Other(failure.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_text_is_unchanged_and_reads_back() {
        for (failure, text) in [
            (
                RoundFailure::quorum_not_met("1 of min_clients 3 updates received".into()),
                "quorum not met: 1 of min_clients 3 updates received",
            ),
            (
                RoundFailure::no_usable_update("a: checksum: bad; b: late"),
                "no usable update: a: checksum: bad; b: late",
            ),
            (
                RoundFailure::job_failed(&JobFailure::new("AggregatorError", "AccessDenied")),
                "job failed: AggregatorError: AccessDenied",
            ),
            (
                RoundFailure::secure_aggregation("phase share_keys: 2 clients survived, 3 needed"),
                "secure aggregation failed: phase share_keys: 2 clients survived, 3 needed",
            ),
            (
                RoundFailure::Other("round 1 of job `j` failed".into()),
                "round 1 of job `j` failed",
            ),
        ] {
            assert_eq!(failure.to_string(), text);
            let json = serde_json::to_value(&failure).unwrap();
            assert_eq!(json, serde_json::Value::String(text.into()));
            assert_eq!(
                serde_json::from_value::<RoundFailure>(json).unwrap(),
                failure
            );
        }
    }

    #[test]
    fn a_long_detail_is_cut_as_the_whole_text_was() {
        let detail = "x".repeat(3 * bounded::FAILURE_BYTES);
        let failure = RoundFailure::no_usable_update(&detail);
        assert_eq!(
            failure.to_string(),
            bounded::failure(&format!("no usable update: {detail}"))
        );
    }
}
