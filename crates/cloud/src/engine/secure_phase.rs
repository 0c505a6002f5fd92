//! A secure round's phases (issue #18). Clients write one row per phase
//! (`SecureRow`); when a phase's rows are in, or its deadline passed, one
//! step closes it: it fixes which rows the phase took (a conditional write
//! on the round row, so the first close is the only one), rebuilds the
//! SecAgg+ server from every row the closed phases took
//! (`crate::secure_replay`), and leaves what the next phase needs in the
//! store: the roster for everyone, each client's forwarded shares or
//! unmask request for it alone, and after the last phase the recovered
//! masks for the tasks that sum the masked inputs.
//!
//! A client the protocol excludes (a malformed key, a share dealt to a
//! stranger, a wrong weight, …) or whose masked input the aggregator cannot
//! use is recorded in the round's rejections with the phase and the reason,
//! and the round goes on; only too few survivors or too few shares fail it
//! (`RoundFailure::SecureAggregation`, naming the phase and who is missing).

use std::collections::BTreeMap;

use fedstep_core::bytes::Input;
use fedstep_core::model::read_header_from;
use fedstep_core::Limits;
use fedstep_secagg::masked_file::MaskedFile;
use fedstep_secagg::model_vector::VectorLayout;
use fedstep_secagg::{Ring, RoundParams};

use super::secure_rows::check_secure_row;
use super::sharded::{blocking, get_json, put_bytes, put_json};
use super::RoundEngine;
use crate::bounded;
use crate::checksum::Sha256Hasher;
use crate::error::{CloudError, Result};
use crate::keys;
use crate::ports::{Clock, Ledger, Notifier, StreamingStore, TaskCallback};
use crate::records::{ClosedSecurePhase, RoundRecord, RoundStatus, SecureAwaiting, SecurePhase};
use crate::round_failure::RoundFailure;
use crate::secure::SecureSettings;
use crate::secure_replay::{
    self, CheckedObject, Participants, PhaseOutput, TakenMessages, TakenPhase,
};

/// What closing a phase did.
#[derive(Debug, Clone, PartialEq)]
pub enum SecurePhaseOutcome {
    /// `phase` is open: its messages are in the store for `survivors`.
    Opened {
        phase: SecurePhase,
        survivors: Vec<String>,
    },
    /// The last phase closed: the masks left in the sum of the `summed`
    /// clients' inputs are at `keys::recovered_masks`.
    Unmasked { summed: Vec<String> },
    /// Too few survivors or shares: the round is FAILED with this.
    Failed(RoundFailure),
}

impl<S, L, N, C, K> RoundEngine<S, L, N, C, K>
where
    S: StreamingStore,
    L: Ledger,
    N: Notifier,
    C: TaskCallback,
    K: Clock,
{
    /// Closes `phase` of secure round `round` and opens the next. Safe to
    /// retry and to run twice at once: whichever close the ledger took
    /// first is what every run replays and publishes.
    pub async fn close_secure_phase(
        &self,
        job_id: &str,
        round: u32,
        phase: SecurePhase,
    ) -> Result<SecurePhaseOutcome> {
        let job = self
            .ledger
            .get_job(job_id)
            .await?
            .ok_or_else(|| CloudError::NotFound(format!("job `{job_id}`")))?;
        let settings = job.secure_aggregation().cloned().ok_or_else(|| {
            CloudError::Invalid(format!("job `{job_id}` has no [secure_aggregation]"))
        })?;
        let mut row = self.secure_round(job_id, round).await?;
        let params = self.round_params(&row, &settings).await?;
        if let Some(failed) = failed(&row) {
            return Ok(failed);
        }
        let closed_before = row.secure_closed.len();
        if closed_before < phase.index() {
            let open = SecurePhase::ALL[closed_before];
            return Err(CloudError::Other(format!(
                "round {job_id}/{round}: phase {phase} cannot close while {open} is open"
            )));
        }
        if closed_before == phase.index() {
            let closing = self.take_phase(&row, phase, &params).await?;
            row = self
                .ledger
                .close_secure_phase(job_id, round, &closing)
                .await?;
            if let Some(failed) = failed(&row) {
                return Ok(failed);
            }
            if row.secure_closed.len() <= phase.index() {
                return Err(CloudError::Other(format!(
                    "round {job_id}/{round} is {:?}: phase {phase} cannot close",
                    row.status
                )));
            }
        }
        let closed = row.secure_closed[..=phase.index()].to_vec();
        let messages = self.taken_messages(&closed).await?;
        let participants = Participants::new(&row.expected_clients);
        let replayed = {
            let participants = participants.clone();
            blocking(move || {
                Ok(secure_replay::replay(
                    params,
                    &participants,
                    &closed,
                    &messages,
                ))
            })
            .await?
        };
        let replayed = match replayed {
            Ok(replayed) => replayed,
            Err(error) => {
                let failure = RoundFailure::secure_aggregation(&error.to_string());
                self.ledger.fail_round(job_id, round, &failure).await?;
                return Ok(SecurePhaseOutcome::Failed(failure));
            }
        };
        for excluded in &replayed.excluded {
            let reason = bounded::reason(&format!(
                "secure aggregation, phase {}: {}",
                excluded.phase, excluded.reason
            ));
            self.ledger
                .record_rejection(job_id, round, &excluded.client, &reason)
                .await?;
        }
        self.publish_phase_output(job_id, round, &participants, &replayed.output)
            .await
    }

    /// The workflow's SecurePhase task: closes `closing` (advertise_keys,
    /// share_keys or masked_input), opens the next phase, and registers
    /// `task_token` for its hand-over, which the stream path answers once
    /// every survivor's row for it is in (or answered here, if they all are
    /// already). A round that fails (too few survivors) is the error the
    /// workflow's failure path takes (`QuorumNotMet`); unmask is closed by
    /// PlanRound, which aggregates what it unmasks.
    pub async fn advance_secure_phase(
        &self,
        job_id: &str,
        round: u32,
        closing: SecurePhase,
        task_token: &str,
    ) -> Result<SecurePhaseOutcome> {
        if closing == SecurePhase::Unmask {
            return Err(CloudError::Invalid(
                "the unmask phase is closed by PlanRound, not by a SecurePhase task".into(),
            ));
        }
        let outcome = self.close_secure_phase(job_id, round, closing).await?;
        match &outcome {
            SecurePhaseOutcome::Opened { phase, survivors } => {
                let awaiting = SecureAwaiting {
                    phase: *phase,
                    clients: survivors.clone(),
                };
                let row = self
                    .ledger
                    .await_secure_phase(job_id, round, &awaiting, task_token)
                    .await?;
                self.secure_hand_over_if_complete(&row).await?;
                Ok(outcome)
            }
            SecurePhaseOutcome::Failed(failure) => Err(failure.clone().into()),
            SecurePhaseOutcome::Unmasked { .. } => Err(CloudError::Other(format!(
                "round {job_id}/{round}: closing {closing} unmasked the sum"
            ))),
        }
    }

    async fn secure_round(&self, job_id: &str, round: u32) -> Result<RoundRecord> {
        self.ledger
            .get_round(job_id, round)
            .await?
            .ok_or_else(|| CloudError::NotFound(format!("round {job_id}/{round}")))
    }

    /// The round's SecAgg+ parameters: the job's settings, and the vector
    /// length of the round's global model (its float tensors, from its
    /// header alone), which every client derives the same way.
    async fn round_params(
        &self,
        row: &RoundRecord,
        settings: &SecureSettings,
    ) -> Result<RoundParams> {
        let key = row.global_model_key.clone();
        let stat = self
            .store
            .stat(&key)
            .await?
            .ok_or_else(|| CloudError::NotFound(format!("the global model `{key}`")))?;
        let reader = self.store.reader(&key, &stat, 0)?;
        let header = blocking(move || {
            read_header_from(&*reader, &Limits::default())
                .map_err(|e| CloudError::Other(format!("the global model `{key}`: {e}")))
        })
        .await?;
        Ok(secure_replay::round_params(
            &row.job_id,
            row.round,
            settings,
            VectorLayout::of(&header).len(),
        ))
    }

    /// Which expected clients' rows for `phase` are in the ledger now, and
    /// which of them the aggregator refuses (a row that breaks a rule, a
    /// masked input it cannot use); the messages of the rest are kept in a
    /// document named by its digest.
    async fn take_phase(
        &self,
        row: &RoundRecord,
        phase: SecurePhase,
        params: &RoundParams,
    ) -> Result<ClosedSecurePhase> {
        let (job_id, round) = (row.job_id.as_str(), row.round);
        let mut taken = Vec::new();
        let mut refused = BTreeMap::new();
        let mut document = TakenPhase {
            phase,
            messages: BTreeMap::new(),
            masked_inputs: BTreeMap::new(),
        };
        for client in Participants::new(&row.expected_clients).names() {
            let Some(secure_row) = self
                .ledger
                .get_secure_row(client, job_id, round, phase)
                .await?
            else {
                continue;
            };
            taken.push(client.clone());
            if let Err(reason) = check_secure_row(&secure_row, row) {
                refused.insert(client.clone(), reason);
                continue;
            }
            if phase == SecurePhase::MaskedInput {
                match self.check_masked_input(row, client, params).await? {
                    Ok(object) => {
                        document.masked_inputs.insert(client.clone(), object);
                    }
                    Err(reason) => {
                        refused.insert(client.clone(), bounded::reason(&reason));
                        continue;
                    }
                }
            }
            document.messages.insert(client.clone(), secure_row.message);
        }
        let bytes = serde_json::to_vec(&document)
            .map_err(|e| CloudError::Other(format!("encoding the {phase} document: {e}")))?;
        let mut digest = Sha256Hasher::default();
        digest.update(&bytes);
        let key = keys::secure_taken(job_id, round, phase, &digest.finish_hex());
        put_bytes(&self.store, &key, bytes).await?;
        Ok(ClosedSecurePhase {
            phase,
            taken,
            refused,
            document: key,
        })
    }

    /// `client`'s masked input as checked (its size and pin), or why it
    /// cannot be summed: the object is missing, or its header does not fit
    /// the round. Checked while the client can still be left out; a read
    /// the store could not serve is the system's failure, retried.
    async fn check_masked_input(
        &self,
        row: &RoundRecord,
        client: &str,
        params: &RoundParams,
    ) -> Result<std::result::Result<CheckedObject, String>> {
        let key = keys::masked_input(&row.job_id, row.round, client);
        let Some(stat) = self.store.stat(&key).await? else {
            return Ok(Err(format!("no masked input at `{key}`")));
        };
        if let Some(why) = &stat.unreadable {
            return Ok(Err(format!(
                "masked input at `{key}` cannot be read: {why}"
            )));
        }
        let reader = self.store.reader(&key, &stat, 0)?;
        let (ring, len): (Ring, u64) = (params.quantization.ring(), params.vector_len);
        let header = blocking(move || {
            match MaskedFile::open(Input::new(reader), ring, len, &Limits::default()) {
                Ok(_) => Ok(Ok(())),
                Err(e) if e.is_unavailable() => Err(CloudError::Transient(e.to_string())),
                Err(e) => Ok(Err(e.to_string())),
            }
        })
        .await?;
        Ok(header.map(|()| CheckedObject {
            key,
            bytes: stat.bytes,
            pin: stat.pin,
        }))
    }

    /// What the closed phases took, from the documents their closes kept.
    async fn taken_messages(&self, closed: &[ClosedSecurePhase]) -> Result<TakenMessages> {
        let mut messages = TakenMessages::new();
        for phase in closed {
            let taken: TakenPhase =
                get_json(&self.store, &phase.document)
                    .await?
                    .ok_or_else(|| {
                        CloudError::Other(format!(
                            "the {} document `{}` the round names is gone",
                            phase.phase, phase.document
                        ))
                    })?;
            messages.insert(phase.phase, taken);
        }
        Ok(messages)
    }

    /// Leaves what the next phase needs in the store.
    async fn publish_phase_output(
        &self,
        job_id: &str,
        round: u32,
        participants: &Participants,
        output: &PhaseOutput,
    ) -> Result<SecurePhaseOutcome> {
        let name = |id: fedstep_secagg::ClientId| -> Result<String> {
            participants
                .name(id)
                .map(str::to_string)
                .ok_or_else(|| CloudError::Other(format!("client {id} is not in the round")))
        };
        match output {
            PhaseOutput::Roster(roster) => {
                put_json(&self.store, &keys::secure_roster(job_id, round), roster).await?;
                let survivors = roster
                    .clients
                    .iter()
                    .map(|c| name(c.client))
                    .collect::<Result<_>>()?;
                Ok(SecurePhaseOutcome::Opened {
                    phase: SecurePhase::ShareKeys,
                    survivors,
                })
            }
            PhaseOutput::Forwarded(forwarded) => {
                let mut survivors = Vec::with_capacity(forwarded.len());
                for shares in forwarded {
                    let to = name(shares.to)?;
                    let key = keys::secure_inbox(job_id, round, SecurePhase::MaskedInput, &to);
                    put_json(&self.store, &key, shares).await?;
                    survivors.push(to);
                }
                Ok(SecurePhaseOutcome::Opened {
                    phase: SecurePhase::MaskedInput,
                    survivors,
                })
            }
            PhaseOutput::Requests(requests) => {
                let mut survivors = Vec::with_capacity(requests.len());
                for request in requests {
                    let to = name(request.to)?;
                    let key = keys::secure_inbox(job_id, round, SecurePhase::Unmask, &to);
                    put_json(&self.store, &key, request).await?;
                    survivors.push(to);
                }
                Ok(SecurePhaseOutcome::Opened {
                    phase: SecurePhase::Unmask,
                    survivors,
                })
            }
            PhaseOutput::Recovered(masks) => {
                put_json(&self.store, &keys::recovered_masks(job_id, round), masks).await?;
                let summed = masks
                    .summed_clients
                    .iter()
                    .map(|&c| name(c))
                    .collect::<Result<_>>()?;
                Ok(SecurePhaseOutcome::Unmasked { summed })
            }
        }
    }
}

/// A FAILED round's outcome; `None` while it is OPEN.
fn failed(row: &RoundRecord) -> Option<SecurePhaseOutcome> {
    (row.status == RoundStatus::Failed).then(|| {
        SecurePhaseOutcome::Failed(
            row.failure
                .clone()
                .unwrap_or_else(|| RoundFailure::Other("failed".into())),
        )
    })
}

/// Reads a document a phase left in the store (the roster, an inbox, the
/// recovered masks); `None` when there is none.
pub async fn read_secure_document<S, T>(store: &S, key: &str) -> Result<Option<T>>
where
    S: StreamingStore,
    T: serde::de::DeserializeOwned + Send + 'static,
{
    get_json(store, key).await
}
