//! The handlers: thin translations between the events the aggregator gets
//! (Step Functions task payloads, DynamoDB stream records) and the round
//! engine in fedstep-cloud. The same functions serve the Lambda runtime and
//! the emulator worker (local mode), so both run exactly this code.

use std::fmt::Debug;
use std::future::Future;

use fedstep_cloud::engine::{CommitOutcome, PlanOutcome, ShardTaskDone};
use fedstep_cloud::records::{ClosedBy, RoundRecord, RoundResult, UpdateRecord};
use fedstep_cloud::{CloudError, Job, JobFailure, JobSpec, TaskErrorName};
use serde::Deserialize;
use serde_json::Value;

/// What the handlers need from the round engine (fedstep_cloud's
/// `RoundEngine` implements it; tests use a fake). Kept as a trait so the
/// event plumbing is tested without AWS.
pub trait RoundTasks: Send + Sync + 'static {
    /// What `on_update` reports; only logged here.
    type Outcome: Debug + Send;

    fn start_round(
        &self,
        job: &Job,
        round: u32,
        task_token: &str,
    ) -> impl Future<Output = Result<RoundRecord, CloudError>> + Send;
    fn on_update(
        &self,
        update: &UpdateRecord,
    ) -> impl Future<Output = Result<Self::Outcome, CloudError>> + Send;
    fn plan_round(
        &self,
        job_id: &str,
        round: u32,
        closed_by: ClosedBy,
    ) -> impl Future<Output = Result<PlanOutcome, CloudError>> + Send;
    fn shard_statistics(
        &self,
        job_id: &str,
        round: u32,
        attempt: &str,
        shard: usize,
    ) -> impl Future<Output = Result<ShardTaskDone, CloudError>> + Send;
    fn decide_round(
        &self,
        job_id: &str,
        round: u32,
        attempt: &str,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    fn aggregate_shard(
        &self,
        job_id: &str,
        round: u32,
        attempt: &str,
        shard: usize,
    ) -> impl Future<Output = Result<ShardTaskDone, CloudError>> + Send;
    fn commit_round(
        &self,
        job_id: &str,
        round: u32,
        attempt: &str,
    ) -> impl Future<Output = Result<CommitOutcome, CloudError>> + Send;
    fn finalize(
        &self,
        job_id: &str,
        round: u32,
        result: &RoundResult,
    ) -> impl Future<Output = Result<Value, CloudError>> + Send;
    fn report_failure(
        &self,
        job_id: &str,
        round: u32,
        failure: &JobFailure,
    ) -> impl Future<Output = Result<Value, CloudError>> + Send;
}

/// A failed task: `error_type` becomes the Step Functions error name
/// (Lambda `Diagnostic.error_type`, activity `SendTaskFailure.error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    pub error_type: TaskErrorName,
    pub message: String,
}

impl TaskError {
    pub fn invalid(message: impl Into<String>) -> TaskError {
        TaskError {
            error_type: TaskErrorName::InvalidTaskInput,
            message: message.into(),
        }
    }
}

impl From<CloudError> for TaskError {
    fn from(err: CloudError) -> TaskError {
        let error_type = err.task_error_name();
        let message = match err {
            // The cause is the engine's text ("quorum not met: 1 of
            // min_clients 3 ..."); keep it as is, without a second prefix.
            CloudError::QuorumNotMet(cause) => cause,
            other => other.to_string(),
        };
        TaskError {
            error_type,
            message,
        }
    }
}

/// The task actions of statemachine/README.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    StartRound,
    PlanRound,
    ShardStatistics,
    DecideRound,
    AggregateShard,
    CommitRound,
    Finalize,
    ReportFailure,
}

impl Action {
    pub const ALL: [Action; 8] = [
        Action::StartRound,
        Action::PlanRound,
        Action::ShardStatistics,
        Action::DecideRound,
        Action::AggregateShard,
        Action::CommitRound,
        Action::Finalize,
        Action::ReportFailure,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Action::StartRound => "start_round",
            Action::PlanRound => "plan_round",
            Action::ShardStatistics => "shard_statistics",
            Action::DecideRound => "decide_round",
            Action::AggregateShard => "aggregate_shard",
            Action::CommitRound => "commit_round",
            Action::Finalize => "finalize",
            Action::ReportFailure => "report_failure",
        }
    }

    fn parse(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == name)
    }
}

#[derive(Debug, Deserialize)]
struct TaskPayload {
    action: String,
    job_id: String,
    round: u32,
    #[serde(default)]
    result: Option<Value>,
    /// plan_round: why the state machine closes the round (`"stream"`:
    /// StartRound was handed over; `"deadline"`: it timed out). Also in
    /// commit_round's payload, where the plan's stands.
    #[serde(default)]
    closed_by: Option<ClosedBy>,
    /// The attempt PlanRound made (every task after it).
    #[serde(default)]
    attempt: Option<String>,
    /// The shard of a Map iteration (shard_statistics, aggregate_shard).
    #[serde(default)]
    shard: Option<usize>,
    /// report_failure: the `{"Error", "Cause"}` the workflow caught.
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    context: Value,
}

/// The action of a task payload, if it is one.
pub fn task_action(payload: &Value) -> Option<Action> {
    payload
        .get("action")
        .and_then(Value::as_str)
        .and_then(Action::parse)
}

/// Runs one task. Returns the task's output (ignored for start_round,
/// whose result arrives later through the task token).
pub async fn handle_task<A: RoundTasks>(engine: &A, payload: Value) -> Result<Value, TaskError> {
    let task: TaskPayload = serde_json::from_value(payload)
        .map_err(|e| TaskError::invalid(format!("task payload: {e}")))?;
    let action = Action::parse(&task.action)
        .ok_or_else(|| TaskError::invalid(format!("unknown action `{}`", task.action)))?;
    tracing::info!(action = action.name(), job_id = %task.job_id, round = task.round, "task");
    match action {
        Action::StartRound => {
            // On AWS the token is in the context object of the
            // .waitForTaskToken task; the emulator worker puts the
            // activity's token at the same place.
            let token = task
                .context
                .pointer("/Task/Token")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| TaskError::invalid("start_round without context.Task.Token"))?;
            let job = job_from_context(&task.context, &task.job_id)?;
            job.check_round(task.round).map_err(TaskError::invalid)?;
            let record = engine.start_round(&job, task.round, token).await?;
            Ok(serde_json::json!({
                "job_id": record.job_id,
                "round": record.round,
                "status": record.status,
                "deadline": record.deadline,
            }))
        }
        Action::PlanRound => {
            let closed_by = task
                .closed_by
                .ok_or_else(|| TaskError::invalid("plan_round without `closed_by`"))?;
            let planned = engine
                .plan_round(&task.job_id, task.round, closed_by)
                .await?;
            to_output(&planned)
        }
        Action::ShardStatistics => {
            let (attempt, shard) = (task.attempt()?, task.shard()?);
            let done = engine
                .shard_statistics(&task.job_id, task.round, attempt, shard)
                .await?;
            to_output(&done)
        }
        Action::DecideRound => {
            engine
                .decide_round(&task.job_id, task.round, task.attempt()?)
                .await?;
            Ok(serde_json::json!({"decided": true}))
        }
        Action::AggregateShard => {
            let (attempt, shard) = (task.attempt()?, task.shard()?);
            let done = engine
                .aggregate_shard(&task.job_id, task.round, attempt, shard)
                .await?;
            to_output(&done)
        }
        Action::CommitRound => {
            let committed = engine
                .commit_round(&task.job_id, task.round, task.attempt()?)
                .await?;
            to_output(&committed)
        }
        Action::Finalize => {
            let raw = task
                .result
                .ok_or_else(|| TaskError::invalid("finalize without `result`"))?;
            let result: RoundResult = serde_json::from_value(raw)
                .map_err(|e| TaskError::invalid(format!("finalize `result`: {e}")))?;
            Ok(engine.finalize(&task.job_id, task.round, &result).await?)
        }
        Action::ReportFailure => {
            let caught = task
                .error
                .ok_or_else(|| TaskError::invalid("report_failure without `error`"))?;
            let failure = JobFailure::from_caught(&caught);
            Ok(engine
                .report_failure(&task.job_id, task.round, &failure)
                .await?)
        }
    }
}

impl TaskPayload {
    fn attempt(&self) -> Result<&str, TaskError> {
        self.attempt
            .as_deref()
            .ok_or_else(|| TaskError::invalid(format!("{} without `attempt`", self.action)))
    }

    fn shard(&self) -> Result<usize, TaskError> {
        self.shard
            .ok_or_else(|| TaskError::invalid(format!("{} without `shard`", self.action)))
    }
}

fn to_output<T: serde::Serialize>(value: &T) -> Result<Value, TaskError> {
    serde_json::to_value(value).map_err(|e| CloudError::Other(e.to_string()).into())
}

/// The job is the execution input (written by `fedstep job start`: the
/// JobSpec JSON, which includes `round_timeout_seconds`). Input from
/// outside: checked here, once per invocation; the engine trusts the `Job`.
fn job_from_context(context: &Value, job_id: &str) -> Result<Job, TaskError> {
    let input = context
        .pointer("/Execution/Input")
        .ok_or_else(|| TaskError::invalid("no context.Execution.Input (the job)"))?;
    // Some integrations hand the input over as a JSON string.
    let job: JobSpec = match input {
        Value::String(text) => serde_json::from_str(text),
        other => serde_json::from_value(other.clone()),
    }
    .map_err(|e| TaskError::invalid(format!("execution input is not a job: {e}")))?;
    let job = job
        .check()
        .map_err(|e| TaskError::invalid(format!("execution input: {e}")))?;
    if job.job_id != job_id {
        return Err(TaskError::invalid(format!(
            "task job_id `{job_id}` differs from the execution input's `{}`",
            job.job_id
        )));
    }
    Ok(job)
}

pub use crate::stream_record::StreamItem;

/// Whether a failed update is worth retrying. Transient faults are, and so
/// are unclassified ones (an SDK error we do not know, a local I/O error):
/// the stream retries them until the event source's retry limit. Bad data,
/// a lost condition or a missing round will not change on retry.
fn retry_worthy(err: &CloudError) -> bool {
    matches!(
        err,
        CloudError::Transient(_) | CloudError::Io(_) | CloudError::Other(_)
    )
}

/// Processes a batch in order and returns the ids to report as
/// `batchItemFailures`. Lambda retries from the lowest failed sequence
/// number, so after the first retryable failure the rest of the batch is not
/// processed and is reported too (processing it now would only repeat it).
pub async fn handle_stream<A: RoundTasks>(engine: &A, items: &[StreamItem]) -> Vec<String> {
    for (i, item) in items.iter().enumerate() {
        if item.event_name != "INSERT" {
            // Update rows are written once; MODIFY/REMOVE are not the protocol.
            tracing::debug!(id = %item.id, event = %item.event_name, "ignored stream record");
            continue;
        }
        let update = match &item.update {
            Ok(u) => u,
            Err(why) => {
                // Retrying cannot make a malformed row decode: log and move on.
                tracing::warn!(id = %item.id, reason = %why, "rejected an update row that does not decode");
                continue;
            }
        };
        match engine.on_update(update).await {
            Ok(outcome) => tracing::info!(
                id = %item.id,
                client_id = %update.client_id,
                job_id = %update.job_id,
                round = update.round,
                outcome = ?outcome,
                "update processed"
            ),
            Err(err) if retry_worthy(&err) => {
                tracing::warn!(id = %item.id, error = %err, remaining = items.len() - i, "update failed; the batch is retried from here");
                return items[i..].iter().map(|it| it.id.clone()).collect();
            }
            Err(err) => tracing::error!(
                id = %item.id,
                client_id = %update.client_id,
                error = %err,
                "update dropped: not retryable"
            ),
        }
    }
    Vec::new()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fedstep_cloud::records::RoundStatus;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// Builds the error a failing on_update returns.
    pub type MakeError = fn(String) -> CloudError;

    /// Records the calls; `fail_on` makes on_update fail for that client.
    #[derive(Default)]
    pub struct Fake {
        pub calls: Mutex<Vec<String>>,
        pub fail_on: Option<(String, MakeError)>,
        pub quorum_not_met: bool,
    }

    pub fn result(job_id: &str, round: u32) -> RoundResult {
        RoundResult {
            job_id: job_id.into(),
            round,
            global_model_key: fedstep_cloud::keys::global_model(job_id, round + 1),
            metrics: BTreeMap::new(),
            continue_training: false,
            closed_by: ClosedBy::Deadline,
            accepted: vec![],
            rejected: BTreeMap::new(),
        }
    }

    impl Fake {
        fn call(&self, call: String) {
            self.calls.lock().unwrap().push(call);
        }
    }

    impl RoundTasks for Fake {
        type Outcome = &'static str;

        async fn start_round(
            &self,
            job: &Job,
            round: u32,
            token: &str,
        ) -> Result<RoundRecord, CloudError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("start {} {round} {token}", job.job_id));
            Ok(RoundRecord {
                job_id: job.job_id.clone(),
                round,
                status: RoundStatus::Open,
                task_token: Some(token.into()),
                expected_clients: job.clients.clone(),
                min_clients: job.min_clients,
                deadline: 0,
                received: Default::default(),
                rejections: Default::default(),
                lease_owner: None,
                lease_expires_at: None,
                global_model_key: String::new(),
                global_checksum: String::new(),
                global_store_checksum: None,
                result: None,
                failure: None,
                buffer: None,
                secure_closed: Vec::new(),
                secure_received: Default::default(),
                secure_awaiting: None,
            })
        }

        async fn on_update(&self, u: &UpdateRecord) -> Result<&'static str, CloudError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("update {}", u.client_id));
            match &self.fail_on {
                Some((client, make)) if *client == u.client_id => Err(make("boom".into())),
                _ => Ok("recorded"),
            }
        }

        async fn plan_round(
            &self,
            job_id: &str,
            round: u32,
            closed_by: ClosedBy,
        ) -> Result<PlanOutcome, CloudError> {
            self.call(format!("plan {job_id} {round} {closed_by}"));
            if self.quorum_not_met {
                return Err(CloudError::QuorumNotMet(
                    "quorum not met: 1 of min_clients 3 updates received".into(),
                ));
            }
            Ok(PlanOutcome::Planned {
                attempt: "a1".into(),
                shards: vec![0, 1],
                statistics: true,
                concurrency: 4,
            })
        }

        async fn shard_statistics(
            &self,
            job_id: &str,
            round: u32,
            attempt: &str,
            shard: usize,
        ) -> Result<ShardTaskDone, CloudError> {
            self.call(format!("statistics {job_id} {round} {attempt} {shard}"));
            Ok(ShardTaskDone {
                shard,
                superseded: false,
            })
        }

        async fn decide_round(
            &self,
            job_id: &str,
            round: u32,
            attempt: &str,
        ) -> Result<(), CloudError> {
            self.call(format!("decide {job_id} {round} {attempt}"));
            Ok(())
        }

        async fn aggregate_shard(
            &self,
            job_id: &str,
            round: u32,
            attempt: &str,
            shard: usize,
        ) -> Result<ShardTaskDone, CloudError> {
            self.call(format!("shard {job_id} {round} {attempt} {shard}"));
            Ok(ShardTaskDone {
                shard,
                superseded: false,
            })
        }

        async fn commit_round(
            &self,
            job_id: &str,
            round: u32,
            attempt: &str,
        ) -> Result<CommitOutcome, CloudError> {
            self.call(format!("commit {job_id} {round} {attempt}"));
            Ok(CommitOutcome::Closed(RoundResult {
                closed_by: ClosedBy::Stream,
                ..result(job_id, round)
            }))
        }

        async fn finalize(
            &self,
            job_id: &str,
            round: u32,
            r: &RoundResult,
        ) -> Result<Value, CloudError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("finalize {job_id} {round} {}", r.global_model_key));
            Ok(serde_json::json!({"job_id": job_id}))
        }

        async fn report_failure(
            &self,
            job_id: &str,
            round: u32,
            failure: &JobFailure,
        ) -> Result<Value, CloudError> {
            self.call(format!("report {job_id} {round} {failure}"));
            Ok(serde_json::json!({"job_id": job_id, "round": round, "notified": true}))
        }
    }

    pub fn job_json() -> Value {
        serde_json::json!({
            "job_id": "j1", "rounds": 2, "clients": ["a", "b"], "min_clients": 1,
            "round_timeout_seconds": 30
        })
    }

    fn update(client: &str) -> UpdateRecord {
        UpdateRecord {
            client_id: client.into(),
            job_round: "j1#000001".into(),
            job_id: "j1".into(),
            round: 1,
            model_key: "k".into(),
            checksum: "c".into(),
            store_checksum: None,
            num_examples: 3.into(),
            llm_type: None,
            metrics: BTreeMap::new(),
            bytes: 1,
            trained_at: "2026-01-01T00:00:00Z".into(),
            schema: Some(1),
            variate_delta_checksum: None,
            base_round: None,
        }
    }

    fn item(seq: &str, client: &str) -> StreamItem {
        StreamItem {
            id: seq.into(),
            event_name: "INSERT".into(),
            update: Ok(update(client)),
        }
    }

    #[tokio::test]
    async fn start_round_reads_token_and_job_from_context() {
        let fake = Fake::default();
        let payload = serde_json::json!({
            "action": "start_round", "job_id": "j1", "round": 1, "round_timeout_seconds": 30,
            "context": {"Execution": {"Input": job_json()}, "Task": {"Token": "tok-1"}}
        });
        let out = handle_task(&fake, payload).await.unwrap();
        assert_eq!(out["status"], "OPEN");
        assert_eq!(fake.calls.lock().unwrap()[0], "start j1 1 tok-1");
    }

    #[tokio::test]
    async fn start_round_refuses_bad_input() {
        let fake = Fake::default();
        for (payload, want) in [
            (
                serde_json::json!({"action": "start_round", "job_id": "j1", "round": 1,
                "context": {"Execution": {"Input": job_json()}}}),
                "Task.Token",
            ),
            (
                serde_json::json!({"action": "start_round", "job_id": "other", "round": 1,
                "context": {"Execution": {"Input": job_json()}, "Task": {"Token": "t"}}}),
                "differs",
            ),
            (
                serde_json::json!({"action": "start_round", "job_id": "j1", "round": 3,
                "context": {"Execution": {"Input": job_json()}, "Task": {"Token": "t"}}}),
                "outside",
            ),
            (
                serde_json::json!({"action": "dance", "job_id": "j1", "round": 1}),
                "unknown action",
            ),
            (
                serde_json::json!({"action": "plan_round", "round": 1, "closed_by": "stream"}),
                "job_id",
            ),
            (
                serde_json::json!({"action": "plan_round", "job_id": "j1", "round": 1}),
                "closed_by",
            ),
            (
                serde_json::json!({"action": "plan_round", "job_id": "j1", "round": 1, "closed_by": "early"}),
                "expected `stream` or `deadline`",
            ),
            (
                serde_json::json!({"action": "close_round", "job_id": "j1", "round": 1, "closed_by": "stream"}),
                "unknown action",
            ),
            (
                serde_json::json!({"action": "aggregate_shard", "job_id": "j1", "round": 1, "attempt": "a1"}),
                "without `shard`",
            ),
            (
                serde_json::json!({"action": "commit_round", "job_id": "j1", "round": 1}),
                "without `attempt`",
            ),
            (
                serde_json::json!({"action": "report_failure", "job_id": "j1", "round": 1}),
                "without `error`",
            ),
        ] {
            let err = handle_task(&fake, payload).await.unwrap_err();
            assert_eq!(err.error_type, TaskErrorName::InvalidTaskInput);
            assert!(err.message.contains(want), "{}", err.message);
        }
        assert!(fake.calls.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn plan_round_quorum_not_met_is_named() {
        let fake = Fake {
            quorum_not_met: true,
            ..Fake::default()
        };
        let err = handle_task(
            &fake,
            serde_json::json!({"action": "plan_round", "job_id": "j1", "round": 1, "closed_by": "deadline", "context": {}}),
        )
        .await
        .unwrap_err();
        assert_eq!(err.error_type, TaskErrorName::QuorumNotMet);
        assert_eq!(
            err.message,
            "quorum not met: 1 of min_clients 3 updates received"
        );
    }

    #[tokio::test]
    async fn the_aggregation_tasks_and_finalize_return_their_output() {
        let fake = Fake::default();
        let task = |action: &str, extra: Value| {
            let mut payload = serde_json::json!({"action": action, "job_id": "j1", "round": 1});
            for (k, v) in extra.as_object().unwrap() {
                payload[k] = v.clone();
            }
            handle_task(&fake, payload)
        };
        let plan = task("plan_round", serde_json::json!({"closed_by": "stream"}))
            .await
            .unwrap();
        assert_eq!(
            plan,
            serde_json::json!({"attempt": "a1", "shards": [0, 1], "statistics": true, "concurrency": 4})
        );
        let shard = serde_json::json!({"attempt": "a1", "shard": 1});
        let out = task("shard_statistics", shard.clone()).await.unwrap();
        assert_eq!(out, serde_json::json!({"shard": 1}));
        task("decide_round", serde_json::json!({"attempt": "a1"}))
            .await
            .unwrap();
        task("aggregate_shard", shard).await.unwrap();
        let out = task(
            "commit_round",
            serde_json::json!({"attempt": "a1", "closed_by": "stream"}),
        )
        .await
        .unwrap();
        assert_eq!(out["continue"], false);
        assert_eq!(out["closed_by"], "stream");
        assert_eq!(
            *fake.calls.lock().unwrap(),
            vec![
                "plan j1 1 stream",
                "statistics j1 1 a1 1",
                "decide j1 1 a1",
                "shard j1 1 a1 1",
                "commit j1 1 a1"
            ]
        );
        let out = task("finalize", serde_json::json!({"result": out}))
            .await
            .unwrap();
        assert_eq!(out["job_id"], "j1");
    }

    #[tokio::test]
    async fn report_failure_passes_the_caught_error_on() {
        let fake = Fake::default();
        let cause = serde_json::json!({"errorType": "AggregatorError", "errorMessage": "AccessDenied on GetObject"});
        let out = handle_task(
            &fake,
            serde_json::json!({
                "action": "report_failure", "job_id": "j1", "round": 2, "context": {},
                "error": {"Error": "AggregatorError", "Cause": cause.to_string()},
            }),
        )
        .await
        .unwrap();
        assert_eq!(
            out,
            serde_json::json!({"job_id": "j1", "round": 2, "notified": true})
        );
        assert_eq!(
            *fake.calls.lock().unwrap(),
            vec!["report j1 2 AggregatorError: AccessDenied on GetObject"]
        );
    }

    #[tokio::test]
    async fn stream_reports_from_the_first_transient_failure() {
        let fake = Fake {
            fail_on: Some(("b".into(), CloudError::Transient)),
            ..Fake::default()
        };
        let mut bad = item("2", "x");
        bad.update = Err("missing field `checksum`".into());
        let mut modify = item("3", "y");
        modify.event_name = "MODIFY".into();
        let items = vec![item("1", "a"), bad, modify, item("4", "b"), item("5", "c")];
        let failed = handle_stream(&fake, &items).await;
        assert_eq!(failed, vec!["4".to_string(), "5".to_string()]);
        // c was not processed: it is retried with b.
        assert_eq!(*fake.calls.lock().unwrap(), vec!["update a", "update b"]);
    }

    #[tokio::test]
    async fn stream_drops_non_retryable_errors() {
        let fake = Fake {
            fail_on: Some(("a".into(), CloudError::Invalid)),
            ..Fake::default()
        };
        let failed = handle_stream(&fake, &[item("1", "a"), item("2", "b")]).await;
        assert!(failed.is_empty());
        assert_eq!(fake.calls.lock().unwrap().len(), 2);
    }
}
