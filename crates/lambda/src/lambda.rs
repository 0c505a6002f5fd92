//! The Lambda runtime entry: one bootstrap, the event's shape picks the
//! handler (a DynamoDB stream batch, or a Step Functions task payload).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lambda_events::event::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use fedstep_cloud::TaskErrorName;
use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use serde_json::Value;

use crate::handlers::{handle_stream, handle_task, RoundTasks, TaskError};
use crate::stream_record::{self, StreamItem};

impl From<TaskError> for Diagnostic {
    fn from(err: TaskError) -> Diagnostic {
        // error_type is what Step Functions matches on (e.g. QuorumNotMet).
        Diagnostic {
            error_type: err.error_type.as_str().into(),
            error_message: err.message,
        }
    }
}

/// Kept back from the invocation's deadline to send an answer. Without it
/// a CloseRound waiting for another aggregator's lease (which outlives the
/// function's timeout by design) is killed by Lambda with an error the
/// workflow does not retry; with it, it answers `Transient`, which it does.
const ANSWER_MARGIN: Duration = Duration::from_secs(10);

pub async fn run<A: RoundTasks>(engine: Arc<A>) -> Result<(), lambda_runtime::Error> {
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let engine = Arc::clone(&engine);
        async move {
            let budget = time_left(event.context.deadline, SystemTime::now());
            within(budget, dispatch(engine.as_ref(), event.payload)).await
        }
    }))
    .await
}

/// Deadlines below this (2020-01-01T00:00:00Z in Unix milliseconds) are no
/// Unix time an invocation can have: see `time_left`.
const EARLIEST_DEADLINE_MS: u64 = 1_577_836_800_000;

/// Until `ANSWER_MARGIN` before the invocation's deadline.
///
/// Lambda sends the deadline in Unix milliseconds. Local Runtime API
/// emulators do not all do so: `cargo lambda watch` (1.9) sends a plain
/// duration (`Lambda-Runtime-Deadline-Ms: 600000`, ten minutes). Read as a
/// Unix time that lies in 1970, so every invocation got no time at all and
/// any work that waited on I/O answered `Transient`. A value too small to
/// be a Unix time is taken for what it is, milliseconds from now.
fn time_left(deadline_ms: u64, now: SystemTime) -> Duration {
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let left_ms = if deadline_ms < EARLIEST_DEADLINE_MS {
        deadline_ms
    } else {
        deadline_ms.saturating_sub(now_ms)
    };
    Duration::from_millis(left_ms).saturating_sub(ANSWER_MARGIN)
}

/// `work`'s answer, or `Transient` if it is not done within `budget`. A
/// stream batch that runs out is retried whole by Lambda, as after a kill.
async fn within(
    budget: Duration,
    work: impl Future<Output = Result<Value, Diagnostic>>,
) -> Result<Value, Diagnostic> {
    tokio::time::timeout(budget, work)
        .await
        .unwrap_or_else(|_| {
            Err(Diagnostic {
                error_type: TaskErrorName::Transient.as_str().into(),
                error_message: format!(
                    "stopped {} s before the invocation's deadline with the work unfinished \
                 (e.g. another aggregation still holds the round); retried by the caller",
                    ANSWER_MARGIN.as_secs()
                ),
            })
        })
}

/// Routes one invocation by the event's shape.
pub async fn dispatch<A: RoundTasks>(engine: &A, event: Value) -> Result<Value, Diagnostic> {
    if let Some(records) = event.get("Records").and_then(Value::as_array) {
        let items: Vec<StreamItem> = records.iter().map(stream_record::decode).collect();
        let failed = handle_stream(engine, &items).await;
        let mut response = DynamoDbEventResponse::default();
        for id in failed {
            let mut failure = DynamoDbBatchItemFailure::default();
            failure.item_identifier = Some(id);
            response.batch_item_failures.push(failure);
        }
        return serde_json::to_value(response).map_err(|e| Diagnostic {
            error_type: TaskErrorName::AggregatorError.as_str().into(),
            error_message: e.to_string(),
        });
    }
    if event.get("action").is_some() {
        return handle_task(engine, event).await.map_err(Diagnostic::from);
    }
    Err(Diagnostic {
        error_type: TaskErrorName::UnknownEvent.as_str().into(),
        error_message: "neither a DynamoDB stream batch (Records) nor a task payload (action)"
            .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::tests::Fake;

    fn record(seq: &str, client: &str, checksum: Option<&str>) -> Value {
        let mut image = serde_json::json!({
            "client_id": {"S": client}, "job_round": {"S": "j1#000001"}, "job_id": {"S": "j1"},
            "round": {"N": "1"}, "model_key": {"S": "k"}, "num_examples": {"N": "10"},
            "metrics": {"M": {"loss": {"N": "0.5"}}}, "bytes": {"N": "4"},
            "trained_at": {"S": "2026-01-01T00:00:00Z"}
        });
        if let Some(c) = checksum {
            image["checksum"] = serde_json::json!({"S": c});
        }
        serde_json::json!({
            "eventID": format!("e{seq}"), "eventName": "INSERT", "eventVersion": "1.1",
            "eventSource": "aws:dynamodb", "awsRegion": "us-east-1",
            "dynamodb": {"ApproximateCreationDateTime": 1.7e9, "Keys": {}, "NewImage": image,
                         "SequenceNumber": seq, "SizeBytes": 100, "StreamViewType": "NEW_IMAGE"},
            "eventSourceARN": "arn:aws:dynamodb:us-east-1:1:table/t/stream/x"
        })
    }

    #[test]
    fn the_answer_margin_comes_off_the_deadline() {
        let now = UNIX_EPOCH + Duration::from_millis(EARLIEST_DEADLINE_MS + 1_000_000);
        let at = |after_ms: u64| EARLIEST_DEADLINE_MS + 1_000_000 + after_ms;
        assert_eq!(time_left(at(60_000), now), Duration::from_secs(50));
        assert_eq!(time_left(at(5_000), now), Duration::ZERO);
        // Already past: no time, not a wrap-around.
        assert_eq!(time_left(EARLIEST_DEADLINE_MS, now), Duration::ZERO);
        assert_eq!(time_left(0, now), Duration::ZERO);
    }

    #[test]
    fn a_deadline_that_is_no_unix_time_is_a_duration() {
        // What `cargo lambda watch` sends: ten minutes, not 1970-01-01T00:10.
        let now = SystemTime::now();
        assert_eq!(time_left(600_000, now), Duration::from_secs(590));
        assert_eq!(time_left(5_000, now), Duration::ZERO);
    }

    #[tokio::test]
    async fn work_that_outlives_the_budget_answers_transient() {
        let slow = async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(Value::Null)
        };
        let err = within(Duration::from_millis(50), slow).await.unwrap_err();
        assert_eq!(err.error_type, "Transient");
        let quick = async { Ok(Value::Bool(true)) };
        assert_eq!(
            within(Duration::from_secs(30), quick).await.unwrap(),
            Value::Bool(true)
        );
    }

    #[tokio::test]
    async fn stream_batch_reports_failures_by_sequence_number() {
        let fake = Fake {
            fail_on: Some(("b".into(), fedstep_cloud::CloudError::Transient)),
            ..Fake::default()
        };
        let event = serde_json::json!({"Records": [
            record("100", "a", Some("c")),
            record("101", "bad", None),
            record("102", "b", Some("c")),
            record("103", "c", Some("c")),
        ]});
        let out = dispatch(&fake, event).await.unwrap();
        assert_eq!(
            out,
            serde_json::json!({"batchItemFailures": [{"itemIdentifier": "102"}, {"itemIdentifier": "103"}]})
        );
        assert_eq!(*fake.calls.lock().unwrap(), vec!["update a", "update b"]);
    }

    #[tokio::test]
    async fn quorum_not_met_is_a_diagnostic() {
        let fake = Fake {
            quorum_not_met: true,
            ..Fake::default()
        };
        let err = dispatch(
            &fake,
            serde_json::json!({"action": "plan_round", "job_id": "j1", "round": 1, "closed_by": "deadline"}),
        )
        .await
        .unwrap_err();
        assert_eq!(err.error_type, "QuorumNotMet");
        assert!(err.error_message.contains("quorum not met"));
        let err = dispatch(&fake, serde_json::json!({"hello": 1}))
            .await
            .unwrap_err();
        assert_eq!(err.error_type, "UnknownEvent");
    }
}
