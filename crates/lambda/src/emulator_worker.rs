//! Local mode for the emulators, where Lambdas cannot run (no Docker): the
//! worker polls the Step Functions activities that stand in for the
//! Lambda tasks (one per task action) (scripts/local-deploy.sh) and the updates table's DynamoDB
//! stream, and hands what it gets to the very handlers the Lambda runs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fedstep_aws::aws_sdk_dynamodbstreams as streams;
use fedstep_aws::aws_sdk_sfn as sfn;
use fedstep_aws::AwsConfig;
use fedstep_cloud::records::UpdateRecord;
use serde_json::Value;
use streams::types::{OperationType, ShardIteratorType};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::handlers::{
    handle_stream, handle_task, task_action, Action, RoundTasks, StreamItem, TaskError,
};

/// Where a shard that exists when the worker starts is read from. Shards
/// that appear later are always read from their start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamStart {
    /// Everything still in the stream (24 h): no row written before the
    /// worker started is missed; replays are harmless (set ADD, conditions).
    TrimHorizon,
    /// Only rows written after start.
    Latest,
}

#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub stream_start: StreamStart,
    pub worker_name: String,
    /// Pause between GetRecords rounds that returned nothing.
    pub idle_poll: Duration,
}

/// Runs until `shutdown` turns true (SIGTERM/SIGINT), then lets in-flight
/// work finish. Each poller is its own task, so a long aggregation
/// (CloseRound) does not hold up the stream, and the other way round.
pub async fn run<A: RoundTasks>(
    engine: Arc<A>,
    cfg: &AwsConfig,
    opts: LocalOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    let s = &cfg.settings;
    let need =
        |v: &Option<String>, name: &str| v.clone().ok_or_else(|| format!("{name} is not set"));
    let activities = [
        (
            Action::StartRound,
            need(
                &s.start_round_activity_arn,
                "FEDSTEP_START_ROUND_ACTIVITY_ARN",
            )?,
        ),
        (
            Action::PlanRound,
            need(
                &s.plan_round_activity_arn,
                "FEDSTEP_PLAN_ROUND_ACTIVITY_ARN",
            )?,
        ),
        (
            Action::ShardStatistics,
            need(
                &s.shard_statistics_activity_arn,
                "FEDSTEP_SHARD_STATISTICS_ACTIVITY_ARN",
            )?,
        ),
        (
            Action::DecideRound,
            need(
                &s.decide_round_activity_arn,
                "FEDSTEP_DECIDE_ROUND_ACTIVITY_ARN",
            )?,
        ),
        (
            Action::AggregateShard,
            need(
                &s.aggregate_shard_activity_arn,
                "FEDSTEP_AGGREGATE_SHARD_ACTIVITY_ARN",
            )?,
        ),
        (
            Action::CommitRound,
            need(
                &s.commit_round_activity_arn,
                "FEDSTEP_COMMIT_ROUND_ACTIVITY_ARN",
            )?,
        ),
        (
            Action::Finalize,
            need(&s.finalize_activity_arn, "FEDSTEP_FINALIZE_ACTIVITY_ARN")?,
        ),
        (
            Action::ReportFailure,
            need(
                &s.report_failure_activity_arn,
                "FEDSTEP_REPORT_FAILURE_ACTIVITY_ARN",
            )?,
        ),
    ];
    let stream_arn = need(&s.updates_stream_arn, "FEDSTEP_UPDATES_STREAM_ARN")?;

    let mut tasks = JoinSet::new();
    for (action, arn) in activities {
        let worker = ActivityWorker {
            sfn: cfg.sfn(),
            action,
            arn,
            name: format!("{}-{}", opts.worker_name, action.name()),
        };
        tasks.spawn(worker.run(Arc::clone(&engine), shutdown.clone()));
    }
    let poller = StreamPoller {
        client: cfg.dynamodb_streams(),
        stream_arn,
        start: opts.stream_start,
        idle: opts.idle_poll,
    };
    tasks.spawn(poller.run(Arc::clone(&engine), shutdown.clone()));
    tracing::info!(worker = %opts.worker_name, "local worker polling {} activities and the updates stream", Action::ALL.len());
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            return Err(format!("a poller panicked: {e}"));
        }
    }
    tracing::info!("local worker stopped");
    Ok(())
}

/// Sleeps, unless shutdown comes first. Returns false on shutdown.
async fn pause(shutdown: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.wait_for(|stop| *stop) => false,
        _ = tokio::time::sleep(d) => true,
    }
}

struct ActivityWorker {
    sfn: sfn::Client,
    action: Action,
    arn: String,
    name: String,
}

/// Pause after a GetActivityTask that returned no task: LocalStack answers
/// at once (AWS after a minute), so this bounds both the poll rate (ten a
/// second per activity) and the latency it adds to a task (≤ 100 ms).
const ACTIVITY_IDLE: Duration = Duration::from_millis(100);

impl ActivityWorker {
    async fn run<A: RoundTasks>(self, engine: Arc<A>, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            // A long poll (up to 60 s on AWS). Abandoning it on shutdown can
            // lose a task handed out in that instant; Step Functions then
            // times it out (TimeoutSeconds), which the workflow handles.
            let polled = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return,
                r = self.sfn.get_activity_task().activity_arn(&self.arn).worker_name(&self.name).send() => r,
            };
            let task = match polled {
                Ok(task) => task,
                Err(e) => {
                    let err = fedstep_aws::sdk_error("Step Functions GetActivityTask", e);
                    tracing::warn!(activity = %self.arn, error = %err, "poll failed; retrying");
                    if !pause(&mut shutdown, Duration::from_secs(2)).await {
                        return;
                    }
                    continue;
                }
            };
            let Some(token) = task.task_token.filter(|t| !t.is_empty()) else {
                // The poll ended without a task. On AWS that took a minute;
                // LocalStack answers at once, and seven pollers per worker
                // asking again at once kept it busy answering nothing
                // (the e2e scenarios took 237 s instead of about 80).
                if !pause(&mut shutdown, ACTIVITY_IDLE).await {
                    return;
                }
                continue;
            };
            // Not cancelled by shutdown: a task once taken is answered.
            self.answer(
                engine.as_ref(),
                &token,
                task.input.as_deref().unwrap_or("{}"),
            )
            .await;
        }
    }

    async fn answer<A: RoundTasks>(&self, engine: &A, token: &str, input: &str) {
        let outcome = match activity_payload(input, token) {
            Ok(payload) if task_action(&payload) == Some(self.action) => {
                handle_task(engine, payload).await
            }
            Ok(payload) => Err(TaskError::invalid(format!(
                "activity {} got action {:?}",
                self.action.name(),
                payload.get("action")
            ))),
            Err(e) => Err(TaskError::invalid(e)),
        };
        let sent = match outcome {
            // start_round's task is completed later, through the token the
            // engine stored, by the stream path's hand-over (or it times out).
            Ok(_) if self.action == Action::StartRound => return,
            Ok(output) => self
                .sfn
                .send_task_success()
                .task_token(token)
                .output(output.to_string())
                .send()
                .await
                .map(|_| ())
                .map_err(|e| fedstep_aws::sdk_error("Step Functions SendTaskSuccess", e)),
            Err(err) => {
                tracing::warn!(action = self.action.name(), error_type = err.error_type.as_str(), message = %err.message, "task failed");
                self.sfn
                    .send_task_failure()
                    .task_token(token)
                    .error(err.error_type.as_str())
                    .cause(err.message)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| fedstep_aws::sdk_error("Step Functions SendTaskFailure", e))
            }
        };
        if let Err(e) = sent {
            // Typically TaskTimedOut: the workflow moved on without us.
            tracing::warn!(action = self.action.name(), error = %e, "could not answer the activity task");
        }
    }
}

/// The handler's payload from an activity input. StartRound's activity gets
/// the Lambda-invoke parameters `{FunctionName, Payload}`; the others get
/// the payload itself. The activity's token goes where the Lambda finds
/// the .waitForTaskToken token: `context.Task.Token`.
fn activity_payload(input: &str, token: &str) -> Result<Value, String> {
    let input: Value =
        serde_json::from_str(input).map_err(|e| format!("activity input is not JSON: {e}"))?;
    let mut payload = match input {
        Value::Object(mut map) if !map.contains_key("action") && map.contains_key("Payload") => {
            map.remove("Payload").unwrap_or(Value::Null)
        }
        other => other,
    };
    let Some(obj) = payload.as_object_mut() else {
        return Err("activity payload is not a JSON object".into());
    };
    let context = obj
        .entry("context")
        .or_insert_with(|| Value::Object(Default::default()));
    if !context.is_object() {
        *context = Value::Object(Default::default());
    }
    if let Some(ctx) = context.as_object_mut() {
        ctx.insert("Task".into(), serde_json::json!({ "Token": token }));
    }
    Ok(payload)
}

struct Shard {
    iterator: Option<String>,
    /// Records that failed with a retryable error: processed again before
    /// reading further (as Lambda retries from the failed sequence number).
    pending: Vec<StreamItem>,
    last_sequence: Option<String>,
    retries: u32,
}

struct StreamPoller {
    client: streams::Client,
    stream_arn: String,
    start: StreamStart,
    idle: Duration,
}

impl StreamPoller {
    async fn run<A: RoundTasks>(self, engine: Arc<A>, mut shutdown: watch::Receiver<bool>) {
        let mut shards: BTreeMap<String, Shard> = BTreeMap::new();
        let mut first = true;
        let mut last_describe = None::<tokio::time::Instant>;
        loop {
            if *shutdown.borrow() {
                return;
            }
            // New shards appear as the stream rolls over (about every 4 h on
            // AWS); look for them now and then.
            let due = last_describe
                .is_none_or(|t: tokio::time::Instant| t.elapsed() > Duration::from_secs(10));
            if due {
                match self.discover(&mut shards, first).await {
                    Ok(()) => {
                        first = false;
                        last_describe = Some(tokio::time::Instant::now());
                    }
                    Err(e) => {
                        tracing::warn!(stream = %self.stream_arn, error = %e, "DescribeStream failed; retrying");
                        if !pause(&mut shutdown, Duration::from_secs(2)).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            let mut busy = false;
            for (shard_id, shard) in shards.iter_mut() {
                busy |= self.poll_shard(engine.as_ref(), shard_id, shard).await;
                if *shutdown.borrow() {
                    return;
                }
            }
            if !busy && !pause(&mut shutdown, self.idle).await {
                return;
            }
        }
    }

    async fn discover(
        &self,
        shards: &mut BTreeMap<String, Shard>,
        first: bool,
    ) -> Result<(), String> {
        let mut start_after: Option<String> = None;
        loop {
            let out = self
                .client
                .describe_stream()
                .stream_arn(&self.stream_arn)
                .set_exclusive_start_shard_id(start_after.take())
                .send()
                .await
                .map_err(|e| {
                    fedstep_aws::sdk_error("DynamoDB Streams DescribeStream", e).to_string()
                })?;
            let Some(desc) = out.stream_description else {
                return Ok(());
            };
            for shard in desc.shards.unwrap_or_default() {
                let Some(id) = shard.shard_id else { continue };
                if shards.contains_key(&id) {
                    continue;
                }
                // A closed shard found after start was fully read already
                // only if we knew it; unknown ones are read from the start.
                let kind = match (first, self.start) {
                    (true, StreamStart::Latest) => ShardIteratorType::Latest,
                    _ => ShardIteratorType::TrimHorizon,
                };
                let iterator = self.iterator(&id, kind.clone(), None).await?;
                tracing::info!(shard = %id, ?kind, "reading stream shard");
                shards.insert(
                    id,
                    Shard {
                        iterator,
                        pending: Vec::new(),
                        last_sequence: None,
                        retries: 0,
                    },
                );
            }
            match desc.last_evaluated_shard_id {
                Some(last) => start_after = Some(last),
                None => return Ok(()),
            }
        }
    }

    async fn iterator(
        &self,
        shard_id: &str,
        kind: ShardIteratorType,
        after: Option<String>,
    ) -> Result<Option<String>, String> {
        let out = self
            .client
            .get_shard_iterator()
            .stream_arn(&self.stream_arn)
            .shard_id(shard_id)
            .shard_iterator_type(kind)
            .set_sequence_number(after)
            .send()
            .await
            .map_err(|e| {
                fedstep_aws::sdk_error("DynamoDB Streams GetShardIterator", e).to_string()
            })?;
        Ok(out.shard_iterator)
    }

    /// One step on one shard; true if it did work (so no idle pause).
    async fn poll_shard<A: RoundTasks>(
        &self,
        engine: &A,
        shard_id: &str,
        shard: &mut Shard,
    ) -> bool {
        if !shard.pending.is_empty() {
            let failed = handle_stream(engine, &shard.pending).await;
            let before = shard.pending.len();
            shard.pending.retain(|item| failed.contains(&item.id));
            if shard.pending.is_empty() {
                shard.retries = 0;
                return true;
            }
            shard.retries += 1;
            // Back off like the Lambda event source would, without blocking
            // the other shards for long.
            let wait = Duration::from_millis(500 * u64::from(shard.retries.min(10)));
            tracing::warn!(
                shard = shard_id,
                failed = shard.pending.len(),
                of = before,
                retry = shard.retries,
                "stream records failed; retrying"
            );
            tokio::time::sleep(wait).await;
            return false;
        }
        let Some(iterator) = shard.iterator.clone() else {
            return false; // closed and fully read
        };
        let out = match self
            .client
            .get_records()
            .shard_iterator(iterator)
            .limit(100)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                let expired = e.as_service_error().is_some_and(|se| {
                    se.is_expired_iterator_exception() || se.is_trimmed_data_access_exception()
                });
                let err = fedstep_aws::sdk_error("DynamoDB Streams GetRecords", e);
                tracing::warn!(shard = shard_id, error = %err, "GetRecords failed");
                if expired {
                    let (kind, after) = match &shard.last_sequence {
                        Some(seq) => (ShardIteratorType::AfterSequenceNumber, Some(seq.clone())),
                        None => (ShardIteratorType::TrimHorizon, None),
                    };
                    match self.iterator(shard_id, kind, after).await {
                        Ok(it) => shard.iterator = it,
                        Err(e) => {
                            tracing::warn!(shard = shard_id, error = %e, "could not renew the iterator")
                        }
                    }
                }
                return false;
            }
        };
        shard.iterator = out.next_shard_iterator;
        let records = out.records.unwrap_or_default();
        if records.is_empty() {
            return false;
        }
        let items: Vec<StreamItem> = records.into_iter().map(stream_item).collect();
        if let Some(last) = items.last() {
            shard.last_sequence = Some(last.id.clone());
        }
        let failed = handle_stream(engine, &items).await;
        if !failed.is_empty() {
            shard.pending = items
                .into_iter()
                .filter(|i| failed.contains(&i.id))
                .collect();
        }
        true
    }
}

fn stream_item(record: streams::types::Record) -> StreamItem {
    let event_name = match &record.event_name {
        Some(OperationType::Insert) => "INSERT".to_string(),
        Some(OperationType::Modify) => "MODIFY".to_string(),
        Some(OperationType::Remove) => "REMOVE".to_string(),
        Some(other) => other.as_str().to_string(),
        None => String::new(),
    };
    let change = record
        .dynamodb
        .unwrap_or_else(|| streams::types::StreamRecord::builder().build());
    let id = change
        .sequence_number
        .clone()
        .or(record.event_id)
        .unwrap_or_default();
    let update = match change.new_image {
        Some(image) => serde_dynamo::from_item::<_, UpdateRecord>(image)
            .map_err(|e| format!("update row: {e}")),
        None => Err("stream record without NewImage".into()),
    };
    StreamItem {
        id,
        event_name,
        update,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_payload_unwraps_and_sets_the_token() {
        let p = activity_payload(
            r#"{"FunctionName":"f","Payload":{"action":"start_round","context":{"State":{}}}}"#,
            "tok",
        )
        .unwrap();
        assert_eq!(p["action"], "start_round");
        assert_eq!(p["context"]["Task"]["Token"], "tok");
        assert_eq!(p["context"]["State"], serde_json::json!({}));
        let p =
            activity_payload(r#"{"action":"plan_round","job_id":"j","round":1}"#, "t2").unwrap();
        assert_eq!(p["context"]["Task"]["Token"], "t2");
        assert!(activity_payload("[1]", "t").is_err());
        assert!(activity_payload("nope", "t").is_err());
    }
}
