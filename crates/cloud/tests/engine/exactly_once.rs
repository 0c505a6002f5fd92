//! At-least-once delivery and racing engines still give exactly one hand-over
//! per round and exactly one aggregation.

use fedstep_cloud::ports::{AddReceived, Clock, Ledger};
use fedstep_cloud::records::{ClosedBy, RoundStatus};
use fedstep_cloud::UpdateOutcome;
use fedstep_test_support::assert_close_f32;
use fedstep_test_support::federation::*;

#[tokio::test]
async fn the_same_row_twice_aggregates_once() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = job("dup", 2, &["a", "b", "c"], 2);
    fed.upload_initial(&job, &[1.0, 2.0]).await;
    engine.start_round(&job, 1, "t1").await.unwrap();

    let a = fed.submit(&job, 1, "a", &[2.0, 2.0], 1, &[]).await;
    let b = fed.submit(&job, 1, "b", &[4.0, 4.0], 1, &[]).await;
    let c = fed.submit(&job, 1, "c", &[6.0, 6.0], 1, &[]).await;
    engine.on_update(&a).await.unwrap();
    // An early duplicate is just counted again (a set ADD).
    let again = engine.on_update(&a).await.unwrap();
    assert_eq!(
        again,
        UpdateOutcome::Recorded {
            usable: 1,
            expected: 3
        }
    );
    engine.on_update(&b).await.unwrap();
    let handed_over = UpdateOutcome::HandedOver {
        usable: 3,
        expected: 3,
    };
    assert_eq!(engine.on_update(&c).await.unwrap(), handed_over);
    // Redelivered before CloseRound ran: the round is complete again, but
    // this engine already answered the token.
    assert_eq!(engine.on_update(&c).await.unwrap(), handed_over);
    assert_eq!(fed.callback.calls().len(), 1);
    // The same replay on a fresh engine answers again; Step Functions
    // refuses a second answer (not delivered, no error).
    assert_eq!(
        fed.engine("other").on_update(&c).await.unwrap(),
        handed_over
    );
    assert_eq!(fed.callback.calls().len(), 2);
    assert_eq!(fed.callback.succeeded("t1").len(), 1);
    let output = &fed.callback.succeeded("t1")[0];
    assert_eq!(output["closed_by"], "stream");
    assert_eq!(output["round"], 1);

    let result = engine
        .close_round("dup", 1, ClosedBy::Stream)
        .await
        .unwrap();
    assert_eq!(result.closed_by, ClosedBy::Stream);
    // The stream redelivers the last row after the round closed.
    let UpdateOutcome::Late(reason) = engine.on_update(&c).await.unwrap() else {
        panic!("a replay after CLOSED is late")
    };
    assert!(reason.starts_with("replay"), "{reason}");
    assert_eq!(fed.callback.calls().len(), 2);
    let row = fed.ledger.get_round("dup", 1).await.unwrap().unwrap();
    assert!(row.rejections.is_empty(), "a replay is not a rejection");
    assert_close_f32(&fed.global(&job, 2).await, &[4.0, 4.0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_racing_on_the_last_update_and_on_close_round() {
    for attempt in 0..8 {
        let fed = Fed::new();
        let (e1, e2) = (fed.engine("engine-1"), fed.engine("engine-2"));
        let job = job(&format!("race{attempt}"), 2, &["a", "b", "c"], 3);
        fed.upload_initial(&job, &[0.0]).await;
        e1.start_round(&job, 1, "t").await.unwrap();
        let a = fed.submit(&job, 1, "a", &[3.0], 1, &[]).await;
        let b = fed.submit(&job, 1, "b", &[6.0], 1, &[]).await;
        let c = fed.submit(&job, 1, "c", &[9.0], 1, &[]).await;
        e1.on_update(&a).await.unwrap();
        let (r1, r2) = if attempt % 2 == 0 {
            // The same last row delivered to two invocations at once.
            e2.on_update(&b).await.unwrap();
            let (x, y) = tokio::join!(e1.on_update(&c), e2.on_update(&c));
            (x.unwrap(), y.unwrap())
        } else {
            // The last two rows land in two invocations at once: both may
            // see the round complete.
            let (x, y) = tokio::join!(e1.on_update(&b), e2.on_update(&c));
            (x.unwrap(), y.unwrap())
        };
        let handed_over = [&r1, &r2]
            .iter()
            .filter(|o| matches!(o, UpdateOutcome::HandedOver { .. }))
            .count();
        assert!(handed_over >= 1, "attempt {attempt}: {r1:?} {r2:?}");
        assert_eq!(fed.callback.succeeded("t").len(), 1, "attempt {attempt}");
        // CloseRound retried while its first attempt still runs.
        let (x, y) = tokio::join!(
            e1.close_round(&job.job_id, 1, ClosedBy::Stream),
            e2.close_round(&job.job_id, 1, ClosedBy::Stream)
        );
        assert_eq!(x.unwrap(), y.unwrap(), "attempt {attempt}");
        let row = fed.ledger.get_round(&job.job_id, 1).await.unwrap().unwrap();
        assert_eq!(row.status, RoundStatus::Closed);
        assert_close_f32(&fed.global(&job, 2).await, &[6.0]);
    }
}

/// The race the fault schedules found on the emulators: two deliveries of
/// one row; the first counts it and its engine claims the round; the
/// second, having read the round OPEN, ADDs after the claim and took that
/// for "late", rejecting a client the claimer was aggregating. `received`
/// is now frozen from the claim on, and the engine asks it whether the
/// client was counted.
#[tokio::test]
async fn received_is_frozen_from_the_claim_on() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = job("frozen", 2, &["a", "b", "c"], 2);
    fed.upload_initial(&job, &[0.0]).await;
    engine.start_round(&job, 1, "t1").await.unwrap();
    let counted = fed.ledger.add_received("frozen", 1, "a").await.unwrap();
    assert!(matches!(counted, AddReceived::Counted(_)), "{counted:?}");
    fed.ledger.add_received("frozen", 1, "b").await.unwrap();
    let claimed = fed
        .ledger
        .claim_round("frozen", 1, "agg", fed.clock.now(), LEASE)
        .await
        .unwrap()
        .expect("claimed");
    for client in ["a", "c"] {
        let AddReceived::PastOpen(row) =
            fed.ledger.add_received("frozen", 1, client).await.unwrap()
        else {
            panic!("an ADD after the claim must not count");
        };
        assert_eq!(row.status, RoundStatus::Aggregating);
        assert_eq!(row.received, claimed.received);
    }
}
