//! Step Functions: wait for an execution to end, and read its history.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fedstep_aws::aws_sdk_sfn::operation::describe_execution::DescribeExecutionOutput;
use fedstep_aws::aws_sdk_sfn::types::ExecutionStatus;
use fedstep_aws::aws_sdk_sfn::Client;

/// The execution once it is no longer RUNNING; panics after `limit`,
/// showing `context()` (process logs).
pub async fn wait_until_done(
    sfn: &Client,
    arn: &str,
    limit: Duration,
    context: impl Fn() -> String,
) -> DescribeExecutionOutput {
    let deadline = Instant::now() + limit;
    loop {
        let d = sfn
            .describe_execution()
            .execution_arn(arn)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "DescribeExecution {arn}: {}",
                    fedstep_aws::sdk_error("describe", e)
                )
            });
        if d.status() != &ExecutionStatus::Running {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "execution {arn} still RUNNING after {limit:?}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Panics unless the execution SUCCEEDED, showing its error, its cause
/// and `context()` (process logs).
pub fn assert_succeeded(done: &DescribeExecutionOutput, context: impl Fn() -> String) {
    assert_eq!(
        done.status().as_str(),
        "SUCCEEDED",
        "error {:?} cause {:?}\n{}",
        done.error(),
        done.cause(),
        context()
    );
}

/// Per state name, how many events of each type happened while the
/// execution was in it (e.g. `StartRound` → {ActivitySucceeded: 1}).
pub async fn events_by_state(sfn: &Client, arn: &str) -> BTreeMap<String, BTreeMap<String, usize>> {
    let mut out: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut state = String::from("(none)");
    let mut token: Option<String> = None;
    loop {
        let page = sfn
            .get_execution_history()
            .execution_arn(arn)
            .set_next_token(token.take())
            .max_results(1000)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "GetExecutionHistory {arn}: {}",
                    fedstep_aws::sdk_error("history", e)
                )
            });
        for ev in page.events() {
            if let Some(entered) = ev.state_entered_event_details() {
                state = entered.name().to_string();
            }
            let kind = ev.r#type().as_str().to_string();
            *out.entry(state.clone())
                .or_default()
                .entry(kind)
                .or_default() += 1;
        }
        match page.next_token() {
            Some(t) => token = Some(t.to_string()),
            None => return out,
        }
    }
}

/// How many events of `kind` happened in `state`.
pub fn count(events: &BTreeMap<String, BTreeMap<String, usize>>, state: &str, kind: &str) -> usize {
    events
        .get(state)
        .and_then(|m| m.get(kind))
        .copied()
        .unwrap_or(0)
}
