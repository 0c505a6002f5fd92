//! Issue #13, item 5: the stream path closed a round (the CLOSED write
//! with its result went through) and then its `SendTaskSuccess` was lost —
//! the aggregator died, or the call failed. The stream redelivers the row
//! that completed the round; that replay sends the stored result to the
//! stored token, so the StartRound task finishes now rather than at its
//! deadline. Step Functions takes one answer per token, so replays never
//! deliver twice; the engine that already had an answer does not even ask.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fedstep_cloud::error::{CloudError, Result};
use fedstep_cloud::local::{CallbackCall, RecordingCallback};
use fedstep_cloud::ports::{Callback, Clock, Ledger, TaskCallback};
use fedstep_cloud::records::{ClosedBy, RoundResult, RoundStatus};
use fedstep_cloud::{EngineConfig, RoundEngine, UpdateOutcome};
use fedstep_test_support::federation::*;
use serde_json::Value;

/// Loses the first `succeed`: it never reaches the recorder.
#[derive(Clone)]
struct LosesFirstSuccess {
    inner: RecordingCallback,
    lost: Arc<AtomicBool>,
}

impl TaskCallback for LosesFirstSuccess {
    async fn succeed(&self, token: &str, output: &Value) -> Result<Callback> {
        if !self.lost.swap(true, Ordering::SeqCst) {
            return Err(CloudError::Transient(
                "injected: the aggregator died before SendTaskSuccess".into(),
            ));
        }
        self.inner.succeed(token, output).await
    }

    async fn fail(&self, token: &str, error: &str, cause: &str) -> Result<Callback> {
        self.inner.fail(token, error, cause).await
    }
}

/// Round 1 of a 3-client job, closed by the stream path whose callback
/// was lost: returns the job, the row that completed the round and the
/// stored result.
async fn closed_without_callback(
    fed: &Fed,
    job_id: &str,
) -> (
    fedstep_cloud::Job,
    fedstep_cloud::records::UpdateRecord,
    RoundResult,
) {
    let crashing = RoundEngine::new(
        fed.store.clone(),
        fed.ledger.clone(),
        fed.bus.clone(),
        LosesFirstSuccess {
            inner: fed.callback.clone(),
            lost: Arc::default(),
        },
        fed.clock.clone(),
        EngineConfig {
            read_ahead_bytes: fedstep_cloud::DEFAULT_READ_AHEAD_BYTES,
            owner: "crashing".into(),
            lease_seconds: LEASE,
        },
    );
    let job = job(job_id, 2, &["a", "b", "c"], 2);
    fed.upload_initial(&job, &[0.0]).await;
    crashing.start_round(&job, 1, "t1").await.unwrap();
    let mut last = None;
    for (c, v) in [("a", 1.0f32), ("b", 2.0), ("c", 6.0)] {
        let row = fed.submit(&job, 1, c, &[v], 1, &[]).await;
        last = Some((row.clone(), crashing.on_update(&row).await));
    }
    let (row, outcome) = last.unwrap();
    assert!(
        outcome.is_err(),
        "the lost callback fails the invocation: {outcome:?}"
    );
    let stored = fed.ledger.get_round(job_id, 1).await.unwrap().unwrap();
    assert_eq!(stored.status, RoundStatus::Closed);
    assert!(
        fed.callback.calls().is_empty(),
        "nothing reached Step Functions"
    );
    (job, row, stored.result.unwrap())
}

#[tokio::test]
async fn a_replayed_row_completes_the_task_without_waiting_for_the_deadline() {
    let fed = Fed::new();
    let (_, c, stored) = closed_without_callback(&fed, "lost").await;
    let deadline = fed
        .ledger
        .get_round("lost", 1)
        .await
        .unwrap()
        .unwrap()
        .deadline;

    // The stream retries the batch at once: the lease of the dead
    // aggregator is still live and the deadline far away.
    let engine = fed.engine("retry");
    let UpdateOutcome::Late(reason) = engine.on_update(&c).await.unwrap() else {
        panic!("a replay after CLOSED is Late")
    };
    assert!(reason.starts_with("replay:"), "{reason}");
    assert!(fed.clock.now() < deadline);
    let delivered = fed.callback.succeeded("t1");
    assert_eq!(delivered, vec![serde_json::to_value(&stored).unwrap()]);

    // More replays on the same engine: it had its answer, no more calls.
    engine.on_update(&c).await.unwrap();
    assert_eq!(fed.callback.calls_for("t1").len(), 1);
    // On another engine: asked again, refused, still one delivery.
    let other = fed.engine("other");
    assert!(matches!(
        other.on_update(&c).await.unwrap(),
        UpdateOutcome::Late(_)
    ));
    let calls = fed.callback.calls_for("t1");
    assert_eq!(calls.len(), 2);
    assert!(matches!(
        &calls[1],
        CallbackCall::Succeed {
            delivered: false,
            ..
        }
    ));
    assert_eq!(fed.callback.succeeded("t1").len(), 1);
    // The deadline path, if it still ran, returns the same result.
    fed.clock.advance(601);
    assert_eq!(engine.close_round("lost", 1).await.unwrap(), stored);
    // Re-sending wrote nothing: the result and rejections are untouched.
    let row = fed.ledger.get_round("lost", 1).await.unwrap().unwrap();
    assert_eq!(row.result.as_ref(), Some(&stored));
    assert!(row.rejections.is_empty(), "{:?}", row.rejections);
}

#[tokio::test]
async fn nothing_is_resent_for_a_round_the_deadline_path_closed() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = job("by-deadline", 2, &["a", "b", "c"], 2);
    fed.upload_initial(&job, &[0.0]).await;
    engine.start_round(&job, 1, "t1").await.unwrap();
    let mut rows = Vec::new();
    for (c, v) in [("a", 1.0f32), ("b", 3.0)] {
        let row = fed.submit(&job, 1, c, &[v], 1, &[]).await;
        engine.on_update(&row).await.unwrap();
        rows.push(row);
    }
    // StartRound timed out (its token is dead); CloseRound closed it.
    fed.clock.advance(601);
    fed.callback.expire("t1");
    let result = fed
        .engine("closer")
        .close_round("by-deadline", 1)
        .await
        .unwrap();
    assert_eq!(result.closed_by, ClosedBy::Deadline);
    // Replays and a late row on a fresh engine: no callback at all.
    let fresh = fed.engine("fresh");
    for row in &rows {
        assert!(matches!(
            fresh.on_update(row).await.unwrap(),
            UpdateOutcome::Late(_)
        ));
    }
    let c = fed.submit(&job, 1, "c", &[9.0], 1, &[]).await;
    assert!(matches!(
        fresh.on_update(&c).await.unwrap(),
        UpdateOutcome::Late(r) if r.starts_with("late:")
    ));
    assert!(
        fed.callback.calls().is_empty(),
        "{:?}",
        fed.callback.calls()
    );
}
