//! A crashed CloseRound holds a claim; once its lease expires the retried
//! task (or the deadline's) takes over and finishes it.

use fedstep_cloud::ports::{Clock, Ledger};
use fedstep_cloud::records::{ClosedBy, RoundStatus};
use fedstep_cloud::UpdateOutcome;
use fedstep_test_support::assert_close_f32;
use fedstep_test_support::federation::*;

/// Rows for a, b, c in, and the round claimed by an aggregator that died.
async fn crashed_round(
    fed: &Fed,
    job: &fedstep_cloud::Job,
) -> fedstep_cloud::records::UpdateRecord {
    let engine = fed.engine("survivor");
    fed.upload_initial(job, &[0.0]).await;
    engine.start_round(job, 1, "t1").await.unwrap();
    for (client, v) in [("a", 1.0f32), ("b", 2.0)] {
        let row = fed.submit(job, 1, client, &[v], 1, &[]).await;
        engine.on_update(&row).await.unwrap();
    }
    let c = fed.submit(job, 1, "c", &[3.0], 1, &[]).await;
    // The crashed invocation counted c and claimed the round, then died.
    fed.ledger.add_received(&job.job_id, 1, "c").await.unwrap();
    let claim = fed
        .ledger
        .claim_round(&job.job_id, 1, "crashed", fed.clock.now(), LEASE)
        .await
        .unwrap();
    assert!(claim.is_some());
    c
}

#[tokio::test]
async fn a_retried_close_round_takes_over_after_the_lease() {
    let fed = Fed::new();
    let job = job("crash", 2, &["a", "b", "c"], 2);
    let c = crashed_round(&fed, &job).await;
    let engine = fed.engine("survivor");

    // The stream redelivers c: counted already, and the stream path never
    // aggregates, so nothing happens.
    assert!(matches!(
        engine.on_update(&c).await.unwrap(),
        UpdateOutcome::Late(r) if r.starts_with("replay")
    ));
    assert!(fed.callback.calls().is_empty());

    // Step Functions retries CloseRound; once the lease ran out it takes over.
    fed.clock.advance(LEASE + 1);
    let result = engine
        .close_round(&c.job_id, c.round, ClosedBy::Stream)
        .await
        .unwrap();
    assert_eq!(result.accepted, vec!["a", "b", "c"]);
    assert_eq!(result.closed_by, ClosedBy::Stream);
    assert_close_f32(&fed.global(&job, 2).await, &[2.0]);
    let row = fed.ledger.get_round("crash", 1).await.unwrap().unwrap();
    assert_eq!(row.status, RoundStatus::Closed);
    let owner = row.lease_owner.as_deref().unwrap_or_default();
    assert!(owner.starts_with("survivor."), "{owner}");
    // The dead aggregator waking up cannot close the round any more.
    assert!(!fed
        .ledger
        .close_round("crash", 1, "crashed", &result)
        .await
        .unwrap());
}

#[tokio::test]
async fn the_deadline_path_takes_over_after_the_lease() {
    let fed = Fed::new();
    let job = job("crash-deadline", 2, &["a", "b", "c"], 2);
    crashed_round(&fed, &job).await;
    fed.clock.advance(LEASE + 1);
    let result = fed
        .engine("closer")
        .close_round("crash-deadline", 1, ClosedBy::Deadline)
        .await
        .unwrap();
    assert_eq!(result.closed_by, ClosedBy::Deadline);
    assert_close_f32(&fed.global(&job, 2).await, &[2.0]);
}

#[tokio::test]
async fn a_failed_attempt_gives_up_its_lease_and_the_retry_finishes() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = job("flaky", 2, &["a", "b"], 2);
    fed.upload_initial(&job, &[0.0]).await;
    engine.start_round(&job, 1, "t1").await.unwrap();
    let a = fed.submit(&job, 1, "a", &[2.0], 1, &[]).await;
    let b = fed.submit(&job, 1, "b", &[4.0], 1, &[]).await;
    engine.on_update(&a).await.unwrap();
    assert!(matches!(
        engine.on_update(&b).await.unwrap(),
        UpdateOutcome::HandedOver { .. }
    ));
    // The store loses the global model: the attempt fails mid-way.
    let global = fed
        .store
        .path_of(&fedstep_cloud::keys::global_model("flaky", 1))
        .unwrap();
    let saved = std::fs::read(&global).unwrap();
    std::fs::remove_file(&global).unwrap();
    assert!(engine
        .close_round("flaky", 1, ClosedBy::Stream)
        .await
        .is_err());
    let row = fed.ledger.get_round("flaky", 1).await.unwrap().unwrap();
    assert_eq!(row.status, RoundStatus::Aggregating);
    assert!(
        row.lease_expires_at.unwrap() < fed.clock.now(),
        "lease released"
    );

    // The state machine retries CloseRound once the store is back: no
    // waiting for the lease.
    std::fs::write(&global, saved).unwrap();
    let result = engine
        .close_round("flaky", 1, ClosedBy::Stream)
        .await
        .unwrap();
    assert_eq!(result.accepted, vec!["a", "b"]);
    assert_close_f32(&fed.global(&job, 2).await, &[3.0]);
    assert_eq!(fed.callback.succeeded("t1").len(), 1);
}
