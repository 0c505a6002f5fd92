//! The round engine (fedstep-cloud) over the AWS adapters.

use std::sync::Arc;

use fedstep_aws::{AwsConfig, DynamoLedger, S3Store, SfnCallback, SnsNotifier};
use fedstep_cloud::engine::{
    CommitOutcome, EngineConfig, PlanOutcome, RoundEngine, ShardTaskDone, UpdateOutcome,
};
use fedstep_cloud::ports::{Clock, Ledger, Notifier, StreamingStore, SystemClock, TaskCallback};
use fedstep_cloud::records::{ClosedBy, RoundRecord, RoundResult, UpdateRecord};
use fedstep_cloud::{CloudError, Job, JobFailure, DEFAULT_READ_AHEAD_BYTES};
use serde_json::Value;

use crate::emf;
use crate::handlers::RoundTasks;

pub type AwsEngine = RoundEngine<S3Store, DynamoLedger, SnsNotifier, SfnCallback, SystemClock>;

/// Lease on a claimed round. Longer than Lambda's 900 s maximum run time,
/// so a live aggregation is never taken over; a crashed one is, after this.
const DEFAULT_LEASE_SECONDS: i64 = 960;

pub fn build(cfg: &AwsConfig, owner: String) -> Result<AwsEngine, String> {
    let lease_seconds = match std::env::var("FEDSTEP_LEASE_SECONDS") {
        Ok(v) => v
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| format!("FEDSTEP_LEASE_SECONDS={v}: not a positive integer"))?,
        Err(_) => DEFAULT_LEASE_SECONDS,
    };
    let err = |e: CloudError| e.to_string();
    // Each round this engine closes becomes CloudWatch metrics (EMF on
    // stdout), in the Lambda and in local mode alike.
    Ok(RoundEngine::new(
        S3Store::from_config(cfg).map_err(err)?,
        DynamoLedger::from_config(cfg).map_err(err)?,
        SnsNotifier::from_config(cfg).map_err(err)?,
        SfnCallback::from_config(cfg),
        SystemClock,
        EngineConfig {
            read_ahead_bytes: DEFAULT_READ_AHEAD_BYTES,
            owner,
            lease_seconds,
        },
    )
    .observe_rounds(Arc::new(emf::print_round)))
}

/// Any round engine serves the handlers: the deployed one over the AWS
/// adapters, and `fedstep bench clients`'s, whose ledger counts its calls.
impl<S, L, N, C, K> RoundTasks for RoundEngine<S, L, N, C, K>
where
    S: StreamingStore + 'static,
    L: Ledger + 'static,
    N: Notifier + 'static,
    C: TaskCallback + 'static,
    K: Clock + 'static,
{
    type Outcome = UpdateOutcome;

    async fn start_round(
        &self,
        job: &Job,
        round: u32,
        task_token: &str,
    ) -> Result<RoundRecord, CloudError> {
        RoundEngine::start_round(self, job, round, task_token).await
    }

    async fn on_update(&self, update: &UpdateRecord) -> Result<UpdateOutcome, CloudError> {
        RoundEngine::on_update(self, update).await
    }

    async fn plan_round(
        &self,
        job_id: &str,
        round: u32,
        closed_by: ClosedBy,
    ) -> Result<PlanOutcome, CloudError> {
        RoundEngine::plan_round(self, job_id, round, closed_by).await
    }

    async fn shard_statistics(
        &self,
        job_id: &str,
        round: u32,
        attempt: &str,
        shard: usize,
    ) -> Result<ShardTaskDone, CloudError> {
        RoundEngine::shard_statistics(self, job_id, round, attempt, shard).await
    }

    async fn decide_round(
        &self,
        job_id: &str,
        round: u32,
        attempt: &str,
    ) -> Result<(), CloudError> {
        RoundEngine::decide_round(self, job_id, round, attempt).await
    }

    async fn aggregate_shard(
        &self,
        job_id: &str,
        round: u32,
        attempt: &str,
        shard: usize,
    ) -> Result<ShardTaskDone, CloudError> {
        RoundEngine::aggregate_shard(self, job_id, round, attempt, shard).await
    }

    async fn commit_round(
        &self,
        job_id: &str,
        round: u32,
        attempt: &str,
    ) -> Result<CommitOutcome, CloudError> {
        RoundEngine::commit_round(self, job_id, round, attempt).await
    }

    async fn finalize(
        &self,
        job_id: &str,
        round: u32,
        result: &RoundResult,
    ) -> Result<Value, CloudError> {
        RoundEngine::finalize(self, job_id, round, result).await
    }

    async fn report_failure(
        &self,
        job_id: &str,
        round: u32,
        failure: &JobFailure,
    ) -> Result<Value, CloudError> {
        RoundEngine::report_failure(self, job_id, round, failure).await
    }
}
