//! In-process fakes of the ports a client uses, with the knobs the tests
//! need (hidden rows, injected transient failures, call counts). They follow
//! the real services' semantics where the client depends on them: SQS
//! visibility and receipts, S3 whole-object SHA-256, the conditional put of
//! the `updates` table.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedstep_client::retry::Backoff;
use fedstep_client::{TrainError, TrainReport, TrainRequest, Trainer, WorkerOptions};
use fedstep_cloud::job::Job;
use fedstep_cloud::ports::{
    AddReceived, ClientQueue, Clock, Ledger, ObjectInfo, ObjectStore, OpenRound, PutSecureRow,
    PutUpdate, QueueMessage,
};
use fedstep_cloud::records::{
    Artifact, ClosedSecurePhase, RoundRecord, RoundResult, SecureAwaiting, SecurePhase, SecureRow,
    UpdateRecord,
};
use fedstep_cloud::{keys, CloudError, RoundFailure};
use fedstep_core::Limits;
use sha2::{Digest, Sha256};

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ---------------------------------------------------------------- queue

struct Entry {
    body: String,
    visible_at: Instant,
    receipt: Option<String>,
    receive_count: u32,
}

pub struct MemQueue {
    entries: Mutex<Vec<Entry>>,
    next_receipt: AtomicU64,
    /// Visibility given on receive.
    pub default_visibility: Duration,
    pub extensions: Mutex<Vec<(String, u32)>>,
    pub deletes: AtomicU32,
}

impl MemQueue {
    pub fn new() -> Arc<MemQueue> {
        Arc::new(MemQueue {
            entries: Mutex::new(Vec::new()),
            next_receipt: AtomicU64::new(1),
            default_visibility: Duration::from_secs(30),
            extensions: Mutex::new(Vec::new()),
            deletes: AtomicU32::new(0),
        })
    }

    pub fn send(&self, body: impl Into<String>) {
        self.entries.lock().unwrap().push(Entry {
            body: body.into(),
            visible_at: Instant::now(),
            receipt: None,
            receive_count: 0,
        });
    }

    /// Messages not yet deleted (visible or not).
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }

    pub fn visible_now(&self) -> usize {
        let now = Instant::now();
        self.entries
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.visible_at <= now)
            .count()
    }

    pub fn extensions(&self) -> Vec<(String, u32)> {
        self.extensions.lock().unwrap().clone()
    }
}

impl ClientQueue for MemQueue {
    async fn receive(&self, max: u32, wait_seconds: u32) -> Result<Vec<QueueMessage>, CloudError> {
        let deadline = Instant::now() + Duration::from_secs(u64::from(wait_seconds));
        loop {
            {
                let now = Instant::now();
                let mut entries = self.entries.lock().unwrap();
                let mut out = Vec::new();
                for (i, e) in entries
                    .iter_mut()
                    .enumerate()
                    .filter(|(_, e)| e.visible_at <= now)
                {
                    if out.len() as u32 >= max {
                        break;
                    }
                    let receipt = format!("r{}", self.next_receipt.fetch_add(1, Ordering::SeqCst));
                    e.receipt = Some(receipt.clone());
                    e.receive_count += 1;
                    e.visible_at = now + self.default_visibility;
                    out.push(QueueMessage {
                        message_id: format!("m{i}"),
                        body: e.body.clone(),
                        receipt,
                        receive_count: e.receive_count,
                    });
                }
                if !out.is_empty() || Instant::now() >= deadline {
                    return Ok(out);
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn delete(&self, receipt: &str) -> Result<(), CloudError> {
        self.deletes.fetch_add(1, Ordering::SeqCst);
        // Like SQS, a stale receipt is not an error; it just does nothing.
        self.entries
            .lock()
            .unwrap()
            .retain(|e| e.receipt.as_deref() != Some(receipt));
        Ok(())
    }

    async fn extend_visibility(&self, receipt: &str, seconds: u32) -> Result<(), CloudError> {
        self.extensions
            .lock()
            .unwrap()
            .push((receipt.to_string(), seconds));
        let mut entries = self.entries.lock().unwrap();
        match entries
            .iter_mut()
            .find(|e| e.receipt.as_deref() == Some(receipt))
        {
            Some(e) => {
                e.visible_at = Instant::now() + Duration::from_secs(u64::from(seconds));
                Ok(())
            }
            None => Err(CloudError::Invalid(format!(
                "receipt {receipt} is not current"
            ))),
        }
    }
}

// ---------------------------------------------------------------- store

pub struct DirStore {
    pub root: PathBuf,
    pub puts: AtomicU32,
}

impl DirStore {
    pub fn new(root: &Path) -> Arc<DirStore> {
        Arc::new(DirStore {
            root: root.to_path_buf(),
            puts: AtomicU32::new(0),
        })
    }

    pub fn put_bytes(&self, key: &str, bytes: &[u8]) -> String {
        let p = self.root.join(key);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
        sha256_hex(bytes)
    }

    pub fn get_bytes(&self, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.root.join(key)).ok()
    }
}

impl ObjectStore for DirStore {
    async fn put_file(&self, key: &str, path: &Path) -> Result<ObjectInfo, CloudError> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        let bytes = std::fs::read(path)?;
        let sha256 = self.put_bytes(key, &bytes);
        Ok(ObjectInfo {
            bytes: bytes.len() as u64,
            sha256,
            store_checksum: None,
        })
    }

    async fn get_file(&self, key: &str, path: &Path) -> Result<ObjectInfo, CloudError> {
        let bytes = self
            .get_bytes(key)
            .ok_or_else(|| CloudError::NotFound(key.to_string()))?;
        std::fs::write(path, &bytes)?;
        Ok(ObjectInfo {
            bytes: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
            store_checksum: None,
        })
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, CloudError> {
        Ok(self.get_bytes(key).map(|b| ObjectInfo {
            bytes: b.len() as u64,
            sha256: sha256_hex(&b),
            store_checksum: None,
        }))
    }
}

// ---------------------------------------------------------------- ledger

#[derive(Default)]
pub struct MemLedger {
    pub rows: Mutex<BTreeMap<(String, String), UpdateRecord>>,
    /// Makes get_update answer "none" (a race with another writer).
    pub hide_rows: AtomicBool,
    /// The next n put_update calls fail transiently.
    pub transient_puts: AtomicU32,
    pub put_calls: AtomicU32,
}

impl MemLedger {
    pub fn new() -> Arc<MemLedger> {
        Arc::new(MemLedger::default())
    }

    pub fn rows(&self) -> Vec<UpdateRecord> {
        self.rows.lock().unwrap().values().cloned().collect()
    }
}

fn unused<T>() -> Result<T, CloudError> {
    Err(CloudError::Other("not used by the client".into()))
}

impl Ledger for MemLedger {
    async fn put_job(&self, _: &Job) -> Result<(), CloudError> {
        unused()
    }
    async fn get_job(&self, _: &str) -> Result<Option<Job>, CloudError> {
        unused()
    }
    async fn open_round(&self, _: &RoundRecord) -> Result<OpenRound, CloudError> {
        unused()
    }
    async fn get_round(&self, _: &str, _: u32) -> Result<Option<RoundRecord>, CloudError> {
        unused()
    }
    async fn list_rounds(&self, _: &str) -> Result<Vec<RoundRecord>, CloudError> {
        unused()
    }
    async fn add_received(&self, _: &str, _: u32, _: &str) -> Result<AddReceived, CloudError> {
        unused()
    }
    async fn record_rejection(&self, _: &str, _: u32, _: &str, _: &str) -> Result<(), CloudError> {
        unused()
    }
    async fn claim_round(
        &self,
        _: &str,
        _: u32,
        _: &str,
        _: i64,
        _: i64,
    ) -> Result<Option<RoundRecord>, CloudError> {
        unused()
    }
    async fn renew_lease(
        &self,
        _: &str,
        _: u32,
        _: &str,
        _: i64,
        _: i64,
    ) -> Result<bool, CloudError> {
        unused()
    }
    async fn close_round(
        &self,
        _: &str,
        _: u32,
        _: &str,
        _: &RoundResult,
    ) -> Result<bool, CloudError> {
        unused()
    }
    async fn fail_round(&self, _: &str, _: u32, _: &RoundFailure) -> Result<(), CloudError> {
        unused()
    }

    async fn put_update(&self, u: &UpdateRecord) -> Result<PutUpdate, CloudError> {
        self.put_calls.fetch_add(1, Ordering::SeqCst);
        if self
            .transient_puts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(CloudError::Transient("throttled (injected)".into()));
        }
        let mut rows = self.rows.lock().unwrap();
        let k = (u.client_id.clone(), u.job_round.clone());
        Ok(match rows.get(&k) {
            None => {
                rows.insert(k, u.clone());
                PutUpdate::Created
            }
            Some(old) if old.checksum == u.checksum => PutUpdate::AlreadyThere,
            Some(old) => PutUpdate::Conflict(Box::new(old.clone())),
        })
    }

    async fn get_update(
        &self,
        client_id: &str,
        job_id: &str,
        round: u32,
    ) -> Result<Option<UpdateRecord>, CloudError> {
        if self.hide_rows.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let k = (client_id.to_string(), keys::job_round(job_id, round));
        Ok(self.rows.lock().unwrap().get(&k).cloned())
    }

    async fn put_secure_row(&self, _: &SecureRow) -> Result<PutSecureRow, CloudError> {
        unused()
    }
    async fn get_secure_row(
        &self,
        _: &str,
        _: &str,
        _: u32,
        _: SecurePhase,
    ) -> Result<Option<SecureRow>, CloudError> {
        unused()
    }
    async fn close_secure_phase(
        &self,
        _: &str,
        _: u32,
        _: &ClosedSecurePhase,
    ) -> Result<RoundRecord, CloudError> {
        unused()
    }
    async fn add_secure_received(
        &self,
        _: &str,
        _: u32,
        _: SecurePhase,
        _: &str,
    ) -> Result<AddReceived, CloudError> {
        unused()
    }
    async fn await_secure_phase(
        &self,
        _: &str,
        _: u32,
        _: &SecureAwaiting,
        _: &str,
    ) -> Result<RoundRecord, CloudError> {
        unused()
    }
    async fn put_artifact(&self, _: &Artifact) -> Result<(), CloudError> {
        unused()
    }
    async fn list_artifacts(&self, _: Option<&str>) -> Result<Vec<Artifact>, CloudError> {
        unused()
    }
}

// ---------------------------------------------------------------- trainer

/// Copies the global model (a valid, compatible "update"), optionally
/// slowly or failing; counts calls.
#[derive(Default)]
pub struct CopyTrainer {
    pub delay: Duration,
    pub calls: AtomicU32,
    /// Set when a call has started (for "crash mid-training" tests).
    pub started: tokio::sync::Notify,
    /// Write this instead of the global model.
    pub output_override: Option<Vec<u8>>,
}

impl Trainer for CopyTrainer {
    async fn train(&self, req: TrainRequest) -> Result<TrainReport, TrainError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.started.notify_one();
        tokio::time::sleep(self.delay).await;
        match &self.output_override {
            Some(bytes) => std::fs::write(&req.output_model, bytes),
            None => std::fs::copy(&req.global_model, &req.output_model).map(|_| ()),
        }
        .map_err(|e| TrainError(e.to_string()))?;
        Ok(TrainReport {
            num_examples: 10,
            llm_type: None,
            metrics: BTreeMap::from([("loss".to_string(), 0.5)]),
        })
    }
}

pub struct FixedClock(pub i64);

impl Clock for FixedClock {
    fn now(&self) -> i64 {
        self.0
    }
}

pub const NOW: i64 = 1_800_000_000;

// ---------------------------------------------------------------- setup

pub fn options(workdir: &Path) -> WorkerOptions {
    WorkerOptions {
        client_id: "site-a".into(),
        jobs: None,
        visibility_timeout_seconds: 30,
        heartbeat_every: Duration::from_millis(40),
        wait_seconds: 0,
        exit_on_complete: false,
        workdir: workdir.to_path_buf(),
        limits: Limits::default(),
        backoff: Backoff {
            first: Duration::from_millis(1),
            max: Duration::from_millis(5),
            attempts: 5,
        },
        failure_retry_seconds: 30,
        personalization: None,
    }
}

/// A small digits MLP, as safetensors bytes.
pub fn global_model() -> Vec<u8> {
    fedstep_trainer::init_model(64, 16, 10, 7).unwrap()
}

/// Stores `model` as the global model of (job, round); returns the
/// `global_model_ready` body announcing it.
pub fn announce(store: &DirStore, job: &str, round: u32, model: &[u8]) -> String {
    let key = keys::global_model(job, round);
    let checksum = store.put_bytes(&key, model);
    serde_json::json!({
        "type": "global_model_ready", "schema": 1, "job_id": job, "round": round,
        "model_key": key, "checksum": checksum, "deadline": NOW + 600,
        "round_config": {"local_epochs": 1}
    })
    .to_string()
}
