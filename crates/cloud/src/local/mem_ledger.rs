//! `Ledger` in memory, with the conditional semantics the DynamoDB adapter
//! implements with condition expressions. Each method takes the one lock
//! for its whole read-check-write, which is what a conditional write is.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::bounded;
use crate::capacity;
use crate::error::{CloudError, Result};
use crate::job::Job;
use crate::keys;
use crate::ports::{AddReceived, Ledger, OpenRound, PutSecureRow, PutUpdate};
use crate::records::{
    Artifact, ClosedSecurePhase, RoundRecord, RoundResult, RoundStatus, SecureAwaiting,
    SecurePhase, SecureRow, UpdateRecord,
};
use crate::round_failure::RoundFailure;

#[derive(Default)]
struct Tables {
    jobs: BTreeMap<String, Job>,
    /// (job_id, round)
    rounds: BTreeMap<(String, u32), RoundRecord>,
    /// (client_id, job_round)
    updates: BTreeMap<(String, String), UpdateRecord>,
    /// (client_id, job_round#phase): the same table's secure rows.
    secure_rows: BTreeMap<(String, String), SecureRow>,
    artifacts: BTreeMap<String, Artifact>,
}

#[derive(Clone, Default)]
pub struct MemLedger {
    tables: Arc<Mutex<Tables>>,
}

impl MemLedger {
    pub fn new() -> Self {
        MemLedger::default()
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // A panic while holding the lock leaves consistent maps (every
        // method mutates at most one entry, last): keep going.
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Test hook: overwrite an `updates` row unconditionally, as a client
    /// may (PutItem on its own rows) after its row was counted.
    pub fn put_update_raw(&self, row: UpdateRecord) {
        self.lock()
            .updates
            .insert((row.client_id.clone(), row.job_round.clone()), row);
    }

    /// Test hook: overwrite a round row as is (e.g. to fake a crashed
    /// aggregator's claim).
    pub fn put_round_raw(&self, row: RoundRecord) {
        self.lock()
            .rounds
            .insert((row.job_id.clone(), row.round), row);
    }
}

fn not_found(job_id: &str, round: u32) -> CloudError {
    CloudError::NotFound(format!("round {round} of job `{job_id}`"))
}

/// Semantics, matching the DynamoDB adapter:
/// - `put_job`: put if `attribute_not_exists`; an equal header is a no-op,
///   a different one `ConditionFailed`.
/// - `open_round`: absent → Created; OPEN → only `task_token` is replaced
///   (TokenReplaced; deadline, received etc. stay); otherwise AlreadyPast.
/// - `add_received`: set ADD under `attribute_exists` and status OPEN
///   (Counted, the new row); past OPEN nothing is added (PastOpen, the row
///   as it is), so `received` is frozen from the claim on; NotFound if
///   absent.
/// - `record_rejection`: map SET of one client under `attribute_exists`.
///   A reason longer than `bounded::REASON_BYTES` is refused (`Invalid`):
///   DynamoDB would take it until the item outgrows 400 KB, and the
///   engine's contract is that every reason arrives bounded, so the local
///   runs and tests catch a call site that forgot (issue #13).
/// - `claim_round`: OPEN, or AGGREGATING with `lease_expires_at < now` (a
///   row without an expiry is not claimable) →
///   AGGREGATING with the new owner and `now + lease_seconds`. The same
///   owner does not re-claim its own live lease (two concurrent calls in one
///   engine must not both win).
/// - `close_round`: AGGREGATING and `lease_owner = owner` → CLOSED with the
///   result; true. Otherwise false (also when already CLOSED).
/// - `fail_round`: any status but CLOSED → FAILED with this reason; CLOSED
///   → no-op; NotFound if absent.
/// - `put_update`: put if absent; same checksum → AlreadyThere, else Conflict.
/// - `put_artifact`: put if absent (a retried Finalize keeps the first).
/// - `list_artifacts`: newest `created_at` first (ties: artifact_id desc).
impl Ledger for MemLedger {
    async fn put_job(&self, job: &Job) -> Result<()> {
        let mut t = self.lock();
        match t.jobs.get(&job.job_id) {
            None => {
                t.jobs.insert(job.job_id.clone(), job.clone());
                Ok(())
            }
            Some(existing) if existing == job => Ok(()),
            Some(_) => Err(CloudError::ConditionFailed(format!(
                "job `{}` exists with a different spec",
                job.job_id
            ))),
        }
    }

    async fn get_job(&self, job_id: &str) -> Result<Option<Job>> {
        Ok(self.lock().jobs.get(job_id).cloned())
    }

    async fn open_round(&self, round: &RoundRecord) -> Result<OpenRound> {
        let mut t = self.lock();
        let key = (round.job_id.clone(), round.round);
        match t.rounds.get_mut(&key) {
            None => {
                t.rounds.insert(key, round.clone());
                Ok(OpenRound::Created)
            }
            Some(existing) if existing.status == RoundStatus::Open => {
                existing.task_token = round.task_token.clone();
                Ok(OpenRound::TokenReplaced)
            }
            Some(existing) => Ok(OpenRound::AlreadyPast(Box::new(existing.clone()))),
        }
    }

    async fn get_round(&self, job_id: &str, round: u32) -> Result<Option<RoundRecord>> {
        Ok(self
            .lock()
            .rounds
            .get(&(job_id.to_string(), round))
            .cloned())
    }

    async fn list_rounds(&self, job_id: &str) -> Result<Vec<RoundRecord>> {
        Ok(self
            .lock()
            .rounds
            .range((job_id.to_string(), 1)..=(job_id.to_string(), u32::MAX))
            .map(|(_, r)| r.clone())
            .collect())
    }

    async fn add_received(&self, job_id: &str, round: u32, client: &str) -> Result<AddReceived> {
        let mut t = self.lock();
        let row = t
            .rounds
            .get_mut(&(job_id.to_string(), round))
            .ok_or_else(|| not_found(job_id, round))?;
        if row.status != RoundStatus::Open {
            return Ok(AddReceived::PastOpen(Box::new(row.clone())));
        }
        row.received.insert(client.to_string());
        Ok(AddReceived::Counted(Box::new(row.clone())))
    }

    async fn record_rejection(
        &self,
        job_id: &str,
        round: u32,
        client: &str,
        reason: &str,
    ) -> Result<()> {
        let mut t = self.lock();
        let row = t
            .rounds
            .get_mut(&(job_id.to_string(), round))
            .ok_or_else(|| not_found(job_id, round))?;
        let limit = capacity::reason_bytes(row.expected_clients.len());
        if reason.len() > limit {
            return Err(CloudError::Invalid(format!(
                "record_rejection: a {}-byte reason for `{}` exceeds this round's {limit} bytes; \
                 pass it through fedstep_cloud::capacity::stored_reason: {}",
                reason.len(),
                bounded::quote(client),
                bounded::reason(reason)
            )));
        }
        row.rejections
            .insert(client.to_string(), reason.to_string());
        Ok(())
    }

    async fn claim_round(
        &self,
        job_id: &str,
        round: u32,
        owner: &str,
        now: i64,
        lease_seconds: i64,
    ) -> Result<Option<RoundRecord>> {
        let mut t = self.lock();
        let row = t
            .rounds
            .get_mut(&(job_id.to_string(), round))
            .ok_or_else(|| not_found(job_id, round))?;
        let claimable = match row.status {
            RoundStatus::Open => true,
            RoundStatus::Aggregating => row.lease_expires_at.is_some_and(|e| e < now),
            RoundStatus::Closed | RoundStatus::Failed => false,
        };
        if !claimable {
            return Ok(None);
        }
        row.status = RoundStatus::Aggregating;
        row.lease_owner = Some(owner.to_string());
        row.lease_expires_at = Some(now.saturating_add(lease_seconds));
        Ok(Some(row.clone()))
    }

    async fn renew_lease(
        &self,
        job_id: &str,
        round: u32,
        owner: &str,
        now: i64,
        lease_seconds: i64,
    ) -> Result<bool> {
        let mut t = self.lock();
        let row = t
            .rounds
            .get_mut(&(job_id.to_string(), round))
            .ok_or_else(|| not_found(job_id, round))?;
        if row.status != RoundStatus::Aggregating || row.lease_owner.as_deref() != Some(owner) {
            return Ok(false);
        }
        row.lease_expires_at = Some(now.saturating_add(lease_seconds));
        Ok(true)
    }

    async fn close_round(
        &self,
        job_id: &str,
        round: u32,
        owner: &str,
        result: &RoundResult,
    ) -> Result<bool> {
        let mut t = self.lock();
        let row = t
            .rounds
            .get_mut(&(job_id.to_string(), round))
            .ok_or_else(|| not_found(job_id, round))?;
        if row.status == RoundStatus::Aggregating && row.lease_owner.as_deref() == Some(owner) {
            row.status = RoundStatus::Closed;
            row.result = Some(result.clone());
            Ok(true)
        } else {
            Ok(false)
        }
    }

    async fn fail_round(&self, job_id: &str, round: u32, failure: &RoundFailure) -> Result<()> {
        let mut t = self.lock();
        let row = t
            .rounds
            .get_mut(&(job_id.to_string(), round))
            .ok_or_else(|| not_found(job_id, round))?;
        if row.status != RoundStatus::Closed {
            row.status = RoundStatus::Failed;
            row.failure = Some(failure.clone());
        }
        Ok(())
    }

    async fn put_update(&self, update: &UpdateRecord) -> Result<PutUpdate> {
        let mut t = self.lock();
        let key = (update.client_id.clone(), update.job_round.clone());
        match t.updates.get(&key) {
            None => {
                t.updates.insert(key, update.clone());
                Ok(PutUpdate::Created)
            }
            Some(existing) if existing.checksum == update.checksum => Ok(PutUpdate::AlreadyThere),
            Some(existing) => Ok(PutUpdate::Conflict(Box::new(existing.clone()))),
        }
    }

    async fn get_update(
        &self,
        client_id: &str,
        job_id: &str,
        round: u32,
    ) -> Result<Option<UpdateRecord>> {
        Ok(self
            .lock()
            .updates
            .get(&(client_id.to_string(), keys::job_round(job_id, round)))
            .cloned())
    }

    async fn put_secure_row(&self, row: &SecureRow) -> Result<PutSecureRow> {
        let mut t = self.lock();
        let key = (row.client_id.clone(), row.job_round.clone());
        match t.secure_rows.get(&key) {
            None => {
                t.secure_rows.insert(key, row.clone());
                Ok(PutSecureRow::Created)
            }
            Some(existing) if existing.message == row.message => Ok(PutSecureRow::AlreadyThere),
            Some(_) => Ok(PutSecureRow::Conflict),
        }
    }

    async fn get_secure_row(
        &self,
        client_id: &str,
        job_id: &str,
        round: u32,
        phase: SecurePhase,
    ) -> Result<Option<SecureRow>> {
        let key = (
            client_id.to_string(),
            keys::secure_job_round(job_id, round, phase),
        );
        Ok(self.lock().secure_rows.get(&key).cloned())
    }

    async fn close_secure_phase(
        &self,
        job_id: &str,
        round: u32,
        closed: &ClosedSecurePhase,
    ) -> Result<RoundRecord> {
        let mut t = self.lock();
        let row = t
            .rounds
            .get_mut(&(job_id.to_string(), round))
            .ok_or_else(|| not_found(job_id, round))?;
        if row.status == RoundStatus::Open && row.secure_closed.len() == closed.phase.index() {
            row.secure_closed.push(closed.clone());
        }
        Ok(row.clone())
    }

    async fn add_secure_received(
        &self,
        job_id: &str,
        round: u32,
        phase: SecurePhase,
        client: &str,
    ) -> Result<AddReceived> {
        let mut t = self.lock();
        let row = t
            .rounds
            .get_mut(&(job_id.to_string(), round))
            .ok_or_else(|| not_found(job_id, round))?;
        if row.status != RoundStatus::Open {
            return Ok(AddReceived::PastOpen(Box::new(row.clone())));
        }
        row.secure_received.insert(phase.received_entry(client));
        Ok(AddReceived::Counted(Box::new(row.clone())))
    }

    async fn await_secure_phase(
        &self,
        job_id: &str,
        round: u32,
        awaiting: &SecureAwaiting,
        task_token: &str,
    ) -> Result<RoundRecord> {
        let mut t = self.lock();
        let row = t
            .rounds
            .get_mut(&(job_id.to_string(), round))
            .ok_or_else(|| not_found(job_id, round))?;
        if row.status == RoundStatus::Open && row.secure_closed.len() == awaiting.phase.index() {
            row.task_token = Some(task_token.to_string());
            row.secure_awaiting = Some(awaiting.clone());
        }
        Ok(row.clone())
    }

    async fn put_artifact(&self, artifact: &Artifact) -> Result<()> {
        self.lock()
            .artifacts
            .entry(artifact.artifact_id.clone())
            .or_insert_with(|| artifact.clone());
        Ok(())
    }

    async fn list_artifacts(&self, llm_type: Option<&str>) -> Result<Vec<Artifact>> {
        let mut v: Vec<Artifact> = self
            .lock()
            .artifacts
            .values()
            .filter(|a| llm_type.is_none_or(|t| a.llm_type == t))
            .cloned()
            .collect();
        v.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| b.artifact_id.cmp(&a.artifact_id))
        });
        Ok(v)
    }
}
