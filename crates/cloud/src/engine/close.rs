//! CloseRound, the workflow's aggregation task: it runs after StartRound,
//! whether the stream path handed the round over (every expected client in)
//! or the task timed out (the deadline). It claims the round itself, so the
//! quorum is judged on a row nobody else can change, then aggregates what
//! is in or fails the round. The aggregation gets the task's own time and
//! memory, never a stream invocation's.

use std::time::Duration;

use super::aggregation::{participants, Closing};
use super::RoundEngine;
use crate::error::{CloudError, Result};
use crate::ports::{Clock, Ledger, Notifier, StreamingStore, TaskCallback};
use crate::records::{ClosedBy, RoundRecord, RoundResult, RoundStatus};
use crate::round_failure::RoundFailure;

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
    /// CloseRound task. CLOSED → the stored result (a retry, or a racing
    /// attempt won). OPEN → claim; fewer than min_clients usable updates →
    /// FAILED and `QuorumNotMet`; else aggregate and return the result (the
    /// task output). AGGREGATING by someone else → wait for it (or for its
    /// lease to run out, then take over). FAILED → the stored reason as the
    /// error again (idempotent). `closed_by` is why the state machine runs
    /// it (stored with the result).
    pub async fn close_round(
        &self,
        job_id: &str,
        round: u32,
        closed_by: ClosedBy,
    ) -> Result<RoundResult> {
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
                RoundStatus::Failed => return Err(stored_failure(&row).into()),
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
                    let failure = quorum_not_met(&claimed, &usable);
                    self.ledger.fail_round(job_id, round, &failure).await?;
                    return Err(failure.into());
                }
                match self.aggregate_claimed(&job, &claimed, closed_by).await? {
                    Closing::Closed(result) => return Ok(result),
                    Closing::Failed(failure) => return Err(failure.into()),
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

fn quorum_not_met(row: &RoundRecord, usable: &[String]) -> RoundFailure {
    let missing: Vec<&str> = row
        .expected_clients
        .iter()
        .filter(|c| !usable.contains(c))
        .map(String::as_str)
        .collect();
    RoundFailure::quorum_not_met(format!(
        "{} of min_clients {} updates received (round {} of job `{}`; received: [{}]; missing or rejected: [{}])",
        usable.len(),
        row.min_clients,
        row.round,
        row.job_id,
        usable.join(", "),
        missing.join(", ")
    ))
}

/// Why a FAILED round failed, as stored (a row without one, which this
/// engine never writes, is reported as a plain failure).
pub(super) fn stored_failure(row: &RoundRecord) -> RoundFailure {
    row.failure.clone().unwrap_or_else(|| {
        RoundFailure::Other(format!(
            "round {} of job `{}` failed",
            row.round, row.job_id
        ))
    })
}
