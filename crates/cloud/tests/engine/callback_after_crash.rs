//! Issue #13, item 5, as it stands with the hand-over: the row that
//! completed a round was counted, and then the stream invocation's
//! `SendTaskSuccess` (the hand-over) was lost: it died, or the call failed.
//! Nothing was written before the call, so the round is still OPEN and
//! complete; the stream redelivers the row, and that replay hands the
//! round over again, so the StartRound task finishes now rather than at
//! its deadline. Step Functions takes one answer per token, so replays
//! never deliver twice; the engine that already had an answer does not
//! even ask.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fedstep_cloud::error::{CloudError, Result};
use fedstep_cloud::local::{CallbackCall, RecordingCallback};
use fedstep_cloud::ports::{Callback, Clock, Ledger, TaskCallback};
use fedstep_cloud::records::{ClosedBy, RoundStatus};
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
                "injected: the invocation died before SendTaskSuccess".into(),
            ));
        }
        self.inner.succeed(token, output).await
    }

    async fn fail(&self, token: &str, error: &str, cause: &str) -> Result<Callback> {
        self.inner.fail(token, error, cause).await
    }
}

#[tokio::test]
async fn a_replayed_row_hands_the_round_over_without_waiting_for_the_deadline() {
    let fed = Fed::new();
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
    let job = job("lost", 2, &["a", "b", "c"], 2);
    fed.upload_initial(&job, &[0.0]).await;
    crashing.start_round(&job, 1, "t1").await.unwrap();
    let mut last = None;
    for (c, v) in [("a", 1.0f32), ("b", 2.0), ("c", 6.0)] {
        let row = fed.submit(&job, 1, c, &[v], 1, &[]).await;
        last = Some((row.clone(), crashing.on_update(&row).await));
    }
    let (c, outcome) = last.unwrap();
    assert!(
        outcome.is_err(),
        "the lost hand-over fails the invocation: {outcome:?}"
    );
    let row = fed.ledger.get_round("lost", 1).await.unwrap().unwrap();
    assert_eq!(row.status, RoundStatus::Open, "nothing was written");
    assert!(
        fed.callback.calls().is_empty(),
        "nothing reached Step Functions"
    );

    // The stream retries the batch at once, the deadline far away.
    let engine = fed.engine("retry");
    assert!(matches!(
        engine.on_update(&c).await.unwrap(),
        UpdateOutcome::HandedOver {
            usable: 3,
            expected: 3
        }
    ));
    assert!(fed.clock.now() < row.deadline);
    let delivered = fed.callback.succeeded("t1");
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0]["closed_by"], "stream");

    // More replays on the same engine: it had its answer, no more calls.
    engine.on_update(&c).await.unwrap();
    assert_eq!(fed.callback.calls_for("t1").len(), 1);
    // On another engine: asked again, refused, still one delivery.
    let other = fed.engine("other");
    assert!(matches!(
        other.on_update(&c).await.unwrap(),
        UpdateOutcome::HandedOver { .. }
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
    // CloseRound aggregates all three.
    let result = engine
        .close_round("lost", 1, ClosedBy::Stream)
        .await
        .unwrap();
    assert_eq!(result.accepted, vec!["a", "b", "c"]);
    let row = fed.ledger.get_round("lost", 1).await.unwrap().unwrap();
    assert_eq!(row.result.as_ref(), Some(&result));
    assert!(row.rejections.is_empty(), "{:?}", row.rejections);
}

/// A retried StartRound replaces the token after the stream handed the
/// round over to the old one (whose task failed): nobody would answer the
/// new token before the deadline, so StartRound hands over itself.
#[tokio::test]
async fn a_retried_start_round_hands_a_complete_round_over() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = job("retried", 2, &["a", "b"], 2);
    fed.upload_initial(&job, &[0.0]).await;
    engine.start_round(&job, 1, "t1").await.unwrap();
    for c in ["a", "b"] {
        let row = fed.submit(&job, 1, c, &[1.0], 1, &[]).await;
        engine.on_update(&row).await.unwrap();
    }
    assert_eq!(fed.callback.succeeded("t1").len(), 1);
    let row = fed
        .engine("starter")
        .start_round(&job, 1, "t2")
        .await
        .unwrap();
    assert_eq!(row.task_token.as_deref(), Some("t2"));
    let delivered = fed.callback.succeeded("t2");
    assert_eq!(delivered.len(), 1, "{:?}", fed.callback.calls());
    assert_eq!(delivered[0]["closed_by"], "stream");
    // Once CLOSED, a retried StartRound hands over too: CloseRound then
    // returns the stored result.
    let result = engine
        .close_round("retried", 1, ClosedBy::Stream)
        .await
        .unwrap();
    fed.engine("late-starter")
        .start_round(&job, 1, "t3")
        .await
        .unwrap();
    assert_eq!(fed.callback.succeeded("t3").len(), 1);
    assert_eq!(
        engine
            .close_round("retried", 1, ClosedBy::Stream)
            .await
            .unwrap(),
        result
    );
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
        .close_round("by-deadline", 1, ClosedBy::Deadline)
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
