//! The fault-schedule harness: a small federated job over the local
//! adapters, driven the way the state machine, the DynamoDB stream and the
//! clients drive the real thing, with faults injected at points a seeded
//! RNG picks. Several engines (different owners) share one store, ledger
//! and callback recorder, each through its own fault-injecting wrappers.
//!
//! The driver plays every part:
//! - Step Functions: StartRound with a task token (sometimes retried with a
//!   new token); on timeout, the token expires and CloseRound runs (also
//!   retried on errors, sometimes by two engines racing); Finalize.
//! - The clients: each receives `global_model_ready` from its queue,
//!   downloads and verifies the global model, trains (deterministically:
//!   global + its delta), uploads, writes its row and only then deletes the
//!   message. Some crash mid-training or after the row (the message comes
//!   back; they retrain; `put_update` must be Created or AlreadyThere), some
//!   upload twice, some are late, some send bad updates.
//! - The stream: each Created row becomes a record, delivered 1–3 times, in
//!   random order, sometimes to two engines at once (`tokio::join!`);
//!   a failed delivery is redelivered (ReportBatchItemFailures).
//!
//! After every round and at the end the invariants of issue #6 are checked
//! (see `check_round` and `finish`); any violation is an `Err` naming it.

#![allow(dead_code)]

pub mod backend;
pub mod faults;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fedstep_cloud::local::{CallbackCall, ManualClock, RecordingCallback};
use fedstep_cloud::ports::{ClientQueue, Clock, Ledger, ObjectStore, PutUpdate};
use fedstep_cloud::records::{
    ClosedBy, HandOver, Notification, RoundResult, RoundStatus, UpdateRecord, SCHEMA,
};
use fedstep_cloud::{keys, EngineConfig, Job, JobSpec, RoundEngine, UpdateOutcome};
use fedstep_core::Limits;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use backend::{Backend, Local, Recorded};
use faults::{FaultCallback, FaultLedger, FaultStore, Faults, Mode, Mutant, Point, POINTS};

pub type Engine<B> = RoundEngine<
    FaultStore<<B as Backend>::Store>,
    FaultLedger<<B as Backend>::Ledger>,
    Recorded<<B as Backend>::Notifier>,
    FaultCallback,
    ManualClock,
>;

/// Lease of an aggregation claim, in (manual-clock) seconds.
pub const LEASE: i64 = 5;
pub const ROUND_TIMEOUT: i64 = 600;
const WIDTH: usize = 4;

/// What a client does in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Normal,
    /// Dies after downloading (maybe after uploading its file), before its
    /// row: the message comes back and it trains again.
    CrashBeforeRow,
    /// Dies after its row, before deleting the message: it trains again
    /// and its `put_update` finds the same row (AlreadyThere).
    CrashAfterRow,
    /// Writes its row twice.
    UploadTwice,
    /// Finishes after the round closed.
    Late,
    /// A NaN in its model.
    BadNaN,
    /// One element too many.
    BadShape,
    /// The row's checksums are well formed but not the object's.
    BadChecksum,
    /// num_examples 0, negative, not a number or 10^12.
    BadExamples,
    /// The row's job_round does not match its job and round.
    BadRow,
}

impl Kind {
    fn good(self) -> bool {
        matches!(
            self,
            Kind::Normal
                | Kind::CrashBeforeRow
                | Kind::CrashAfterRow
                | Kind::UploadTwice
                | Kind::Late
        )
    }
    /// The rule a bad update's rejection must name.
    fn rule(self) -> &'static str {
        match self {
            Kind::BadNaN => "non-finite",
            Kind::BadShape => "shape",
            // "checksum: the row says …" when the engine hashed it, "the
            // store's checksum …" when the store's checksum told.
            Kind::BadChecksum => "checksum",
            Kind::BadExamples => "num_examples",
            Kind::BadRow => "job_round:",
            _ => "",
        }
    }
}

const GOOD: [Kind; 4] = [
    Kind::Normal,
    Kind::CrashBeforeRow,
    Kind::CrashAfterRow,
    Kind::UploadTwice,
];
const ODD: [Kind; 6] = [
    Kind::Late,
    Kind::BadNaN,
    Kind::BadShape,
    Kind::BadChecksum,
    Kind::BadExamples,
    Kind::BadRow,
];

struct Pending {
    record: UpdateRecord,
    /// Deliveries still to come (duplicates included).
    copies: u32,
    /// Delivered at least once without an error.
    ok_once: bool,
    /// A delivery of it failed (the stream retries it).
    failed_once: bool,
}

/// What one client did in the round.
#[derive(Default, Clone)]
struct Trained {
    values: Vec<f32>,
    num_examples: u64,
    attempts: u32,
    done: bool,
    /// A delivery of its record began while the round was OPEN.
    counted_while_open: bool,
}

#[derive(Default, Debug, Clone)]
pub struct Tally {
    pub rounds: usize,
    pub deliveries: usize,
    pub duplicate_deliveries: usize,
    pub races: usize,
    pub close_races: usize,
    pub failed_deliveries: usize,
    pub client_crashes: usize,
    pub late_records: usize,
    /// Redeliveries of a row whose earlier delivery failed and which now
    /// delivered the hand-over (the first one had been lost).
    pub resent_callbacks: usize,
    pub rejected: usize,
    pub deadline_closes: usize,
    pub start_retries: usize,
    pub fired: BTreeMap<String, usize>,
}

impl Tally {
    /// Sums another schedule's counts into this one.
    pub fn add(&mut self, t: &Tally) {
        self.rounds += t.rounds;
        self.deliveries += t.deliveries;
        self.duplicate_deliveries += t.duplicate_deliveries;
        self.races += t.races;
        self.close_races += t.close_races;
        self.failed_deliveries += t.failed_deliveries;
        self.client_crashes += t.client_crashes;
        self.late_records += t.late_records;
        self.resent_callbacks += t.resent_callbacks;
        self.rejected += t.rejected;
        self.deadline_closes += t.deadline_closes;
        self.start_retries += t.start_retries;
        for (k, v) in &t.fired {
            *self.fired.entry(k.clone()).or_default() += v;
        }
    }
}

pub struct Sim<B: Backend> {
    pub seed: u64,
    rng: ChaCha8Rng,
    _dir: tempfile::TempDir,
    files: PathBuf,
    backend: B,
    store: B::Store,
    ledger: B::Ledger,
    bus: Recorded<B::Notifier>,
    callback: RecordingCallback,
    clock: ManualClock,
    pub faults: Faults,
    engines: Vec<Engine<B>>,
    /// Filled by `run` (subscribing may need the network).
    queues: BTreeMap<String, B::Queue>,
    /// A crashed client's message still in flight: its receipt.
    in_flight: BTreeMap<String, String>,
    job: Job,
    pub log: Vec<String>,
    pub tally: Tally,
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        let ok: bool = $cond;
        if !ok {
            return Err(format!($($fmt)+));
        }
    };
}

mod actors;
mod invariants;
mod schedule;

fn infra<T>(what: &str, r: fedstep_cloud::error::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

impl<B: Backend> Sim<B> {
    /// `backend` builds the schedule's adapters from its clock and its
    /// temporary directory.
    pub fn new(
        seed: u64,
        mutant: Mutant,
        backend: impl FnOnce(&ManualClock, &std::path::Path) -> B,
    ) -> Sim<B> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::new(1_800_000_000);
        let backend = backend(&clock, dir.path());
        let store = backend.store();
        let ledger = backend.ledger();
        let bus = Recorded::new(backend.notifier());
        let raw_put = backend.raw_put();
        let callback = RecordingCallback::new();
        let faults = Faults::default();
        faults.lock().mutant = mutant;
        // Its own stream, so the schedules drawn from `rng` stay as they were.
        faults.lock().interleave = Some(ChaCha8Rng::seed_from_u64(seed ^ 0x1e4f_0a57));

        let n_clients = rng.random_range(3..=4usize);
        let clients: Vec<String> = (0..n_clients).map(|i| format!("site-{i}")).collect();
        let rounds = rng.random_range(2..=3u32);
        let job = JobSpec::from_toml(&format!(
            "job_id = \"{}\"\nrounds = {rounds}\nclients = [{}]\nmin_clients = 2\n\
             round_timeout_seconds = {ROUND_TIMEOUT}\n[aggregation]\nweighting = \"examples\"\n",
            backend.job_id(seed),
            clients
                .iter()
                .map(|c| format!("\"{c}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .expect("job");
        let engines = (0..3)
            .map(|i| {
                let owner = format!("engine-{i}");
                RoundEngine::new(
                    FaultStore {
                        inner: store.clone(),
                        owner: owner.clone(),
                        faults: faults.clone(),
                    },
                    FaultLedger {
                        inner: ledger.clone(),
                        owner: owner.clone(),
                        faults: faults.clone(),
                        raw_put: raw_put.clone(),
                    },
                    bus.clone(),
                    FaultCallback {
                        inner: callback.clone(),
                        owner: owner.clone(),
                        faults: faults.clone(),
                    },
                    clock.clone(),
                    EngineConfig {
                        read_ahead_bytes: fedstep_cloud::DEFAULT_READ_AHEAD_BYTES,
                        owner,
                        lease_seconds: LEASE,
                    },
                )
            })
            .collect();
        let files = dir.path().join("files");
        std::fs::create_dir_all(&files).expect("files dir");
        Sim {
            seed,
            rng,
            _dir: dir,
            files,
            backend,
            store,
            ledger,
            bus,
            callback,
            clock,
            faults,
            engines,
            queues: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            job,
            log: Vec::new(),
            tally: Tally::default(),
        }
    }

    fn note(&mut self, what: String) {
        self.log
            .push(format!("[t+{}] {what}", self.clock.now() - 1_800_000_000));
    }

    fn write_model(&self, name: &str, values: &[f32]) -> PathBuf {
        let path = self.files.join(format!("{name}.safetensors"));
        fedstep_test_support::model::write_f32_model(&path, values).expect("write model");
        path
    }

    async fn read_global(&self, round: u32) -> Result<Vec<f32>, String> {
        let path = self.files.join(format!("read-global-{round}.safetensors"));
        infra(
            "reading a global model",
            self.store
                .get_file(&keys::global_model(&self.job.job_id, round), &path)
                .await,
        )?;
        read_values(&path)
    }
}

fn read_values(path: &std::path::Path) -> Result<Vec<f32>, String> {
    let m = fedstep_core::model::load_dense(path, &Limits::default())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(m["w"].values.iter().map(|v| *v as f32).collect())
}

/// Runs one schedule, catching panics: `Err` carries the reason and the
/// event log's tail.
pub fn run_schedule(
    rt: &tokio::runtime::Runtime,
    seed: u64,
    mutant: Mutant,
) -> Result<Tally, String> {
    run_schedule_on(rt, seed, mutant, Local::new)
}

/// [`run_schedule`] over the adapters `backend` builds.
pub fn run_schedule_on<B: Backend>(
    rt: &tokio::runtime::Runtime,
    seed: u64,
    mutant: Mutant,
    backend: impl FnOnce(&ManualClock, &std::path::Path) -> B,
) -> Result<Tally, String> {
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut sim = Sim::new(seed, mutant, backend);
        let mut r = rt.block_on(sim.run());
        if let Err(e) = rt.block_on(sim.backend.teardown()) {
            r = r.and(Err(format!("teardown: {e}")));
        }
        (r, sim.log, sim.tally)
    }));
    match caught {
        Ok((Ok(()), _, tally)) => Ok(tally),
        Ok((Err(why), log, _)) => {
            let tail = log[log.len().saturating_sub(40)..].join("\n    ");
            Err(format!("{why}\n  last events:\n    {tail}"))
        }
        Err(panic) => Err(format!(
            "panicked: {}",
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    }
}
