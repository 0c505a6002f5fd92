//! Async jobs' own stop conditions (`[async] max_updates`, `max_seconds`),
//! decided at the commit beside the round rules (`stop_rule.rs`: `rounds`
//! caps the versions, `[stop]` applies as for rounds).

use super::RoundEngine;
use crate::error::Result;
use crate::job::Job;
use crate::ports::{Clock, Ledger, Notifier, StreamingStore, TaskCallback};
use crate::records::RoundStatus;

impl<S, L, N, C, K> RoundEngine<S, L, N, C, K>
where
    S: StreamingStore,
    L: Ledger,
    N: Notifier,
    C: TaskCallback,
    K: Clock,
{
    /// Whether an async job goes on after version `round`, which accepted
    /// `accepted_now` updates. A sync job, or one with neither limit set,
    /// always does (as far as these limits go).
    pub(super) async fn async_goes_on(
        &self,
        job: &Job,
        round: u32,
        accepted_now: usize,
    ) -> Result<bool> {
        let Some(a) = job.asynchronous() else {
            return Ok(true);
        };
        if a.max_updates.is_none() && a.max_seconds.is_none() {
            return Ok(true);
        }
        let rounds = self.ledger.list_rounds(&job.job_id).await?;
        if let Some(max) = a.max_updates {
            let before: usize = rounds
                .iter()
                .filter(|r| r.round < round && r.status == RoundStatus::Closed)
                .filter_map(|r| r.result.as_ref())
                .map(|r| r.accepted.len())
                .sum();
            if (before + accepted_now) as u64 >= max {
                return Ok(false);
            }
        }
        if let Some(max) = a.max_seconds {
            // Version 1 opened at its deadline minus the round timeout.
            let timeout = i64::try_from(job.round_timeout_seconds).unwrap_or(i64::MAX);
            if let Some(first) = rounds.iter().find(|r| r.round == 1) {
                let opened = first.deadline.saturating_sub(timeout);
                let elapsed = self.clock.now().saturating_sub(opened);
                if elapsed >= i64::try_from(max).unwrap_or(i64::MAX) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}
