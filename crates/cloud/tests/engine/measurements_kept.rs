//! Each closed round keeps its aggregation's measurements beside the model
//! it wrote: every participant once (the core's verdicts and the engine's
//! own rejections), weights of the accepted summing to 1, and a rerun of
//! the aggregation rewriting the same object with the same content.

use fedstep_cloud::keys;
use fedstep_cloud::ports::{Ledger, ObjectStore};
use fedstep_cloud::records::{ClosedBy, RoundResult, RoundStatus};
use fedstep_cloud::round_measurements::RoundMeasurements;
use fedstep_cloud::UpdateOutcome;
use fedstep_core::measurements::ClientStatus;
use fedstep_test_support::federation::*;

/// Round 1 of a job of a, b, c, d: a's row points outside its prefix
/// (rejected at on_update), c's object is swapped after its row was
/// written (rejected when it is hashed, after the core ran), b and d are aggregated with 10
/// and 30 examples.
async fn round_with_rejections(fed: &Fed) -> RoundResult {
    let engine = fed.engine("agg");
    let job = job("kept", 1, &["a", "b", "c", "d"], 2);
    fed.upload_initial(&job, &[0.0, 0.0]).await;
    engine.start_round(&job, 1, "t1").await.unwrap();

    let mut a = fed.submit(&job, 1, "a", &[1.0, 1.0], 1, &[]).await;
    a.model_key = keys::update("kept", 1, "b");
    assert!(matches!(
        engine.on_update(&a).await.unwrap(),
        UpdateOutcome::Rejected(_)
    ));
    let b = fed.submit(&job, 1, "b", &[2.0, 2.0], 10, &[]).await;
    engine.on_update(&b).await.unwrap();
    let c = fed.submit(&job, 1, "c", &[9.0, 9.0], 10, &[]).await;
    let swapped = fed.model_file("c-swapped", &[900.0, 900.0]);
    fed.store.put_file(&c.model_key, &swapped).await.unwrap();
    engine.on_update(&c).await.unwrap();
    let d = fed.submit(&job, 1, "d", &[4.0, 4.0], 30, &[]).await;
    let UpdateOutcome::HandedOver { .. } = engine.on_update(&d).await.unwrap() else {
        panic!("d completes the round");
    };
    let result = engine
        .close_round(&d.job_id, d.round, ClosedBy::Stream)
        .await
        .unwrap();
    result
}

async fn stored(fed: &Fed, name: &str) -> (Vec<u8>, RoundMeasurements) {
    let key = keys::round_measurements("kept", 2);
    let path = fed.dir.path().join(name);
    fed.store.get_file(&key, &path).await.unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let parsed = RoundMeasurements::from_json_bytes(&key, &bytes).unwrap();
    (bytes, parsed)
}

#[tokio::test]
async fn a_closed_round_keeps_every_participant_once() {
    let fed = Fed::new();
    let result = round_with_rejections(&fed).await;
    let row = fed.ledger.get_round("kept", 1).await.unwrap().unwrap();
    assert_eq!(row.status, RoundStatus::Closed);
    assert_eq!(result.accepted, ["b", "d"]);

    let (_, kept) = stored(&fed, "m.json").await;
    assert_eq!((kept.job_id.as_str(), kept.round), ("kept", 1));
    let ids: Vec<&str> = kept
        .measurements
        .clients
        .iter()
        .map(|c| c.client_id.as_str())
        .collect();
    assert_eq!(ids, ["a", "b", "c", "d"], "each participant exactly once");

    for (client, rule) in [("a", "model_key:"), ("c", "checksum:")] {
        let m = kept.client(client).unwrap();
        assert_eq!(m.status, ClientStatus::Rejected, "{client}");
        let reason = m.reason.as_deref().unwrap();
        assert!(reason.starts_with(rule), "{client}: {reason}");
        assert!(result.rejected.contains_key(client), "{client}");
        assert_eq!(m.weight, None);
    }
    let weights: Vec<f64> = ["b", "d"]
        .iter()
        .map(|c| {
            let m = kept.client(c).unwrap();
            assert_eq!(m.status, ClientStatus::Accepted, "{c}");
            m.weight.unwrap()
        })
        .collect();
    assert!(
        (weights.iter().sum::<f64>() - 1.0).abs() < 1e-12,
        "{weights:?}"
    );
    assert!((weights[0] - 0.25).abs() < 1e-12, "{weights:?}");
    assert_eq!(kept.measurements.accepted, 2);
    assert_eq!(kept.measurements.rejected, 2);
}

#[tokio::test]
async fn a_rerun_rewrites_the_same_object_with_the_same_content() {
    let first = Fed::new();
    round_with_rejections(&first).await;
    let (_, once) = stored(&first, "once.json").await;

    // A crashed attempt left something at the key: the aggregation that
    // closes the round writes over it.
    let again = Fed::new();
    let leftover = again.dir.path().join("leftover.json");
    std::fs::write(&leftover, b"{\"partial\": true}").unwrap();
    again
        .store
        .put_file(&keys::round_measurements("kept", 2), &leftover)
        .await
        .unwrap();
    round_with_rejections(&again).await;
    let (_, twice) = stored(&again, "twice.json").await;

    // The same content but for the measured wall time.
    let without_time = |m: &RoundMeasurements| {
        let mut v = serde_json::to_value(m).unwrap();
        v["measurements"]["seconds"] = serde_json::Value::Null;
        v
    };
    assert_eq!(without_time(&once), without_time(&twice));
}
