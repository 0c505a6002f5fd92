//! The deadline path: CloseRound runs when StartRound timed out. It claims
//! the round itself, so the quorum is judged on a row nobody else can
//! change, then aggregates what is in or fails the round.

use std::time::Duration;

use fedstep_core::AggregateError;

use super::aggregation::{participants, Closing};
use super::RoundEngine;
use crate::error::{CloudError, Result};
use crate::ports::{Clock, Ledger, Notifier, StreamingStore, TaskCallback};
use crate::records::{RoundRecord, RoundResult, RoundStatus};

/// How often to look again while another engine holds the round.
const POLL: Duration = Duration::from_millis(250);

impl<S, L, N, C, K> RoundEngine<S, L, N, C, K>
where
    S: StreamingStore,
    L: Ledger,
    N: Notifier,
    C: TaskCallback,
    K: Clock,
{
    /// CloseRound task. CLOSED → the stored result (the stream path won).
    /// OPEN → claim; fewer than min_clients usable updates → FAILED and
    /// `QuorumNotMet`; else aggregate and return the result (no callback:
    /// the return value is the task output). AGGREGATING by someone else →
    /// wait for it (or for its lease to run out, then take over).
    /// FAILED → the stored reason as the error again (idempotent).
    pub async fn close_round(&self, job_id: &str, round: u32) -> Result<RoundResult> {
        let job = self
            .ledger
            .get_job(job_id)
            .await?
            .ok_or_else(|| CloudError::NotFound(format!("job `{job_id}`")))?;
        let started = tokio::time::Instant::now();
        let max_wait = Duration::from_secs(self.config.lease_seconds.clamp(1, 900) as u64);
        loop {
            let row =
                self.ledger.get_round(job_id, round).await?.ok_or_else(|| {
                    CloudError::NotFound(format!("round {round} of job `{job_id}`"))
                })?;
            match row.status {
                RoundStatus::Closed => {
                    return row.result.ok_or_else(|| {
                        CloudError::Other(format!(
                            "round {round} of job `{job_id}` is CLOSED without a result"
                        ))
                    })
                }
                RoundStatus::Failed => return Err(failure_error(&row)),
                RoundStatus::Open | RoundStatus::Aggregating => {}
            }
            let claimed = self
                .ledger
                .claim_round(
                    job_id,
                    round,
                    &self.config.owner,
                    self.clock.now(),
                    self.config.lease_seconds,
                )
                .await?;
            if let Some(claimed) = claimed {
                let usable = participants(&claimed);
                if usable.len() < claimed.min_clients as usize {
                    let cause = quorum_cause(&claimed, &usable);
                    self.ledger.fail_round(job_id, round, &cause).await?;
                    return Err(CloudError::QuorumNotMet(cause));
                }
                match self.aggregate_claimed(&job, &claimed, "deadline").await? {
                    Closing::Closed(result) => return Ok(result),
                    Closing::Failed(reason) => return Err(no_usable(reason)),
                    // Whoever took over will close it: look again.
                    Closing::LeaseLost => continue,
                }
            }
            if started.elapsed() >= max_wait {
                return Err(CloudError::Transient(format!(
                    "round {round} of job `{job_id}` is being aggregated by `{}` (lease until {}); try again",
                    row.lease_owner.as_deref().unwrap_or("?"),
                    row.lease_expires_at.unwrap_or(0)
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

fn quorum_cause(row: &RoundRecord, usable: &[String]) -> String {
    let missing: Vec<&str> = row
        .expected_clients
        .iter()
        .filter(|c| !usable.contains(c))
        .map(String::as_str)
        .collect();
    format!(
        "quorum not met: {} of min_clients {} updates received (round {} of job `{}`; received: [{}]; missing or rejected: [{}])",
        usable.len(),
        row.min_clients,
        row.round,
        row.job_id,
        usable.join(", "),
        missing.join(", ")
    )
}

fn no_usable(reason: String) -> CloudError {
    let detail = reason
        .strip_prefix("no usable update: ")
        .unwrap_or(&reason)
        .to_string();
    CloudError::Aggregate(AggregateError::NoUsableUpdate(detail))
}

/// The error a FAILED round reports again (a retried CloseRound).
pub(super) fn failure_error(row: &RoundRecord) -> CloudError {
    let reason = row
        .failure
        .clone()
        .unwrap_or_else(|| format!("round {} of job `{}` failed", row.round, row.job_id));
    if reason.starts_with("quorum not met") {
        CloudError::QuorumNotMet(reason)
    } else if reason.starts_with("no usable update") {
        no_usable(reason)
    } else {
        CloudError::Other(reason)
    }
}
