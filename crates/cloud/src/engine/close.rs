//! CloseRound in one process: the steps the workflow runs as tasks
//! (docs/design.md §3a, [`super::sharded`]) run here one after the other,
//! every shard in turn. `fedstep simulate`, the fault harness and the
//! engine's tests close rounds this way; a deployment runs PlanRound,
//! the Maps and CommitRound as the state machine's tasks.

use super::sharded::{CommitOutcome, PlanOutcome};
use super::RoundEngine;
use crate::error::Result;
use crate::ports::{Clock, Ledger, Notifier, StreamingStore, TaskCallback};
use crate::records::{ClosedBy, RoundRecord, RoundResult};
use crate::round_failure::RoundFailure;

impl<S, L, N, C, K> RoundEngine<S, L, N, C, K>
where
    S: StreamingStore,
    L: Ledger,
    N: Notifier,
    C: TaskCallback,
    K: Clock,
{
    /// Plans the round, runs every shard's tasks and commits, until the
    /// round is closed (a commit that sends it back to the plan runs a new
    /// attempt). Errors as the tasks report them (`QuorumNotMet`, a failed
    /// round's stored failure, the system's transient failures); after a
    /// failed step the attempt's lease is given up, so a retry starts at
    /// once.
    pub async fn close_round(
        &self,
        job_id: &str,
        round: u32,
        closed_by: ClosedBy,
    ) -> Result<RoundResult> {
        loop {
            let (attempt, shards, statistics) =
                match self.plan_round(job_id, round, closed_by).await? {
                    PlanOutcome::Closed { closed } => return Ok(closed),
                    PlanOutcome::Planned {
                        attempt,
                        shards,
                        statistics,
                        ..
                    } => (attempt, shards, statistics),
                };
            match self
                .run_attempt(job_id, round, &attempt, &shards, statistics)
                .await
            {
                Ok(CommitOutcome::Closed(result)) => return Ok(result),
                Ok(CommitOutcome::Replan { .. }) => continue,
                Err(e) => {
                    self.give_up(job_id, round, &attempt).await;
                    return Err(e);
                }
            }
        }
    }

    async fn run_attempt(
        &self,
        job_id: &str,
        round: u32,
        attempt: &str,
        shards: &[usize],
        statistics: bool,
    ) -> Result<CommitOutcome> {
        if statistics {
            for &shard in shards {
                self.shard_statistics(job_id, round, attempt, shard).await?;
            }
            self.decide_round(job_id, round, attempt).await?;
        }
        for &shard in shards {
            self.aggregate_shard(job_id, round, attempt, shard).await?;
        }
        self.commit_round(job_id, round, attempt).await
    }

    /// Gives `attempt`'s lease up, if it still holds the round.
    async fn give_up(&self, job_id: &str, round: u32, attempt: &str) {
        if let Ok(Some(row)) = self.ledger.get_round(job_id, round).await {
            if row.lease_owner.as_deref() == Some(attempt) {
                self.release_lease(&row).await;
            }
        }
    }
}

pub(super) fn quorum_not_met(row: &RoundRecord, usable: &[String]) -> RoundFailure {
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
