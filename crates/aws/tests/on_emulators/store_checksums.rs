//! The round engine over the real S3 adapter (the ledger, bus and callback
//! in memory): rows name the checksum S3 verified at upload, so the plan
//! binds each update by its HEAD — four shards each fetch about a quarter
//! of the inputs, and an object replaced after its row (same size, still a
//! valid model) is rejected by the plan before a byte of it is read.
//! Setup: see common/mod.rs.

use crate::common;

use common::unique;
use fedstep_cloud::local::{LocalBus, ManualClock, MemLedger, RecordingCallback};
use fedstep_cloud::ports::{Ledger, ObjectStore};
use fedstep_cloud::records::{ClosedBy, UpdateRecord, SCHEMA};
use fedstep_cloud::round_measurements::RoundMeasurements;
use fedstep_cloud::{keys, EngineConfig, JobSpec, RoundEngine};
use fedstep_test_support::model::write_f32_model;
use serde_json::Value;

/// 8M f32: 32 MiB a model, four shards at `shard_mib = 8`.
const PARAMS: usize = 8 << 20;
const READ_AHEAD: u64 = 4 << 20;
const WINDOW: u64 = 256 << 10;

fn values(seed: u32) -> Vec<f32> {
    (0..PARAMS)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f32 / 500.0)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_shards_bind_updates_by_the_stores_checksum_and_fetch_a_quarter_each() {
    let Some(env) = common::env().await else {
        return;
    };
    let store = env.store();
    let ledger = MemLedger::new();
    let clock = ManualClock::new(1_800_000_000);
    let engine = RoundEngine::new(
        store.clone(),
        ledger.clone(),
        LocalBus::new(std::sync::Arc::new(clock.clone())),
        RecordingCallback::new(),
        clock,
        EngineConfig {
            // 1 MiB a reader (two updates, the global model, the state
            // slot): S3Reader's smallest windows, 256 KiB.
            read_ahead_bytes: READ_AHEAD,
            owner: "emu".into(),
            lease_seconds: 600,
        },
    );
    let job_id = unique("storeck");
    let job = JobSpec::from_toml(&format!(
        "job_id = \"{job_id}\"\nrounds = 1\nclients = [\"a\", \"b\", \"c\"]\nmin_clients = 2\n\
         round_timeout_seconds = 600\n[sharding]\nshard_mib = 8\nconcurrency = 4\n"
    ))
    .unwrap();
    ledger.put_job(&job).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, seed: u32| {
        let path = dir.path().join(name);
        write_f32_model(&path, &values(seed)).unwrap();
        path
    };
    store
        .put_file(&keys::global_model(&job_id, 1), &file("global", 0))
        .await
        .unwrap();
    let opened = engine.start_round(&job, 1, "t1").await.unwrap();
    assert!(
        opened.global_store_checksum.is_some(),
        "S3 keeps the global model's"
    );

    for (i, client) in ["a", "b", "c"].into_iter().enumerate() {
        let key = keys::update(&job_id, 1, client);
        let put = store
            .put_update_file(&key, &file(client, i as u32 + 1))
            .await
            .unwrap();
        let row = UpdateRecord {
            client_id: client.into(),
            job_round: keys::job_round(&job_id, 1),
            job_id: job_id.clone(),
            round: 1,
            model_key: key.clone(),
            checksum: put.sha256,
            store_checksum: put.store_checksum,
            num_examples: Value::from(10),
            llm_type: None,
            metrics: Default::default(),
            bytes: put.bytes,
            trained_at: "2026-12-02T00:00:00Z".into(),
            schema: Some(SCHEMA),
            variate_delta_checksum: None,
            base_round: None,
        };
        assert!(
            row.store_checksum.is_some(),
            "S3 answers the upload's checksum"
        );
        ledger.put_update(&row).await.unwrap();
        if client == "c" {
            // Replaced after its row: same size, another valid model.
            store.put_update_file(&key, &file("c2", 99)).await.unwrap();
        }
        engine.on_update(&row).await.unwrap();
    }

    let result = engine
        .close_round(&job_id, 1, ClosedBy::Stream)
        .await
        .unwrap();
    assert_eq!(result.accepted, ["a", "b"]);
    let reason = &result.rejected["c"];
    assert!(reason.contains("the store's checksum"), "{reason}");

    let path = dir.path().join("measurements.json");
    store
        .get_file(&keys::round_measurements(&job_id, 2), &path)
        .await
        .unwrap();
    let stored: RoundMeasurements = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let fetched = &stored.shard_bytes_fetched;
    assert_eq!(fetched.len(), 4, "{fetched:?}");
    // Two updates (plain FedAvg does not read the global model): a shard
    // fetches its quarter of each, in whole windows (one more at each
    // edge at most), and the first 64 KiB for each header. Hashing an
    // update through would add 24 MiB; read-ahead past the slice, 768 KiB.
    let inputs = 2 * (PARAMS as u64 * 4);
    for (s, &f) in fetched.iter().enumerate() {
        assert!(
            f <= inputs / 4 + 2 * (2 * WINDOW + (64 << 10)),
            "shard {s} fetched {f} of {inputs} bytes: {fetched:?}"
        );
    }
}
