//! What `fedstep bench clients` watches, without changing what it watches:
//! wrappers around the real ports that note the moments the figures are
//! made of (a row written, a round closed, a message received) and count
//! the aggregator's ledger calls.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedstep_cloud::engine::{CommitOutcome, PlanOutcome, ShardTaskDone};
use fedstep_cloud::ports::{
    AddReceived, ClientQueue, Ledger, Notifier, OpenRound, PutSecureRow, PutUpdate, QueueMessage,
};
use fedstep_cloud::records::{
    Artifact, ClosedBy, ClosedSecurePhase, Notification, RoundRecord, RoundResult, SecureAwaiting,
    SecurePhase, SecureRow, UpdateRecord,
};
use fedstep_cloud::{CloudError, Job, JobFailure, RoundFailure};
use fedstep_lambda::handlers::RoundTasks;
use serde_json::Value;

type Result<T> = std::result::Result<T, CloudError>;

/// What a client's next message announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Next {
    Round(u32),
    Complete,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A client's `updates` row is in the table (its put returned).
    RowWritten { client: String, round: u32 },
    /// The aggregator's conditional CLOSED write succeeded.
    RoundClosed { round: u32 },
    /// The aggregator's publish of this announcement returned.
    Published { next: Next },
    /// A client's long poll returned this message.
    Received { client: String, next: Next },
}

/// Every event with its time since the bench started, in one process (one
/// monotonic clock for all of them).
pub struct Timeline {
    start: Instant,
    events: Mutex<Vec<(Duration, Event)>>,
}

impl Timeline {
    pub fn new() -> Arc<Timeline> {
        Arc::new(Timeline {
            start: Instant::now(),
            events: Mutex::new(Vec::new()),
        })
    }

    fn note(&self, event: Event) {
        let at = self.start.elapsed();
        self.events.lock().expect("timeline lock").push((at, event));
    }

    pub fn events(&self) -> Vec<(Duration, Event)> {
        self.events.lock().expect("timeline lock").clone()
    }
}

tokio::task_local! {
    /// Set while the aggregator handles one stream record, so the ledger
    /// calls made for it are told apart from the round tasks' calls.
    static HANDLING_UPDATE: ();
}

/// The aggregator's DynamoDB calls through the ledger port.
#[derive(Default)]
pub struct LedgerCalls {
    pub total: AtomicU64,
    pub for_updates: AtomicU64,
}

/// A ledger that notes rows written and rounds closed, and counts calls.
pub struct ObservedLedger<L> {
    inner: L,
    timeline: Arc<Timeline>,
    calls: Arc<LedgerCalls>,
}

impl<L: Ledger> ObservedLedger<L> {
    pub fn new(inner: L, timeline: Arc<Timeline>, calls: Arc<LedgerCalls>) -> Self {
        ObservedLedger {
            inner,
            timeline,
            calls,
        }
    }

    fn count(&self) {
        self.calls.total.fetch_add(1, Ordering::Relaxed);
        if HANDLING_UPDATE.try_with(|_| ()).is_ok() {
            self.calls.for_updates.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<L: Ledger> Ledger for ObservedLedger<L> {
    async fn put_job(&self, job: &Job) -> Result<()> {
        self.count();
        self.inner.put_job(job).await
    }
    async fn get_job(&self, job_id: &str) -> Result<Option<Job>> {
        self.count();
        self.inner.get_job(job_id).await
    }
    async fn open_round(&self, round: &RoundRecord) -> Result<OpenRound> {
        self.count();
        self.inner.open_round(round).await
    }
    async fn get_round(&self, job_id: &str, round: u32) -> Result<Option<RoundRecord>> {
        self.count();
        self.inner.get_round(job_id, round).await
    }
    async fn list_rounds(&self, job_id: &str) -> Result<Vec<RoundRecord>> {
        self.count();
        self.inner.list_rounds(job_id).await
    }
    async fn add_received(&self, job_id: &str, round: u32, client: &str) -> Result<AddReceived> {
        self.count();
        self.inner.add_received(job_id, round, client).await
    }
    async fn record_rejection(
        &self,
        job_id: &str,
        round: u32,
        client: &str,
        reason: &str,
    ) -> Result<()> {
        self.count();
        self.inner
            .record_rejection(job_id, round, client, reason)
            .await
    }
    async fn claim_round(
        &self,
        job_id: &str,
        round: u32,
        owner: &str,
        now: i64,
        lease_seconds: i64,
    ) -> Result<Option<RoundRecord>> {
        self.count();
        self.inner
            .claim_round(job_id, round, owner, now, lease_seconds)
            .await
    }
    async fn renew_lease(
        &self,
        job_id: &str,
        round: u32,
        owner: &str,
        now: i64,
        lease_seconds: i64,
    ) -> Result<bool> {
        self.count();
        self.inner
            .renew_lease(job_id, round, owner, now, lease_seconds)
            .await
    }
    async fn close_round(
        &self,
        job_id: &str,
        round: u32,
        owner: &str,
        result: &RoundResult,
    ) -> Result<bool> {
        self.count();
        let closed = self.inner.close_round(job_id, round, owner, result).await?;
        if closed {
            self.timeline.note(Event::RoundClosed { round });
        }
        Ok(closed)
    }
    async fn fail_round(&self, job_id: &str, round: u32, failure: &RoundFailure) -> Result<()> {
        self.count();
        self.inner.fail_round(job_id, round, failure).await
    }
    async fn put_update(&self, update: &UpdateRecord) -> Result<PutUpdate> {
        self.count();
        let put = self.inner.put_update(update).await?;
        if matches!(put, PutUpdate::Created | PutUpdate::AlreadyThere) {
            self.timeline.note(Event::RowWritten {
                client: update.client_id.clone(),
                round: update.round,
            });
        }
        Ok(put)
    }
    async fn get_update(
        &self,
        client_id: &str,
        job_id: &str,
        round: u32,
    ) -> Result<Option<UpdateRecord>> {
        self.count();
        self.inner.get_update(client_id, job_id, round).await
    }
    async fn put_secure_row(&self, row: &SecureRow) -> Result<PutSecureRow> {
        self.count();
        self.inner.put_secure_row(row).await
    }
    async fn get_secure_row(
        &self,
        client_id: &str,
        job_id: &str,
        round: u32,
        phase: SecurePhase,
    ) -> Result<Option<SecureRow>> {
        self.count();
        self.inner
            .get_secure_row(client_id, job_id, round, phase)
            .await
    }
    async fn close_secure_phase(
        &self,
        job_id: &str,
        round: u32,
        closed: &ClosedSecurePhase,
    ) -> Result<RoundRecord> {
        self.count();
        self.inner.close_secure_phase(job_id, round, closed).await
    }
    async fn add_secure_received(
        &self,
        job_id: &str,
        round: u32,
        phase: SecurePhase,
        client: &str,
    ) -> Result<AddReceived> {
        self.count();
        self.inner
            .add_secure_received(job_id, round, phase, client)
            .await
    }
    async fn await_secure_phase(
        &self,
        job_id: &str,
        round: u32,
        awaiting: &SecureAwaiting,
        task_token: &str,
    ) -> Result<RoundRecord> {
        self.count();
        self.inner
            .await_secure_phase(job_id, round, awaiting, task_token)
            .await
    }
    async fn put_artifact(&self, artifact: &Artifact) -> Result<()> {
        self.count();
        self.inner.put_artifact(artifact).await
    }
    async fn list_artifacts(&self, llm_type: Option<&str>) -> Result<Vec<Artifact>> {
        self.count();
        self.inner.list_artifacts(llm_type).await
    }
}

/// A client's queue that notes when each announcement arrives.
pub struct ObservedQueue<Q> {
    inner: Q,
    client: String,
    timeline: Arc<Timeline>,
}

impl<Q: ClientQueue> ObservedQueue<Q> {
    pub fn new(inner: Q, client: String, timeline: Arc<Timeline>) -> Self {
        ObservedQueue {
            inner,
            client,
            timeline,
        }
    }
}

/// The announcement a message body carries, if it is one of ours.
pub fn announcement(body: &str) -> Option<Next> {
    let v: Value = serde_json::from_str(body).ok()?;
    match v.get("type")?.as_str()? {
        "global_model_ready" => Some(Next::Round(u32::try_from(v.get("round")?.as_u64()?).ok()?)),
        "training_complete" => Some(Next::Complete),
        _ => None,
    }
}

impl<Q: ClientQueue> ClientQueue for ObservedQueue<Q> {
    async fn receive(&self, max: u32, wait_seconds: u32) -> Result<Vec<QueueMessage>> {
        let got = self.inner.receive(max, wait_seconds).await?;
        for m in &got {
            if let Some(next) = announcement(&m.body) {
                self.timeline.note(Event::Received {
                    client: self.client.clone(),
                    next,
                });
            }
        }
        Ok(got)
    }
    async fn delete(&self, receipt: &str) -> Result<()> {
        self.inner.delete(receipt).await
    }
    async fn extend_visibility(&self, receipt: &str, seconds: u32) -> Result<()> {
        self.inner.extend_visibility(receipt, seconds).await
    }
}

/// The aggregator's notifier, noting when each announcement is out: it
/// splits the fan-out into the workflow's part and the delivery's.
pub struct ObservedNotifier<N> {
    inner: N,
    timeline: Arc<Timeline>,
}

impl<N: Notifier> ObservedNotifier<N> {
    pub fn new(inner: N, timeline: Arc<Timeline>) -> Self {
        ObservedNotifier { inner, timeline }
    }
}

impl<N: Notifier> Notifier for ObservedNotifier<N> {
    async fn publish(&self, message: &Notification) -> Result<()> {
        self.inner.publish(message).await?;
        let next = match message {
            Notification::GlobalModelReady(m) => Next::Round(m.round),
            Notification::TrainingComplete(_) | Notification::JobFailed(_) => Next::Complete,
        };
        self.timeline.note(Event::Published { next });
        Ok(())
    }
}

/// The aggregator's handlers, counting stream records and marking the
/// ledger calls made while handling one.
pub struct CountingRoundTasks<A> {
    inner: A,
    pub records: AtomicU64,
}

impl<A> CountingRoundTasks<A> {
    pub fn new(inner: A) -> Self {
        CountingRoundTasks {
            inner,
            records: AtomicU64::new(0),
        }
    }
}

impl<A: RoundTasks> RoundTasks for CountingRoundTasks<A> {
    type Outcome = A::Outcome;

    async fn start_round(&self, job: &Job, round: u32, task_token: &str) -> Result<RoundRecord> {
        self.inner.start_round(job, round, task_token).await
    }

    async fn on_update(&self, update: &UpdateRecord) -> Result<A::Outcome> {
        self.records.fetch_add(1, Ordering::Relaxed);
        HANDLING_UPDATE
            .scope((), self.inner.on_update(update))
            .await
    }

    async fn plan_round(
        &self,
        job_id: &str,
        round: u32,
        closed_by: ClosedBy,
    ) -> Result<PlanOutcome> {
        self.inner.plan_round(job_id, round, closed_by).await
    }

    async fn shard_statistics(
        &self,
        job_id: &str,
        round: u32,
        attempt: &str,
        shard: usize,
    ) -> Result<ShardTaskDone> {
        self.inner
            .shard_statistics(job_id, round, attempt, shard)
            .await
    }

    async fn decide_round(&self, job_id: &str, round: u32, attempt: &str) -> Result<()> {
        self.inner.decide_round(job_id, round, attempt).await
    }

    async fn aggregate_shard(
        &self,
        job_id: &str,
        round: u32,
        attempt: &str,
        shard: usize,
    ) -> Result<ShardTaskDone> {
        self.inner
            .aggregate_shard(job_id, round, attempt, shard)
            .await
    }

    async fn commit_round(&self, job_id: &str, round: u32, attempt: &str) -> Result<CommitOutcome> {
        self.inner.commit_round(job_id, round, attempt).await
    }

    async fn finalize(&self, job_id: &str, round: u32, result: &RoundResult) -> Result<Value> {
        self.inner.finalize(job_id, round, result).await
    }

    async fn report_failure(
        &self,
        job_id: &str,
        round: u32,
        failure: &JobFailure,
    ) -> Result<Value> {
        self.inner.report_failure(job_id, round, failure).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_are_read_from_the_bodies_clients_get() {
        assert_eq!(
            announcement(r#"{"type":"global_model_ready","schema":1,"job_id":"j","round":3}"#),
            Some(Next::Round(3))
        );
        assert_eq!(
            announcement(r#"{"type":"training_complete","job_id":"j","final_round":2}"#),
            Some(Next::Complete)
        );
        assert_eq!(announcement(r#"{"type":"other"}"#), None);
        assert_eq!(announcement("not json"), None);
        assert_eq!(
            announcement(r#"{"type":"global_model_ready","round":-1}"#),
            None
        );
    }
}
