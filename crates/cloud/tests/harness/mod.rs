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
use fedstep_cloud::records::{Notification, RoundResult, RoundStatus, UpdateRecord, SCHEMA};
use fedstep_cloud::{keys, EngineConfig, Job, JobSpec, RoundEngine, UpdateOutcome};
use fedstep_core::Limits;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::Dtype;
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
    /// The row's checksum is well formed but not the object's.
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
            Kind::BadChecksum => "checksum:",
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
    /// Replays after a CLOSED round whose re-sent result was the one
    /// delivered (the closer's callback had been lost).
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
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        fedstep_core::writer::write_model(
            &path,
            &[("w".into(), Dtype::F32, vec![values.len()], bytes)],
            &BTreeMap::new(),
        )
        .expect("write model");
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

    /// The whole job; `Ok` when every invariant held.
    pub async fn run(&mut self) -> Result<(), String> {
        self.queues = self
            .backend
            .subscribe(&self.job.clients, &self.job.job_id)
            .await?;
        let init: Vec<f32> = (0..WIDTH)
            .map(|_| self.rng.random_range(-1.0..1.0f32))
            .collect();
        let f = self.write_model("init", &init);
        infra(
            "uploading the initial model",
            self.store
                .put_file(&keys::global_model(&self.job.job_id, 1), &f)
                .await,
        )?;
        let mut last = None;
        for round in 1..=self.job.rounds {
            let result = self.run_round(round).await?;
            self.tally.rounds += 1;
            let go_on = result.continue_training;
            last = Some(result);
            ensure!(
                go_on == (round < self.job.rounds),
                "round {round}: continue = {go_on} with {} rounds in the job",
                self.job.rounds
            );
            if !go_on {
                break;
            }
        }
        let last = last.ok_or("no round ran")?;
        self.finish(&last).await?;
        let fired = self.faults.lock().fired.clone();
        for ((p, m), n) in fired {
            *self.tally.fired.entry(format!("{p:?}/{m:?}")).or_default() += n;
        }
        Ok(())
    }

    fn plan_kinds(&mut self) -> BTreeMap<String, Kind> {
        let mut budget = self.job.clients.len() - self.job.min_clients as usize;
        let mut kinds = BTreeMap::new();
        let mut clients = self.job.clients.clone();
        // Who gets the odd kinds is random too.
        for i in (1..clients.len()).rev() {
            let j = self.rng.random_range(0..=i);
            clients.swap(i, j);
        }
        for c in clients {
            let kind = if budget > 0 && self.rng.random_bool(0.45) {
                budget -= 1;
                ODD[self.rng.random_range(0..ODD.len())]
            } else {
                GOOD[self.rng.random_range(0..GOOD.len())]
            };
            kinds.insert(c, kind);
        }
        kinds
    }

    async fn run_round(&mut self, round: u32) -> Result<RoundResult, String> {
        let job_id = self.job.job_id.clone();
        let kinds = self.plan_kinds();
        self.note(format!("round {round}: clients {kinds:?}"));
        let global = self.read_global(round).await?;
        let mut trained: BTreeMap<String, Trained> = kinds
            .keys()
            .map(|c| {
                let n = self.rng.random_range(1..=1000u64);
                (
                    c.clone(),
                    Trained {
                        values: global
                            .iter()
                            .map(|g| g + self.rng.random_range(-1.0..1.0f32))
                            .collect(),
                        num_examples: n,
                        ..Trained::default()
                    },
                )
            })
            .collect();

        // StartRound (maybe retried with a new token before anything happened).
        let mut token = format!("t{round}");
        let e = self.rng.random_range(0..self.engines.len());
        let row = infra(
            "StartRound",
            self.engines[e].start_round(&self.job, round, &token).await,
        )?;
        let deadline = row.deadline;
        let mut tokens = vec![token.clone()];
        if self.rng.random_bool(0.2) {
            token = format!("t{round}-retry");
            tokens.push(token.clone());
            let e = self.rng.random_range(0..self.engines.len());
            let again = infra(
                "StartRound retry",
                self.engines[e].start_round(&self.job, round, &token).await,
            )?;
            ensure!(
                again.task_token.as_deref() == Some(token.as_str()) && again.deadline == deadline,
                "round {round}: a retried StartRound must replace the token and keep the deadline: {again:?}"
            );
            self.tally.start_retries += 1;
        }

        // Faults for this round.
        let n_faults = self.rng.random_range(0..=2);
        for _ in 0..n_faults {
            let point = POINTS[self.rng.random_range(0..POINTS.len())];
            let mode = if point == Point::DeadlineBeforeCallback || self.rng.random_bool(0.5) {
                Mode::Error
            } else {
                Mode::Crash
            };
            self.faults.arm(point, mode);
            self.note(format!("armed {point:?}/{mode:?}"));
        }
        let early_deadline = self.rng.random_bool(0.15);

        // Clients and the stream, interleaved at random, until every
        // on-time client is done and every record delivered.
        let mut pending: Vec<Pending> = Vec::new();
        loop {
            let busy: Vec<String> = kinds
                .iter()
                .filter(|(c, k)| **k != Kind::Late && !trained[*c].done)
                .map(|(c, _)| c.clone())
                .collect();
            if busy.is_empty() && pending.is_empty() {
                break;
            }
            if early_deadline {
                let usable = trained
                    .iter()
                    .filter(|(c, t)| t.counted_while_open && kinds[*c].good())
                    .count();
                if usable >= self.job.min_clients as usize && self.rng.random_bool(0.3) {
                    self.note("the deadline comes early".into());
                    break;
                }
            }
            if !busy.is_empty() && (pending.is_empty() || self.rng.random_bool(0.5)) {
                let c = busy[self.rng.random_range(0..busy.len())].clone();
                self.client_step(round, &c, kinds[&c], &mut trained, &mut pending)
                    .await?;
            } else {
                let i = self.rng.random_range(0..pending.len());
                self.deliver(round, &kinds, &mut trained, &mut pending, i)
                    .await?;
            }
        }

        // What the state machine gets: the callback, or CloseRound after
        // the StartRound task timed out.
        let delivered = self.callback.succeeded(&token);
        let sm_result: RoundResult = if let [output] = delivered.as_slice() {
            serde_json::from_value(output.clone())
                .map_err(|e| format!("round {round}: callback output: {e}"))?
        } else {
            ensure!(
                delivered.is_empty(),
                "round {round}: {} delivered callbacks",
                delivered.len()
            );
            self.deadline_close(round, deadline, &token).await?
        };

        // After the round: stragglers finish and their records arrive.
        loop {
            let busy: Vec<String> = kinds
                .keys()
                .filter(|c| !trained[*c].done)
                .cloned()
                .collect();
            if busy.is_empty() && pending.is_empty() {
                break;
            }
            if !busy.is_empty() && (pending.is_empty() || self.rng.random_bool(0.5)) {
                let c = busy[self.rng.random_range(0..busy.len())].clone();
                self.client_step(round, &c, kinds[&c], &mut trained, &mut pending)
                    .await?;
            } else {
                let i = self.rng.random_range(0..pending.len());
                self.deliver(round, &kinds, &mut trained, &mut pending, i)
                    .await?;
            }
        }
        self.faults.disarm_all();
        self.faults.revive_all();

        self.check_round(
            round,
            &job_id,
            &kinds,
            &trained,
            &tokens,
            &sm_result,
            early_deadline,
        )
        .await?;
        Ok(sm_result)
    }

    /// One client step: take the next message; train and submit, or drop
    /// a stale/duplicate message.
    async fn client_step(
        &mut self,
        round: u32,
        client: &str,
        kind: Kind,
        trained: &mut BTreeMap<String, Trained>,
        pending: &mut Vec<Pending>,
    ) -> Result<(), String> {
        let queue = self.queues[client].clone();
        let wait = self.backend.receive_wait_seconds();
        let mut got = infra("receive", queue.receive(1, wait).await)?;
        if got.is_empty() {
            // Its last message is in flight after a crash: the visibility
            // timeout passes.
            let receipt = self.in_flight.get(client).cloned();
            self.backend
                .lapse_visibility(&queue, receipt.as_deref())
                .await?;
            got = infra("receive", queue.receive(1, wait).await)?;
        }
        if !got.is_empty() {
            self.in_flight.remove(client);
        }
        let Some(m) = got.into_iter().next() else {
            return Err(format!(
                "round {round}: `{client}` has work to do but no message in its queue"
            ));
        };
        let note: Notification = serde_json::from_str(&m.body)
            .map_err(|e| format!("a message does not decode: {e}: {}", m.body))?;
        let ready = match note {
            Notification::GlobalModelReady(g)
                if g.job_id == self.job.job_id && g.round == round && !trained[client].done =>
            {
                g
            }
            other => {
                // Old round, duplicate (retried StartRound), or done: drop it.
                self.note(format!("{client}: drops {other:?}"));
                infra("delete", queue.delete(&m.receipt).await)?;
                return Ok(());
            }
        };
        ensure!(
            ready.schema == SCHEMA
                && ready.model_key == keys::global_model(&self.job.job_id, round),
            "round {round}: message {ready:?}"
        );
        let gpath = self
            .files
            .join(format!("{client}-{round}-global.safetensors"));
        let info = infra(
            "download global",
            self.store.get_file(&ready.model_key, &gpath).await,
        )?;
        ensure!(
            info.sha256 == ready.checksum,
            "round {round}: the global model's checksum {} is not the announced {}",
            info.sha256,
            ready.checksum
        );
        let t = trained.get_mut(client).expect("planned");
        let attempt = t.attempts;
        t.attempts += 1;
        let mut values = t.values.clone();
        match kind {
            Kind::BadNaN => values[1] = f32::NAN,
            Kind::BadShape => values.push(1.0),
            _ => {}
        }
        let crash_before = kind == Kind::CrashBeforeRow && attempt == 0;
        let key = keys::update(&self.job.job_id, round, client);
        let file = self.write_model(&format!("{client}-{round}-{attempt}"), &values);
        if crash_before {
            if self.rng.random_bool(0.5) {
                infra("upload", self.store.put_file(&key, &file).await)?;
            }
            self.tally.client_crashes += 1;
            self.in_flight.insert(client.to_string(), m.receipt.clone());
            self.note(format!("{client}: crashes mid-training"));
            return Ok(());
        }
        let info = infra("upload", self.store.put_file(&key, &file).await)?;
        let num_examples = match kind {
            Kind::BadExamples => [
                Value::from(0),
                Value::from(-5),
                Value::from("many"),
                Value::from(1_000_000_000_000u64),
            ][self.rng.random_range(0..4)]
            .clone(),
            _ => Value::from(t.num_examples),
        };
        let row = UpdateRecord {
            client_id: client.to_string(),
            job_round: if kind == Kind::BadRow {
                keys::job_round(&self.job.job_id, round + 7)
            } else {
                keys::job_round(&self.job.job_id, round)
            },
            job_id: self.job.job_id.clone(),
            round,
            model_key: key,
            checksum: if kind == Kind::BadChecksum {
                "ab".repeat(32)
            } else {
                info.sha256
            },
            num_examples,
            llm_type: None,
            metrics: BTreeMap::from([("loss".to_string(), Value::from(0.5))]),
            bytes: info.bytes,
            trained_at: "2027-01-15T08:00:00Z".into(),
            schema: Some(SCHEMA),
        };
        let put = infra("put_update", self.ledger.put_update(&row).await)?;
        match (&put, attempt) {
            (PutUpdate::Created, _) => {
                let copies = 1 + self.rng.random_range(0..=2);
                self.tally.duplicate_deliveries += copies as usize - 1;
                pending.push(Pending {
                    record: row.clone(),
                    copies,
                    ok_once: false,
                });
            }
            (PutUpdate::AlreadyThere, a) if a > 0 => {}
            (other, _) => {
                return Err(format!(
                    "round {round}: `{client}` attempt {attempt}: put_update gave {other:?}"
                ));
            }
        }
        if kind == Kind::CrashAfterRow && attempt == 0 {
            self.tally.client_crashes += 1;
            self.in_flight.insert(client.to_string(), m.receipt.clone());
            self.note(format!("{client}: crashes after writing its row"));
            return Ok(());
        }
        if kind == Kind::UploadTwice {
            let again = infra("put_update", self.ledger.put_update(&row).await)?;
            ensure!(
                again == PutUpdate::AlreadyThere,
                "round {round}: `{client}` writing its row twice got {again:?}"
            );
        }
        infra("delete", queue.delete(&m.receipt).await)?;
        t.done = true;
        self.note(format!("{client}: submitted ({put:?})"));
        Ok(())
    }

    /// One stream delivery of `pending[i]`, to one engine or to two racing.
    async fn deliver(
        &mut self,
        round: u32,
        kinds: &BTreeMap<String, Kind>,
        trained: &mut BTreeMap<String, Trained>,
        pending: &mut Vec<Pending>,
        i: usize,
    ) -> Result<(), String> {
        let record = pending[i].record.clone();
        let client = record.client_id.clone();
        let kind = kinds[&client];
        let before = infra(
            "get_round",
            self.ledger.get_round(&record.job_id, round).await,
        )?
        .ok_or("the round vanished")?;
        let delivered_before = before
            .task_token
            .as_ref()
            .map_or(0, |t| self.callback.succeeded(t).len());
        let a = self.rng.random_range(0..self.engines.len());
        let race = self.rng.random_bool(0.2);
        let outcomes = if race {
            let b = (a + 1 + self.rng.random_range(0..self.engines.len() - 1)) % self.engines.len();
            self.tally.races += 1;
            let (x, y) = tokio::join!(
                self.engines[a].on_update(&record),
                self.engines[b].on_update(&record)
            );
            vec![x, y]
        } else {
            vec![self.engines[a].on_update(&record).await]
        };
        self.tally.deliveries += 1;
        // A crashed invocation is gone; the next delivery is a new one.
        self.faults.revive_all();
        let delivered_after = before
            .task_token
            .as_ref()
            .map_or(0, |t| self.callback.succeeded(t).len());
        if before.status == RoundStatus::Closed && delivered_after > delivered_before {
            self.note(format!(
                "deliver {client}: the stored result was re-sent and delivered"
            ));
            self.tally.resent_callbacks += 1;
        }
        let mut failed = false;
        for o in &outcomes {
            self.note(format!("deliver {client} (race: {race}) → {o:?}"));
            match o {
                Err(_) => failed = true,
                Ok(UpdateOutcome::Rejected(r)) => {
                    ensure!(
                        !kind.good() || r.starts_with("late:"),
                        "round {round}: good update of `{client}` rejected: {r}"
                    );
                    ensure!(
                        !r.contains("failed:"),
                        "round {round}: the round failed: {r}"
                    );
                    self.tally.rejected += 1;
                }
                Ok(UpdateOutcome::Late(r)) => {
                    ensure!(
                        r.starts_with("late:") || r.starts_with("replay:"),
                        "round {round}: `{client}`: late outcome without the rule: {r}"
                    );
                    if r.starts_with("late:") {
                        self.tally.late_records += 1;
                    }
                }
                Ok(UpdateOutcome::Recorded { .. }) | Ok(UpdateOutcome::Aggregated(_)) => {}
            }
        }
        if before.status == RoundStatus::Open {
            // Counted or not, this attempt began while the round was OPEN
            // (a failed attempt may still have counted it).
            trained
                .get_mut(&client)
                .expect("planned")
                .counted_while_open = true;
        }
        if failed {
            self.tally.failed_deliveries += 1;
            // Lambda retries the batch item later; sometimes after the
            // crashed aggregator's lease ran out.
            if self.rng.random_bool(0.7) {
                self.clock.advance(LEASE + 1);
            }
            return Ok(());
        }
        pending[i].ok_once = true;
        pending[i].copies -= 1;
        if pending[i].copies == 0 {
            pending.remove(i);
        }
        Ok(())
    }

    /// The StartRound task timed out: its token expires and CloseRound
    /// runs (retried on errors, as the state machine's Retry does),
    /// sometimes on two engines at once.
    async fn deadline_close(
        &mut self,
        round: u32,
        deadline: i64,
        token: &str,
    ) -> Result<RoundResult, String> {
        self.tally.deadline_closes += 1;
        self.clock.set(self.clock.now().max(deadline + 1));
        self.callback.expire(token);
        let job_id = self.job.job_id.clone();
        for attempt in 0..6 {
            let a = self.rng.random_range(0..self.engines.len());
            let race = self.rng.random_bool(0.3);
            // Time moves while CloseRound waits on another engine's lease.
            let done = AtomicBool::new(false);
            let ticker = async {
                for _ in 0..200 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if done.load(Ordering::SeqCst) {
                        break;
                    }
                    self.clock.advance(LEASE + 1);
                }
            };
            let results = if race {
                self.tally.close_races += 1;
                let b = (a + 1) % self.engines.len();
                let closes = async {
                    let (x, y) = tokio::join!(
                        self.engines[a].close_round(&job_id, round),
                        self.engines[b].close_round(&job_id, round)
                    );
                    done.store(true, Ordering::SeqCst);
                    vec![x, y]
                };
                tokio::join!(closes, ticker).0
            } else {
                let close = async {
                    let x = self.engines[a].close_round(&job_id, round).await;
                    done.store(true, Ordering::SeqCst);
                    vec![x]
                };
                tokio::join!(close, ticker).0
            };
            self.faults.revive_all();
            let mut ok: Option<RoundResult> = None;
            let mut failed = false;
            for r in results {
                self.note(format!("CloseRound attempt {attempt} → {r:?}"));
                match r {
                    Ok(res) => {
                        if let Some(prev) = &ok {
                            ensure!(
                                prev == &res,
                                "round {round}: racing CloseRounds returned different results"
                            );
                        }
                        ok = Some(res);
                    }
                    Err(e) if e.is_transient() => failed = true,
                    Err(e) => return Err(format!("round {round}: CloseRound failed: {e}")),
                }
            }
            if let (Some(res), false) = (&ok, failed) {
                return Ok(res.clone());
            }
            if let Some(res) = ok {
                // One of the racers finished it: that is the task output.
                return Ok(res);
            }
            self.clock.advance(LEASE + 1);
        }
        Err(format!("round {round}: CloseRound never succeeded"))
    }

    #[allow(clippy::too_many_arguments)]
    async fn check_round(
        &self,
        round: u32,
        job_id: &str,
        kinds: &BTreeMap<String, Kind>,
        trained: &BTreeMap<String, Trained>,
        tokens: &[String],
        sm: &RoundResult,
        early_deadline: bool,
    ) -> Result<(), String> {
        let row = infra("get_round", self.ledger.get_round(job_id, round).await)?
            .ok_or("round row missing")?;
        ensure!(
            row.status == RoundStatus::Closed,
            "round {round} is {:?}, not CLOSED",
            row.status
        );
        let stored = row.result.clone().ok_or("CLOSED without a result")?;
        ensure!(
            &stored == sm,
            "round {round}: the state machine got {sm:?} but the ledger holds {stored:?}"
        );

        // Aggregated exactly once.
        let closes = self.faults.lock().closes.get(&round).copied().unwrap_or(0);
        ensure!(closes == 1, "round {round} was closed {closes} times");
        let mut delivered = 0;
        for t in tokens {
            for call in self.callback.calls_for(t) {
                match call {
                    CallbackCall::Succeed {
                        delivered: true,
                        output,
                        ..
                    } => {
                        delivered += 1;
                        ensure!(
                            output == serde_json::to_value(&stored).unwrap(),
                            "round {round}: the callback carried another result"
                        );
                    }
                    CallbackCall::Fail {
                        delivered: true,
                        error,
                        cause,
                        ..
                    } => return Err(format!("round {round}: failure callback {error}: {cause}")),
                    _ => {}
                }
            }
        }
        ensure!(
            delivered <= 1,
            "round {round}: {delivered} delivered callbacks"
        );
        let next_key = keys::global_model(job_id, round + 1);
        let writes = self
            .faults
            .lock()
            .global_writes
            .get(&next_key)
            .cloned()
            .unwrap_or_default();
        ensure!(!writes.is_empty(), "round {round}: no global model written");
        ensure!(
            writes.iter().all(|w| w == &writes[0]),
            "round {round}: the global model was written with different contents: {writes:?}"
        );
        let now = infra("head", self.store.head(&next_key).await)?.ok_or("no next global")?;
        ensure!(
            now.sha256 == writes[0],
            "round {round}: the stored global is none of the writes"
        );
        ensure!(
            stored.global_model_key == next_key,
            "round {round}: result names {}",
            stored.global_model_key
        );

        // Every accepted update counted once; every client accounted for.
        let accepted: BTreeSet<&String> = stored.accepted.iter().collect();
        ensure!(
            accepted.len() == stored.accepted.len(),
            "round {round}: accepted twice: {:?}",
            stored.accepted
        );
        ensure!(
            stored.metrics.get("clients_accepted") == Some(&(accepted.len() as f64)),
            "round {round}: clients_accepted metric {:?}",
            stored.metrics.get("clients_accepted")
        );
        for (c, kind) in kinds {
            let t = &trained[c];
            let rejection = row.rejections.get(c);
            let is_accepted = accepted.contains(c);
            ensure!(
                is_accepted != rejection.is_some(),
                "round {round}: `{c}` ({kind:?}) accepted: {is_accepted}, rejection: {rejection:?} \
                 (must be exactly one)"
            );
            if kind.good() {
                let on_time = *kind != Kind::Late && !early_deadline;
                if on_time {
                    ensure!(
                        is_accepted,
                        "round {round}: on-time `{c}` not accepted: {rejection:?}"
                    );
                } else if let Some(r) = rejection {
                    ensure!(
                        r.starts_with("late:"),
                        "round {round}: `{c}` ({kind:?}): {r}"
                    );
                }
                if is_accepted {
                    ensure!(
                        t.counted_while_open,
                        "round {round}: `{c}` accepted though never counted while OPEN"
                    );
                }
            } else {
                let r = rejection.ok_or_else(|| {
                    format!("round {round}: bad update of `{c}` ({kind:?}) was accepted")
                })?;
                ensure!(
                    r.contains(kind.rule()) || r.starts_with("late:"),
                    "round {round}: `{c}` ({kind:?}) rejected for `{r}`, want the rule `{}`",
                    kind.rule()
                );
                if let Some(at_close) = stored.rejected.get(c) {
                    ensure!(
                        at_close.contains(kind.rule()) || at_close.starts_with("late:"),
                        "round {round}: `{c}` ({kind:?}) in the result: `{at_close}`"
                    );
                }
            }
        }

        // A reason recorded by the time the round closed is never replaced
        // (a replay after the close must not turn `job_round: …` into `late: …`).
        for (c, at_close) in &stored.rejected {
            ensure!(
                row.rejections.get(c) == Some(at_close),
                "round {round}: `{c}` was rejected with `{at_close}` at the close, the row now says {:?}",
                row.rejections.get(c)
            );
        }

        // The new global model is the weighted mean of the accepted updates.
        let got = self.read_global(round + 1).await?;
        let total: f64 = stored
            .accepted
            .iter()
            .map(|c| trained[c].num_examples as f64)
            .sum();
        ensure!(total > 0.0, "round {round}: nothing accepted");
        for (i, g) in got.iter().enumerate() {
            let want: f64 = stored
                .accepted
                .iter()
                .map(|c| f64::from(trained[c].values[i]) * trained[c].num_examples as f64)
                .sum::<f64>()
                / total;
            ensure!(
                (f64::from(*g) - want).abs() <= 1e-5 * want.abs().max(1.0),
                "round {round}: global[{i}] = {g}, the weighted mean of {:?} is {want}",
                stored.accepted
            );
        }
        ensure!(
            got.len() == WIDTH,
            "round {round}: global has {} values",
            got.len()
        );

        let announced = self
            .bus
            .published()
            .iter()
            .filter(|n| matches!(n, Notification::GlobalModelReady(g) if g.job_id == job_id && g.round == round))
            .count();
        ensure!(
            announced == tokens.len(),
            "round {round}: announced {announced} times for {} StartRounds",
            tokens.len()
        );
        Ok(())
    }

    /// Finalize (twice: a retry is a no-op) and the end-of-job invariants.
    async fn finish(&mut self, last: &RoundResult) -> Result<(), String> {
        let job_id = self.job.job_id.clone();
        let rounds = infra("list_rounds", self.ledger.list_rounds(&job_id).await)?;
        ensure!(
            rounds.len() == self.job.rounds as usize
                && rounds.iter().all(|r| r.status == RoundStatus::Closed),
            "the job did not run all its rounds to CLOSED: {:?}",
            rounds
                .iter()
                .map(|r| (r.round, r.status))
                .collect::<Vec<_>>()
        );
        let a = self.rng.random_range(0..self.engines.len());
        let out = infra(
            "Finalize",
            self.engines[a].finalize(&job_id, last.round, last).await,
        )?;
        let b = self.rng.random_range(0..self.engines.len());
        let again = infra(
            "Finalize retry",
            self.engines[b].finalize(&job_id, last.round, last).await,
        )?;
        ensure!(
            out == again,
            "a retried Finalize answered {again} after {out}"
        );
        // The registry may be shared (the emulators): this job's entries only.
        let artifacts: Vec<_> = infra("artifacts", self.ledger.list_artifacts(None).await)?
            .into_iter()
            .filter(|a| a.job_id == job_id)
            .collect();
        let want = format!("{job_id}:{}", self.job.rounds);
        ensure!(
            artifacts.len() == 1 && artifacts[0].artifact_id == want,
            "artifacts: {artifacts:?}"
        );
        ensure!(
            artifacts[0].model_key == keys::global_model(&job_id, self.job.rounds + 1),
            "the artifact is {}",
            artifacts[0].model_key
        );
        let complete = self
            .bus
            .published()
            .iter()
            .filter(|n| matches!(n, Notification::TrainingComplete(_)))
            .count();
        ensure!(complete >= 1, "no training_complete published");
        Ok(())
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
