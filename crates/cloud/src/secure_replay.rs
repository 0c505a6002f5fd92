//! A secure round's SecAgg+ server, rebuilt from the ledger at each phase
//! (issue #18).
//!
//! The protocol's server (`fedstep_secagg::Server`) is a state machine in
//! memory, and a serverless round has no memory between its phases: each
//! phase closes in its own task. Storing the server's state between tasks
//! would put every client's keys and every share in transit in one more
//! place, written by one more step that has to be made exactly-once.
//! Instead each step rebuilds it: the server is deterministic, a client's
//! row for a phase is immutable once written (first write wins), and the
//! round row records which rows each closed phase took
//! ([`ClosedSecurePhase`]), so feeding those rows in the same order gives
//! the same server every time. A retried step publishes byte for byte what
//! the first published, and a row written after its phase closed is never
//! read. The messages are replayed from the document the close kept
//! ([`TakenPhase`]), not from the rows: a client may overwrite its own rows
//! (it has PutItem on them), and a replay that read a rewritten key would
//! no longer be the server that published the roster. The cost is reading
//! the earlier phases' documents again: a few KB per client per phase.

use std::collections::BTreeMap;

use fedstep_secagg::messages::{ForwardedShares, Roster, UnmaskRequest};
use fedstep_secagg::{
    ClientId, Exclusion, RecoveredMasks, RoundError, RoundId, RoundParams, Server,
};
use serde::{Deserialize, Serialize};

use crate::records::{ClosedSecurePhase, SecurePhase};
use crate::secure::SecureSettings;

/// The protocol's round id for round `round` of `job_id`: both sides derive
/// the neighbour graph from it, so it is made from public values only.
pub fn round_id(job_id: &str, round: u32) -> RoundId {
    RoundId::new(format!("{job_id}/{round}"))
        .expect("job ids are checked short enough for a round id")
}

/// Round `round`'s SecAgg+ parameters, as the aggregator and every client
/// make them: the job's settings and the length of the round's vector
/// (`fedstep_secagg::model_vector::VectorLayout` of its global model).
pub fn round_params(
    job_id: &str,
    round: u32,
    settings: &SecureSettings,
    vector_len: u64,
) -> RoundParams {
    RoundParams {
        round: round_id(job_id, round),
        neighbours: settings.degree,
        min_clients: settings.min_survivors as usize,
        vector_len,
        quantization: settings.quantization,
    }
}

/// The round's clients and their protocol ids: the expected clients in
/// sorted order, client i being `ClientId(i)`. Everyone derives it from the
/// round's public client list, so no message carries a mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Participants {
    names: Vec<String>,
}

impl Participants {
    pub fn new(expected: &[String]) -> Participants {
        let mut names = expected.to_vec();
        names.sort();
        names.dedup();
        Participants { names }
    }

    pub fn id(&self, name: &str) -> Option<ClientId> {
        self.names
            .binary_search_by(|n| n.as_str().cmp(name))
            .ok()
            .map(|i| ClientId(i as u32))
    }

    pub fn name(&self, id: ClientId) -> Option<&str> {
        self.names.get(id.0 as usize).map(String::as_str)
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }
}

/// What one phase took when it closed, kept where clients cannot write
/// (`crate::keys::secure_taken`): the rows' messages as they were then, and
/// the masked inputs as checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakenPhase {
    pub phase: SecurePhase,
    /// client → its row's message (JSON), refused rows left out.
    pub messages: BTreeMap<String, String>,
    /// masked_input: client → its masked input's object as checked. The
    /// aggregation reads it pinned (S3: by version id), so a client that
    /// replaces the object later changes nothing.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub masked_inputs: BTreeMap<String, CheckedObject>,
}

/// An object's size and pin when it was checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckedObject {
    pub key: String,
    pub bytes: u64,
    /// `crate::ports::ObjectStat::pin`.
    pub pin: Option<String>,
}

/// The taken phases, oldest first.
pub type TakenMessages = BTreeMap<SecurePhase, TakenPhase>;

/// What closing a phase hands on.
#[derive(Debug, Clone, PartialEq)]
pub enum PhaseOutput {
    /// After advertise_keys: every survivor's keys, for everyone.
    Roster(Roster),
    /// After share_keys: each survivor's sealed shares, for it alone.
    Forwarded(Vec<ForwardedShares>),
    /// After masked_input: what each summed client is to reveal.
    Requests(Vec<UnmaskRequest>),
    /// After unmask: the masks left in the sum, for the aggregation.
    Recovered(RecoveredMasks),
}

/// A client left out of the rest of the round, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Excluded {
    pub client: String,
    pub phase: fedstep_secagg::Phase,
    pub reason: String,
}

/// The server after the replay: what the last phase closed with and every
/// exclusion so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Replayed {
    pub output: PhaseOutput,
    pub excluded: Vec<Excluded>,
    /// Shares that rebuild a secret (t).
    pub threshold: usize,
}

/// Feeds the server every message the closed phases took, phase by phase,
/// and closes each. `closed` is the round row's `secure_closed` (the last
/// entry is the phase to report on); `messages` holds the rows' JSON. A
/// client the aggregator refused in a phase (its masked input unreadable:
/// `ClosedSecurePhase::refused`) is not fed, so the protocol treats it as
/// dropped, and is reported excluded with the aggregator's reason.
pub fn replay(
    params: RoundParams,
    participants: &Participants,
    closed: &[ClosedSecurePhase],
    messages: &TakenMessages,
) -> Result<Replayed, RoundError> {
    let mut server = Server::new(params);
    let mut refused = Vec::new();
    let mut output = None;
    for phase in closed {
        let taken = messages.get(&phase.phase).map(|t| &t.messages);
        for name in &phase.taken {
            if let Some(reason) = phase.refused.get(name) {
                refused.push(Excluded {
                    client: name.clone(),
                    phase: phase.phase.protocol_phase(),
                    reason: reason.clone(),
                });
                continue;
            }
            let (Some(id), Some(json)) = (participants.id(name), taken.and_then(|t| t.get(name)))
            else {
                // Not a participant (the engine takes only expected
                // clients), or a row the caller did not load: left out,
                // as if it had not arrived.
                continue;
            };
            match phase.phase {
                SecurePhase::AdvertiseKeys => server.receive_advertise_keys_json(id, json),
                SecurePhase::ShareKeys => server.receive_share_keys_json(id, json),
                SecurePhase::MaskedInput => server.receive_masked_input_json(id, json),
                SecurePhase::Unmask => server.receive_unmask_json(id, json),
            }
        }
        output = Some(match phase.phase {
            SecurePhase::AdvertiseKeys => PhaseOutput::Roster(server.close_advertise_keys()?),
            SecurePhase::ShareKeys => PhaseOutput::Forwarded(server.close_share_keys()?),
            SecurePhase::MaskedInput => PhaseOutput::Requests(server.close_masked_input()?),
            SecurePhase::Unmask => PhaseOutput::Recovered(server.close_unmask()?),
        });
    }
    let output = output.ok_or(RoundError::OutOfOrder {
        expected: fedstep_secagg::Phase::AdvertiseKeys,
        got: fedstep_secagg::Phase::Done,
    })?;
    let mut excluded: Vec<Excluded> = server
        .exclusions()
        .iter()
        .map(|e: &Exclusion| Excluded {
            client: participants
                .name(e.client)
                .map_or_else(|| e.client.to_string(), str::to_string),
            phase: e.phase,
            reason: e.reason.clone(),
        })
        .collect();
    excluded.extend(refused);
    Ok(Replayed {
        output,
        excluded,
        threshold: server.threshold(),
    })
}
