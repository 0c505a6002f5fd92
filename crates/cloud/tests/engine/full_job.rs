//! Three clients, three rounds, end to end over the local adapters: each
//! round's global model is the example-weighted average, rows end CLOSED,
//! the StartRound task is handed over exactly once per round (then
//! CloseRound aggregates), and Finalize registers the last model.

use fedstep_cloud::ports::Ledger;
use fedstep_cloud::records::{ClosedBy, Notification, RoundStatus};
use fedstep_cloud::UpdateOutcome;
use fedstep_test_support::assert_close_f32;
use fedstep_test_support::federation::*;

#[tokio::test]
async fn three_clients_three_rounds() {
    let fed = Fed::new();
    let engine = fed.engine("aggregator-1");
    let job = job("digits-001", 3, &["site-a", "site-b", "site-c"], 2);
    fed.upload_initial(&job, &[0.0, 1.0, 2.0, 3.0]).await;
    let examples = [("site-a", 10u64), ("site-b", 30), ("site-c", 60)];

    let mut last = None;
    for round in 1..=3u32 {
        let token = format!("token-{round}");
        let row = engine.start_round(&job, round, &token).await.unwrap();
        assert_eq!(row.status, RoundStatus::Open);
        let global = fed.global(&job, round).await;

        let mut models = Vec::new();
        for (i, (client, n)) in examples.iter().enumerate() {
            // Each client moves the model its own way.
            let local: Vec<f32> = global
                .iter()
                .map(|g| g + (i as f32 + 1.0) * 0.5 + round as f32)
                .collect();
            let loss = 1.0 / (round as f64 + i as f64);
            let row = fed
                .submit(&job, round, client, &local, *n, &[("loss", loss)])
                .await;
            let outcome = engine.on_update(&row).await.unwrap();
            if i < 2 {
                assert_eq!(
                    outcome,
                    UpdateOutcome::Recorded {
                        usable: i + 1,
                        expected: 3
                    }
                );
            } else {
                assert_eq!(
                    outcome,
                    UpdateOutcome::HandedOver {
                        usable: 3,
                        expected: 3
                    },
                    "the last update hands the round over"
                );
                // The state machine's next task.
                let result = engine
                    .close_round(&job.job_id, round, ClosedBy::Stream)
                    .await
                    .unwrap();
                assert_eq!(result.round, round);
                assert_eq!(result.closed_by, ClosedBy::Stream);
                assert_eq!(result.continue_training, round < 3);
                assert_eq!(result.accepted.len(), 3);
                assert_eq!(result.metrics["clients_accepted"], 3.0);
                assert_eq!(result.metrics["clients_rejected"], 0.0);
                let want_loss = examples
                    .iter()
                    .enumerate()
                    .map(|(j, (_, n))| *n as f64 / 100.0 / (round as f64 + j as f64))
                    .sum::<f64>();
                // The weighted mean is reported beside the median, which
                // is what the stop rule reads: here client j = 1's loss.
                assert!((result.metrics["loss:mean"] - want_loss).abs() < 1e-9);
                assert_eq!(result.metrics["loss"], 1.0 / (round as f64 + 1.0));
                last = Some(result);
            }
            models.push((local, *n));
        }
        let refs: Vec<(&[f32], u64)> = models.iter().map(|(m, n)| (m.as_slice(), *n)).collect();
        assert_close_f32(&fed.global(&job, round + 1).await, &weighted_mean(&refs));

        let stored = fed
            .ledger
            .get_round(&job.job_id, round)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.status, RoundStatus::Closed);
        // The lease is held by an attempt of this engine (named after it).
        let owner = stored.lease_owner.as_deref().unwrap_or_default();
        assert!(owner.starts_with("aggregator-1."), "{owner}");
        let outputs = fed.callback.succeeded(&token);
        assert_eq!(outputs.len(), 1, "one callback per round");
        assert_eq!(fed.callback.calls_for(&token).len(), 1);
        assert_eq!(
            outputs[0],
            serde_json::json!({"job_id": "digits-001", "round": round, "closed_by": "stream", "usable": 3, "expected": 3})
        );
    }

    let result = last.unwrap();
    let fin = engine.finalize(&job.job_id, 3, &result).await.unwrap();
    assert_eq!(fin["artifact_id"], "digits-001:3");
    assert_eq!(
        fin["final_model_key"],
        "jobs/digits-001/rounds/4/global.safetensors"
    );
    // Idempotent: a retried Finalize registers nothing new.
    engine.finalize(&job.job_id, 3, &result).await.unwrap();
    let artifacts = fed.ledger.list_artifacts(Some("untyped")).await.unwrap();
    assert_eq!(artifacts.len(), 1);
    assert_eq!(artifacts[0].created_at, "2027-01-15T08:00:00Z");

    let published = fed.bus.published();
    let ready = published
        .iter()
        .filter(|n| matches!(n, Notification::GlobalModelReady(_)))
        .count();
    assert_eq!(ready, 3);
    assert!(matches!(
        published.last(),
        Some(Notification::TrainingComplete(_))
    ));
    // The aggregation wrote nothing but whole objects: no partial output of
    // an attempt is left in the store (nor anywhere else: the engine has no
    // scratch directory).
    let mut stack = vec![fed.store.root().to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(!name.starts_with('.'), "left behind: {}", path.display());
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
}

/// A job with `[secure_aggregation]` passes its checks but cannot run yet
/// (issue #18): StartRound refuses it before any round is opened or any
/// client told, whoever started the execution.
#[tokio::test]
async fn a_secure_job_is_refused_before_any_round_opens() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = fedstep_cloud::JobSpec::from_toml(
        "job_id = \"secure\"\nrounds = 2\nclients = [\"a\", \"b\", \"c\"]\nmin_clients = 3\n\
         round_timeout_seconds = 600\n[secure_aggregation]\nneighbours = 2\n",
    )
    .unwrap();
    fed.upload_initial(&job, &[0.0]).await;
    let err = engine.start_round(&job, 1, "t1").await.unwrap_err();
    assert!(err.to_string().contains("does not run SecAgg+"), "{err}");
    assert!(fed.ledger.get_round("secure", 1).await.unwrap().is_none());
}
