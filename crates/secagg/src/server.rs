//! The server's side of a round: one `receive_*` per incoming message and one
//! `close_*` per phase, tracking who survives each phase.
//!
//! Every message is untrusted. A message that is malformed, claims another
//! sender, repeats, names a non-neighbour, carries a low-order key, a wrong
//! weight or length, or a share dealt to someone else makes its sender an
//! [`Exclusion`] with a bounded reason; the round goes on without that
//! client. (A client excluded after it sent its masked input stays in the
//! sum: its vector is already there, and its self-mask is recovered from its
//! neighbours' shares.) Only a phase that closes with too few survivors, or a
//! secret that too few shares survive to reconstruct, fails the round.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::bytes::FixedBytes;
use crate::graph::NeighbourGraph;
use crate::ids::{bounded_reason, ClientId};
use crate::keys::{is_low_order, KeyPair, Purpose};
use crate::messages::{
    AdvertiseKeys, ForwardedShares, MaskedInput, ReceivedShare, Roster, ShareKeys, ShareOf, Unmask,
    UnmaskRequest,
};
use crate::params::{threshold_for_degree, RoundParams};
use crate::prg::MaskSign;
use crate::recovered::{MaskCorrection, RecoveredMasks};
use crate::shamir::{self, ShamirShare, MAX_SHARES};

/// The four phases, and after them the end of the round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// 1: clients advertise public keys.
    AdvertiseKeys,
    /// 2: clients deal sealed shares to their neighbours.
    ShareKeys,
    /// 3: clients send masked inputs.
    MaskedInput,
    /// 4: clients reveal shares so the server can remove the masks.
    Unmask,
    /// The round is over (closed or failed).
    Done,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Phase::AdvertiseKeys => "advertise_keys",
            Phase::ShareKeys => "share_keys",
            Phase::MaskedInput => "masked_input",
            Phase::Unmask => "unmask",
            Phase::Done => "done",
        };
        f.write_str(name)
    }
}

/// A client left out of the rest of the round, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exclusion {
    /// Who.
    pub client: ClientId,
    /// The phase whose message (or whose check) excluded it.
    pub phase: Phase,
    /// Why, at most [`crate::ids::MAX_REASON_LEN`] characters.
    pub reason: String,
}

/// Why the round cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum RoundError {
    /// A phase closed with fewer survivors than the round needs.
    #[error("phase {phase}: {have} clients survived, {needed} needed; missing {missing:?}")]
    TooFewClients {
        /// The phase that closed.
        phase: Phase,
        /// The minimum.
        needed: usize,
        /// The survivors.
        have: usize,
        /// The previous phase's survivors that did not survive this one.
        missing: Vec<ClientId>,
    },
    /// Too few shares of a client's secret arrived in phase 4.
    #[error("cannot reconstruct client {client}'s secret: {have} shares, {needed} needed")]
    CannotReconstruct {
        /// Whose secret.
        client: ClientId,
        /// Valid shares received.
        have: usize,
        /// The threshold.
        needed: usize,
    },
    /// Shares reconstructed a secret key that does not match the client's
    /// advertised public key: some share was wrong.
    #[error("reconstructed secret key of client {client} does not match its advertised key")]
    KeyMismatch {
        /// Whose key.
        client: ClientId,
    },
    /// A close or message for a phase other than the open one: a caller bug.
    #[error("phase {got} called while phase {expected} is open")]
    OutOfOrder {
        /// The open phase.
        expected: Phase,
        /// The phase called.
        got: Phase,
    },
}

/// The server's state for one round.
pub struct Server {
    params: RoundParams,
    phase: Phase,
    exclusions: Vec<Exclusion>,
    excluded: BTreeSet<ClientId>,
    advertised: BTreeMap<ClientId, AdvertiseKeys>,
    graph: NeighbourGraph,
    threshold: usize,
    share_keys: BTreeMap<ClientId, ShareKeys>,
    masked: BTreeMap<ClientId, MaskedInput>,
    /// For each summed client, the neighbours it masked with.
    partners: BTreeMap<ClientId, BTreeSet<ClientId>>,
    summed: BTreeSet<ClientId>,
    requests: BTreeMap<ClientId, UnmaskRequest>,
    unmasks: BTreeMap<ClientId, Unmask>,
}

impl Server {
    /// A round in phase 1.
    pub fn new(params: RoundParams) -> Self {
        let graph = NeighbourGraph::new(&params.round, &[], params.neighbours);
        Server {
            params,
            phase: Phase::AdvertiseKeys,
            exclusions: Vec::new(),
            excluded: BTreeSet::new(),
            advertised: BTreeMap::new(),
            graph,
            threshold: 0,
            share_keys: BTreeMap::new(),
            masked: BTreeMap::new(),
            partners: BTreeMap::new(),
            summed: BTreeSet::new(),
            requests: BTreeMap::new(),
            unmasks: BTreeMap::new(),
        }
    }

    /// The open phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Every exclusion so far, in order.
    pub fn exclusions(&self) -> &[Exclusion] {
        &self.exclusions
    }

    /// The neighbour graph (empty before phase 1 closes).
    pub fn graph(&self) -> &NeighbourGraph {
        &self.graph
    }

    /// The Shamir threshold (0 before phase 1 closes).
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    fn exclude(&mut self, client: ClientId, phase: Phase, reason: impl AsRef<str>) {
        if self.excluded.insert(client) {
            self.exclusions.push(Exclusion {
                client,
                phase,
                reason: bounded_reason(reason),
            });
        }
    }

    /// Common checks of an incoming message: the open phase, the sender the
    /// transport vouches for, exclusion, membership in the previous phase,
    /// and repetition. Returns whether to go on.
    fn admit(
        &mut self,
        phase: Phase,
        sender: ClientId,
        claimed: ClientId,
        eligible: bool,
        seen: bool,
    ) -> bool {
        if self.excluded.contains(&sender) {
            return false;
        }
        if phase != self.phase {
            self.exclude(
                sender,
                self.phase,
                format!("{phase} message arrived while phase {} is open", self.phase),
            );
            return false;
        }
        if claimed != sender {
            self.exclude(
                sender,
                phase,
                format!("message claims to be from client {claimed}"),
            );
            return false;
        }
        if !eligible {
            self.exclude(sender, phase, "did not survive the previous phase");
            return false;
        }
        if seen {
            self.exclude(sender, phase, "duplicate message");
            return false;
        }
        true
    }

    fn parse<T: serde::de::DeserializeOwned>(
        &mut self,
        phase: Phase,
        sender: ClientId,
        json: &str,
    ) -> Option<T> {
        match serde_json::from_str(json) {
            Ok(message) => Some(message),
            Err(e) => {
                self.exclude(sender, phase, format!("malformed {phase} message: {e}"));
                None
            }
        }
    }

    fn open(&self, phase: Phase) -> Result<(), RoundError> {
        if self.phase != phase {
            return Err(RoundError::OutOfOrder {
                expected: self.phase,
                got: phase,
            });
        }
        Ok(())
    }

    fn too_few(
        &mut self,
        phase: Phase,
        have: &BTreeSet<ClientId>,
        before: &BTreeSet<ClientId>,
    ) -> RoundError {
        self.phase = Phase::Done;
        RoundError::TooFewClients {
            phase,
            needed: self.params.min_clients,
            have: have.len(),
            missing: before.difference(have).copied().collect(),
        }
    }

    // ---- Phase 1 -------------------------------------------------------

    /// Phase 1 message as JSON from the transport-authenticated `sender`.
    pub fn receive_advertise_keys_json(&mut self, sender: ClientId, json: &str) {
        if let Some(m) = self.parse(Phase::AdvertiseKeys, sender, json) {
            self.receive_advertise_keys(sender, m);
        }
    }

    /// Phase 1 message from the transport-authenticated `sender`.
    pub fn receive_advertise_keys(&mut self, sender: ClientId, message: AdvertiseKeys) {
        let seen = self.advertised.contains_key(&sender);
        if !self.admit(Phase::AdvertiseKeys, sender, message.client, true, seen) {
            if seen && self.excluded.contains(&sender) {
                self.advertised.remove(&sender);
            }
            return;
        }
        for (name, key) in [("c_pk", &message.c_pk), ("s_pk", &message.s_pk)] {
            if is_low_order(key) {
                self.exclude(
                    sender,
                    Phase::AdvertiseKeys,
                    format!("{name} is a low-order point"),
                );
                return;
            }
        }
        if message.c_pk == message.s_pk {
            self.exclude(
                sender,
                Phase::AdvertiseKeys,
                "c_pk and s_pk are the same key",
            );
            return;
        }
        let copied = self.advertised.values().find(|other| {
            [&other.c_pk, &other.s_pk]
                .iter()
                .any(|k| **k == message.c_pk || **k == message.s_pk)
        });
        if let Some(other) = copied {
            let reason = format!("reuses a public key of client {}", other.client);
            self.exclude(sender, Phase::AdvertiseKeys, reason);
            return;
        }
        self.advertised.insert(sender, message);
    }

    /// Closes phase 1: the roster of clients that advertised valid keys.
    pub fn close_advertise_keys(&mut self) -> Result<Roster, RoundError> {
        self.open(Phase::AdvertiseKeys)?;
        let survivors: BTreeSet<ClientId> = self.advertised.keys().copied().collect();
        // Fewer than 3 clients leave a neighbourhood too small for t >= 2.
        let needed = self.params.min_clients.max(3);
        if survivors.len() < needed {
            let excluded = self.excluded.clone();
            let mut error = self.too_few(Phase::AdvertiseKeys, &survivors, &excluded);
            if let RoundError::TooFewClients { needed: n, .. } = &mut error {
                *n = needed;
            }
            return Err(error);
        }
        let ids: Vec<ClientId> = survivors.iter().copied().collect();
        self.graph = NeighbourGraph::new(&self.params.round, &ids, self.params.neighbours);
        self.threshold = threshold_for_degree(self.graph.degree());
        if self.graph.degree() > MAX_SHARES {
            // More than 255 neighbours cannot be dealt GF(256) shares.
            self.phase = Phase::Done;
            return Err(RoundError::TooFewClients {
                phase: Phase::AdvertiseKeys,
                needed: MAX_SHARES,
                have: self.graph.degree(),
                missing: Vec::new(),
            });
        }
        self.phase = Phase::ShareKeys;
        Ok(Roster {
            round: self.params.round.clone(),
            clients: self.advertised.values().cloned().collect(),
        })
    }

    // ---- Phase 2 -------------------------------------------------------

    /// Phase 2 message as JSON from the transport-authenticated `sender`.
    pub fn receive_share_keys_json(&mut self, sender: ClientId, json: &str) {
        if let Some(m) = self.parse(Phase::ShareKeys, sender, json) {
            self.receive_share_keys(sender, m);
        }
    }

    /// Phase 2 message from the transport-authenticated `sender`: exactly
    /// one sealed bundle for each of its neighbours.
    pub fn receive_share_keys(&mut self, sender: ClientId, message: ShareKeys) {
        let seen = self.share_keys.contains_key(&sender);
        let eligible = self.advertised.contains_key(&sender);
        if !self.admit(Phase::ShareKeys, sender, message.from, eligible, seen) {
            if seen && self.excluded.contains(&sender) {
                self.share_keys.remove(&sender);
            }
            return;
        }
        let mut recipients = BTreeSet::new();
        for share in &message.shares {
            if !self.graph.are_neighbours(sender, share.to) {
                self.exclude(
                    sender,
                    Phase::ShareKeys,
                    format!("share addressed to non-neighbour {}", share.to),
                );
                return;
            }
            if !recipients.insert(share.to) {
                self.exclude(
                    sender,
                    Phase::ShareKeys,
                    format!("two shares addressed to {}", share.to),
                );
                return;
            }
        }
        let missing: Vec<ClientId> = self
            .graph
            .neighbours_of(sender)
            .filter(|c| !recipients.contains(c))
            .collect();
        if !missing.is_empty() {
            self.exclude(
                sender,
                Phase::ShareKeys,
                format!("no share for neighbours {missing:?}"),
            );
            return;
        }
        self.share_keys.insert(sender, message);
    }

    /// Closes phase 2: each survivor gets the bundles its surviving
    /// neighbours addressed to it.
    pub fn close_share_keys(&mut self) -> Result<Vec<ForwardedShares>, RoundError> {
        self.open(Phase::ShareKeys)?;
        let survivors: BTreeSet<ClientId> = self.share_keys.keys().copied().collect();
        if survivors.len() < self.params.min_clients {
            let before = self.advertised.keys().copied().collect();
            return Err(self.too_few(Phase::ShareKeys, &survivors, &before));
        }
        let mut forwarded: BTreeMap<ClientId, Vec<ReceivedShare>> =
            survivors.iter().map(|&c| (c, Vec::new())).collect();
        for (from, message) in &self.share_keys {
            for share in &message.shares {
                if let Some(inbox) = forwarded.get_mut(&share.to) {
                    inbox.push(ReceivedShare {
                        from: *from,
                        ciphertext: share.ciphertext.clone(),
                    });
                }
            }
        }
        self.phase = Phase::MaskedInput;
        Ok(forwarded
            .into_iter()
            .map(|(to, shares)| ForwardedShares { to, shares })
            .collect())
    }

    // ---- Phase 3 -------------------------------------------------------

    /// Phase 3 message as JSON from the transport-authenticated `sender`.
    pub fn receive_masked_input_json(&mut self, sender: ClientId, json: &str) {
        if let Some(m) = self.parse(Phase::MaskedInput, sender, json) {
            self.receive_masked_input(sender, m);
        }
    }

    /// Phase 3 message from the transport-authenticated `sender`. The vector
    /// itself travels separately; whoever receives it must check that it has
    /// `vector_len` ring elements (`Ring::contains`) before summing it.
    pub fn receive_masked_input(&mut self, sender: ClientId, message: MaskedInput) {
        let seen = self.masked.contains_key(&sender);
        let eligible = self.share_keys.contains_key(&sender);
        if !self.admit(Phase::MaskedInput, sender, message.client, eligible, seen) {
            if seen && self.excluded.contains(&sender) {
                self.masked.remove(&sender);
            }
            return;
        }
        if let Err(e) = self.params.quantization.check_weight(message.weight) {
            self.exclude(sender, Phase::MaskedInput, e.to_string());
            return;
        }
        if message.vector_len != self.params.vector_len {
            let reason = format!(
                "vector has {} elements, the round's have {}",
                message.vector_len, self.params.vector_len
            );
            self.exclude(sender, Phase::MaskedInput, reason);
            return;
        }
        let mut accused = BTreeSet::new();
        for complaint in &message.rejected_shares {
            let forwarded = self.graph.are_neighbours(sender, complaint.from)
                && self.share_keys.contains_key(&complaint.from);
            if !forwarded || !accused.insert(complaint.from) {
                let reason = format!(
                    "complains about client {}, who sent it no share",
                    complaint.from
                );
                self.exclude(sender, Phase::MaskedInput, reason);
                return;
            }
        }
        self.masked.insert(sender, message);
    }

    /// Closes phase 3: excludes the dealers of shares that did not open,
    /// fixes the set of summed clients, and asks each of them for the shares
    /// that remove the remaining masks.
    pub fn close_masked_input(&mut self) -> Result<Vec<UnmaskRequest>, RoundError> {
        self.open(Phase::MaskedInput)?;
        let complaints: Vec<(ClientId, ClientId, String)> = self
            .masked
            .values()
            .flat_map(|m| {
                m.rejected_shares
                    .iter()
                    .map(|c| (c.from, m.client, c.reason.clone()))
            })
            .collect();
        for (dealer, recipient, reason) in complaints {
            let reason = format!("share to client {recipient} rejected: {reason}");
            self.exclude(dealer, Phase::ShareKeys, reason);
        }
        let shared: BTreeSet<ClientId> = self.share_keys.keys().copied().collect();
        self.summed = self
            .masked
            .keys()
            .copied()
            .filter(|c| !self.excluded.contains(c))
            .collect();
        if self.summed.len() < self.params.min_clients {
            let summed = self.summed.clone();
            return Err(self.too_few(Phase::MaskedInput, &summed, &shared));
        }
        for &client in &self.summed {
            let rejected: BTreeSet<ClientId> = self.masked[&client]
                .rejected_shares
                .iter()
                .map(|c| c.from)
                .collect();
            let partners = self
                .graph
                .neighbours_of(client)
                .filter(|v| shared.contains(v) && !rejected.contains(v))
                .collect();
            self.partners.insert(client, partners);
        }
        for (&client, partners) in &self.partners {
            let (self_mask_of, secret_key_of): (Vec<ClientId>, Vec<ClientId>) =
                partners.iter().partition(|v| self.summed.contains(v));
            self.requests.insert(
                client,
                UnmaskRequest {
                    to: client,
                    self_mask_of,
                    secret_key_of,
                },
            );
        }
        self.phase = Phase::Unmask;
        Ok(self.requests.values().cloned().collect())
    }

    // ---- Phase 4 -------------------------------------------------------

    /// Phase 4 message as JSON from the transport-authenticated `sender`.
    pub fn receive_unmask_json(&mut self, sender: ClientId, json: &str) {
        if let Some(m) = self.parse(Phase::Unmask, sender, json) {
            self.receive_unmask(sender, m);
        }
    }

    /// Phase 4 message from the transport-authenticated `sender`: only the
    /// requested shares, each with the x-coordinate it was dealt with.
    pub fn receive_unmask(&mut self, sender: ClientId, message: Unmask) {
        let seen = self.unmasks.contains_key(&sender);
        let Some(request) = self.requests.get(&sender).cloned() else {
            self.admit(Phase::Unmask, sender, message.client, false, seen);
            return;
        };
        if !self.admit(Phase::Unmask, sender, message.client, true, seen) {
            if seen && self.excluded.contains(&sender) {
                self.unmasks.remove(&sender);
            }
            return;
        }
        for (kind, shares, requested) in [
            (
                "self-mask",
                &message.self_mask_shares,
                &request.self_mask_of,
            ),
            (
                "secret-key",
                &message.secret_key_shares,
                &request.secret_key_of,
            ),
        ] {
            let mut given = BTreeSet::new();
            for ShareOf { of_client, share } in shares {
                if !requested.contains(of_client) || !given.insert(*of_client) {
                    let reason =
                        format!("unrequested or repeated {kind} share of client {of_client}");
                    self.exclude(sender, Phase::Unmask, reason);
                    return;
                }
                if self.graph.share_coordinate(*of_client, sender)
                    != Some(shamir::x_coordinate(share))
                {
                    let reason = format!(
                        "{kind} share of client {of_client} has another holder's coordinate"
                    );
                    self.exclude(sender, Phase::Unmask, reason);
                    return;
                }
            }
        }
        self.unmasks.insert(sender, message);
    }

    fn shares_of(&self, client: ClientId, pick: fn(&Unmask) -> &Vec<ShareOf>) -> Vec<ShamirShare> {
        self.unmasks
            .iter()
            .filter(|(holder, _)| !self.excluded.contains(holder))
            .flat_map(|(_, m)| {
                pick(m)
                    .iter()
                    .filter(|s| s.of_client == client)
                    .map(|s| s.share.clone())
            })
            .collect()
    }

    fn reconstruct(
        &self,
        client: ClientId,
        shares: &[ShamirShare],
    ) -> Result<crate::keys::Secret32, RoundError> {
        shamir::reconstruct(shares, self.threshold).map_err(|_| RoundError::CannotReconstruct {
            client,
            have: shares.len(),
            needed: self.threshold,
        })
    }

    /// Closes phase 4: reconstructs the summed clients' self-mask seeds and
    /// the `s` secret keys of their partners that are not summed, and turns
    /// both into mask corrections for the sum.
    pub fn close_unmask(&mut self) -> Result<RecoveredMasks, RoundError> {
        self.open(Phase::Unmask)?;
        self.phase = Phase::Done;
        let mut corrections = Vec::new();
        for &client in &self.summed {
            let seed =
                self.reconstruct(client, &self.shares_of(client, |m| &m.self_mask_shares))?;
            corrections.push(MaskCorrection {
                seed: FixedBytes(*seed),
                sign: MaskSign::Subtract,
            });
        }
        let dropped: BTreeSet<ClientId> = self
            .partners
            .values()
            .flatten()
            .copied()
            .filter(|v| !self.summed.contains(v))
            .collect();
        for dropped_client in dropped {
            let secret = self.reconstruct(
                dropped_client,
                &self.shares_of(dropped_client, |m| &m.secret_key_shares),
            )?;
            let keys = KeyPair::from_secret_bytes(*secret);
            if keys.public_bytes() != self.advertised[&dropped_client].s_pk {
                return Err(RoundError::KeyMismatch {
                    client: dropped_client,
                });
            }
            for (&survivor, partners) in &self.partners {
                if !partners.contains(&dropped_client) {
                    continue;
                }
                let seed = keys
                    .derive_pairwise(
                        &self.advertised[&survivor].s_pk,
                        Purpose::PairwiseMask,
                        &self.params.round,
                        dropped_client,
                        survivor,
                    )
                    .map_err(|_| RoundError::KeyMismatch { client: survivor })?;
                // The survivor added the mask if its id is the smaller one.
                let applied = if survivor < dropped_client {
                    MaskSign::Add
                } else {
                    MaskSign::Subtract
                };
                corrections.push(MaskCorrection {
                    seed: FixedBytes(*seed),
                    sign: applied.opposite(),
                });
            }
        }
        Ok(RecoveredMasks {
            quantization: self.params.quantization,
            vector_len: self.params.vector_len,
            summed_clients: self.summed.iter().copied().collect(),
            total_weight: self.summed.iter().map(|c| self.masked[c].weight).sum(),
            corrections,
        })
    }
}
