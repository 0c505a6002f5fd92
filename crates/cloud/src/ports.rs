//! The ports the round engine is written against. Each has an AWS adapter
//! (S3, DynamoDB, SNS, Step Functions, SQS) and a local one (filesystem,
//! in-process) used by `fedstep simulate` and the fast fault harness.
//!
//! Methods return `impl Future + Send` so the engine can run on tokio's
//! multi-threaded runtime; implementations may simply write `async fn`.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use fedstep_core::shard::PartStore;
use fedstep_core::{ByteSource, OutputTarget};
use serde::{Deserialize, Serialize};

use serde_json::Value;

use crate::error::Result;
use crate::job::Job;
use crate::records::{
    Artifact, ClosedSecurePhase, Notification, RoundRecord, RoundResult, SecureAwaiting,
    SecurePhase, SecureRow, UpdateRecord,
};
use crate::round_failure::RoundFailure;

/// Size and SHA-256 (lowercase hex) of a stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub bytes: u64,
    pub sha256: String,
    /// The checksum the store itself verified against the bytes when they
    /// were written, exactly as its HEAD reports it (S3: the object's
    /// `x-amz-checksum-sha256`, the whole object's SHA-256 in base64 or,
    /// for an upload in parts, the composite `…-N` over the parts'
    /// SHA-256s). An opaque token: equal tokens mean equal bytes. `None`
    /// when the store keeps none (a directory).
    pub store_checksum: Option<String>,
}

/// What a HEAD tells about a stored object before any byte of it is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectStat {
    pub bytes: u64,
    /// What every later read is pinned to (S3: the version id, else the
    /// ETag), so an object replaced after this stat fails the read instead
    /// of mixing two objects. `None`: the store cannot pin (a directory).
    pub pin: Option<String>,
    /// The store's own verified checksum of the object (see
    /// [`ObjectInfo::store_checksum`]). When it equals what a row
    /// committed to, the pinned bytes are the ones that row names, without
    /// reading them.
    pub store_checksum: Option<String>,
    /// Why the object cannot be read although it exists (an archived
    /// storage class, a customer-provided encryption key); `None` when it
    /// can.
    pub unreadable: Option<String>,
}

/// An object the aggregation reads in place (ranged reads), pinned to one
/// [`ObjectStat`]. Its reads are blocking: the numeric core calls them from
/// its own threads, never from the async runtime.
pub trait ObjectReader: ByteSource {
    /// SHA-256 (lowercase hex) of the whole object. Bytes that were read in
    /// order were hashed on the way, so this reads only what was skipped
    /// (nothing, when the aggregation read the object front to back).
    /// Blocking.
    fn sha256(&self) -> std::io::Result<String>;
    /// Bytes this reader has fetched from the store so far (reads,
    /// read-ahead and hashing): what a shard's measurements report.
    fn bytes_fetched(&self) -> u64;
}

/// An object the aggregation writes as it produces it (S3: a multipart
/// upload, one part at a time), without a local copy. A finished attempt
/// is staged, not visible: the engine commits it only after every input it
/// read was proven to be what its row committed to, so a model computed
/// from a bad input never appears at its key, not even briefly.
pub trait ObjectWriter: OutputTarget + Send {
    /// Makes the last finished attempt visible at its key and returns its
    /// size and SHA-256 (empty when it was written out of order and so
    /// not hashed); `None` when no attempt finished. Blocking.
    fn commit(&self) -> std::io::Result<Option<ObjectInfo>>;
}

/// The model registry as the aggregator uses it: objects read and written
/// in place, streamed, never staged on local disk (clients and the CLI
/// move whole files through [`ObjectStore`]).
pub trait StreamingStore: ObjectStore {
    /// HEAD: `None` when the object does not exist.
    fn stat(&self, key: &str) -> impl Future<Output = Result<Option<ObjectStat>>> + Send;
    /// Opens `key` for ranged reads pinned to `stat`, with up to
    /// `read_ahead` bytes fetched ahead of the reader. Nothing is read yet.
    fn reader(
        &self,
        key: &str,
        stat: &ObjectStat,
        read_ahead: u64,
    ) -> Result<Arc<dyn ObjectReader>>;
    /// Like [`reader`](Self::reader), for an object whose content the
    /// engine has already bound by its store checksum: nothing is hashed
    /// on the way (its [`ObjectReader::sha256`] still works, by reading the
    /// object through). Stores whose readers never hash on the way keep
    /// this default.
    fn reader_unhashed(
        &self,
        key: &str,
        stat: &ObjectStat,
        read_ahead: u64,
    ) -> Result<Arc<dyn ObjectReader>> {
        self.reader(key, stat, read_ahead)
    }
    /// An output at `key`, visible once an attempt finishes.
    fn writer(&self, key: &str) -> Result<Arc<dyn ObjectWriter>>;
    /// Starts an output at `key` that several tasks write in parts (the
    /// shards of a sharded aggregation, each in its own process); returns
    /// the upload's id. Nothing is visible at `key` until
    /// [`complete_upload`](Self::complete_upload).
    fn create_upload(&self, key: &str) -> impl Future<Output = Result<String>> + Send;
    /// One task's handle on upload `upload_id` of `key`: the core writes
    /// whole parts into it, and its receipts go to whoever completes.
    fn upload_parts(&self, key: &str, upload_id: &str) -> Result<Arc<dyn UploadParts>>;
    /// Makes upload `upload_id` of `key` visible whole from every task's
    /// receipts (any order; numbers run from 1 without a gap) and returns
    /// the object's size and SHA-256 (no task saw the whole object, so the
    /// store reads it back once to hash it, and keeps the hash where
    /// [`ObjectStore::head`] finds it). Completing an upload that was
    /// already completed (a retried commit) hashes what is at `key`.
    fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        receipts: Vec<PartReceipt>,
    ) -> impl Future<Output = Result<ObjectInfo>> + Send;
}

/// What the store answered for one uploaded part: what completing the
/// upload needs. Plain data, so a shard task hands its receipts to the
/// commit task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartReceipt {
    pub number: u32,
    pub etag: String,
    /// The part's SHA-256 as the store checked it (S3: base64), if any.
    pub sha256: Option<String>,
}

/// A task's handle on an upload in parts (see
/// [`StreamingStore::upload_parts`]). Its writes are blocking.
pub trait UploadParts: PartStore {
    /// The receipts of the parts written through this handle so far.
    fn receipts(&self) -> Vec<PartReceipt>;
}

/// The model registry (S3). Objects move as files: models can be large, so
/// nothing here holds a whole model in memory.
pub trait ObjectStore: Send + Sync {
    /// Uploads `path` to `key` with its SHA-256 checksum; returns it.
    fn put_file(&self, key: &str, path: &Path) -> impl Future<Output = Result<ObjectInfo>> + Send;
    /// Downloads `key` to `path` (atomically: a partial download never sits
    /// at `path`); returns the SHA-256 computed over the bytes received.
    fn get_file(&self, key: &str, path: &Path) -> impl Future<Output = Result<ObjectInfo>> + Send;
    /// `None` when the object does not exist.
    fn head(&self, key: &str) -> impl Future<Output = Result<Option<ObjectInfo>>> + Send;
    /// Uploads a client's update (a local model) like `put_file`, marked as
    /// an update so the deployment can expire it: on S3 the object is
    /// tagged `fedstep-kind=update`, which the bucket's lifecycle rule
    /// selects (infra/lib/model-store.ts). Global models and server state
    /// go through `put_file` and are kept. Stores without object tags (a
    /// directory) keep this default.
    fn put_update_file(
        &self,
        key: &str,
        path: &Path,
    ) -> impl Future<Output = Result<ObjectInfo>> + Send {
        self.put_file(key, path)
    }
}

/// What a conditional `put_update` found.
#[derive(Debug, Clone, PartialEq)]
pub enum PutUpdate {
    Created,
    /// The same row (same checksum) was already there: a retry, a no-op.
    AlreadyThere,
    /// A different row exists for this client and round; it stays.
    Conflict(Box<UpdateRecord>),
}

/// What a conditional `put_secure_row` found.
#[derive(Debug, Clone, PartialEq)]
pub enum PutSecureRow {
    Created,
    /// The same message was already there: a retry, a no-op.
    AlreadyThere,
    /// Another message exists for this client and phase; it stays (a
    /// client cannot take back what it told its neighbours).
    Conflict,
}

/// What `open_round` found.
#[derive(Debug, Clone, PartialEq)]
pub enum OpenRound {
    Created,
    /// The round was already OPEN (a retried StartRound): the task token
    /// was replaced by the new one.
    TokenReplaced,
    /// The round already moved on (AGGREGATING, CLOSED or FAILED).
    AlreadyPast(Box<RoundRecord>),
}

/// What `add_received` found.
#[derive(Debug, Clone, PartialEq)]
pub enum AddReceived {
    /// The round was OPEN: the client is in `received` (maybe already was);
    /// the row after the ADD.
    Counted(Box<RoundRecord>),
    /// The round was past OPEN, so nothing was added: `received` is frozen
    /// from the claim on, and so is what the claimer aggregates. The row as
    /// it is now (whether it names this client says whether an earlier
    /// delivery was counted before the claim).
    PastOpen(Box<RoundRecord>),
}

/// The ledger (DynamoDB): the `rounds` table (written by the aggregator
/// only; the job header is round 0) and the `updates` table (written by
/// clients). Every state change is conditional.
pub trait Ledger: Send + Sync {
    /// Stores the job header if absent. An existing, different job with the
    /// same id is `ConditionFailed`.
    fn put_job(&self, job: &Job) -> impl Future<Output = Result<()>> + Send;
    fn get_job(&self, job_id: &str) -> impl Future<Output = Result<Option<Job>>> + Send;

    fn open_round(&self, round: &RoundRecord) -> impl Future<Output = Result<OpenRound>> + Send;
    fn get_round(
        &self,
        job_id: &str,
        round: u32,
    ) -> impl Future<Output = Result<Option<RoundRecord>>> + Send;
    /// All rounds of a job, oldest first (job header excluded).
    fn list_rounds(&self, job_id: &str) -> impl Future<Output = Result<Vec<RoundRecord>>> + Send;
    /// Set-ADDs `client` to the round's `received` while the round is OPEN
    /// (replays are harmless); past OPEN it adds nothing. `NotFound` if the
    /// round does not exist.
    fn add_received(
        &self,
        job_id: &str,
        round: u32,
        client: &str,
    ) -> impl Future<Output = Result<AddReceived>> + Send;
    /// Records why a client's update was not used (overwrites that client's entry).
    fn record_rejection(
        &self,
        job_id: &str,
        round: u32,
        client: &str,
        reason: &str,
    ) -> impl Future<Output = Result<()>> + Send;
    /// OPEN → AGGREGATING, or takes over an AGGREGATING round whose lease
    /// expired before `now`. Exactly one caller wins; it gets the row.
    fn claim_round(
        &self,
        job_id: &str,
        round: u32,
        owner: &str,
        now: i64,
        lease_seconds: i64,
    ) -> impl Future<Output = Result<Option<RoundRecord>>> + Send;
    /// Extends the lease of a round AGGREGATING under `owner` to `now +
    /// lease_seconds`. False when `owner` no longer holds it (another
    /// owner took it over, or it is closed or failed). Each task of an
    /// aggregation renews as it starts, so a Map longer than one lease is
    /// not taken over while its attempt makes progress.
    fn renew_lease(
        &self,
        job_id: &str,
        round: u32,
        owner: &str,
        now: i64,
        lease_seconds: i64,
    ) -> impl Future<Output = Result<bool>> + Send;
    /// AGGREGATING (held by `owner`) → CLOSED with the result. False if the
    /// lease was lost (another owner took over). The reasons in
    /// `result.rejected` are the ones recorded with `record_rejection`: a
    /// ledger may store them once and read them back from there (the
    /// DynamoDB one does, so a 1,000-client round fits in one item).
    fn close_round(
        &self,
        job_id: &str,
        round: u32,
        owner: &str,
        result: &RoundResult,
    ) -> impl Future<Output = Result<bool>> + Send;
    /// → FAILED with this failure, unless the round is CLOSED.
    fn fail_round(
        &self,
        job_id: &str,
        round: u32,
        failure: &RoundFailure,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Conditional put: one row per client per round.
    fn put_update(&self, update: &UpdateRecord) -> impl Future<Output = Result<PutUpdate>> + Send;
    fn get_update(
        &self,
        client_id: &str,
        job_id: &str,
        round: u32,
    ) -> impl Future<Output = Result<Option<UpdateRecord>>> + Send;

    /// Conditional put: one row per client per phase of a secure round.
    fn put_secure_row(&self, row: &SecureRow) -> impl Future<Output = Result<PutSecureRow>> + Send;
    fn get_secure_row(
        &self,
        client_id: &str,
        job_id: &str,
        round: u32,
        phase: SecurePhase,
    ) -> impl Future<Output = Result<Option<SecureRow>>> + Send;
    /// Appends `closed` to an OPEN round's `secure_closed` if it is the
    /// next phase to close (`secure_closed` holds exactly
    /// `closed.phase.index()` entries): the first close of a phase wins.
    /// Returns the round as stored afterwards, whoever closed it (or
    /// whatever else it became: FAILED, CLOSED). `NotFound` if the round
    /// does not exist.
    fn close_secure_phase(
        &self,
        job_id: &str,
        round: u32,
        closed: &ClosedSecurePhase,
    ) -> impl Future<Output = Result<RoundRecord>> + Send;

    /// Set-ADDs `{phase}#{client}` to the round's `secure_received` while
    /// the round is OPEN (replays are harmless); past OPEN it adds nothing.
    /// `NotFound` if the round does not exist.
    fn add_secure_received(
        &self,
        job_id: &str,
        round: u32,
        phase: SecurePhase,
        client: &str,
    ) -> impl Future<Output = Result<AddReceived>> + Send;
    /// Sets an OPEN round's `task_token` and `secure_awaiting` if
    /// `awaiting.phase` is the open phase (`secure_closed` holds exactly
    /// `awaiting.phase.index()` entries): the phase's hand-over will answer
    /// this token. Returns the round as stored afterwards, changed or not.
    /// `NotFound` if the round does not exist.
    fn await_secure_phase(
        &self,
        job_id: &str,
        round: u32,
        awaiting: &SecureAwaiting,
        task_token: &str,
    ) -> impl Future<Output = Result<RoundRecord>> + Send;

    /// Registers a final model in the artifact registry.
    fn put_artifact(&self, artifact: &Artifact) -> impl Future<Output = Result<()>> + Send;
    /// Artifacts, newest first, optionally of one llm_type.
    fn list_artifacts(
        &self,
        llm_type: Option<&str>,
    ) -> impl Future<Output = Result<Vec<Artifact>>> + Send;
}

/// The `global_model_ready` / `training_complete` topic (SNS).
pub trait Notifier: Send + Sync {
    fn publish(&self, message: &Notification) -> impl Future<Output = Result<()>> + Send;
}

/// What became of a callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Callback {
    Delivered,
    /// TaskTimedOut / InvalidToken: the workflow moved on (the deadline path
    /// owns the round now). Not an error.
    WorkflowMovedOn(String),
}

/// Step Functions task callbacks.
pub trait TaskCallback: Send + Sync {
    fn succeed(&self, token: &str, output: &Value)
        -> impl Future<Output = Result<Callback>> + Send;
    fn fail(
        &self,
        token: &str,
        error: &str,
        cause: &str,
    ) -> impl Future<Output = Result<Callback>> + Send;
}

/// One message from a client's queue (SQS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueMessage {
    /// The queue's id for the message (SQS MessageId), stable across
    /// deliveries unlike the receipt: what a log line names so an operator
    /// can find the message.
    pub message_id: String,
    pub body: String,
    /// Opaque handle for delete / visibility changes.
    pub receipt: String,
    /// How many times it has been delivered (1 = first time).
    pub receive_count: u32,
}

/// A client's queue.
pub trait ClientQueue: Send + Sync {
    /// Long-polls for up to `wait_seconds`; returns at most `max` messages.
    fn receive(
        &self,
        max: u32,
        wait_seconds: u32,
    ) -> impl Future<Output = Result<Vec<QueueMessage>>> + Send;
    fn delete(&self, receipt: &str) -> impl Future<Output = Result<()>> + Send;
    /// Keeps a message invisible for `seconds` more (while training).
    fn extend_visibility(
        &self,
        receipt: &str,
        seconds: u32,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// Wall-clock time in Unix seconds; injectable so tests can move deadlines
/// and leases.
pub trait Clock: Send + Sync {
    fn now(&self) -> i64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }
}
