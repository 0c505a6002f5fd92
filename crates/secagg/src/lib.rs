//! The cryptographic and protocol core of SecAgg+ (Bell, Bonawitz, Gascón,
//! Lepoint, Raykova: "Secure Single-Server Aggregation with (Poly)Logarithmic
//! Overhead", CCS 2020), as in Flower's SecAgg+ workflow: a server learns the
//! weighted sum of the clients' vectors and nothing else about any one of
//! them, even when some clients drop out mid-round. No I/O, no async: the
//! caller moves the messages ([`messages`], serde JSON) and the masked
//! vectors (plain integers) however it likes.
//!
//! # The protocol in four phases
//!
//! 1. **Advertise keys.** Each client makes two X25519 key pairs, `c` (to
//!    seal shares) and `s` (for pairwise masks), and a random self-mask seed
//!    `b_u`, and sends both public keys ([`messages::AdvertiseKeys`]). The
//!    server excludes malformed, low-order and copied keys, and sends the
//!    roster of the rest. Everyone derives the same sparse neighbour graph of
//!    degree k from the round id ([`graph`]) and the Shamir threshold
//!    `t = ⌊2d/3⌋ + 1` for degree `d` ([`params::threshold_for_degree`]).
//! 2. **Share keys.** Each client splits its `s` secret key and `b_u` t-of-d
//!    ([`shamir`]) and seals one share of each for each neighbour with
//!    ChaCha20-Poly1305 under the pairwise `c` key ([`sealed_share`]); the
//!    server relays them unread.
//! 3. **Masked input.** Each client opens the shares it was forwarded,
//!    quantizes its vector times its integer weight ([`quantize`]), and
//!    adds `PRG(b_u)` plus, for each neighbour `v` whose share opened,
//!    `±PRG(s_uv)` (`+` if `u < v`), where `s_uv` is derived from the `s`
//!    key agreement ([`keys`], [`prg`]); all in Z_2^b ([`ring`]). Pairwise
//!    masks of two clients that both send cancel in the sum.
//! 4. **Unmask.** For each client in the sum, its neighbours reveal their
//!    share of its `b_u`; for each neighbour that shared keys but is not in
//!    the sum, its `s` secret-key share. The server reconstructs the seeds
//!    and keys and hands a [`recovered::RecoveredMasks`] (the remaining
//!    masks as PRG seeds with signs) to whoever holds the summed vector, who
//!    unmasks it whole or shard by shard and dequantizes the weighted mean.
//!
//! [`client::Client`] and [`server::Server`] are the two state machines.
//! Every client message is untrusted: anything wrong with it excludes that
//! client with a bounded reason ([`server::Exclusion`]) and the round goes
//! on; only too few survivors or too few shares fail it
//! ([`server::RoundError`]).
//!
//! # Threat model
//!
//! - The server is **honest but curious**: it follows the protocol and
//!   tries to learn individual inputs from what it sees. It learns only the
//!   sum of at least `min_clients` inputs.
//! - Clients may collude with each other (up to n − t of them learn nothing
//!   about the others' inputs beyond the sum), and with the server as long
//!   as fewer than `t` of any client's neighbours are among them: `t` shares
//!   of both secrets of a client would unmask its individual input. An
//!   honest client never reveals both kinds of share of the same client in
//!   one round ([`client::ClientError::RevealBoth`]).
//! - **Not covered:** a malicious server that lies about the roster or
//!   about who dropped (showing clients different views), or any other
//!   active attack. Defending against those needs clients to sign their
//!   keys and a consistency round (SecAgg's active variant); here messages
//!   are authenticated only by the transport (the ledger's IAM-authenticated
//!   rows), whose sender id is passed to the server next to each message.
//!   Shares are not verifiable (plain Shamir): a client sending a wrong
//!   share can make reconstruction fail ([`server::RoundError::KeyMismatch`]
//!   catches a wrong `s` key) or, for a self-mask, corrupt the sum.
//!   A client's complaint that a share did not open is believed.
//!
//! # Parameters
//!
//! - `k` (neighbours): SecAgg+ needs O(log n) for its guarantees; odd k is
//!   rounded up; k ≥ n − 1 gives plain SecAgg.
//! - `t = ⌊2d/3⌋ + 1`: tolerates about a third of a neighbourhood dropping,
//!   and `2t > d`, so any two quorums of a client's neighbours overlap and a
//!   server cannot gather a self-mask quorum and a secret-key quorum of the
//!   same client from disjoint honest clients. Small neighbourhoods tolerate
//!   few drops (d = 4: t = 3, one drop).
//! - Shamir over GF(2^8) caps a neighbourhood at 255.
//! - Ring width b ∈ {32, 64} (any 8..=64 works), quantization q bits, clip c
//!   and max weight: the configuration refuses a sum that could wrap, and
//!   the mean is exact to `c / (2^q − 1)` per coordinate
//!   ([`quantize::QuantizationConfig::error_bound`]).

pub mod bytes;
pub mod client;
pub mod graph;
pub mod ids;
pub mod keys;
pub mod masked_file;
pub mod masked_sum;
pub mod messages;
pub mod model_vector;
pub mod next_model;
pub mod params;
pub mod prg;
pub mod quantize;
pub mod recovered;
pub mod ring;
pub mod sealed_share;
pub mod server;
pub mod shamir;

pub use client::{Client, ClientError, MaskedClient, SharedClient};
pub use ids::{ClientId, RoundId};
pub use params::RoundParams;
pub use quantize::QuantizationConfig;
pub use recovered::RecoveredMasks;
pub use ring::Ring;
pub use server::{Exclusion, Phase, RoundError, Server};
