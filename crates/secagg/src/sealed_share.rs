//! A client's two Shamir shares for one neighbour, sealed so that only that
//! neighbour can read them while the server relays them.
//!
//! ChaCha20-Poly1305 under the pairwise `ShareEncryption` key of sender and
//! recipient. The nonce is `sender ‖ recipient ‖ 0u32` (ids big-endian). A
//! deterministic nonce is safe here because a (key, nonce) pair never repeats:
//! the key is unique to the pair and the round (HKDF label), and within the
//! round each direction carries exactly one message (phase 2 sends one share
//! bundle per neighbour; a second bundle from the same sender is refused by the
//! server as a duplicate), while the two directions differ in the nonce.
//! The associated data binds the round id, sender and recipient, so a sealed
//! share replayed into another round or relabelled by the server fails to open.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use zeroize::Zeroizing;

use crate::bytes::FixedBytes;
use crate::ids::{ClientId, RoundId};
use crate::shamir::ShamirShare;

/// The plaintext: the self-mask share then the `s` secret-key share.
const PLAINTEXT_LEN: usize = 66;
/// The plaintext plus the 16-byte Poly1305 tag.
pub const SEALED_SHARE_LEN: usize = PLAINTEXT_LEN + 16;

/// A sealed pair of shares as it travels.
pub type SealedShareBytes = FixedBytes<SEALED_SHARE_LEN>;

/// The two shares a client deals to one neighbour.
#[derive(Clone, PartialEq, Eq)]
pub struct SharePair {
    /// The neighbour's share of the dealer's self-mask seed.
    pub self_mask: ShamirShare,
    /// The neighbour's share of the dealer's `s` secret key.
    pub secret_key: ShamirShare,
}

impl std::fmt::Debug for SharePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharePair(..)")
    }
}

/// The sealed share did not open: wrong key, tampered ciphertext, or bound to
/// another round, sender or recipient.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sealed share failed to decrypt (authentication tag mismatch)")]
pub struct OpenError;

fn nonce(sender: ClientId, recipient: ClientId) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&sender.0.to_be_bytes());
    n[4..8].copy_from_slice(&recipient.0.to_be_bytes());
    n
}

fn associated_data(round: &RoundId, sender: ClientId, recipient: ClientId) -> Vec<u8> {
    let mut ad = Vec::with_capacity(40 + round.as_bytes().len());
    ad.extend_from_slice(b"fedstep-secagg/v1/share");
    ad.extend_from_slice(&(round.as_bytes().len() as u32).to_be_bytes());
    ad.extend_from_slice(round.as_bytes());
    ad.extend_from_slice(&sender.0.to_be_bytes());
    ad.extend_from_slice(&recipient.0.to_be_bytes());
    ad
}

/// Seals `shares` from `sender` to `recipient` under their pairwise key.
pub fn seal(
    key: &[u8; 32],
    round: &RoundId,
    sender: ClientId,
    recipient: ClientId,
    shares: &SharePair,
) -> SealedShareBytes {
    let mut plaintext = Zeroizing::new([0u8; PLAINTEXT_LEN]);
    plaintext[..33].copy_from_slice(&shares.self_mask.0);
    plaintext[33..].copy_from_slice(&shares.secret_key.0);
    let aad = associated_data(round, sender, recipient);
    let ciphertext = ChaCha20Poly1305::new(key.into())
        .encrypt(
            &nonce(sender, recipient).into(),
            Payload {
                msg: plaintext.as_slice(),
                aad: &aad,
            },
        )
        .expect("ChaCha20-Poly1305 encrypts any message shorter than 2^38 bytes");
    let array: [u8; SEALED_SHARE_LEN] = ciphertext
        .try_into()
        .expect("ciphertext is plaintext plus a 16-byte tag");
    FixedBytes(array)
}

/// Opens a sealed share sent by `sender` to `recipient`.
pub fn open(
    key: &[u8; 32],
    round: &RoundId,
    sender: ClientId,
    recipient: ClientId,
    sealed: &SealedShareBytes,
) -> Result<SharePair, OpenError> {
    let aad = associated_data(round, sender, recipient);
    let plaintext = Zeroizing::new(
        ChaCha20Poly1305::new(key.into())
            .decrypt(
                &nonce(sender, recipient).into(),
                Payload {
                    msg: &sealed.0,
                    aad: &aad,
                },
            )
            .map_err(|_| OpenError)?,
    );
    if plaintext.len() != PLAINTEXT_LEN {
        return Err(OpenError);
    }
    let mut self_mask = [0u8; 33];
    let mut secret_key = [0u8; 33];
    self_mask.copy_from_slice(&plaintext[..33]);
    secret_key.copy_from_slice(&plaintext[33..]);
    Ok(SharePair {
        self_mask: FixedBytes(self_mask),
        secret_key: FixedBytes(secret_key),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> SharePair {
        SharePair {
            self_mask: FixedBytes([1; 33]),
            secret_key: FixedBytes([2; 33]),
        }
    }

    #[test]
    fn opens_only_with_the_same_key_round_and_direction() {
        let key = [5u8; 32];
        let round = RoundId::new("r").unwrap();
        let (u, v) = (ClientId(1), ClientId(2));
        let sealed = seal(&key, &round, u, v, &pair());
        assert_eq!(open(&key, &round, u, v, &sealed).unwrap(), pair());
        assert_eq!(open(&[6; 32], &round, u, v, &sealed), Err(OpenError));
        assert_eq!(
            open(&key, &RoundId::new("r2").unwrap(), u, v, &sealed),
            Err(OpenError)
        );
        assert_eq!(open(&key, &round, v, u, &sealed), Err(OpenError));
        let mut tampered = sealed.clone();
        tampered.0[0] ^= 1;
        assert_eq!(open(&key, &round, u, v, &tampered), Err(OpenError));
    }
}
