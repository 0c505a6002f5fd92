//! The stop rule decides `continue`; StartRound is idempotent across task
//! retries (new token) and after the round closed.

use fedstep_cloud::local::CallbackCall;
use fedstep_cloud::ports::Ledger;
use fedstep_cloud::records::{ClosedBy, Notification};
use fedstep_cloud::{Job, JobSpec, UpdateOutcome};
use fedstep_test_support::federation::*;

fn job_with_target(job_id: &str) -> Job {
    let mut j = JobSpec::from(job(job_id, 5, &["a", "b"], 2));
    j.stop = Some(fedstep_cloud::job::StopRule {
        metric: "accuracy".into(),
        target: Some(0.9),
        mode: fedstep_cloud::job::StopMode::Max,
        patience: None,
    });
    j.check().unwrap()
}

async fn one_round(
    fed: &Fed,
    job: &Job,
    round: u32,
    acc: [f64; 2],
) -> fedstep_cloud::records::RoundResult {
    let engine = fed.engine("agg");
    engine
        .start_round(job, round, &format!("t{round}"))
        .await
        .unwrap();
    let a = fed
        .submit(job, round, "a", &[1.0], 1, &[("accuracy", acc[0])])
        .await;
    let b = fed
        .submit(job, round, "b", &[1.0], 3, &[("accuracy", acc[1])])
        .await;
    engine.on_update(&a).await.unwrap();
    match engine.on_update(&b).await.unwrap() {
        UpdateOutcome::HandedOver { .. } => engine
            .close_round(&job.job_id, round, ClosedBy::Stream)
            .await
            .unwrap(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn reaching_the_target_stops_training() {
    let fed = Fed::new();
    let job = job_with_target("stop");
    fed.upload_initial(&job, &[0.0]).await;
    // Median accuracy (0.5 + 0.7) / 2 = 0.6: go on. The example-weighted
    // mean 0.25·0.5 + 0.75·0.7 = 0.65 is reported beside it.
    let r1 = one_round(&fed, &job, 1, [0.5, 0.7]).await;
    assert!((r1.metrics["accuracy"] - 0.6).abs() < 1e-9);
    assert!((r1.metrics["accuracy:mean"] - 0.65).abs() < 1e-9);
    assert!(r1.continue_training);
    // Weighted 0.25·0.8 + 0.75·0.95 = 0.9125 but median 0.875 < 0.9: the
    // stop rule decides on the median, so the job goes on.
    let r2 = one_round(&fed, &job, 2, [0.8, 0.95]).await;
    assert!((r2.metrics["accuracy"] - 0.875).abs() < 1e-9);
    assert!(r2.continue_training);
    // Median (0.9 + 0.96) / 2 = 0.93 ≥ 0.9: stop, although rounds = 5.
    let r3 = one_round(&fed, &job, 3, [0.9, 0.96]).await;
    assert!(!r3.continue_training);
}

/// Issue #13: the stop metric is the median of the accepted clients'
/// reports, so one client claiming a perfect (or absurd) score cannot end
/// the job, and one claiming zero cannot hold back an honest majority
/// that reached the target.
#[tokio::test]
async fn one_outlier_cannot_trigger_the_stop_rule_but_the_majority_does() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let mut job = JobSpec::from(job("outlier", 5, &["a", "b", "evil"], 3));
    job.stop = Some(fedstep_cloud::job::StopRule {
        metric: "accuracy".into(),
        target: Some(0.9),
        mode: fedstep_cloud::job::StopMode::Max,
        patience: None,
    });
    let job = job.check().unwrap();
    fed.upload_initial(&job, &[0.0]).await;
    let round = |r: u32, honest: [f64; 2], evil: f64, evil_examples: u64| {
        let (fed, engine, job) = (&fed, &engine, &job);
        async move {
            engine.start_round(job, r, &format!("t{r}")).await.unwrap();
            let mut last = None;
            for (c, acc, n) in [
                ("a", honest[0], 1),
                ("b", honest[1], 1),
                ("evil", evil, evil_examples),
            ] {
                let row = fed.submit(job, r, c, &[1.0], n, &[("accuracy", acc)]).await;
                last = Some(engine.on_update(&row).await.unwrap());
            }
            match last {
                Some(UpdateOutcome::HandedOver { .. }) => engine
                    .close_round(&job.job_id, r, ClosedBy::Stream)
                    .await
                    .unwrap(),
                other => panic!("{other:?}"),
            }
        }
    };
    // A finite 1e300 from a heavily weighted client: the weighted mean is
    // absurd, the median is an honest value, and the job goes on.
    for (r, evil) in [(1, 1e300), (2, 1.0), (3, f64::MAX)] {
        let result = round(r, [0.5, 0.6], evil, 1000).await;
        assert_eq!(result.metrics["accuracy"], 0.6, "round {r}");
        assert!(result.continue_training, "round {r}: {:?}", result.metrics);
        if evil == 1e300 {
            assert!(result.metrics["accuracy:mean"] > 1e299);
        }
    }
    // The honest majority reaches the target; the outlier reports 0.
    let result = round(4, [0.92, 0.95], 0.0, 1000).await;
    assert_eq!(result.metrics["accuracy"], 0.92);
    assert!(!result.continue_training, "{:?}", result.metrics);
}

#[tokio::test]
async fn start_round_is_idempotent() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = job("retry", 3, &["a", "b"], 1);
    fed.upload_initial(&job, &[0.0]).await;
    engine.start_round(&job, 1, "first").await.unwrap();
    // Step Functions retried the task: a new token replaces the old one.
    let row = engine.start_round(&job, 1, "second").await.unwrap();
    assert_eq!(row.task_token.as_deref(), Some("second"));
    let ready = fed
        .bus
        .published()
        .into_iter()
        .filter(|n| matches!(n, Notification::GlobalModelReady(_)))
        .count();
    assert_eq!(ready, 2, "published again for the retry");

    for (c, v) in [("a", 1.0f32), ("b", 3.0)] {
        let row = fed.submit(&job, 1, c, &[v], 1, &[]).await;
        engine.on_update(&row).await.unwrap();
    }
    assert_eq!(fed.callback.succeeded("second").len(), 1);
    assert!(fed.callback.calls_for("first").is_empty());
    engine
        .close_round("retry", 1, ClosedBy::Stream)
        .await
        .unwrap();

    // A retry after the round closed hands it over on its own token
    // (CloseRound then returns the stored result) and keeps the stored one.
    engine.start_round(&job, 1, "third").await.unwrap();
    let calls = fed.callback.calls_for("third");
    assert!(matches!(
        &calls[..],
        [CallbackCall::Succeed {
            delivered: true,
            ..
        }]
    ));
    assert_eq!(
        fed.ledger
            .get_round("retry", 1)
            .await
            .unwrap()
            .unwrap()
            .task_token
            .as_deref(),
        Some("second")
    );

    // Without the global model the round cannot open.
    let err = engine.start_round(&job, 3, "t3").await.unwrap_err();
    assert!(err.to_string().contains("global.safetensors"), "{err}");
}
