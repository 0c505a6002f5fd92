//! Bad rows are rejected with a reason naming the rule, recorded in the
//! round (when the client is one of the round's), and the round goes on
//! with the others.

use fedstep_cloud::keys;
use fedstep_cloud::ports::{Ledger, ObjectStore};
use fedstep_cloud::records::ClosedBy;
use fedstep_cloud::UpdateOutcome;
use fedstep_test_support::assert_close_f32;
use fedstep_test_support::federation::*;

#[tokio::test]
async fn bad_rows_are_rejected_and_the_round_goes_on() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = job("rules", 2, &["a", "b", "c"], 2);
    fed.upload_initial(&job, &[0.0, 0.0]).await;
    engine.start_round(&job, 1, "t1").await.unwrap();

    // a points its row at b's prefix.
    let b_file = fed.model_file("b-fake", &[100.0, 100.0]);
    let b_key = keys::update("rules", 1, "b");
    fed.store.put_file(&b_key, &b_file).await.unwrap();
    let mut a = fed.submit(&job, 1, "a", &[1.0, 1.0], 1, &[]).await;
    a.model_key = b_key;
    let UpdateOutcome::Rejected(reason) = engine.on_update(&a).await.unwrap() else {
        panic!("a key outside the client's prefix must be rejected")
    };
    assert!(reason.starts_with("model_key:"), "{reason}");

    // Someone not in the federation.
    let mallory = fed.submit(&job, 1, "mallory", &[5.0, 5.0], 1000, &[]).await;
    let UpdateOutcome::Rejected(reason) = engine.on_update(&mallory).await.unwrap() else {
        panic!("an unknown client must be rejected")
    };
    assert!(reason.starts_with("client:"), "{reason}");

    // A malformed checksum is caught at once.
    let mut bad = fed.submit(&job, 1, "b", &[2.0, 4.0], 1, &[]).await;
    bad.checksum = "not-a-sha".into();
    let UpdateOutcome::Rejected(reason) = engine.on_update(&bad).await.unwrap() else {
        panic!("a malformed checksum must be rejected")
    };
    assert!(reason.starts_with("checksum:"), "{reason}");

    // c's checksum is well formed but wrong: found when its file is fetched.
    let mut c = fed.submit(&job, 1, "c", &[7.0, 7.0], 1, &[]).await;
    c.checksum = "0".repeat(64);
    // b's real row (the malformed one above was never stored).
    let outcome = engine.on_update(&c).await.unwrap();
    assert!(
        matches!(outcome, UpdateOutcome::Recorded { .. }),
        "{outcome:?}"
    );

    let row = fed.ledger.get_round("rules", 1).await.unwrap().unwrap();
    assert!(row.rejections["a"].starts_with("model_key:"));
    // Issue #13: a client that is not in the round writes nothing into
    // its item, not even its rejection (it is only reported and logged).
    assert!(
        !row.rejections.contains_key("mallory"),
        "{:?}",
        row.rejections
    );
    assert!(!row.received.contains("mallory"));
    assert!(row.rejections["b"].starts_with("checksum:"));
    assert_eq!(row.status, fedstep_cloud::records::RoundStatus::Open);
}

#[tokio::test]
async fn a_wrong_checksum_rejects_that_client_only() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = job("sums", 2, &["a", "b", "c"], 2);
    fed.upload_initial(&job, &[0.0]).await;
    engine.start_round(&job, 1, "t1").await.unwrap();
    let a = fed.submit(&job, 1, "a", &[2.0], 1, &[]).await;
    let b = fed.submit(&job, 1, "b", &[4.0], 1, &[]).await;
    // c's object is replaced after its row was written (tampering, or a
    // partial re-upload): the row's checksum no longer matches.
    let c = fed.submit(&job, 1, "c", &[6.0], 1, &[]).await;
    let other = fed.model_file("c-swapped", &[600.0]);
    fed.store.put_file(&c.model_key, &other).await.unwrap();
    engine.on_update(&a).await.unwrap();
    engine.on_update(&b).await.unwrap();
    let UpdateOutcome::HandedOver { .. } = engine.on_update(&c).await.unwrap() else {
        panic!("the round still closes");
    };
    let result = engine
        .close_round(&c.job_id, c.round, ClosedBy::Stream)
        .await
        .unwrap();
    assert_eq!(result.accepted, vec!["a", "b"]);
    assert!(
        result.rejected["c"].starts_with("checksum: the row says"),
        "{:?}",
        result.rejected
    );
    assert_eq!(result.metrics["clients_rejected"], 1.0);
    assert_close_f32(&fed.global(&job, 2).await, &[3.0]);
    let row = fed.ledger.get_round("sums", 1).await.unwrap().unwrap();
    assert!(row.rejections["c"].starts_with("checksum:"));
}

#[tokio::test]
async fn a_rejected_client_counts_as_in_so_the_round_closes_early() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = job("early", 2, &["a", "b", "c"], 2);
    fed.upload_initial(&job, &[0.0]).await;
    engine.start_round(&job, 1, "t1").await.unwrap();
    let mut a = fed.submit(&job, 1, "a", &[1.0], 1, &[]).await;
    a.job_round = "early#000002".into();
    assert!(matches!(
        engine.on_update(&a).await.unwrap(),
        UpdateOutcome::Rejected(r) if r.starts_with("job_round:")
    ));
    let b = fed.submit(&job, 1, "b", &[2.0], 1, &[]).await;
    engine.on_update(&b).await.unwrap();
    let c = fed.submit(&job, 1, "c", &[4.0], 1, &[]).await;
    let UpdateOutcome::HandedOver { .. } = engine.on_update(&c).await.unwrap() else {
        panic!("b and c meet min_clients and a is accounted for");
    };
    let result = engine
        .close_round(&c.job_id, c.round, ClosedBy::Stream)
        .await
        .unwrap();
    assert_eq!(result.accepted, vec!["b", "c"]);
    assert!(result.rejected["a"].starts_with("job_round:"));
    assert_eq!(fed.callback.succeeded("t1").len(), 1);
}
