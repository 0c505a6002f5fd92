//! The stop rule decides `continue`; StartRound is idempotent across task
//! retries (new token) and after the round closed.

mod common;

use common::*;
use fedstep_cloud::local::CallbackCall;
use fedstep_cloud::ports::Ledger;
use fedstep_cloud::records::Notification;
use fedstep_cloud::{JobSpec, UpdateOutcome};

fn job_with_target(job_id: &str) -> JobSpec {
    let mut j = job(job_id, 5, &["a", "b"], 2);
    j.stop = Some(fedstep_cloud::job::StopRule {
        metric: "accuracy".into(),
        target: Some(0.9),
        mode: fedstep_cloud::job::StopMode::Max,
        patience: None,
    });
    j.check().unwrap();
    j
}

async fn one_round(
    fed: &Fed,
    job: &JobSpec,
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
        UpdateOutcome::Aggregated(r) => r,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn reaching_the_target_stops_training() {
    let fed = Fed::new();
    let job = job_with_target("stop");
    fed.upload_initial(&job, &[0.0]).await;
    // Weighted accuracy 0.25·0.5 + 0.75·0.7 = 0.65: go on.
    let r1 = one_round(&fed, &job, 1, [0.5, 0.7]).await;
    assert!((r1.metrics["accuracy"] - 0.65).abs() < 1e-9);
    assert!(r1.continue_training);
    // 0.25·0.8 + 0.75·0.95 = 0.9125 ≥ 0.9: stop, although rounds = 5.
    let r2 = one_round(&fed, &job, 2, [0.8, 0.95]).await;
    assert!(!r2.continue_training);
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

    // A retry after the round closed re-sends the result with its token.
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
