//! The rows and messages of the round protocol (docs/design.md §2–3). Field
//! names are the DynamoDB attribute names and JSON keys: changing one is a
//! schema change.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::round_failure::RoundFailure;

/// Version of the messages and rows below; readers refuse newer ones.
pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RoundStatus {
    /// Accepting updates.
    Open,
    /// Claimed by one aggregator (lease in `lease_owner`/`lease_expires_at`).
    Aggregating,
    /// The next global model is written; `result` holds the outcome.
    Closed,
    /// Gave up (quorum not met, no usable update); `failure` says why.
    Failed,
}

/// One row of the `rounds` table (PK `job_id`, SK `round`). Written by the
/// aggregator only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoundRecord {
    pub job_id: String,
    pub round: u32,
    pub status: RoundStatus,
    /// Step Functions task token of the StartRound task (never sent to
    /// clients). A retried StartRound replaces it.
    #[serde(default)]
    pub task_token: Option<String>,
    pub expected_clients: Vec<String>,
    pub min_clients: u32,
    /// Unix seconds after which the deadline path (CloseRound) owns the round.
    pub deadline: i64,
    /// Clients whose update row has been seen (a set: replays are harmless).
    #[serde(default)]
    pub received: BTreeSet<String>,
    /// client → why its update was not used.
    #[serde(default)]
    pub rejections: BTreeMap<String, String>,
    #[serde(default)]
    pub lease_owner: Option<String>,
    #[serde(default)]
    pub lease_expires_at: Option<i64>,
    /// The model clients train in this round, and its SHA-256 (hex).
    pub global_model_key: String,
    pub global_checksum: String,
    /// The store's own checksum of that model when the round opened
    /// (`ObjectInfo::store_checksum`): the plan matches it instead of
    /// hashing the model. Absent: the store keeps none, and it is hashed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_store_checksum: Option<String>,
    #[serde(default)]
    pub result: Option<RoundResult>,
    #[serde(default)]
    pub failure: Option<RoundFailure>,
    /// Async jobs: the round is a version's buffer (hand over at K usable
    /// updates, however many clients are still training).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer: Option<VersionBuffer>,
    /// Secure rounds: the SecAgg+ phases closed so far, in order, each
    /// with the clients whose rows it took (`crate::engine` replays the
    /// protocol from exactly these). Appended by one conditional write per
    /// phase, so the first close of a phase is the only one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secure_closed: Vec<ClosedSecurePhase>,
    /// Secure rounds: every phase row counted, as `{phase}#{client}` (a
    /// set: replays are harmless; neither part can hold a `#`).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub secure_received: BTreeSet<String>,
    /// Secure rounds: the open phase and whose rows its hand-over waits
    /// for, set with the task token that the hand-over answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_awaiting: Option<SecureAwaiting>,
}

/// The open phase of a secure round and the clients it waits for: every
/// expected client in the first phase, the previous phase's survivors
/// after it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SecureAwaiting {
    pub phase: SecurePhase,
    pub clients: Vec<String>,
}

impl RoundRecord {
    /// Whether `client`'s row for `phase` was counted.
    pub fn secure_row_received(&self, phase: SecurePhase, client: &str) -> bool {
        self.secure_received.contains(&phase.received_entry(client))
    }

    /// The open phase of a secure round whose hand-over is due: all the
    /// clients it waits for have their row in.
    pub fn secure_phase_complete(&self) -> Option<SecurePhase> {
        let awaiting = self.secure_awaiting.as_ref()?;
        awaiting
            .clients
            .iter()
            .all(|c| self.secure_row_received(awaiting.phase, c))
            .then_some(awaiting.phase)
    }
}

/// One closed phase of a secure round.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClosedSecurePhase {
    pub phase: SecurePhase,
    /// The clients whose row for this phase was in the ledger when it
    /// closed, sorted. A row written later is never read.
    pub taken: Vec<String>,
    /// Of those, the ones the aggregator itself refused, with why (a row
    /// that breaks a rule, a masked input whose object is missing or does
    /// not fit the round): the protocol treats them as dropped.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub refused: BTreeMap<String, String>,
    /// Where the messages the phase took are kept (`keys::secure_taken`,
    /// named by their digest): every later step replays these, never the
    /// rows again, which their clients could rewrite.
    pub document: String,
}

/// A phase of a SecAgg+ round in which clients write rows
/// (`fedstep_secagg::Phase` without its end state).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum SecurePhase {
    /// 1: two public keys.
    AdvertiseKeys,
    /// 2: sealed shares for the neighbours.
    ShareKeys,
    /// 3: the masked input's metadata (the vector is an object).
    MaskedInput,
    /// 4: the shares the server asked for.
    Unmask,
}

impl SecurePhase {
    pub const ALL: [SecurePhase; 4] = [
        SecurePhase::AdvertiseKeys,
        SecurePhase::ShareKeys,
        SecurePhase::MaskedInput,
        SecurePhase::Unmask,
    ];

    /// 0 for the first phase: how many phases close before this one.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The stored name (also the last part of a row's sort key).
    pub fn as_str(self) -> &'static str {
        match self {
            SecurePhase::AdvertiseKeys => "advertise_keys",
            SecurePhase::ShareKeys => "share_keys",
            SecurePhase::MaskedInput => "masked_input",
            SecurePhase::Unmask => "unmask",
        }
    }

    /// The phase after this one; `None` after the last.
    pub fn next(self) -> Option<SecurePhase> {
        SecurePhase::ALL.get(self.index() + 1).copied()
    }

    /// `client`'s entry in a round's `secure_received`.
    pub fn received_entry(self, client: &str) -> String {
        format!("{self}#{client}")
    }

    /// The protocol core's name for it.
    pub fn protocol_phase(self) -> fedstep_secagg::Phase {
        match self {
            SecurePhase::AdvertiseKeys => fedstep_secagg::Phase::AdvertiseKeys,
            SecurePhase::ShareKeys => fedstep_secagg::Phase::ShareKeys,
            SecurePhase::MaskedInput => fedstep_secagg::Phase::MaskedInput,
            SecurePhase::Unmask => fedstep_secagg::Phase::Unmask,
        }
    }
}

impl std::fmt::Display for SecurePhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One client's message in one phase of a secure round (issue #18): a row
/// of the `updates` table beside its update rows (PK `client_id`, SK
/// `{job_id}#{round:06}#{phase}`), so the IAM condition that lets a client
/// write only rows under its own id (`LeadingKeys`) authenticates these
/// too: the sender the protocol is told is the row's key, never a field of
/// the message. Untrusted: the round's SecAgg+ server parses `message` and
/// excludes the sender, with a reason, if anything is wrong with it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SecureRow {
    pub client_id: String,
    /// `{job_id}#{round:06}#{phase}` (`keys::secure_job_round`).
    pub job_round: String,
    pub job_id: String,
    pub round: u32,
    pub phase: SecurePhase,
    /// The phase's message (`fedstep_secagg::messages`) as JSON, at most
    /// [`SecureRow::MAX_MESSAGE_BYTES`].
    pub message: String,
    #[serde(default)]
    pub schema: Option<u32>,
}

impl SecureRow {
    /// Phase 2's shares are the largest message, one sealed bundle of two
    /// 33-byte shares per neighbour (under 300 bytes of JSON each), so 255
    /// neighbours (GF(2^8) Shamir's most) fit, and a row stays far under
    /// DynamoDB's 400 KB item.
    pub const MAX_MESSAGE_BYTES: usize = 128 * 1024;
}

/// An async round's buffer rules, fixed when it opens.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionBuffer {
    /// K: usable updates that make the version.
    pub size: u32,
    /// Rows trained from a version older than `round − max_staleness` are
    /// rejected.
    pub max_staleness: u32,
}

/// What a round produced: the StartRound callback output and the CloseRound
/// return value (statemachine/README.md). `continue` is the only field the
/// state machine reads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoundResult {
    pub job_id: String,
    pub round: u32,
    /// The next round's global model.
    pub global_model_key: String,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    #[serde(rename = "continue")]
    pub continue_training: bool,
    /// Which path closed the round.
    pub closed_by: ClosedBy,
    /// Accepted clients and rejected clients with reasons.
    #[serde(default)]
    pub accepted: Vec<String>,
    #[serde(default)]
    pub rejected: BTreeMap<String, String>,
}

/// Why a round was closed: stored in round rows and results as `"stream"`
/// / `"deadline"`, and passed to CloseRound by the state machine.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClosedBy {
    /// Every expected client was in: the stream path handed the round over
    /// (answered StartRound with a [`HandOver`]).
    Stream,
    /// StartRound timed out: the round closes with what arrived.
    Deadline,
}

/// What the stream path answers the StartRound task with once every
/// expected client is in: no result (the stream invocation never
/// aggregates), only that CloseRound may now run. The state machine passes
/// `closed_by` on to CloseRound.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandOver {
    pub job_id: String,
    pub round: u32,
    pub closed_by: ClosedBy,
    /// Usable updates counted when the round was handed over, of `expected`.
    pub usable: usize,
    pub expected: usize,
}

impl ClosedBy {
    /// The stored name, also shown by `fedstep job status`.
    pub fn as_str(self) -> &'static str {
        match self {
            ClosedBy::Stream => "stream",
            ClosedBy::Deadline => "deadline",
        }
    }
}

impl std::fmt::Display for ClosedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of the `updates` table (PK `client_id`, SK `job_round`), written
/// by a client after its model is in S3. Untrusted: every field is checked
/// by the aggregator before use.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UpdateRecord {
    pub client_id: String,
    /// `{job_id}#{round:06}`.
    pub job_round: String,
    pub job_id: String,
    pub round: u32,
    pub model_key: String,
    /// SHA-256 of the model file, lowercase hex.
    pub checksum: String,
    /// The checksum the store verified when the client uploaded the model
    /// (`ObjectInfo::store_checksum`, as the upload's answer gave it). When
    /// the object's HEAD reports the same, the aggregator reads it pinned
    /// without hashing it; when it reports another, the object was
    /// replaced after the row and the update is rejected. Absent: the
    /// aggregator hashes the bytes against `checksum`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_checksum: Option<String>,
    /// As claimed; validated by the weighting stage.
    pub num_examples: Value,
    #[serde(default)]
    pub llm_type: Option<String>,
    #[serde(default)]
    pub metrics: BTreeMap<String, Value>,
    pub bytes: u64,
    /// RFC 3339 time the client finished training.
    pub trained_at: String,
    #[serde(default)]
    pub schema: Option<u32>,
    /// SCAFFOLD jobs: SHA-256 (lowercase hex) of the client's Δc_i at
    /// `keys::variate_delta`. The server counts the Δc_i only if its bytes
    /// hash to this, so a rewritten or stale object is left out of c.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variate_delta_checksum: Option<String>,
    /// Async jobs: the version (round) whose global model the client
    /// trained from, at most `round` (the version it is counted into).
    /// Absent: `round` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_round: Option<u32>,
}

/// Where a SCAFFOLD round's server control variate c is, and its SHA-256:
/// clients verify what they download against it, as for the model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServerVariateRef {
    pub key: String,
    pub checksum: String,
}

/// Published on the `global_model_ready` topic when a round opens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GlobalModelReady {
    pub schema: u32,
    pub job_id: String,
    pub round: u32,
    pub model_key: String,
    pub checksum: String,
    /// Unix seconds.
    pub deadline: i64,
    #[serde(default)]
    pub round_config: serde_json::Map<String, Value>,
    /// SCAFFOLD jobs only: the round's server control variate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_variate: Option<ServerVariateRef>,
    /// Async jobs: the round is a version; a client submits what it
    /// trained from it to the newest version announced when it finishes
    /// (`crates/client/src/version.rs`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub asynchronous: bool,
}

/// Published when the job ends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainingComplete {
    pub schema: u32,
    pub job_id: String,
    pub final_round: u32,
    pub final_model_key: String,
    pub artifact_id: String,
}

/// Published when the job's execution fails (the ReportFailure task): the
/// clients stop waiting for a round that will not come.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobFailed {
    pub schema: u32,
    pub job_id: String,
    /// The round (async: version) the job was in when it failed.
    pub round: u32,
    /// The error's name (`QuorumNotMet`, `AggregatorError`, …).
    pub error: String,
    /// Its cause, as people read it (bounded).
    pub cause: String,
}

/// Every message on the topic, tagged by `type`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Notification {
    GlobalModelReady(GlobalModelReady),
    TrainingComplete(TrainingComplete),
    JobFailed(JobFailed),
}

impl Notification {
    pub fn job_id(&self) -> &str {
        match self {
            Notification::GlobalModelReady(m) => &m.job_id,
            Notification::TrainingComplete(m) => &m.job_id,
            Notification::JobFailed(m) => &m.job_id,
        }
    }
}

/// A registered final model ("pull artifact ID" is one query).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Artifact {
    /// `{job_id}:{round}`.
    pub artifact_id: String,
    pub job_id: String,
    pub round: u32,
    pub llm_type: String,
    pub model_key: String,
    pub checksum: String,
    /// RFC 3339.
    pub created_at: String,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}
