//! `--mode async`: the federation as an async job (issue #17) on a
//! simulated clock, through the same round engine as every other run.
//!
//! Each client trains from the newest version it has heard of and takes
//! `client_speeds[k]` simulated seconds to do it; nothing sleeps. Events
//! are processed in simulated-time order (ties by client index, so a run is
//! reproducible bit for bit). When a client finishes, its update becomes
//! its row for the version being buffered (the open round), naming the
//! version it trained from; the engine counts it, and at K usable rows it
//! hands the version over and `close_round` aggregates it (stale rows
//! rebased and discounted: `fedstep_core::staleness`). The new version is
//! published to every queue; an idle client takes the newest message on
//! its queue and skips older ones, as the client binary does.
//!
//! A client holds at most one row per version: one that finishes while
//! its earlier row is still buffered keeps its update until the next
//! version opens (and so counts it one version staler).
//!
//! The sync federation at the same speeds needs max(speeds) simulated
//! seconds a round (every round waits for the slowest client); the async
//! run is given the same simulated time in total.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use fedstep_cloud::asynchronous::{AsyncSpec, JobMode, StalenessForm};
use fedstep_cloud::job::JobSpec;
use fedstep_cloud::keys;
use fedstep_cloud::local::{FsStore, LocalBus, LocalQueue, MemLedger, RecordingCallback};
use fedstep_cloud::ports::{ClientQueue, ObjectStore, SystemClock};
use fedstep_cloud::records::{ClosedBy, GlobalModelReady, Notification};
use fedstep_cloud::{EngineConfig, RoundEngine, UpdateOutcome};
use serde::Serialize;

use super::args::{AsyncSim, Settings};
use super::client::{Pending, SimClient};
use super::data::SimData;

type Engine = RoundEngine<FsStore, MemLedger, LocalBus, RecordingCallback, SystemClock>;

const JOB_ID: &str = "simulate-async";

/// Versions an async run may make at most (it stops on simulated time).
const MAX_VERSIONS: u32 = 100_000;

/// One version the async run made.
#[derive(Debug, Clone, Serialize)]
pub struct VersionReport {
    /// The version made (round r's aggregation makes version r + 1).
    pub version: u32,
    /// Simulated seconds when it was made.
    pub time: f64,
    pub accuracy: f64,
    pub loss: f64,
    /// Client → versions its update was behind (0: fresh).
    pub staleness: BTreeMap<String, u32>,
    pub rejected: BTreeMap<String, String>,
}

/// What the async run measured.
pub struct AsyncRun {
    pub versions: Vec<VersionReport>,
    /// Rows rejected at the stream (stale past max_staleness), by client.
    pub rejected_at_stream: BTreeMap<String, u32>,
    pub updates_submitted: u32,
}

/// A client's training in flight.
struct Training {
    finish: f64,
    client: usize,
    pending: Pending,
}

pub struct Federation<'a> {
    pub settings: &'a Settings,
    pub sim: &'a AsyncSim,
    pub data: &'a Arc<SimData>,
    pub init: &'a [u8],
    /// The run's own directory (store, clients' scratch).
    pub dir: &'a Path,
    /// Simulated seconds the run may use.
    pub budget: f64,
}

impl Federation<'_> {
    pub async fn run(&self) -> Result<AsyncRun> {
        let n = self.data.clients.len();
        let store = FsStore::new(self.dir.join("store"))?;
        let ledger = MemLedger::new();
        let bus = LocalBus::new(Arc::new(SystemClock));
        let jobs = [JOB_ID.to_string()];
        let queues: Vec<LocalQueue> = self
            .data
            .clients
            .iter()
            .map(|c| bus.subscribe(&c.id, Some(&jobs)))
            .collect();
        let engine = Engine::new(
            store.clone(),
            ledger.clone(),
            bus.clone(),
            RecordingCallback::new(),
            SystemClock,
            EngineConfig {
                read_ahead_bytes: fedstep_cloud::DEFAULT_READ_AHEAD_BYTES,
                owner: "fedstep-simulate-async".into(),
                lease_seconds: 600,
            },
        );
        let init_path = self.dir.join("init.safetensors");
        std::fs::write(&init_path, self.init)?;
        store
            .put_file(&keys::global_model(JOB_ID, 1), &init_path)
            .await?;
        let job = JobSpec {
            job_id: JOB_ID.into(),
            rounds: MAX_VERSIONS,
            clients: self.data.clients.iter().map(|c| c.id.clone()).collect(),
            min_clients: 1,
            round_timeout_seconds: 3600,
            initial_model: None,
            stop: None,
            aggregation: self.settings.aggregation.clone(),
            round_config: self.settings.round_config(),
            sharding: Default::default(),
            mode: JobMode::Async,
            asynchronous: Some(AsyncSpec {
                buffer_size: Some(self.sim.buffer_size),
                staleness: StalenessForm::Polynomial,
                staleness_exponent: Some(self.sim.staleness_exponent),
                max_staleness: Some(self.sim.max_staleness),
                server_learning_rate: self.sim.server_learning_rate,
                ..Default::default()
            }),
            secure_aggregation: None,
        }
        .check()
        .map_err(|e| anyhow::anyhow!("simulated async job: {e}"))?;

        let clients: Vec<Arc<SimClient>> = self
            .data
            .clients
            .iter()
            .enumerate()
            .map(|(k, share)| {
                Arc::new(SimClient {
                    index: k,
                    share: share.clone(),
                    cfg: self.settings.train_config(),
                    byzantine_scale: self.settings.byzantine_scale,
                    personal: None,
                    workdir: self.dir.join("clients").join(&share.id),
                    algorithm: self.settings.algorithm,
                })
            })
            .collect();

        let mut run = AsyncRun {
            versions: Vec::new(),
            rejected_at_stream: BTreeMap::new(),
            updates_submitted: 0,
        };
        let mut open = 1u32;
        engine
            .start_round(&job, open, "simulate-async-token-1")
            .await
            .context("start_round 1")?;
        let mut now = 0.0f64;
        let mut training: Vec<Training> = Vec::new();
        // Finished updates waiting for a version their client has no row in.
        let mut held: VecDeque<(usize, Pending)> = VecDeque::new();
        let mut in_open: BTreeSet<usize> = BTreeSet::new();
        let mut busy = vec![false; n];
        'run: loop {
            // Idle clients start on the newest version their queue names.
            for k in 0..n {
                if busy[k] {
                    continue;
                }
                if let Some(ready) = newest_version(&queues[k]).await? {
                    let pending = Arc::clone(&clients[k])
                        .train_version(&store, &ready)
                        .await?;
                    training.push(Training {
                        finish: now + self.sim.client_speeds[k],
                        client: k,
                        pending,
                    });
                    busy[k] = true;
                }
            }
            let Some(next) = (0..training.len()).min_by(|&a, &b| {
                let (a, b) = (&training[a], &training[b]);
                a.finish.total_cmp(&b.finish).then(a.client.cmp(&b.client))
            }) else {
                bail!("no client is training and no version is open: the async run stalled");
            };
            let done = training.swap_remove(next);
            if done.finish > self.budget {
                break;
            }
            now = done.finish;
            held.push_back((done.client, done.pending));
            // Submit what can be: each client once per version. A hand-over
            // makes a version at once and opens the next.
            while let Some(i) = held.iter().position(|(k, _)| !in_open.contains(k)) {
                let (k, pending) = held.remove(i).expect("position is in range");
                let row = clients[k]
                    .submit_pending(&store, &ledger, JOB_ID, open, pending)
                    .await?;
                run.updates_submitted += 1;
                in_open.insert(k);
                busy[k] = false;
                match engine.on_update(&row).await? {
                    UpdateOutcome::HandedOver { .. } => {}
                    UpdateOutcome::Rejected(reason) | UpdateOutcome::Late(reason) => {
                        *run.rejected_at_stream
                            .entry(format!("{}: {}", row.client_id, reason_kind(&reason)))
                            .or_default() += 1;
                        continue;
                    }
                    UpdateOutcome::Recorded { .. } => continue,
                }
                let result = engine
                    .close_round(JOB_ID, open, ClosedBy::Stream)
                    .await
                    .with_context(|| format!("close_round {open}"))?;
                let eval = super::runner::evaluate_global(
                    &store,
                    &result.global_model_key,
                    &self.dir.join("engine"),
                    self.data,
                )
                .await?;
                let staleness = staleness_of(&ledger, open, &result.accepted).await?;
                run.versions.push(VersionReport {
                    version: open + 1,
                    time: now,
                    accuracy: eval.accuracy,
                    loss: eval.loss,
                    staleness,
                    rejected: result.rejected.clone(),
                });
                if !result.continue_training {
                    break 'run;
                }
                open += 1;
                in_open.clear();
                engine
                    .start_round(&job, open, &format!("simulate-async-token-{open}"))
                    .await
                    .with_context(|| format!("start_round {open}"))?;
            }
            // A client whose update is held is not idle: it waits.
            for (k, _) in &held {
                busy[*k] = true;
            }
        }
        Ok(run)
    }
}

/// The newest `global_model_ready` on `queue`; older ones are deleted
/// unread (a client that was busy skips the versions it missed).
async fn newest_version(queue: &LocalQueue) -> Result<Option<GlobalModelReady>> {
    let mut newest: Option<GlobalModelReady> = None;
    loop {
        let messages = queue.receive(10, 0).await?;
        if messages.is_empty() {
            return Ok(newest);
        }
        for m in messages {
            if let Ok(Notification::GlobalModelReady(ready)) = serde_json::from_str(&m.body) {
                if newest.as_ref().is_none_or(|n| ready.round > n.round) {
                    newest = Some(ready);
                }
            }
            queue.delete(&m.receipt).await?;
        }
    }
}

/// How stale each accepted row of round `round` was.
async fn staleness_of(
    ledger: &MemLedger,
    round: u32,
    accepted: &[String],
) -> Result<BTreeMap<String, u32>> {
    use fedstep_cloud::ports::Ledger;
    let mut out = BTreeMap::new();
    for client in accepted {
        let row = ledger
            .get_update(client, JOB_ID, round)
            .await?
            .with_context(|| format!("{client}'s row of version {round} is gone"))?;
        out.insert(client.clone(), round - row.base_round.unwrap_or(round));
    }
    Ok(out)
}

/// The rule a stream rejection names (its first word), for counting.
fn reason_kind(reason: &str) -> &str {
    reason.split(':').next().unwrap_or(reason)
}

/// The first simulated time `curve` reaches `target` (points in time order).
pub fn time_to(curve: &[(f64, f64)], target: f64) -> Option<f64> {
    curve.iter().find(|(_, a)| *a >= target).map(|(t, _)| *t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_to_target_is_the_first_crossing() {
        let curve = [(1.0, 0.5), (2.0, 0.8), (3.0, 0.7), (4.0, 0.9)];
        assert_eq!(time_to(&curve, 0.8), Some(2.0));
        assert_eq!(time_to(&curve, 0.85), Some(4.0));
        assert_eq!(time_to(&curve, 0.95), None);
    }
}
