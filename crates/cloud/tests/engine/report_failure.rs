//! ReportFailure: when a job's execution fails, the round it was in is
//! failed (unless it already failed or closed), an async job's waiting
//! rows are settled, and `job_failed` tells the clients. Idempotent.

use fedstep_cloud::ports::Ledger;
use fedstep_cloud::records::{ClosedBy, JobFailed, Notification, RoundStatus};
use fedstep_cloud::round_failure::RoundFailure;
use fedstep_cloud::{JobFailure, UpdateOutcome};
use fedstep_test_support::federation::*;

use crate::asynchronous::{c_waiting_while_version_two_aggregates, JOB};

fn failures_published(fed: &Fed) -> Vec<JobFailed> {
    fed.bus
        .published()
        .into_iter()
        .filter_map(|n| match n {
            Notification::JobFailed(f) => Some(f),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn the_open_round_fails_and_the_clients_are_told_once_per_report() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = job("broken", 2, &["a", "b"], 2);
    fed.upload_initial(&job, &[0.0]).await;
    engine.start_round(&job, 1, "t1").await.unwrap();
    let a = fed.submit(&job, 1, "a", &[1.0], 1, &[]).await;
    engine.on_update(&a).await.unwrap();

    let failure = JobFailure::new("AggregatorError", "AccessDenied on PutObject");
    for attempt in 1..=2 {
        let out = engine.report_failure("broken", 1, &failure).await.unwrap();
        assert_eq!(
            out,
            serde_json::json!({"job_id": "broken", "round": 1, "notified": true})
        );
        let row = fed.ledger.get_round("broken", 1).await.unwrap().unwrap();
        assert_eq!(row.status, RoundStatus::Failed);
        assert_eq!(
            row.failure.unwrap().to_string(),
            "job failed: AggregatorError: AccessDenied on PutObject"
        );
        let told = failures_published(&fed);
        assert_eq!(told.len(), attempt, "one message per report");
        assert_eq!((told[0].job_id.as_str(), told[0].round), ("broken", 1));
        assert_eq!(
            (told[0].error.as_str(), told[0].cause.as_str()),
            ("AggregatorError", "AccessDenied on PutObject")
        );
    }
    // A row that arrives after: late, with a reason that is final.
    let b = fed.submit(&job, 1, "b", &[2.0], 1, &[]).await;
    let UpdateOutcome::Late(reason) = engine.on_update(&b).await.unwrap() else {
        panic!("b's row for the failed round is late")
    };
    assert!(
        reason.contains("round 1 is Failed; updates are no longer accepted"),
        "{reason}"
    );
    assert!(
        fed.callback.calls().is_empty(),
        "nothing answers a task token"
    );
}

#[tokio::test]
async fn a_round_that_failed_or_closed_keeps_its_own_outcome() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let quorum = job("quorum", 2, &["a", "b", "c"], 3);
    fed.upload_initial(&quorum, &[0.0]).await;
    engine.start_round(&quorum, 1, "t1").await.unwrap();
    let a = fed.submit(&quorum, 1, "a", &[1.0], 1, &[]).await;
    engine.on_update(&a).await.unwrap();
    let err = engine
        .close_round("quorum", 1, ClosedBy::Deadline)
        .await
        .unwrap_err();
    let failure = JobFailure::new("QuorumNotMet", &err.to_string());
    engine.report_failure("quorum", 1, &failure).await.unwrap();
    let row = fed.ledger.get_round("quorum", 1).await.unwrap().unwrap();
    assert!(
        matches!(row.failure, Some(RoundFailure::QuorumNotMet { .. })),
        "{:?}",
        row.failure
    );
    assert_eq!(failures_published(&fed)[0].error, "QuorumNotMet");

    // A CLOSED round (the failure came after it, e.g. in Finalize).
    let closed = job("closed", 1, &["a"], 1);
    fed.upload_initial(&closed, &[0.0]).await;
    engine.start_round(&closed, 1, "t2").await.unwrap();
    let a = fed.submit(&closed, 1, "a", &[1.0], 1, &[]).await;
    engine.on_update(&a).await.unwrap();
    engine
        .close_round("closed", 1, ClosedBy::Deadline)
        .await
        .unwrap();
    engine
        .report_failure("closed", 1, &JobFailure::new("AggregatorError", "x"))
        .await
        .unwrap();
    let row = fed.ledger.get_round("closed", 1).await.unwrap().unwrap();
    assert_eq!(row.status, RoundStatus::Closed);
    assert_eq!(failures_published(&fed).len(), 2);
}

#[tokio::test]
async fn a_job_or_round_that_does_not_exist_is_still_reported() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    engine
        .report_failure(
            "never-started",
            1,
            &JobFailure::new("NotFound", "job `never-started`"),
        )
        .await
        .unwrap();
    let told = failures_published(&fed);
    assert_eq!(told.len(), 1);
    assert_eq!(told[0].job_id, "never-started");
    assert!(fed
        .ledger
        .get_round("never-started", 1)
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn an_async_jobs_waiting_rows_are_settled_and_later_ones_are_final_at_once() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = c_waiting_while_version_two_aggregates(&fed, &engine).await;
    // Version 2's aggregation fails for good: no version 3 will carry them.
    let failure = JobFailure::new("AggregatorError", "AccessDenied on GetObject");
    engine.report_failure(JOB, 2, &failure).await.unwrap();
    let v2 = fed.ledger.get_round(JOB, 2).await.unwrap().unwrap();
    assert_eq!(v2.status, RoundStatus::Failed);
    for version in [1, 2] {
        let row = fed.ledger.get_round(JOB, version).await.unwrap().unwrap();
        let reason = &row.rejections["c"];
        assert!(
            reason.starts_with("late:")
                && reason.ends_with("the job failed in version 2, so no later version took it"),
            "version {version}: {reason}"
        );
    }
    // d's rows after the report: final at once, for the failed version
    // and for the one before it.
    for (round, expect) in [
        (2, "version 2 is Failed; the job failed in version 2"),
        (
            1,
            "the job failed in version 2, so no later version took it",
        ),
    ] {
        let d = fed
            .submit_from(&job, round, Some(round), "d", &[4.0], 1, &[])
            .await;
        let UpdateOutcome::Late(reason) = engine.on_update(&d).await.unwrap() else {
            panic!("d's row for version {round} is late")
        };
        assert!(reason.contains(expect), "version {round}: {reason}");
        assert!(!reason.contains("waiting"), "{reason}");
    }
}
