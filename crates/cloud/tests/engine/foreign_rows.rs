//! Issue #13: an `updates` row names its job and round, and any client can
//! write one naming any job. A client that is not an expected client of the
//! round it names is rejected without writing anything into that round's
//! item — not a rejection, not a "late" entry — whatever the round's state;
//! an expected client's rule violations are still recorded there.

use fedstep_cloud::ports::Ledger;
use fedstep_cloud::records::{ClosedBy, RoundRecord, RoundStatus, UpdateRecord};
use fedstep_cloud::UpdateOutcome;
use fedstep_test_support::federation::*;

fn rejected(o: UpdateOutcome) -> String {
    match o {
        UpdateOutcome::Rejected(r) => r,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// `row` as written by a client of another job: the same client id, but
/// naming `job_id` round 1 (with the keys that job would use, so the only
/// rule it breaks is membership).
fn naming(row: &UpdateRecord, job_id: &str) -> UpdateRecord {
    let mut r = row.clone();
    r.job_id = job_id.into();
    r.job_round = fedstep_cloud::keys::job_round(job_id, 1);
    r.model_key = fedstep_cloud::keys::update(job_id, 1, &r.client_id);
    r
}

async fn round_item(fed: &Fed, job_id: &str) -> RoundRecord {
    fed.ledger.get_round(job_id, 1).await.unwrap().unwrap()
}

#[tokio::test]
async fn a_client_of_another_job_cannot_write_into_a_round_item() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let ours = job("ours", 2, &["a", "b"], 2);
    let theirs = job("theirs", 2, &["x", "y", "z"], 2);
    fed.upload_initial(&ours, &[0.0]).await;
    fed.upload_initial(&theirs, &[0.0]).await;
    engine.start_round(&ours, 1, "t-ours").await.unwrap();
    engine.start_round(&theirs, 1, "t-theirs").await.unwrap();
    let a = fed.submit(&ours, 1, "a", &[1.0], 1, &[]).await;

    // While `theirs` is OPEN: a well-formed row, and ones that would break
    // a rule if `a` were a client there. None is recorded.
    let foreign = naming(&a, "theirs");
    let mut bad_key = foreign.clone();
    bad_key.model_key = format!("{}/../../../{}", foreign.model_key, "x".repeat(100_000));
    let mut bad_sum = foreign.clone();
    bad_sum.checksum = "\n".repeat(50_000);
    for row in [&foreign, &bad_key, &bad_sum] {
        let reason = rejected(engine.on_update(row).await.unwrap());
        assert!(
            reason.starts_with("client: `a` is not an expected client of round 1 of job `theirs`"),
            "{reason}"
        );
        assert!(reason.len() <= fedstep_cloud::bounded::REASON_BYTES);
    }
    let item = round_item(&fed, "theirs").await;
    assert!(item.rejections.is_empty(), "{:?}", item.rejections);
    assert!(item.received.is_empty(), "{:?}", item.received);

    // Their round goes on and closes with its own clients.
    for (c, v) in [("x", 1.0), ("y", 2.0), ("z", 3.0)] {
        let row = fed.submit(&theirs, 1, c, &[v], 1, &[]).await;
        engine.on_update(&row).await.unwrap();
    }
    engine
        .close_round("theirs", 1, ClosedBy::Stream)
        .await
        .unwrap();
    let item = round_item(&fed, "theirs").await;
    assert_eq!(item.status, RoundStatus::Closed);
    let result = item.result.clone().unwrap();
    assert_eq!(result.accepted, vec!["x", "y", "z"]);
    assert!(result.rejected.is_empty());

    // Once `theirs` is CLOSED, the same row is not recorded as late either.
    let reason = rejected(engine.on_update(&foreign).await.unwrap());
    assert!(reason.starts_with("client:"), "{reason}");
    assert_eq!(round_item(&fed, "theirs").await, item);
    // Nor after a FAILED round.
    let failed = job("failed", 2, &["x", "y"], 2);
    fed.upload_initial(&failed, &[0.0]).await;
    engine.start_round(&failed, 1, "t-failed").await.unwrap();
    fed.clock.advance(601);
    engine
        .close_round("failed", 1, ClosedBy::Deadline)
        .await
        .unwrap_err();
    let before = round_item(&fed, "failed").await;
    assert_eq!(before.status, RoundStatus::Failed);
    let reason = rejected(engine.on_update(&naming(&a, "failed")).await.unwrap());
    assert!(reason.starts_with("client:"), "{reason}");
    assert_eq!(round_item(&fed, "failed").await, before);

    // No callback was sent on anyone's behalf but `theirs`' own close.
    assert!(fed.callback.calls_for("t-ours").is_empty());
    assert_eq!(fed.callback.calls_for("t-theirs").len(), 1);
}

#[tokio::test]
async fn an_expected_clients_violations_are_still_recorded() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let j = job("mine", 2, &["a", "b", "c"], 2);
    fed.upload_initial(&j, &[0.0]).await;
    engine.start_round(&j, 1, "t1").await.unwrap();

    // An expected client with a huge, control-laden job_round: recorded,
    // bounded and escaped.
    let mut a = fed.submit(&j, 1, "a", &[1.0], 1, &[]).await;
    a.job_round = format!("mine#000002\n{}", "€".repeat(200_000));
    let reason = rejected(engine.on_update(&a).await.unwrap());
    assert!(
        reason.starts_with("job_round: `mine#000002\\n€€"),
        "{reason}"
    );
    assert!(
        reason.len() <= fedstep_cloud::bounded::REASON_BYTES,
        "{}",
        reason.len()
    );
    assert!(!reason.contains('\n'));
    assert!(reason.contains(" bytes)"), "the cut is marked: {reason}");
    let item = round_item(&fed, "mine").await;
    assert_eq!(item.rejections["a"], reason);

    // The round closes with the others; a's rejection is in the result.
    for (c, v) in [("b", 1.0), ("c", 3.0)] {
        let row = fed.submit(&j, 1, c, &[v], 1, &[]).await;
        engine.on_update(&row).await.unwrap();
    }
    engine
        .close_round("mine", 1, ClosedBy::Stream)
        .await
        .unwrap();
    let item = round_item(&fed, "mine").await;
    assert_eq!(item.status, RoundStatus::Closed);
    assert_eq!(item.result.unwrap().rejected["a"], reason);
}
