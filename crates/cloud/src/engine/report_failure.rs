//! ReportFailure: the job's execution is failing (a task's error after its
//! retries, or a contract violation), and everyone waiting on it is told
//! before it ends: the round still OPEN or AGGREGATING becomes FAILED (so a
//! late row gets a final reason, and a shard task still running loses its
//! lease), an async job's rows waiting to be carried are settled, and
//! `job_failed` goes to the clients, which stop waiting for a round that
//! will not come. Idempotent: a retry finds the round FAILED and nothing
//! waiting, and publishes the same message again (harmless: a client
//! logs and deletes each, and one with `exit_on_complete` has left at the
//! first).

use serde_json::{json, Value};

use super::carry::failed_at;
use super::RoundEngine;
use crate::error::Result;
use crate::job_failure::JobFailure;
use crate::ports::{Clock, Ledger, Notifier, StreamingStore, TaskCallback};
use crate::records::{JobFailed, Notification, RoundStatus, SCHEMA};
use crate::round_failure::RoundFailure;

impl<S, L, N, C, K> RoundEngine<S, L, N, C, K>
where
    S: StreamingStore,
    L: Ledger,
    N: Notifier,
    C: TaskCallback,
    K: Clock,
{
    /// ReportFailure task for job `job_id`, which failed in round `round`
    /// with `failure`. Neither the job nor the round need exist (the job
    /// may have failed because one did not): the clients are told anyway.
    /// Returns `{"job_id", "round", "notified": true}`.
    pub async fn report_failure(
        &self,
        job_id: &str,
        round: u32,
        failure: &JobFailure,
    ) -> Result<Value> {
        if let Some(row) = self.ledger.get_round(job_id, round).await? {
            // A FAILED round keeps its own reason (quorum not met, …),
            // which is what failed the job; a CLOSED one has its result.
            if matches!(row.status, RoundStatus::Open | RoundStatus::Aggregating) {
                self.ledger
                    .fail_round(job_id, round, &RoundFailure::job_failed(failure))
                    .await?;
            }
        }
        let asynchronous = self
            .ledger
            .get_job(job_id)
            .await?
            .is_some_and(|job| job.asynchronous().is_some());
        if asynchronous {
            self.settle_late_rows_at_end(job_id, round, &failed_at(round))
                .await?;
        }
        self.notifier
            .publish(&Notification::JobFailed(JobFailed {
                schema: SCHEMA,
                job_id: job_id.to_string(),
                round,
                error: failure.error().to_string(),
                cause: failure.cause().to_string(),
            }))
            .await?;
        Ok(json!({"job_id": job_id, "round": round, "notified": true}))
    }
}
