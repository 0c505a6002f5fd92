//! Finalize: register the last round's model as an artifact and announce
//! the end of training; an async job's late rows that no version will
//! carry get their final reason (carry.rs). Idempotent: the artifact id is `{job}:{round}` and
//! the registry keeps the first registration.

use serde_json::{json, Value};

use super::carry::ended_with;
use super::RoundEngine;
use crate::error::{CloudError, Result};
use crate::job::Job;
use crate::ports::{Clock, Ledger, Notifier, StreamingStore, TaskCallback};
use crate::records::{Artifact, Notification, RoundResult, RoundStatus, TrainingComplete, SCHEMA};
use crate::timefmt::rfc3339_utc;

/// llm_type of artifacts from type-blind aggregations.
pub const UNTYPED: &str = "untyped";

impl<S, L, N, C, K> RoundEngine<S, L, N, C, K>
where
    S: StreamingStore,
    L: Ledger,
    N: Notifier,
    C: TaskCallback,
    K: Clock,
{
    /// Finalize task. The round must be CLOSED; its stored result is the
    /// authority (the `result` passed in is only checked to name the same
    /// job and round). Returns `{"job_id", "artifact_id", "final_model_key"}`.
    pub async fn finalize(&self, job_id: &str, round: u32, result: &RoundResult) -> Result<Value> {
        if result.job_id != job_id || result.round != round {
            return Err(CloudError::Invalid(format!(
                "the result is for job `{}` round {}, not job `{job_id}` round {round}",
                result.job_id, result.round
            )));
        }
        let job = self
            .ledger
            .get_job(job_id)
            .await?
            .ok_or_else(|| CloudError::NotFound(format!("job `{job_id}`")))?;
        let row = self
            .ledger
            .get_round(job_id, round)
            .await?
            .ok_or_else(|| CloudError::NotFound(format!("round {round} of job `{job_id}`")))?;
        let stored = match (&row.status, row.result) {
            (RoundStatus::Closed, Some(r)) => r,
            (status, _) => {
                return Err(CloudError::Invalid(format!(
                    "round {round} of job `{job_id}` is {status:?}, not CLOSED: nothing to finalize"
                )))
            }
        };
        if job.asynchronous().is_some() {
            self.settle_late_rows_at_end(job_id, round, &ended_with(round))
                .await?;
        }
        let key = stored.global_model_key.clone();
        let info = self.store.head(&key).await?.ok_or_else(|| {
            CloudError::NotFound(format!("the final model of job `{job_id}` at `{key}`"))
        })?;
        let artifact_id = format!("{job_id}:{round}");
        let artifact = Artifact {
            artifact_id: artifact_id.clone(),
            job_id: job_id.to_string(),
            round,
            llm_type: self.final_llm_type(&job, &stored).await?,
            model_key: key.clone(),
            checksum: info.sha256,
            created_at: rfc3339_utc(self.clock.now()),
            metrics: stored.metrics.clone(),
        };
        self.ledger.put_artifact(&artifact).await?;
        self.notifier
            .publish(&Notification::TrainingComplete(TrainingComplete {
                schema: SCHEMA,
                job_id: job_id.to_string(),
                final_round: round,
                final_model_key: key.clone(),
                artifact_id: artifact_id.clone(),
            }))
            .await?;
        Ok(json!({"job_id": job_id, "artifact_id": artifact_id, "final_model_key": key}))
    }

    /// The aggregation's target type: the configured one, or with "auto"
    /// the type of the accepted updates (they all share it), or "untyped".
    async fn final_llm_type(&self, job: &Job, result: &RoundResult) -> Result<String> {
        let configured = job.pipeline().type_filter_name();
        match configured {
            "none" => Ok(UNTYPED.to_string()),
            "auto" => {
                for client in &result.accepted {
                    if let Some(t) = self
                        .ledger
                        .get_update(client, &result.job_id, result.round)
                        .await?
                        .and_then(|u| u.llm_type)
                    {
                        return Ok(t);
                    }
                }
                Ok(UNTYPED.to_string())
            }
            explicit => Ok(explicit.to_string()),
        }
    }
}
