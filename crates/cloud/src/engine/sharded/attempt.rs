//! One attempt at aggregating a round, as the plan stored it: exactly which
//! objects every task reads (pinned to what the plan's HEAD saw), the
//! uploads the shards write into, and how the model is cut. Every task of
//! the attempt (statistics, decide, shard, commit), in whatever process,
//! reopens the same aggregation from it, so they all compute on the same
//! inputs with the same plan.
//!
//! The documents live in the attempt's folder ([`keys::attempt_dir`]), not
//! in the workflow's history: they can be large (a Gram matrix per shard)
//! and the decision holds the DP noise key.

use std::collections::BTreeMap;
use std::sync::Arc;

use fedstep_core::aggregate::{Decision, ShardDone, ShardStatistics};
use fedstep_core::staleness::Rebased;
use fedstep_core::{ByteSink, Input, Limits, OutputTarget, UpdateMeta, UpdateSource};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{CloudError, Result};
use crate::keys;
use crate::ports::{ObjectReader, ObjectStat, PartReceipt, StreamingStore};
use crate::records::{ClosedBy, UpdateRecord};

/// The largest attempt document a task reads back (a shard's statistics
/// hold a Gram matrix over the clients: 8 bytes × n² per stripe group).
const MAX_DOC_BYTES: u64 = 256 << 20;

/// An object as the plan's HEAD saw it; reads are pinned to it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Pinned {
    pub key: String,
    pub bytes: u64,
    pub pin: Option<String>,
    /// The store's checksum of the pinned object equals the one its row
    /// (the round, for the global model) committed to: its bytes are
    /// bound without reading them, so no shard hashes it and its readers
    /// hash nothing on the way.
    #[serde(default)]
    pub store_verified: bool,
}

impl Pinned {
    /// `committed`: the store checksum a row or the round named, if any.
    pub fn new(key: &str, stat: &ObjectStat, committed: Option<&str>) -> Pinned {
        Pinned {
            key: key.to_string(),
            bytes: stat.bytes,
            pin: stat.pin.clone(),
            store_verified: committed.is_some() && committed == stat.store_checksum.as_deref(),
        }
    }

    pub fn stat(&self) -> ObjectStat {
        ObjectStat {
            bytes: self.bytes,
            pin: self.pin.clone(),
            store_checksum: None,
            unreadable: None,
        }
    }

    /// A reader pinned to this object: one that hashes on the way unless
    /// the object is store-verified.
    pub fn reader<S: StreamingStore>(
        &self,
        store: &S,
        read_ahead: u64,
    ) -> Result<Arc<dyn ObjectReader>> {
        if self.store_verified {
            store.reader_unhashed(&self.key, &self.stat(), read_ahead)
        } else {
            store.reader(&self.key, &self.stat(), read_ahead)
        }
    }
}

/// One accepted row and its pinned object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct PinnedUpdate {
    pub row: UpdateRecord,
    pub object: Pinned,
    /// Async: the update was trained from an older version, and enters as
    /// rebased onto this round's global model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebase: Option<RebaseFrom>,
}

/// The older version a stale update is rebased from, and its discount.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct RebaseFrom {
    /// The version's global model, pinned like every input.
    pub model: Pinned,
    /// s(τ) (`fedstep_core::staleness`).
    pub weight: f64,
}

/// What the plan decided for the attempt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Plan {
    pub job_id: String,
    pub round: u32,
    /// The attempt's id: also the round's lease owner while it runs.
    pub attempt: String,
    pub closed_by: ClosedBy,
    /// Unix milliseconds (wall clock) the attempt began: the
    /// measurements' `seconds` span plan to commit, across processes.
    pub started_ms: u64,
    pub global: Pinned,
    /// What the round was opened with: the global model must hash to it.
    pub global_checksum: String,
    pub state_in: Option<Pinned>,
    /// The rows checked in, sorted by client (the core's input order).
    pub updates: Vec<PinnedUpdate>,
    /// Clients the engine rejected before the core read them (at the
    /// stream, by the plan's checks, by an earlier attempt): never measured.
    pub engine_rejected: BTreeMap<String, String>,
    /// The shard count the core was asked for (`Sharding::shards`): every
    /// task reopens with it, so every task cuts the model the same way.
    pub shards_requested: usize,
    /// How many shards that made.
    pub shards: usize,
    pub statistics: bool,
    pub model_upload: String,
    pub state_upload: Option<String>,
}

/// The decide step's answer, stored for the shard tasks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Decided {
    Decision(Decision),
    /// A client's statistics were unusable: the attempt ends, the commit
    /// sends the round back to the plan without it.
    Rejected {
        client: String,
        reason: String,
    },
}

/// A shard's statistics pass, stored for the decide step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum StatisticsDone {
    Statistics(ShardStatistics),
    Rejected { client: String, reason: String },
}

/// A shard's combine pass, stored for the commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ShardOutcome {
    Done {
        done: ShardDone,
        model: Vec<PartReceipt>,
        state: Vec<PartReceipt>,
        /// Bytes the task fetched from the store: headers, its ranges of
        /// every input, and whatever it read to hash its share.
        #[serde(default)]
        bytes_fetched: u64,
    },
    Rejected {
        client: String,
        reason: String,
    },
    /// The decision rejected a client: nothing was computed.
    Skipped,
}

pub(crate) fn plan_key(job_id: &str, round: u32, attempt: &str) -> String {
    format!("{}/plan.json", keys::attempt_dir(job_id, round, attempt))
}

pub(crate) fn statistics_key(job_id: &str, round: u32, attempt: &str, shard: usize) -> String {
    format!(
        "{}/statistics/{shard:05}.json",
        keys::attempt_dir(job_id, round, attempt)
    )
}

pub(crate) fn decision_key(job_id: &str, round: u32, attempt: &str) -> String {
    format!(
        "{}/decision.json",
        keys::attempt_dir(job_id, round, attempt)
    )
}

pub(crate) fn shard_key(job_id: &str, round: u32, attempt: &str, shard: usize) -> String {
    format!(
        "{}/shards/{shard:05}.json",
        keys::attempt_dir(job_id, round, attempt)
    )
}

/// Unix milliseconds now, by the wall clock.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A fresh attempt id from the engine's owner name: unique per claim, and
/// a plain key segment whatever the owner name holds.
pub(crate) fn new_attempt_id(owner: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let safe: String = owner
        .chars()
        .take(48)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{safe}.{nanos:x}.{}", N.fetch_add(1, Ordering::Relaxed))
}

/// An attempt id from a task payload is used in keys: refuse anything
/// [`new_attempt_id`] would not make.
pub(crate) fn check_attempt_id(attempt: &str) -> Result<()> {
    let plain = !attempt.is_empty()
        && attempt.len() <= 96
        && attempt
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !attempt.starts_with('.');
    if plain {
        Ok(())
    } else {
        Err(CloudError::Invalid(format!(
            "attempt `{}` is not an attempt id",
            attempt.chars().take(64).collect::<String>()
        )))
    }
}

/// Writes `value` as JSON at `key`, visible at once.
pub(crate) async fn put_json<S: StreamingStore, T: Serialize>(
    store: &S,
    key: &str,
    value: &T,
) -> Result<()> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| CloudError::Other(format!("`{key}` does not encode: {e}")))?;
    put_bytes(store, key, bytes).await
}

/// Writes `bytes` at `key` through the streaming port (no local file),
/// visible at once. The store refusing it is the system's failure: retried.
pub(crate) async fn put_bytes<S: StreamingStore>(
    store: &S,
    key: &str,
    bytes: Vec<u8>,
) -> Result<()> {
    let writer = store.writer(key)?;
    let written = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let sink = writer.create(bytes.len() as u64)?;
        sink.write_at(0, &bytes)?;
        sink.finish()?;
        writer.commit()
    })
    .await
    .map_err(|e| CloudError::Other(format!("writing `{key}` panicked: {e}")))?;
    match written {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(CloudError::Other(format!(
            "`{key}` was written but not committed"
        ))),
        Err(e) => Err(CloudError::Transient(format!("writing `{key}`: {e}"))),
    }
}

/// Reads the JSON document at `key`; `None` when there is none.
pub(crate) async fn get_json<S: StreamingStore, T: DeserializeOwned + Send + 'static>(
    store: &S,
    key: &str,
) -> Result<Option<T>> {
    let Some(stat) = store.stat(key).await? else {
        return Ok(None);
    };
    if stat.bytes > MAX_DOC_BYTES {
        return Err(CloudError::Other(format!(
            "`{key}` holds {} bytes, more than an attempt document may",
            stat.bytes
        )));
    }
    let reader = store.reader(key, &stat, stat.bytes)?;
    let key_owned = key.to_string();
    tokio::task::spawn_blocking(move || -> Result<T> {
        let mut buf = vec![0u8; stat.bytes as usize];
        reader
            .read_exact_at(&mut buf, 0)
            .map_err(|e| CloudError::Transient(format!("reading `{key_owned}`: {e}")))?;
        serde_json::from_slice(&buf)
            .map_err(|e| CloudError::Other(format!("`{key_owned}` does not decode: {e}")))
    })
    .await
    .map_err(|e| CloudError::Other(format!("reading `{key}` panicked: {e}")))?
    .map(Some)
}

/// The plan's document, which every later task needs.
pub(crate) async fn load_plan<S: StreamingStore>(
    store: &S,
    job_id: &str,
    round: u32,
    attempt: &str,
) -> Result<Plan> {
    check_attempt_id(attempt)?;
    let key = plan_key(job_id, round, attempt);
    get_json(store, &key).await?.ok_or_else(|| {
        CloudError::Other(format!(
            "attempt `{attempt}` of round {round} of job `{job_id}` has no plan at `{key}`"
        ))
    })
}

/// The aggregation an attempt describes, opened for reading: what the core
/// takes as its request. The outputs are never written through `out` and
/// `state_out` (shards write their parts into the uploads); they only name
/// them in errors.
pub(crate) struct Opened {
    pub sources: Vec<UpdateSource>,
    /// The same readers as `sources` and `global`, for their hashes: a
    /// reader hashes what it reads in order on the way, so an input the
    /// combine pass read front to back (one shard) hashes without another
    /// read.
    pub update_readers: Vec<Arc<dyn ObjectReader>>,
    pub global_reader: Arc<dyn ObjectReader>,
    /// Every reader opened (rebased updates' models and the state too):
    /// what the task fetched is their sum.
    pub all_readers: Vec<Arc<dyn ObjectReader>>,
    pub global: Input,
    pub state_in: Option<Input>,
    pub out: NamedOutput,
    pub state_out: NamedOutput,
}

impl Opened {
    pub fn open<S: StreamingStore>(
        store: &S,
        plan: &Plan,
        read_ahead_total: u64,
        limits: &Limits,
    ) -> Result<Self> {
        // A rebased update reads two global models beside its own.
        let rebased = plan.updates.iter().filter(|u| u.rebase.is_some()).count();
        let readers = plan.updates.len() + 2 * rebased + 2;
        let read_ahead = read_ahead_total / readers as u64;
        let mut sources = Vec::with_capacity(plan.updates.len());
        let mut update_readers = Vec::with_capacity(plan.updates.len());
        let mut all_readers = Vec::with_capacity(readers);
        for u in &plan.updates {
            let reader = u.object.reader(store, read_ahead)?;
            update_readers.push(reader.clone());
            all_readers.push(reader.clone());
            // The hash is taken by `reader` whether or not the update is
            // rebased: a rebased read reads the same ranges of it.
            let input = match &u.rebase {
                None => Input::new(reader),
                Some(r) => {
                    let base = r.model.reader(store, read_ahead)?;
                    let current = plan.global.reader(store, read_ahead)?;
                    all_readers.extend([base.clone(), current.clone()]);
                    Input::new(Arc::new(Rebased::new(
                        Input::new(reader),
                        Input::new(base),
                        Input::new(current),
                        r.weight,
                        limits.clone(),
                    )))
                }
            };
            sources.push(UpdateSource {
                input,
                meta: UpdateMeta {
                    client_id: u.row.client_id.clone(),
                    num_examples: u.row.num_examples.clone(),
                    llm_type: u.row.llm_type.clone(),
                    metrics: u.row.metrics.clone(),
                },
            });
        }
        let global = plan.global.reader(store, read_ahead)?;
        all_readers.push(global.clone());
        let state_in = match &plan.state_in {
            Some(p) => {
                let reader = p.reader(store, read_ahead)?;
                all_readers.push(reader.clone());
                Some(Input::new(reader))
            }
            None => None,
        };
        Ok(Opened {
            sources,
            update_readers,
            all_readers,
            global_reader: global.clone(),
            global: Input::new(global),
            state_in,
            out: NamedOutput(keys::global_model(&plan.job_id, plan.round + 1)),
            state_out: NamedOutput(keys::server_state(&plan.job_id, plan.round + 1)),
        })
    }
}

/// An output the core names but never creates: the shards write their
/// parts into the store's upload instead.
pub(crate) struct NamedOutput(pub String);

impl OutputTarget for NamedOutput {
    fn create(&self, _len: u64) -> std::io::Result<Box<dyn ByteSink>> {
        Err(std::io::Error::other(format!(
            "`{}` is written in parts by the shard tasks, not whole",
            self.0
        )))
    }

    fn describe(&self) -> String {
        format!("`{}`", self.0)
    }
}
