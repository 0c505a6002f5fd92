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

#[tokio::test]
async fn two_clients_two_rounds_through_the_engine() {
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
    let job = JobSpec::from_toml(
        r#"
job_id = "digits-e2e"
rounds = 2
clients = ["site-a", "site-b"]
min_clients = 2
round_timeout_seconds = 600
[round_config]
local_epochs = 1
"#,
    )
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

    // Federated training moved the model: two rounds beat the initial one
    // on the whole dataset, although each client saw mostly half the digits.
    let data = fedstep_trainer::bundled_digits().unwrap();
    let read = |round| std::fs::read(root.join(keys::global_model(&job.job_id, round))).unwrap();
    let before = fedstep_trainer::evaluate(&read(1), &data).unwrap();
    let after = fedstep_trainer::evaluate(&read(3), &data).unwrap();
    assert!(
        after.accuracy > before.accuracy + 0.3,
        "{before:?} -> {after:?}"
    );
}
