//! Fault-injecting wrappers around the local adapters. Each engine gets its
//! own wrappers (named by the engine's owner) over the one shared store,
//! ledger and callback recorder; a shared [`Faults`] holds the armed faults,
//! which engines are down, and what the wrappers saw (closes, global-model
//! writes) for the invariants.
//!
//! A fault fires at the first matching call by any engine and is then
//! disarmed. `Crash` models a process dying at that point: the call's
//! effect (if it is an "after" point) stays, the call fails, and every
//! later call of that engine fails until the driver revives it (a new
//! Lambda invocation). `Error` fails only that call; the engine goes on
//! (so it gives its lease up, as on any error).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use fedstep_cloud::error::{CloudError, Result};
use fedstep_cloud::local::RecordingCallback;
use fedstep_cloud::ports::{
    AddReceived, Callback, Ledger, ObjectInfo, ObjectReader, ObjectStat, ObjectStore, ObjectWriter,
    OpenRound, PartReceipt, PutSecureRow, PutUpdate, StreamingStore, TaskCallback, UploadParts,
};
use fedstep_cloud::records::{
    Artifact, ClosedSecurePhase, RoundRecord, RoundResult, RoundStatus, SecureAwaiting,
    SecurePhase, SecureRow, UpdateRecord,
};
use fedstep_cloud::{Job, RoundFailure};
use fedstep_core::bytes::Unavailable;
use fedstep_core::shard::PartStore;
use fedstep_core::{ByteSink, ByteSource, OutputTarget};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Point {
    /// `claim_round` won (a real claim, not a lease release), then…
    AfterClaim,
    /// Round r+1's global model is in the store, then…
    AfterGlobalWrite,
    /// Before `close_round` reaches the ledger.
    BeforeClose,
    /// Before `SendTaskSuccess` reaches Step Functions: the call is lost.
    BeforeCallback,
    /// The StartRound task times out just before the callback arrives
    /// (the callback then gets WorkflowMovedOn). Never an error.
    DeadlineBeforeCallback,
    /// `add_received` lost before it reached the ledger.
    AddReceivedLost,
    /// `add_received` applied, then the answer is lost.
    AddReceivedThenFail,
    /// Downloading a client's update fails (S3 hiccup).
    UpdateDownload,
    /// Uploading one part of a shard's output fails (a shard task dying
    /// mid-upload).
    PartUpload,
}

pub const POINTS: [Point; 9] = [
    Point::AfterClaim,
    Point::AfterGlobalWrite,
    Point::BeforeClose,
    Point::BeforeCallback,
    Point::DeadlineBeforeCallback,
    Point::AddReceivedLost,
    Point::AddReceivedThenFail,
    Point::UpdateDownload,
    Point::PartUpload,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    Crash,
    Error,
}

/// Deliberately broken ledger semantics, to show the harness catches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mutant {
    #[default]
    None,
    /// `record_rejection` returns Ok and records nothing.
    DropsRejections,
    /// `claim_round` ignores live leases and `close_round` ignores the
    /// status and owner: two aggregators can both close a round.
    NoConditions,
}

#[derive(Default)]
pub struct State {
    pub armed: Vec<(Point, Mode)>,
    pub down: BTreeSet<String>,
    /// (point, mode) → times fired.
    pub fired: BTreeMap<(Point, Mode), usize>,
    /// round → successful `close_round` calls.
    pub closes: BTreeMap<u32, usize>,
    /// global-model key → SHA-256 of every completed write.
    pub global_writes: BTreeMap<String, Vec<String>>,
    pub mutant: Mutant,
    /// Draws how often each ledger call yields to the runtime first, so
    /// that two deliveries joined on one task interleave at every ledger
    /// call (as two Lambdas do), not only where the store happens to
    /// yield. Seeded from the schedule's seed; `None` never yields.
    pub interleave: Option<ChaCha8Rng>,
}

#[derive(Clone, Default)]
pub struct Faults(Arc<Mutex<State>>);

impl Faults {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn arm(&self, point: Point, mode: Mode) {
        self.lock().armed.push((point, mode));
    }

    pub fn disarm_all(&self) {
        self.lock().armed.clear();
    }

    pub fn revive_all(&self) {
        self.lock().down.clear();
    }

    /// A ledger call's first step: yield 0–2 times (see `interleave`),
    /// then fail if this engine is down.
    async fn step(&self, owner: &str) -> Result<()> {
        let yields = match self.lock().interleave.as_mut() {
            Some(rng) => rng.random_range(0..=2),
            None => 0,
        };
        for _ in 0..yields {
            tokio::task::yield_now().await;
        }
        self.alive(owner)
    }

    fn alive(&self, owner: &str) -> Result<()> {
        if self.lock().down.contains(owner) {
            Err(CloudError::Transient(format!(
                "injected: engine `{owner}` has crashed"
            )))
        } else {
            Ok(())
        }
    }

    /// Fires the first armed fault at `point`, if any: returns the error
    /// the call must fail with.
    fn fire(&self, owner: &str, point: Point) -> Option<CloudError> {
        let mut s = self.lock();
        let i = s.armed.iter().position(|(p, _)| *p == point)?;
        let (_, mode) = s.armed.remove(i);
        *s.fired.entry((point, mode)).or_default() += 1;
        if mode == Mode::Crash {
            s.down.insert(owner.to_string());
        }
        Some(CloudError::Transient(format!(
            "injected {mode:?} at {point:?} in `{owner}`"
        )))
    }
}

#[derive(Clone)]
pub struct FaultStore<S> {
    pub inner: S,
    pub owner: String,
    pub faults: Faults,
}

impl<S: ObjectStore + Clone> ObjectStore for FaultStore<S> {
    async fn put_file(&self, key: &str, path: &Path) -> Result<ObjectInfo> {
        self.faults.alive(&self.owner)?;
        let info = self.inner.put_file(key, path).await?;
        if key.ends_with("/global.safetensors") {
            self.faults
                .lock()
                .global_writes
                .entry(key.to_string())
                .or_default()
                .push(info.sha256.clone());
            if let Some(e) = self.faults.fire(&self.owner, Point::AfterGlobalWrite) {
                return Err(e);
            }
        }
        Ok(info)
    }

    async fn get_file(&self, key: &str, path: &Path) -> Result<ObjectInfo> {
        self.faults.alive(&self.owner)?;
        if key.contains("/updates/") {
            if let Some(e) = self.faults.fire(&self.owner, Point::UpdateDownload) {
                return Err(e);
            }
        }
        self.inner.get_file(key, path).await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        self.faults.alive(&self.owner)?;
        self.inner.head(key).await
    }
}

impl<S> FaultStore<S> {
    /// `inner`, a reader of `key`, with this store's faults injected.
    fn faulty(&self, key: &str, inner: Arc<dyn ObjectReader>) -> Arc<dyn ObjectReader> {
        Arc::new(FaultReader {
            inner,
            update: key.contains("/updates/"),
            owner: self.owner.clone(),
            faults: self.faults.clone(),
        })
    }
}

impl<S: StreamingStore + Clone> StreamingStore for FaultStore<S> {
    async fn stat(&self, key: &str) -> Result<Option<ObjectStat>> {
        self.faults.alive(&self.owner)?;
        self.inner.stat(key).await
    }

    fn reader(
        &self,
        key: &str,
        stat: &ObjectStat,
        read_ahead: u64,
    ) -> Result<Arc<dyn ObjectReader>> {
        self.faults.alive(&self.owner)?;
        Ok(self.faulty(key, self.inner.reader(key, stat, read_ahead)?))
    }

    fn reader_unhashed(
        &self,
        key: &str,
        stat: &ObjectStat,
        read_ahead: u64,
    ) -> Result<Arc<dyn ObjectReader>> {
        self.faults.alive(&self.owner)?;
        Ok(self.faulty(key, self.inner.reader_unhashed(key, stat, read_ahead)?))
    }

    fn writer(&self, key: &str) -> Result<Arc<dyn ObjectWriter>> {
        self.faults.alive(&self.owner)?;
        Ok(Arc::new(FaultWriter {
            inner: self.inner.writer(key)?,
            global: key
                .ends_with("/global.safetensors")
                .then(|| key.to_string()),
            owner: self.owner.clone(),
            faults: self.faults.clone(),
        }))
    }

    async fn create_upload(&self, key: &str) -> Result<String> {
        self.faults.alive(&self.owner)?;
        self.inner.create_upload(key).await
    }

    fn upload_parts(&self, key: &str, upload_id: &str) -> Result<Arc<dyn UploadParts>> {
        self.faults.alive(&self.owner)?;
        Ok(Arc::new(FaultParts {
            inner: self.inner.upload_parts(key, upload_id)?,
            owner: self.owner.clone(),
            faults: self.faults.clone(),
        }))
    }

    async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        receipts: Vec<PartReceipt>,
    ) -> Result<ObjectInfo> {
        self.faults.alive(&self.owner)?;
        let info = self.inner.complete_upload(key, upload_id, receipts).await?;
        if key.ends_with("/global.safetensors") {
            self.faults
                .lock()
                .global_writes
                .entry(key.to_string())
                .or_default()
                .push(info.sha256.clone());
            if let Some(e) = self.faults.fire(&self.owner, Point::AfterGlobalWrite) {
                return Err(e);
            }
        }
        Ok(info)
    }
}

/// A shard's parts: an upload can die mid-way (`PartUpload`).
struct FaultParts {
    inner: Arc<dyn UploadParts>,
    owner: String,
    faults: Faults,
}

impl PartStore for FaultParts {
    fn put_part(&self, number: u32, bytes: &[u8]) -> std::io::Result<()> {
        self.faults.alive(&self.owner).map_err(as_io)?;
        if let Some(e) = self.faults.fire(&self.owner, Point::PartUpload) {
            return Err(as_io(e));
        }
        self.inner.put_part(number, bytes)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

impl UploadParts for FaultParts {
    fn receipts(&self) -> Vec<PartReceipt> {
        self.inner.receipts()
    }
}

/// An engine-side failure as a read or write error: what the store's
/// adapters say when the service is unreachable.
fn as_io(e: CloudError) -> std::io::Error {
    std::io::Error::other(Unavailable(e.to_string()))
}

/// Reads of a client's update can hit `UpdateDownload` (an S3 hiccup).
struct FaultReader {
    inner: Arc<dyn ObjectReader>,
    update: bool,
    owner: String,
    faults: Faults,
}

impl ByteSource for FaultReader {
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.faults.alive(&self.owner).map_err(as_io)?;
        if self.update {
            if let Some(e) = self.faults.fire(&self.owner, Point::UpdateDownload) {
                return Err(as_io(e));
            }
        }
        self.inner.read_exact_at(buf, offset)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

impl ObjectReader for FaultReader {
    fn sha256(&self) -> std::io::Result<String> {
        self.faults.alive(&self.owner).map_err(as_io)?;
        self.inner.sha256()
    }

    fn bytes_fetched(&self) -> u64 {
        self.inner.bytes_fetched()
    }
}

/// A committed global model is recorded for the invariants, then
/// `AfterGlobalWrite` can fire.
struct FaultWriter {
    inner: Arc<dyn ObjectWriter>,
    global: Option<String>,
    owner: String,
    faults: Faults,
}

impl OutputTarget for FaultWriter {
    fn create(&self, len: u64) -> std::io::Result<Box<dyn ByteSink>> {
        self.faults.alive(&self.owner).map_err(as_io)?;
        Ok(Box::new(FaultSink {
            inner: self.inner.create(len)?,
            owner: self.owner.clone(),
            faults: self.faults.clone(),
        }))
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

impl ObjectWriter for FaultWriter {
    fn commit(&self) -> std::io::Result<Option<ObjectInfo>> {
        self.faults.alive(&self.owner).map_err(as_io)?;
        let info = self.inner.commit()?;
        if let (Some(key), Some(info)) = (&self.global, &info) {
            self.faults
                .lock()
                .global_writes
                .entry(key.clone())
                .or_default()
                .push(info.sha256.clone());
            if let Some(e) = self.faults.fire(&self.owner, Point::AfterGlobalWrite) {
                return Err(as_io(e));
            }
        }
        Ok(info)
    }
}

struct FaultSink {
    inner: Box<dyn ByteSink>,
    owner: String,
    faults: Faults,
}

impl ByteSink for FaultSink {
    fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.faults.alive(&self.owner).map_err(as_io)?;
        self.inner.write_at(offset, bytes)
    }
    fn finish(self: Box<Self>) -> std::io::Result<()> {
        self.faults.alive(&self.owner).map_err(as_io)?;
        self.inner.finish()
    }
}

/// Writes a round row unconditionally: only the in-memory ledger offers
/// it, and only the `NoConditions` mutant uses it.
pub type RawPut = Arc<dyn Fn(RoundRecord) + Send + Sync>;

#[derive(Clone)]
pub struct FaultLedger<L> {
    pub inner: L,
    pub owner: String,
    pub faults: Faults,
    pub raw_put: Option<RawPut>,
}

impl<L> FaultLedger<L> {
    fn put_round_raw(&self, row: RoundRecord) -> Result<()> {
        let put = self.raw_put.as_ref().ok_or_else(|| {
            CloudError::Other("the NoConditions mutant needs a ledger with raw writes".into())
        })?;
        put(row);
        Ok(())
    }
}

impl<L: Ledger + Clone> Ledger for FaultLedger<L> {
    async fn put_job(&self, job: &Job) -> Result<()> {
        self.faults.step(&self.owner).await?;
        self.inner.put_job(job).await
    }

    async fn get_job(&self, job_id: &str) -> Result<Option<Job>> {
        self.faults.step(&self.owner).await?;
        self.inner.get_job(job_id).await
    }

    async fn open_round(&self, round: &RoundRecord) -> Result<OpenRound> {
        self.faults.step(&self.owner).await?;
        self.inner.open_round(round).await
    }

    async fn get_round(&self, job_id: &str, round: u32) -> Result<Option<RoundRecord>> {
        self.faults.step(&self.owner).await?;
        self.inner.get_round(job_id, round).await
    }

    async fn list_rounds(&self, job_id: &str) -> Result<Vec<RoundRecord>> {
        self.faults.step(&self.owner).await?;
        self.inner.list_rounds(job_id).await
    }

    async fn add_received(&self, job_id: &str, round: u32, client: &str) -> Result<AddReceived> {
        self.faults.step(&self.owner).await?;
        if let Some(e) = self.faults.fire(&self.owner, Point::AddReceivedLost) {
            return Err(e);
        }
        let row = self.inner.add_received(job_id, round, client).await?;
        if let Some(e) = self.faults.fire(&self.owner, Point::AddReceivedThenFail) {
            return Err(e);
        }
        Ok(row)
    }

    async fn record_rejection(
        &self,
        job_id: &str,
        round: u32,
        client: &str,
        reason: &str,
    ) -> Result<()> {
        self.faults.step(&self.owner).await?;
        if self.faults.lock().mutant == Mutant::DropsRejections {
            return Ok(());
        }
        self.inner
            .record_rejection(job_id, round, client, reason)
            .await
    }

    async fn claim_round(
        &self,
        job_id: &str,
        round: u32,
        owner: &str,
        now: i64,
        lease_seconds: i64,
    ) -> Result<Option<RoundRecord>> {
        self.faults.step(&self.owner).await?;
        if self.faults.lock().mutant == Mutant::NoConditions {
            if let Some(mut row) = self.inner.get_round(job_id, round).await? {
                if row.status == RoundStatus::Aggregating {
                    row.lease_expires_at = Some(i64::MIN);
                    self.put_round_raw(row)?;
                }
            }
        }
        let claimed = self
            .inner
            .claim_round(job_id, round, owner, now, lease_seconds)
            .await?;
        // A negative lease is the engine giving its lease up, not a claim.
        if claimed.is_some() && lease_seconds > 0 {
            if let Some(e) = self.faults.fire(&self.owner, Point::AfterClaim) {
                return Err(e);
            }
        }
        Ok(claimed)
    }

    async fn renew_lease(
        &self,
        job_id: &str,
        round: u32,
        owner: &str,
        now: i64,
        lease_seconds: i64,
    ) -> Result<bool> {
        self.faults.step(&self.owner).await?;
        self.inner
            .renew_lease(job_id, round, owner, now, lease_seconds)
            .await
    }

    async fn close_round(
        &self,
        job_id: &str,
        round: u32,
        owner: &str,
        result: &RoundResult,
    ) -> Result<bool> {
        self.faults.step(&self.owner).await?;
        if let Some(e) = self.faults.fire(&self.owner, Point::BeforeClose) {
            return Err(e);
        }
        if self.faults.lock().mutant == Mutant::NoConditions {
            if let Some(mut row) = self.inner.get_round(job_id, round).await? {
                row.status = RoundStatus::Aggregating;
                row.lease_owner = Some(owner.to_string());
                self.put_round_raw(row)?;
            }
        }
        let closed = self.inner.close_round(job_id, round, owner, result).await?;
        if closed {
            *self.faults.lock().closes.entry(round).or_default() += 1;
        }
        Ok(closed)
    }

    async fn fail_round(&self, job_id: &str, round: u32, failure: &RoundFailure) -> Result<()> {
        self.faults.step(&self.owner).await?;
        self.inner.fail_round(job_id, round, failure).await
    }

    async fn put_update(&self, update: &UpdateRecord) -> Result<PutUpdate> {
        self.faults.step(&self.owner).await?;
        self.inner.put_update(update).await
    }

    async fn get_update(
        &self,
        client_id: &str,
        job_id: &str,
        round: u32,
    ) -> Result<Option<UpdateRecord>> {
        self.faults.step(&self.owner).await?;
        self.inner.get_update(client_id, job_id, round).await
    }

    async fn put_secure_row(&self, row: &SecureRow) -> Result<PutSecureRow> {
        self.faults.step(&self.owner).await?;
        self.inner.put_secure_row(row).await
    }

    async fn get_secure_row(
        &self,
        client_id: &str,
        job_id: &str,
        round: u32,
        phase: SecurePhase,
    ) -> Result<Option<SecureRow>> {
        self.faults.step(&self.owner).await?;
        self.inner
            .get_secure_row(client_id, job_id, round, phase)
            .await
    }

    async fn close_secure_phase(
        &self,
        job_id: &str,
        round: u32,
        closed: &ClosedSecurePhase,
    ) -> Result<RoundRecord> {
        self.faults.step(&self.owner).await?;
        self.inner.close_secure_phase(job_id, round, closed).await
    }

    async fn add_secure_received(
        &self,
        job_id: &str,
        round: u32,
        phase: SecurePhase,
        client: &str,
    ) -> Result<AddReceived> {
        self.faults.step(&self.owner).await?;
        self.inner
            .add_secure_received(job_id, round, phase, client)
            .await
    }
    async fn await_secure_phase(
        &self,
        job_id: &str,
        round: u32,
        awaiting: &SecureAwaiting,
        task_token: &str,
    ) -> Result<RoundRecord> {
        self.faults.step(&self.owner).await?;
        self.inner
            .await_secure_phase(job_id, round, awaiting, task_token)
            .await
    }
    async fn put_artifact(&self, artifact: &Artifact) -> Result<()> {
        self.faults.step(&self.owner).await?;
        self.inner.put_artifact(artifact).await
    }

    async fn list_artifacts(&self, llm_type: Option<&str>) -> Result<Vec<Artifact>> {
        self.faults.step(&self.owner).await?;
        self.inner.list_artifacts(llm_type).await
    }
}

#[derive(Clone)]
pub struct FaultCallback {
    pub inner: RecordingCallback,
    pub owner: String,
    pub faults: Faults,
}

impl TaskCallback for FaultCallback {
    async fn succeed(&self, token: &str, output: &Value) -> Result<Callback> {
        self.faults.alive(&self.owner)?;
        if let Some(e) = self.faults.fire(&self.owner, Point::BeforeCallback) {
            return Err(e);
        }
        if self
            .faults
            .fire(&self.owner, Point::DeadlineBeforeCallback)
            .is_some()
        {
            self.inner.expire(token);
        }
        self.inner.succeed(token, output).await
    }

    async fn fail(&self, token: &str, error: &str, cause: &str) -> Result<Callback> {
        self.faults.alive(&self.owner)?;
        self.inner.fail(token, error, cause).await
    }
}
