//! The deadline path (CloseRound): aggregate what is in if the quorum is
//! met, else fail the round with QuorumNotMet; late updates are recorded.

use fedstep_cloud::ports::Ledger;
use fedstep_cloud::records::{ClosedBy, RoundStatus};
use fedstep_cloud::{CloudError, UpdateOutcome};
use fedstep_test_support::assert_close_f32;
use fedstep_test_support::federation::*;

#[tokio::test]
async fn two_of_three_with_min_two_closes() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = job("quorum-ok", 2, &["a", "b", "c"], 2);
    fed.upload_initial(&job, &[0.0, 0.0]).await;
    engine.start_round(&job, 1, "t1").await.unwrap();
    for (client, v, n) in [("a", 1.0f32, 1u64), ("b", 4.0, 3)] {
        let row = fed.submit(&job, 1, client, &[v, -v], n, &[]).await;
        assert!(matches!(
            engine.on_update(&row).await.unwrap(),
            UpdateOutcome::Recorded { .. }
        ));
    }
    fed.clock.advance(601);
    fed.callback.expire("t1"); // StartRound timed out
    let result = engine
        .close_round("quorum-ok", 1, ClosedBy::Deadline)
        .await
        .unwrap();
    assert_eq!(result.closed_by, ClosedBy::Deadline);
    assert_eq!(result.accepted, vec!["a", "b"]);
    assert!(result.continue_training);
    assert_close_f32(&fed.global(&job, 2).await, &[3.25, -3.25]);
    assert!(
        fed.callback.calls().is_empty(),
        "the deadline path returns, it does not call back"
    );
    // Retried CloseRound: the stored result.
    assert_eq!(
        engine
            .close_round("quorum-ok", 1, ClosedBy::Deadline)
            .await
            .unwrap(),
        result
    );

    // The straggler arrives after the round closed: late, and recorded.
    let c = fed.submit(&job, 1, "c", &[9.0, 9.0], 1, &[]).await;
    let UpdateOutcome::Late(reason) = engine.on_update(&c).await.unwrap() else {
        panic!("expected Late")
    };
    assert!(reason.starts_with("late"), "{reason}");
    let row = fed.ledger.get_round("quorum-ok", 1).await.unwrap().unwrap();
    assert_eq!(row.status, RoundStatus::Closed);
    assert!(row.rejections["c"].starts_with("late"));
}

#[tokio::test]
async fn two_of_three_with_min_three_fails() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = job("quorum-no", 2, &["a", "b", "c"], 3);
    fed.upload_initial(&job, &[0.0]).await;
    engine.start_round(&job, 1, "t1").await.unwrap();
    for client in ["a", "b"] {
        let row = fed.submit(&job, 1, client, &[1.0], 1, &[]).await;
        engine.on_update(&row).await.unwrap();
    }
    let err = engine
        .close_round("quorum-no", 1, ClosedBy::Deadline)
        .await
        .unwrap_err();
    let CloudError::QuorumNotMet(cause) = &err else {
        panic!("expected QuorumNotMet, got {err}")
    };
    assert!(
        cause.starts_with("quorum not met: 2 of min_clients 3 updates received"),
        "{cause}"
    );
    assert!(cause.contains("missing or rejected: [c]"), "{cause}");
    let row = fed.ledger.get_round("quorum-no", 1).await.unwrap().unwrap();
    assert_eq!(row.status, RoundStatus::Failed);
    // A retried CloseRound reports the same failure.
    assert!(matches!(
        engine.close_round("quorum-no", 1, ClosedBy::Deadline).await,
        Err(CloudError::QuorumNotMet(_))
    ));
    // Nothing was written for round 2.
    assert!(fedstep_cloud::ports::ObjectStore::head(
        &fed.store,
        &fedstep_cloud::keys::global_model("quorum-no", 2)
    )
    .await
    .unwrap()
    .is_none());
}
