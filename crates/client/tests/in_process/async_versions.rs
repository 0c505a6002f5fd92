//! Async jobs (issue #17) through the client binary's worker and the real
//! round engine: a slow client whose version moved on while it trained
//! submits to the newest version, naming the one it trained from, and the
//! engine counts it there as stale; a client that finds a newer version
//! announced skips the older message and trains from the newest.

use crate::common;

use std::sync::{Arc, Mutex};

use fedstep_client::builtin_trainer::BuiltinTrainer;
use fedstep_client::config::{BuiltinConfig, DatasetKind};
use fedstep_client::trainer::{TrainError, TrainReport, TrainRequest, Trainer};
use fedstep_client::{Outcome, Worker};
use fedstep_cloud::keys;
use fedstep_cloud::local::{FsStore, LocalBus, ManualClock, MemLedger, RecordingCallback};
use fedstep_cloud::ports::{Ledger, ObjectStore};
use fedstep_cloud::records::ClosedBy;
use fedstep_cloud::{EngineConfig, JobSpec, RoundEngine, UpdateOutcome};
use tokio::sync::{mpsc, oneshot};

const JOB: &str = "buffered";

fn builtin(classes: &[u8], seed: u64) -> BuiltinTrainer {
    BuiltinTrainer::from_config(&BuiltinConfig {
        dataset: DatasetKind::Digits,
        digits_csv: None,
        mnist_images: None,
        mnist_labels: None,
        classes: Some(classes.to_vec()),
        sel_prob: 1.0,
        def_prob: 0.05,
        seed,
        local_epochs: 1,
        batch_size: 32,
        learning_rate: 0.1,
    })
    .unwrap()
}

/// The built-in trainer, each of whose first runs says it started and then
/// waits to be let go (one gate each): the test moves the job on meanwhile.
struct Gated {
    inner: BuiltinTrainer,
    started: mpsc::UnboundedSender<u32>,
    gates: Mutex<Vec<oneshot::Receiver<()>>>,
}

impl Trainer for Gated {
    async fn train(&self, req: TrainRequest) -> Result<TrainReport, TrainError> {
        self.started.send(req.round).ok();
        let gate = {
            let mut gates = self.gates.lock().unwrap();
            (!gates.is_empty()).then(|| gates.remove(0))
        };
        if let Some(gate) = gate {
            gate.await.ok();
        }
        self.inner.train(req).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_submits_to_the_newest_version_and_skips_superseded_ones() {
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
        "job_id = \"{JOB}\"\nrounds = 5\nclients = [\"site-a\", \"site-b\", \"site-slow\"]\n\
         min_clients = 1\nround_timeout_seconds = 600\nmode = \"async\"\n[async]\nbuffer_size = 2\n"
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
        .put_file(&keys::global_model(JOB, 1), &initial)
        .await
        .unwrap();

    let options = |client: &str| {
        let mut opts = common::options(&dir.path().join(client));
        opts.client_id = client.to_string();
        opts
    };
    let worker = |client: &str, classes: &[u8], seed| {
        Worker::new(
            options(client),
            Arc::new(bus.subscribe(client, None)),
            Arc::new(FsStore::new(&root).unwrap()),
            Arc::new(ledger.clone()),
            Arc::new(builtin(classes, seed)),
        )
        .with_clock(Arc::new(clock.clone()))
    };
    let a = worker("site-a", &[0, 1, 2], 1);
    let b = worker("site-b", &[3, 4, 5], 2);
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (release, gate) = oneshot::channel();
    let slow = Arc::new(
        Worker::new(
            options("site-slow"),
            Arc::new(bus.subscribe("site-slow", None)),
            Arc::new(FsStore::new(&root).unwrap()),
            Arc::new(ledger.clone()),
            Arc::new(Gated {
                inner: builtin(&[6, 7, 8, 9], 3),
                started: started_tx,
                gates: Mutex::new(vec![gate]),
            }),
        )
        .with_clock(Arc::new(clock.clone())),
    );

    // Version 1: the slow client starts training from it...
    engine.start_round(&job, 1, "token-1").await.unwrap();
    let slow_run = tokio::spawn({
        let slow = Arc::clone(&slow);
        async move { slow.poll_once().await.unwrap() }
    });
    assert_eq!(started.recv().await, Some(1));
    // ... while the two others make version 2 (K = 2) and it is announced.
    for w in [&a, &b] {
        let out = w.poll_once().await.unwrap();
        assert!(
            matches!(
                out[..],
                [Outcome::Submitted {
                    round: 1,
                    trained_from: 1,
                    ..
                }]
            ),
            "{out:?}"
        );
        let row = ledger
            .get_update(&w.options().client_id, JOB, 1)
            .await
            .unwrap()
            .unwrap();
        engine.on_update(&row).await.unwrap();
    }
    engine.close_round(JOB, 1, ClosedBy::Stream).await.unwrap();
    engine.start_round(&job, 2, "token-2").await.unwrap();

    // The slow client finishes: its row goes to version 2, trained from 1.
    release.send(()).unwrap();
    let out = slow_run.await.unwrap();
    assert!(
        matches!(
            out[..],
            [Outcome::Submitted {
                round: 2,
                trained_from: 1,
                ..
            }]
        ),
        "{out:?}"
    );
    let stale = ledger
        .get_update("site-slow", JOB, 2)
        .await
        .unwrap()
        .expect("the slow client's row is in version 2");
    assert_eq!(stale.base_round, Some(1));
    assert_eq!(stale.model_key, keys::update(JOB, 2, "site-slow"));
    assert!(ledger
        .get_update("site-slow", JOB, 1)
        .await
        .unwrap()
        .is_none());
    assert!(matches!(
        engine.on_update(&stale).await.unwrap(),
        UpdateOutcome::Recorded { usable: 1, .. }
    ));
    // A fresh update fills version 2's buffer; the stale one is rebased in.
    let out = a.poll_once().await.unwrap();
    assert!(
        matches!(
            out[..],
            [Outcome::Submitted {
                round: 2,
                trained_from: 2,
                ..
            }]
        ),
        "{out:?}"
    );
    let row = ledger.get_update("site-a", JOB, 2).await.unwrap().unwrap();
    assert!(matches!(
        engine.on_update(&row).await.unwrap(),
        UpdateOutcome::HandedOver { usable: 2, .. }
    ));
    let v2 = engine.close_round(JOB, 2, ClosedBy::Stream).await.unwrap();
    assert_eq!(v2.accepted, ["site-a", "site-slow"]);
    engine.start_round(&job, 3, "token-3").await.unwrap();

    // Versions 2 and 3 are both on the slow client's queue now: 2 is
    // skipped, and it trains from 3.
    let out = slow.poll_once().await.unwrap();
    assert!(
        matches!(out[..], [Outcome::Superseded { round: 2, .. }]),
        "{out:?}"
    );
    let out = slow.poll_once().await.unwrap();
    assert!(
        matches!(
            out[..],
            [Outcome::Submitted {
                round: 3,
                trained_from: 3,
                ..
            }]
        ),
        "{out:?}"
    );
    assert_eq!(started.recv().await, Some(3));
    let fresh = ledger
        .get_update("site-slow", JOB, 3)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fresh.base_round, None);
}

/// A slow client whose row from an older version already sits in the
/// newest version holds its next update until a newer version is
/// announced, then submits it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_waits_while_our_row_is_already_in_the_newest_version() {
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
        "job_id = \"{JOB}\"\nrounds = 5\nclients = [\"site-a\", \"site-b\", \"site-slow\"]\n\
         min_clients = 1\nround_timeout_seconds = 600\nmode = \"async\"\n[async]\nbuffer_size = 2\n"
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
        .put_file(&keys::global_model(JOB, 1), &initial)
        .await
        .unwrap();
    let options = |client: &str| {
        let mut opts = common::options(&dir.path().join(client));
        opts.client_id = client.to_string();
        opts
    };
    let worker = |client: &str, classes: &[u8], seed| {
        Worker::new(
            options(client),
            Arc::new(bus.subscribe(client, None)),
            Arc::new(FsStore::new(&root).unwrap()),
            Arc::new(ledger.clone()),
            Arc::new(builtin(classes, seed)),
        )
        .with_clock(Arc::new(clock.clone()))
    };
    let a = worker("site-a", &[0, 1, 2], 1);
    let b = worker("site-b", &[3, 4, 5], 2);
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (first, first_gate) = oneshot::channel();
    let (second, second_gate) = oneshot::channel();
    let slow = Arc::new(
        Worker::new(
            options("site-slow"),
            Arc::new(bus.subscribe("site-slow", None)),
            Arc::new(FsStore::new(&root).unwrap()),
            Arc::new(ledger.clone()),
            Arc::new(Gated {
                inner: builtin(&[6, 7, 8, 9], 3),
                started: started_tx,
                gates: Mutex::new(vec![first_gate, second_gate]),
            }),
        )
        .with_clock(Arc::new(clock.clone())),
    );
    let poll = |w: &Arc<Worker<_, _, _, Gated>>| {
        let w = Arc::clone(w);
        tokio::spawn(async move { w.poll_once().await.unwrap() })
    };

    // Its update from version 1 lands in version 2 (as in the test above).
    engine.start_round(&job, 1, "token-1").await.unwrap();
    let run = poll(&slow);
    assert_eq!(started.recv().await, Some(1));
    for w in [&a, &b] {
        w.poll_once().await.unwrap();
        let row = ledger
            .get_update(&w.options().client_id, JOB, 1)
            .await
            .unwrap()
            .unwrap();
        engine.on_update(&row).await.unwrap();
    }
    engine.close_round(JOB, 1, ClosedBy::Stream).await.unwrap();
    engine.start_round(&job, 2, "token-2").await.unwrap();
    first.send(()).unwrap();
    let out = run.await.unwrap();
    assert!(
        matches!(
            out[..],
            [Outcome::Submitted {
                round: 2,
                trained_from: 1,
                ..
            }]
        ),
        "{out:?}"
    );
    let stale = ledger
        .get_update("site-slow", JOB, 2)
        .await
        .unwrap()
        .unwrap();
    engine.on_update(&stale).await.unwrap();

    // It trains from version 2 and finishes while version 2 is still the
    // newest: its row there is taken, so it waits.
    let run = poll(&slow);
    assert_eq!(started.recv().await, Some(2));
    second.send(()).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !run.is_finished(),
        "the update must wait for a newer version"
    );
    assert_eq!(
        ledger
            .get_update("site-slow", JOB, 2)
            .await
            .unwrap()
            .unwrap()
            .checksum,
        stale.checksum,
        "its row in version 2 is untouched"
    );
    // Version 2 is made (a's fresh row fills it) and 3 is announced.
    a.poll_once().await.unwrap();
    let row = ledger.get_update("site-a", JOB, 2).await.unwrap().unwrap();
    engine.on_update(&row).await.unwrap();
    engine.close_round(JOB, 2, ClosedBy::Stream).await.unwrap();
    engine.start_round(&job, 3, "token-3").await.unwrap();
    let out = run.await.unwrap();
    assert!(
        matches!(
            out[..],
            [Outcome::Submitted {
                round: 3,
                trained_from: 2,
                ..
            }]
        ),
        "{out:?}"
    );
    let held = ledger
        .get_update("site-slow", JOB, 3)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.base_round, Some(2));
}
