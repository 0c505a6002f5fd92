//! Async jobs (issue #17) through the client binary's worker and the real
//! round engine: a slow client whose version moved on while it trained
//! submits to the newest version, naming the one it trained from, and the
//! engine counts it there as stale; a client that finds a newer version
//! announced skips the older message and trains from the newest; one
//! whose row is already in the newest version waits for the next.

use crate::common;

use std::sync::{Arc, Mutex};

use fedstep_client::builtin_trainer::BuiltinTrainer;
use fedstep_client::config::{BuiltinConfig, DatasetKind};
use fedstep_client::trainer::{TrainError, TrainReport, TrainRequest, Trainer};
use fedstep_client::{Outcome, Worker};
use fedstep_cloud::keys;
use fedstep_cloud::local::{
    FsStore, LocalBus, LocalQueue, ManualClock, MemLedger, RecordingCallback,
};
use fedstep_cloud::ports::{Ledger, ObjectStore};
use fedstep_cloud::records::{ClosedBy, UpdateRecord};
use fedstep_cloud::{EngineConfig, Job, JobSpec, RoundEngine, UpdateOutcome};
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

type Engine = RoundEngine<FsStore, MemLedger, LocalBus, RecordingCallback, ManualClock>;

/// The engine over the local adapters, an async job of site-a, site-b and
/// site-slow (K = 2) with its initial model stored, and their workers; the
/// slow one's trainer is gated.
struct Federation {
    _dir: tempfile::TempDir,
    engine: Engine,
    ledger: MemLedger,
    job: Job,
    a: Worker<LocalQueue, FsStore, MemLedger, BuiltinTrainer>,
    b: Worker<LocalQueue, FsStore, MemLedger, BuiltinTrainer>,
    slow: Arc<Worker<LocalQueue, FsStore, MemLedger, Gated>>,
    /// The version each of the slow client's trainings started from.
    started: mpsc::UnboundedReceiver<u32>,
}

/// What a client's worker is made of, before its trainer.
struct Parts {
    client: String,
    workdir: std::path::PathBuf,
    queue: LocalQueue,
    store: FsStore,
    ledger: MemLedger,
    clock: ManualClock,
}

impl Parts {
    fn worker<T: Trainer>(self, trainer: T) -> Worker<LocalQueue, FsStore, MemLedger, T> {
        let mut opts = common::options(&self.workdir);
        opts.client_id = self.client;
        Worker::new(
            opts,
            Arc::new(self.queue),
            Arc::new(self.store),
            Arc::new(self.ledger),
            Arc::new(trainer),
        )
        .with_clock(Arc::new(self.clock))
    }
}

/// The federation, and one sender per gated training of the slow client
/// (`gates` of them, in order).
async fn federation(gates: usize) -> (Federation, Vec<oneshot::Sender<()>>) {
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
    let worker = |client: &str| Parts {
        client: client.to_string(),
        workdir: dir.path().join(client),
        queue: bus.subscribe(client, None),
        store: FsStore::new(&root).unwrap(),
        ledger: ledger.clone(),
        clock: clock.clone(),
    };
    let (started_tx, started) = mpsc::unbounded_channel();
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..gates).map(|_| oneshot::channel()).unzip();
    let slow = Gated {
        inner: builtin(&[6, 7, 8, 9], 3),
        started: started_tx,
        gates: Mutex::new(receivers),
    };
    let federation = Federation {
        a: worker("site-a").worker(builtin(&[0, 1, 2], 1)),
        b: worker("site-b").worker(builtin(&[3, 4, 5], 2)),
        slow: Arc::new(worker("site-slow").worker(slow)),
        _dir: dir,
        engine,
        ledger,
        job,
        started,
    };
    (federation, senders)
}

impl Federation {
    /// The slow client's next poll, on its own task.
    fn poll_slow(&self) -> tokio::task::JoinHandle<Vec<Outcome>> {
        let slow = Arc::clone(&self.slow);
        tokio::spawn(async move { slow.poll_once().await.unwrap() })
    }

    /// `w`'s next poll must submit to `round`, trained from `trained_from`;
    /// its row is then handed to the engine as the stream would.
    async fn submits(
        &self,
        w: &Worker<LocalQueue, FsStore, MemLedger, BuiltinTrainer>,
        round: u32,
        trained_from: u32,
    ) -> UpdateOutcome {
        let out = w.poll_once().await.unwrap();
        assert!(
            matches!(out[..], [Outcome::Submitted { round: r, trained_from: t, .. }] if r == round && t == trained_from),
            "{out:?}"
        );
        let row = self
            .ledger
            .get_update(&w.options().client_id, JOB, round)
            .await
            .unwrap()
            .unwrap();
        self.engine.on_update(&row).await.unwrap()
    }

    /// Version 1: the slow client starts training from it while the two
    /// others make version 2 (K = 2), which is announced; let go, its row
    /// goes to version 2, trained from 1, and is counted there.
    async fn slow_update_lands_in_version_2(
        &mut self,
        release: oneshot::Sender<()>,
    ) -> UpdateRecord {
        self.engine
            .start_round(&self.job, 1, "token-1")
            .await
            .unwrap();
        let run = self.poll_slow();
        assert_eq!(self.started.recv().await, Some(1));
        self.submits(&self.a, 1, 1).await;
        self.submits(&self.b, 1, 1).await;
        self.engine
            .close_round(JOB, 1, ClosedBy::Stream)
            .await
            .unwrap();
        self.engine
            .start_round(&self.job, 2, "token-2")
            .await
            .unwrap();
        release.send(()).unwrap();
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
        let stale = self
            .ledger
            .get_update("site-slow", JOB, 2)
            .await
            .unwrap()
            .expect("the slow client's row is in version 2");
        assert_eq!(stale.base_round, Some(1));
        assert_eq!(stale.model_key, keys::update(JOB, 2, "site-slow"));
        assert!(self
            .ledger
            .get_update("site-slow", JOB, 1)
            .await
            .unwrap()
            .is_none());
        assert!(matches!(
            self.engine.on_update(&stale).await.unwrap(),
            UpdateOutcome::Recorded { usable: 1, .. }
        ));
        stale
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_submits_to_the_newest_version_and_skips_superseded_ones() {
    let (mut f, mut release) = federation(1).await;
    f.slow_update_lands_in_version_2(release.remove(0)).await;
    // A fresh update fills version 2's buffer; the stale one is rebased in.
    assert!(matches!(
        f.submits(&f.a, 2, 2).await,
        UpdateOutcome::HandedOver { usable: 2, .. }
    ));
    let v2 = f
        .engine
        .close_round(JOB, 2, ClosedBy::Stream)
        .await
        .unwrap();
    assert_eq!(v2.accepted, ["site-a", "site-slow"]);
    f.engine.start_round(&f.job, 3, "token-3").await.unwrap();

    // Versions 2 and 3 are both on the slow client's queue now: 2 is
    // skipped, and it trains from 3.
    let out = f.slow.poll_once().await.unwrap();
    assert!(
        matches!(out[..], [Outcome::Superseded { round: 2, .. }]),
        "{out:?}"
    );
    let out = f.slow.poll_once().await.unwrap();
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
    assert_eq!(f.started.recv().await, Some(3));
    let fresh = f
        .ledger
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
    let (mut f, mut release) = federation(2).await;
    let stale = f.slow_update_lands_in_version_2(release.remove(0)).await;

    // It trains from version 2 and finishes while version 2 is still the
    // newest: its row there is taken, so it waits.
    let run = f.poll_slow();
    assert_eq!(f.started.recv().await, Some(2));
    release.remove(0).send(()).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !run.is_finished(),
        "the update must wait for a newer version"
    );
    assert_eq!(
        f.ledger
            .get_update("site-slow", JOB, 2)
            .await
            .unwrap()
            .unwrap()
            .checksum,
        stale.checksum,
        "its row in version 2 is untouched"
    );
    // Version 2 is made (a's fresh row fills it) and 3 is announced.
    f.submits(&f.a, 2, 2).await;
    f.engine
        .close_round(JOB, 2, ClosedBy::Stream)
        .await
        .unwrap();
    f.engine.start_round(&f.job, 3, "token-3").await.unwrap();
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
    let held = f
        .ledger
        .get_update("site-slow", JOB, 3)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.base_round, Some(2));
}
