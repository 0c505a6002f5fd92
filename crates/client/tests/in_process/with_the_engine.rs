//! Two built-in clients and the real round engine over fedstep-cloud's
//! local adapters (FsStore, MemLedger, LocalBus): what the engine publishes
//! is what the client accepts, and what the client writes is what the
//! engine aggregates. The stream is played by hand (rows → on_update).

use crate::common;

use std::sync::Arc;

use fedstep_client::builtin_trainer::BuiltinTrainer;
use fedstep_client::config::{BuiltinConfig, DatasetKind};
use fedstep_client::{Outcome, Worker};
use fedstep_cloud::keys;
use fedstep_cloud::local::{FsStore, LocalBus, ManualClock, MemLedger, RecordingCallback};
use fedstep_cloud::ports::{Ledger, ObjectStore};
use fedstep_cloud::records::ClosedBy;
use fedstep_cloud::{EngineConfig, JobSpec, RoundEngine, UpdateOutcome};

fn trainer(classes: &[u8], seed: u64) -> BuiltinTrainer {
    BuiltinTrainer::from_config(&BuiltinConfig {
        dataset: DatasetKind::Digits,
        digits_csv: None,
        mnist_images: None,
        mnist_labels: None,
        classes: Some(classes.to_vec()),
        sel_prob: 1.0,
        def_prob: 0.05,
        seed,
        local_epochs: 2,
        batch_size: 32,
        learning_rate: 0.1,
    })
    .unwrap()
}

/// Two built-in clients (mostly digits 0–4 and 5–9) train two rounds of a
/// job whose `[round_config]` is `round_config`; returns the scratch
/// directory, the bucket's root, the job id and the ledger.
async fn two_rounds(
    round_config: &str,
) -> (tempfile::TempDir, std::path::PathBuf, String, MemLedger) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bucket");
    let clock = ManualClock::new(common::NOW);
    let bus = LocalBus::new(Arc::new(clock.clone()));
    let ledger = MemLedger::new();
    let engine = RoundEngine::new(
        FsStore::new(&root).unwrap(),
        ledger.clone(),
        bus.clone(),
        RecordingCallback::new(),
        clock.clone(),
        EngineConfig {
            read_ahead_bytes: fedstep_cloud::DEFAULT_READ_AHEAD_BYTES,
            owner: "aggregator".into(),
            lease_seconds: 60,
        },
    );
    let job = JobSpec::from_toml(&format!(
        "job_id = \"digits-e2e\"\nrounds = 2\nclients = [\"site-a\", \"site-b\"]\n\
         min_clients = 2\nround_timeout_seconds = 600\n[round_config]\n{round_config}"
    ))
    .unwrap();
    let initial = dir.path().join("init.safetensors");
    std::fs::write(
        &initial,
        fedstep_trainer::init_model(64, 32, 10, 3).unwrap(),
    )
    .unwrap();
    engine
        .store()
        .put_file(&keys::global_model(&job.job_id, 1), &initial)
        .await
        .unwrap();

    let worker = |client: &str, classes: &[u8], seed| {
        let mut opts = common::options(&dir.path().join(client));
        opts.client_id = client.to_string();
        Worker::new(
            opts,
            Arc::new(bus.subscribe(client, None)),
            Arc::new(FsStore::new(&root).unwrap()),
            Arc::new(ledger.clone()),
            Arc::new(trainer(classes, seed)),
        )
        .with_clock(Arc::new(clock.clone()))
    };
    let workers = [
        worker("site-a", &[0, 1, 2, 3, 4], 1),
        worker("site-b", &[5, 6, 7, 8, 9], 2),
    ];

    for round in 1..=2u32 {
        engine
            .start_round(&job, round, &format!("token-{round}"))
            .await
            .unwrap();
        let mut outcomes = Vec::new();
        for w in &workers {
            let out = w.poll_once().await.unwrap();
            assert!(matches!(out[..], [Outcome::Submitted { .. }]), "{out:?}");
            let me = &w.options().client_id;
            let row = ledger
                .get_update(me, &job.job_id, round)
                .await
                .unwrap()
                .unwrap();
            outcomes.push(engine.on_update(&row).await.unwrap());
        }
        let Some(UpdateOutcome::HandedOver { .. }) = outcomes.pop() else {
            panic!("the second row should hand the round over: {outcomes:?}")
        };
        let result = engine
            .close_round(&job.job_id, round, ClosedBy::Stream)
            .await
            .unwrap();
        assert_eq!(
            result.accepted,
            vec!["site-a".to_string(), "site-b".to_string()]
        );
        assert!(result.rejected.is_empty(), "{:?}", result.rejected);
        assert!(
            result.metrics.contains_key("accuracy"),
            "{:?}",
            result.metrics
        );
    }

    (dir, root, job.job_id.clone(), ledger)
}

#[tokio::test]
async fn two_clients_two_rounds_through_the_engine() {
    let (_dir, root, job_id, _) = two_rounds("local_epochs = 1\n").await;
    assert!(!root.join(keys::server_variate(&job_id, 1)).exists());
    // Federated training moved the model: two rounds beat the initial one
    // on the whole dataset, although each client saw mostly half the digits.
    let data = fedstep_trainer::bundled_digits().unwrap();
    let read = |round| std::fs::read(root.join(keys::global_model(&job_id, round))).unwrap();
    let before = fedstep_trainer::evaluate(&read(1), &data).unwrap();
    let after = fedstep_trainer::evaluate(&read(3), &data).unwrap();
    assert!(
        after.accuracy > before.accuracy + 0.3,
        "{before:?} -> {after:?}"
    );
}

/// SCAFFOLD through the client binary's worker and the engine: each
/// client's row commits to the Δc_i it uploaded, the engine moves c, and
/// each client keeps c_i = the F32 sum of the Δc_i it sent.
#[tokio::test]
async fn scaffold_clients_keep_the_sum_of_the_deltas_they_sent() {
    let (dir, root, job_id, ledger) =
        two_rounds("local_epochs = 1\nalgorithm = \"scaffold\"\n").await;
    let read =
        |key: String| std::fs::read(root.join(&key)).unwrap_or_else(|e| panic!("{key}: {e}"));
    let floats = |bytes: &[u8]| -> Vec<f32> {
        let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
        let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
        names.sort();
        names
            .iter()
            .flat_map(|n| {
                st.tensor(n)
                    .unwrap()
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let c1 = floats(&read(keys::server_variate(&job_id, 1)));
    assert!(c1.iter().all(|x| *x == 0.0));
    let c3 = floats(&read(keys::server_variate(&job_id, 3)));
    assert_eq!(c3.len(), c1.len());
    assert!(c3.iter().any(|x| *x != 0.0), "c moved over two rounds");
    for client in ["site-a", "site-b"] {
        let mut sum = vec![0.0f32; c1.len()];
        for round in 1..=2 {
            let delta = read(keys::variate_delta(&job_id, round, client));
            let row = ledger
                .get_update(client, &job_id, round)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                row.variate_delta_checksum,
                Some(common::sha256_hex(&delta)),
                "{client} round {round}: the row commits to the uploaded Δc_i"
            );
            sum.iter_mut()
                .zip(floats(&delta))
                .for_each(|(s, d)| *s += d);
        }
        let kept = dir
            .path()
            .join(client)
            .join("scaffold")
            .join(format!("{job_id}.safetensors"));
        assert_eq!(floats(&std::fs::read(&kept).unwrap()), sum, "{client}");
    }
}
