//! The figures an engine reports for each round it closes (the Lambda
//! prints them as CloudWatch metrics): once per close, by the engine that
//! closed, from the same numbers the ledger and the measurements keep.

use std::sync::{Arc, Mutex};

use fedstep_cloud::ports::ObjectStore;
use fedstep_cloud::records::ClosedBy;
use fedstep_cloud::round_measurements::RoundMeasurements;
use fedstep_cloud::{keys, JobSpec, RoundFigures, UpdateOutcome};
use fedstep_test_support::federation::*;

#[tokio::test]
async fn each_close_is_reported_once_with_the_stored_figures() {
    let fed = Fed::new();
    let seen: Arc<Mutex<Vec<RoundFigures>>> = Arc::default();
    let sink = seen.clone();
    let engine = fed
        .engine("agg")
        .observe_rounds(Arc::new(move |f: &RoundFigures| {
            sink.lock().unwrap().push(f.clone())
        }));
    let bystander = fed.engine("other");
    let job = JobSpec::from_toml(
        r#"
job_id = "figs"
rounds = 3
clients = ["a", "b", "c"]
min_clients = 2
round_timeout_seconds = 600
[stop]
metric = "accuracy"
target = 0.99
[aggregation]
weighting = "examples"
"#,
    )
    .unwrap();
    fed.upload_initial(&job, &[0.0, 0.0]).await;
    engine.start_round(&job, 1, "t1").await.unwrap();
    fed.clock.advance(42);
    let a = fed
        .submit(&job, 1, "a", &[1.0, 1.0], 10, &[("accuracy", 0.5)])
        .await;
    let b = fed
        .submit(&job, 1, "b", &[2.0, 2.0], 10, &[("accuracy", 0.7)])
        .await;
    // The wrong shape: the core rejects it.
    let c = fed.submit(&job, 1, "c", &[3.0], 10, &[]).await;
    engine.on_update(&a).await.unwrap();
    engine.on_update(&b).await.unwrap();
    let UpdateOutcome::HandedOver { .. } = engine.on_update(&c).await.unwrap() else {
        panic!("c completes the round");
    };
    let result = engine
        .close_round(&c.job_id, c.round, ClosedBy::Stream)
        .await
        .unwrap();
    // A replay on another engine closes nothing and reports nothing.
    bystander.on_update(&c).await.unwrap();

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let f = &seen[0];
    assert_eq!((f.job_id.as_str(), f.round), ("figs", 1));
    assert_eq!(f.closed_by, ClosedBy::Stream);
    assert_eq!((f.clients_accepted, f.clients_rejected), (2, 1));
    assert_eq!(f.open_to_close_seconds, 42);
    assert_eq!(
        f.stop_metric,
        Some(("accuracy".to_string(), result.metrics["accuracy"]))
    );
    // The bytes and seconds are the stored measurements' own.
    let path = fed.dir.path().join("measurements.json");
    fed.store
        .get_file(&keys::round_measurements("figs", 2), &path)
        .await
        .unwrap();
    let stored: RoundMeasurements = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(f.bytes_read, stored.measurements.bytes_read);
    assert_eq!(f.bytes_written, stored.measurements.bytes_written);
    assert!(f.bytes_read > 0 && f.bytes_written > 0);
    assert_eq!(f.aggregation_seconds, stored.measurements.seconds);
}
