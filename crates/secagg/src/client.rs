//! The client's side of a round, as a chain of states each consumed by the
//! next phase: [`Client`] (keys made) → [`SharedClient`] (shares dealt) →
//! [`MaskedClient`] (masked input sent, holding neighbours' shares).
//!
//! Inputs from the server are checked as well: the server is trusted to
//! follow the protocol (honest-but-curious), but a roster or request that
//! could only come from a broken or lying server is refused with an error
//! rather than acted on, and in particular a request that would unmask one
//! client's individual input is refused.

use std::collections::{BTreeMap, BTreeSet};

use rand_core::{CryptoRng, RngCore};

use crate::graph::NeighbourGraph;
use crate::ids::{bounded_reason, ClientId};
use crate::keys::{KeyPair, PublicKeyBytes, Purpose, Secret32};
use crate::messages::{
    AddressedShare, AdvertiseKeys, ForwardedShares, MaskedInput, Roster, ShareComplaint, ShareKeys,
    ShareOf, Unmask, UnmaskRequest,
};
use crate::params::{threshold_for_degree, RoundParams};
use crate::prg::{apply_mask, MaskSign};
use crate::quantize::QuantizationError;
use crate::sealed_share::{open, seal, SharePair};
use crate::shamir::{self, ShamirError, MAX_SHARES};

/// Why a client refuses to go on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    /// The roster is for another round.
    #[error("roster is for round {got:?}, not {expected:?}")]
    WrongRound {
        /// Ours.
        expected: String,
        /// The roster's.
        got: String,
    },
    /// The roster leaves us out or has other keys for us.
    #[error("roster does not list this client with its own keys")]
    NotInRoster,
    /// The roster names a client twice.
    #[error("roster lists client {0} twice")]
    DuplicateInRoster(ClientId),
    /// Fewer clients than the round's minimum.
    #[error("roster has {have} clients, the round needs {needed}")]
    RosterTooSmall {
        /// In the roster.
        have: usize,
        /// min_clients.
        needed: usize,
    },
    /// The neighbourhood is too small or too large for Shamir sharing.
    #[error("a neighbourhood of {degree} cannot hold {threshold}-of-{degree} shares (at most {MAX_SHARES})")]
    Neighbourhood {
        /// The graph degree.
        degree: usize,
        /// The threshold.
        threshold: usize,
    },
    /// A neighbour's public key is a low-order point.
    #[error("client {0} advertised a low-order public key")]
    BadPeerKey(ClientId),
    /// A message addressed to another client.
    #[error("message is addressed to client {got}, this is client {expected}")]
    WrongRecipient {
        /// Us.
        expected: ClientId,
        /// The message's recipient.
        got: ClientId,
    },
    /// Forwarded shares from a client that is not a neighbour, or twice.
    #[error("forwarded share from client {0}, who is not a neighbour or was forwarded twice")]
    UnexpectedShare(ClientId),
    /// The input vector's length differs from the round's.
    #[error("input has {got} values, the round's vectors have {expected}")]
    WrongLength {
        /// vector_len.
        expected: u64,
        /// The input's.
        got: u64,
    },
    /// Weight or encoding problem.
    #[error(transparent)]
    Quantization(#[from] QuantizationError),
    /// Sharing failed.
    #[error(transparent)]
    Shamir(#[from] ShamirError),
    /// Asked for both the self-mask share and the secret-key share of the
    /// same client: together they would unmask that client's input.
    #[error("asked to reveal both the self-mask and the secret-key share of clients {0:?}")]
    RevealBoth(Vec<ClientId>),
}

/// Phase 1: a client with fresh keys and a fresh self-mask seed.
pub struct Client {
    id: ClientId,
    params: RoundParams,
    c_keys: KeyPair,
    s_keys: KeyPair,
    self_mask_seed: Secret32,
}

impl Client {
    /// New keys and self-mask seed for `id` in the round `params`.
    pub fn new<R: RngCore + CryptoRng>(id: ClientId, params: RoundParams, rng: &mut R) -> Self {
        let c_keys = KeyPair::generate(rng);
        let s_keys = KeyPair::generate(rng);
        let mut seed = Secret32::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        Client {
            id,
            params,
            c_keys,
            s_keys,
            self_mask_seed: seed,
        }
    }

    /// This client's id.
    pub fn id(&self) -> ClientId {
        self.id
    }

    /// Phase 1's message.
    pub fn advertise(&self) -> AdvertiseKeys {
        AdvertiseKeys {
            client: self.id,
            c_pk: self.c_keys.public_bytes(),
            s_pk: self.s_keys.public_bytes(),
        }
    }

    /// Phase 2: checks the roster, deals t-of-d shares of the `s` secret key
    /// and of the self-mask seed to the d neighbours, and seals each pair.
    pub fn share_keys<R: RngCore + CryptoRng>(
        self,
        roster: &Roster,
        rng: &mut R,
    ) -> Result<(SharedClient, ShareKeys), ClientError> {
        if roster.round != self.params.round {
            return Err(ClientError::WrongRound {
                expected: self.params.round.as_str().to_owned(),
                got: roster.round.as_str().to_owned(),
            });
        }
        let mut keys: BTreeMap<ClientId, AdvertiseKeys> = BTreeMap::new();
        for entry in &roster.clients {
            if keys.insert(entry.client, entry.clone()).is_some() {
                return Err(ClientError::DuplicateInRoster(entry.client));
            }
        }
        if keys.get(&self.id) != Some(&self.advertise()) {
            return Err(ClientError::NotInRoster);
        }
        if keys.len() < self.params.min_clients {
            return Err(ClientError::RosterTooSmall {
                have: keys.len(),
                needed: self.params.min_clients,
            });
        }
        let ids: Vec<ClientId> = keys.keys().copied().collect();
        let graph = NeighbourGraph::new(&self.params.round, &ids, self.params.neighbours);
        let degree = graph.degree();
        let threshold = threshold_for_degree(degree);
        if degree < threshold || degree > MAX_SHARES {
            return Err(ClientError::Neighbourhood { degree, threshold });
        }
        let neighbours: Vec<ClientId> = graph.neighbours_of(self.id).collect();
        let self_mask_shares =
            shamir::split(&self.self_mask_seed, threshold, neighbours.len(), rng)?;
        let secret_key_shares = shamir::split(
            &self.s_keys.secret_bytes(),
            threshold,
            neighbours.len(),
            rng,
        )?;
        let mut shares = Vec::with_capacity(neighbours.len());
        for ((&to, self_mask), secret_key) in neighbours
            .iter()
            .zip(self_mask_shares)
            .zip(secret_key_shares)
        {
            let key = self
                .c_keys
                .derive_pairwise(
                    &keys[&to].c_pk,
                    Purpose::ShareEncryption,
                    &self.params.round,
                    self.id,
                    to,
                )
                .map_err(|_| ClientError::BadPeerKey(to))?;
            let pair = SharePair {
                self_mask,
                secret_key,
            };
            shares.push(AddressedShare {
                to,
                ciphertext: seal(&key, &self.params.round, self.id, to, &pair),
            });
        }
        let peers = keys.into_iter().map(|(id, k)| (id, k.s_pk)).collect();
        let shared = SharedClient {
            id: self.id,
            params: self.params,
            c_keys: self.c_keys,
            s_keys: self.s_keys,
            self_mask_seed: self.self_mask_seed,
            graph,
            peers_s_pk: peers,
            peers_c_pk: roster
                .clients
                .iter()
                .map(|k| (k.client, k.c_pk.clone()))
                .collect(),
        };
        Ok((
            shared,
            ShareKeys {
                from: self.id,
                shares,
            },
        ))
    }
}

/// Phase 2 done: the client has dealt its shares.
pub struct SharedClient {
    id: ClientId,
    params: RoundParams,
    c_keys: KeyPair,
    s_keys: KeyPair,
    self_mask_seed: Secret32,
    graph: NeighbourGraph,
    peers_s_pk: BTreeMap<ClientId, PublicKeyBytes>,
    peers_c_pk: BTreeMap<ClientId, PublicKeyBytes>,
}

impl SharedClient {
    /// Phase 3: opens the forwarded shares, then returns the masked input's
    /// metadata and the masked vector
    /// `w·q(x) + PRG(b_u) + Σ_{v > u} PRG(s_uv) − Σ_{v < u} PRG(s_uv)` over
    /// the neighbours `v` whose shares opened. A share that does not open is
    /// reported in the message (its dealer is not masked with).
    pub fn mask_input(
        self,
        forwarded: &ForwardedShares,
        values: &[f32],
        weight: u64,
    ) -> Result<(MaskedClient, MaskedInput, Vec<u64>), ClientError> {
        if forwarded.to != self.id {
            return Err(ClientError::WrongRecipient {
                expected: self.id,
                got: forwarded.to,
            });
        }
        if values.len() as u64 != self.params.vector_len {
            return Err(ClientError::WrongLength {
                expected: self.params.vector_len,
                got: values.len() as u64,
            });
        }
        let q = self.params.quantization;
        let ring = q.ring();
        let mut vector = q.quantize(values, weight)?;
        let round = &self.params.round;

        let mut held: BTreeMap<ClientId, SharePair> = BTreeMap::new();
        let mut complaints = Vec::new();
        let mut seen = BTreeSet::new();
        for received in &forwarded.shares {
            let from = received.from;
            if !self.graph.are_neighbours(self.id, from) || !seen.insert(from) {
                return Err(ClientError::UnexpectedShare(from));
            }
            let Ok(key) = self.c_keys.derive_pairwise(
                &self.peers_c_pk[&from],
                Purpose::ShareEncryption,
                round,
                self.id,
                from,
            ) else {
                complaints.push(complaint(from, "c public key is a low-order point"));
                continue;
            };
            let Ok(pair) = open(&key, round, from, self.id, &received.ciphertext) else {
                complaints.push(complaint(from, "sealed share failed to decrypt"));
                continue;
            };
            let Ok(seed) = self.s_keys.derive_pairwise(
                &self.peers_s_pk[&from],
                Purpose::PairwiseMask,
                round,
                self.id,
                from,
            ) else {
                complaints.push(complaint(from, "s public key is a low-order point"));
                continue;
            };
            let sign = if self.id < from {
                MaskSign::Add
            } else {
                MaskSign::Subtract
            };
            apply_mask(&seed, sign, 0, &mut vector, ring);
            held.insert(from, pair);
        }
        apply_mask(&self.self_mask_seed, MaskSign::Add, 0, &mut vector, ring);
        let message = MaskedInput {
            client: self.id,
            weight,
            vector_len: self.params.vector_len,
            rejected_shares: complaints,
        };
        Ok((MaskedClient { id: self.id, held }, message, vector))
    }
}

fn complaint(from: ClientId, reason: &str) -> ShareComplaint {
    ShareComplaint {
        from,
        reason: bounded_reason(reason),
    }
}

/// Phase 3 done: the client holds its neighbours' shares until asked.
pub struct MaskedClient {
    id: ClientId,
    held: BTreeMap<ClientId, SharePair>,
}

impl MaskedClient {
    /// The clients whose shares this client holds.
    pub fn holds_shares_of(&self) -> impl Iterator<Item = ClientId> + '_ {
        self.held.keys().copied()
    }

    /// Phase 4: reveals the requested shares it holds. Refuses a request
    /// naming the same client under both kinds: the self-mask seed and the
    /// `s` secret key of one client unmask its individual input.
    pub fn unmask(&self, request: &UnmaskRequest) -> Result<Unmask, ClientError> {
        if request.to != self.id {
            return Err(ClientError::WrongRecipient {
                expected: self.id,
                got: request.to,
            });
        }
        let self_mask_of: BTreeSet<ClientId> = request.self_mask_of.iter().copied().collect();
        let both: Vec<ClientId> = request
            .secret_key_of
            .iter()
            .copied()
            .filter(|c| self_mask_of.contains(c))
            .collect();
        if !both.is_empty() {
            return Err(ClientError::RevealBoth(both));
        }
        let pick = |clients: &mut dyn Iterator<Item = ClientId>,
                    which: fn(&SharePair) -> &shamir::ShamirShare| {
            clients
                .filter_map(|of| {
                    self.held.get(&of).map(|pair| ShareOf {
                        of_client: of,
                        share: which(pair).clone(),
                    })
                })
                .collect::<Vec<_>>()
        };
        let secret_keys: BTreeSet<ClientId> = request.secret_key_of.iter().copied().collect();
        Ok(Unmask {
            client: self.id,
            self_mask_shares: pick(&mut self_mask_of.into_iter(), |p| &p.self_mask),
            secret_key_shares: pick(&mut secret_keys.into_iter(), |p| &p.secret_key),
        })
    }
}
