//! StartRound: open the round row and tell the clients a global model is
//! ready. The task token stays in the ledger; clients never see it.

use super::close::stored_failure;
use super::{hand_over, RoundEngine};
use crate::error::{CloudError, Result};
use crate::job::Job;
use crate::keys;
use crate::ports::{Clock, Ledger, Notifier, OpenRound, StreamingStore, TaskCallback};
use crate::records::{
    ClosedBy, GlobalModelReady, Notification, RoundRecord, RoundStatus, VersionBuffer, SCHEMA,
};

impl<S, L, N, C, K> RoundEngine<S, L, N, C, K>
where
    S: StreamingStore,
    L: Ledger,
    N: Notifier,
    C: TaskCallback,
    K: Clock,
{
    /// StartRound task. `job` comes from the execution input (checked
    /// where it was read, like every [`Job`]). Writes the job
    /// header if absent, opens the round row (token, expected clients,
    /// min_clients, deadline = now + timeout, the global model's key and
    /// checksum — that model must already be in the store) and publishes
    /// `global_model_ready` (with SCAFFOLD, naming the round's server
    /// variate too: `scaffold.rs`).
    ///
    /// Idempotent: a retry (new token) replaces the stored token and
    /// publishes again (clients dedupe by job and round). The stream path
    /// may have handed the round over to the old token, which is dead now:
    /// a round that is complete already is handed over with the new one.
    /// If the round is already past OPEN: AGGREGATING or CLOSED → handed
    /// over (CloseRound then waits for, or returns, the stored result);
    /// FAILED → the failure is sent.
    pub async fn start_round(
        &self,
        job: &Job,
        round: u32,
        task_token: &str,
    ) -> Result<RoundRecord> {
        job.check_round(round).map_err(CloudError::Invalid)?;
        // `fedstep job start` refuses such a job; an execution started
        // some other way fails here, before any client is told of a round.
        if job.secure_aggregation().is_some() {
            return Err(CloudError::Invalid(
                crate::secure::SecureSettings::NOT_RUNNABLE_YET.into(),
            ));
        }
        if task_token.is_empty() {
            return Err(CloudError::Invalid("the task token is empty".into()));
        }
        self.ledger.put_job(job).await?;

        let key = keys::global_model(&job.job_id, round);
        let Some(global) = self.store.head(&key).await? else {
            return Err(CloudError::NotFound(format!(
                "the global model of round {round} of job `{}` is not at `{key}` \
                 (round 1's is uploaded by `fedstep job start`, round r+1's by round r's aggregation)",
                job.job_id
            )));
        };
        let server_variate = if job.scaffold() {
            Some(self.round_server_variate(job, round).await?)
        } else {
            None
        };
        let timeout = i64::try_from(job.round_timeout_seconds).unwrap_or(i64::MAX);
        let fresh = RoundRecord {
            job_id: job.job_id.clone(),
            round,
            status: RoundStatus::Open,
            task_token: Some(task_token.to_string()),
            expected_clients: job.clients.clone(),
            min_clients: job.min_clients,
            deadline: self.clock.now().saturating_add(timeout),
            received: Default::default(),
            rejections: Default::default(),
            lease_owner: None,
            lease_expires_at: None,
            global_model_key: key,
            global_checksum: global.sha256,
            global_store_checksum: global.store_checksum,
            result: None,
            failure: None,
            buffer: job.asynchronous().map(|a| VersionBuffer {
                size: a.buffer_size,
                max_staleness: a.max_staleness,
            }),
            secure_closed: Vec::new(),
            secure_received: Default::default(),
            secure_awaiting: None,
        };
        match self.ledger.open_round(&fresh).await? {
            opened @ (OpenRound::Created | OpenRound::TokenReplaced) => {
                // Async: the previous version's late rows come along
                // (carry.rs), before the clients hear of this one.
                if let Some(a) = job.asynchronous() {
                    self.carry_late_rows_into(
                        &job.job_id,
                        round,
                        a.max_staleness.saturating_add(1),
                    )
                    .await?;
                }
                // Publish what is stored (a retry keeps the first deadline).
                let row = self
                    .ledger
                    .get_round(&job.job_id, round)
                    .await?
                    .unwrap_or(fresh);
                let message = Notification::GlobalModelReady(GlobalModelReady {
                    schema: SCHEMA,
                    job_id: row.job_id.clone(),
                    round,
                    model_key: row.global_model_key.clone(),
                    checksum: row.global_checksum.clone(),
                    deadline: row.deadline,
                    round_config: job.round_config.clone(),
                    server_variate: server_variate.clone(),
                    asynchronous: job.asynchronous().is_some(),
                });
                self.notifier.publish(&message).await?;
                if matches!(opened, OpenRound::TokenReplaced) && hand_over::ready(&row).is_some() {
                    self.hand_over(&row, task_token, ClosedBy::Stream).await?;
                }
                Ok(row)
            }
            OpenRound::AlreadyPast(row) => {
                match row.status {
                    RoundStatus::Aggregating | RoundStatus::Closed => {
                        let closed_by = row
                            .result
                            .as_ref()
                            .map_or(ClosedBy::Stream, |r| r.closed_by);
                        self.hand_over(&row, task_token, closed_by).await?;
                    }
                    RoundStatus::Failed => {
                        let failure = stored_failure(&row);
                        let name = failure.start_round_error_name();
                        // The cause is what CloseRound would report.
                        let cause = CloudError::from(failure).to_string();
                        self.callback
                            .fail(task_token, name.as_str(), &cause)
                            .await?;
                    }
                    RoundStatus::Open => {}
                }
                Ok(*row)
            }
        }
    }
}
