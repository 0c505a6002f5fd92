//! X25519 key pairs and the HKDF-SHA256 derivations of pairwise secrets.
//!
//! Each client holds two key pairs: `c` (its shared secrets key the sealing of
//! Shamir shares) and `s` (its shared secrets seed the pairwise masks). They
//! are separate so that revealing a dropped client's `s` secret key, which
//! the server reconstructs to cancel that client's pairwise masks, does not
//! also reveal the keys that sealed its shares.
//!
//! Derived values use HKDF-SHA256 with no salt, the X25519 shared secret as
//! input key material and an info string
//! `"fedstep-secagg/v1/" purpose 0x00 len(round) round min(u,v) max(u,v)`
//! (lengths and ids big-endian u32). The round and the canonically ordered
//! pair make every derived key unique per pair, purpose and round, and both
//! ends derive the same value.

use hkdf::Hkdf;
use rand_core::CryptoRngCore;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::bytes::FixedBytes;
use crate::ids::{ClientId, RoundId};

/// An X25519 public key as it travels (32 bytes, base64).
pub type PublicKeyBytes = FixedBytes<32>;

/// A 32-byte secret (seed or key) that is wiped when dropped.
pub type Secret32 = Zeroizing<[u8; 32]>;

/// What a pairwise derivation is for; part of the HKDF label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The seed of the pairwise mask between two clients (from `s` keys).
    PairwiseMask,
    /// The AEAD key sealing shares between two clients (from `c` keys).
    ShareEncryption,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::PairwiseMask => b"pairwise-mask",
            Purpose::ShareEncryption => b"share-encryption",
        }
    }
}

/// A peer's public key that yields an all-zero shared secret: a low-order
/// point, which would make the "shared" secret known to everyone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("public key is a low-order point (non-contributory key agreement)")]
pub struct NonContributoryKey;

/// One X25519 key pair.
pub struct KeyPair {
    secret: StaticSecret,
    public: PublicKey,
}

impl KeyPair {
    /// A fresh key pair from `rng`.
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        let secret = StaticSecret::random_from_rng(rng);
        let public = PublicKey::from(&secret);
        KeyPair { secret, public }
    }

    /// The key pair of a known secret key (a reconstructed one).
    pub fn from_secret_bytes(bytes: [u8; 32]) -> Self {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret);
        KeyPair { secret, public }
    }

    /// The public key as it travels.
    pub fn public_bytes(&self) -> PublicKeyBytes {
        FixedBytes(self.public.to_bytes())
    }

    /// The secret key's bytes (to be Shamir-shared).
    pub fn secret_bytes(&self) -> Secret32 {
        Zeroizing::new(self.secret.to_bytes())
    }

    /// The 32-byte pairwise secret for `purpose` between `me` and `peer`,
    /// refusing a non-contributory agreement.
    pub fn derive_pairwise(
        &self,
        peer_public: &PublicKeyBytes,
        purpose: Purpose,
        round: &RoundId,
        me: ClientId,
        peer: ClientId,
    ) -> Result<Secret32, NonContributoryKey> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(peer_public.0));
        if !shared.was_contributory() {
            return Err(NonContributoryKey);
        }
        Ok(hkdf_label(shared.as_bytes(), purpose, round, me, peer))
    }
}

/// Whether a public key is a low-order point: agreement with it is
/// non-contributory for every secret key (X25519 clamps secrets to multiples
/// of the cofactor), so one throwaway agreement decides it. Used by the
/// server to exclude such keys in phase 1, before anyone derives from them.
pub fn is_low_order(public: &PublicKeyBytes) -> bool {
    let probe = StaticSecret::random_from_rng(rand_core::OsRng);
    !probe
        .diffie_hellman(&PublicKey::from(public.0))
        .was_contributory()
}

fn hkdf_label(
    ikm: &[u8; 32],
    purpose: Purpose,
    round: &RoundId,
    a: ClientId,
    b: ClientId,
) -> Secret32 {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut info = Vec::with_capacity(64 + round.as_bytes().len());
    info.extend_from_slice(b"fedstep-secagg/v1/");
    info.extend_from_slice(purpose.label());
    info.push(0);
    // Round ids are at most MAX_ROUND_ID_LEN bytes, so the length fits u32.
    info.extend_from_slice(&(round.as_bytes().len() as u32).to_be_bytes());
    info.extend_from_slice(round.as_bytes());
    info.extend_from_slice(&lo.0.to_be_bytes());
    info.extend_from_slice(&hi.0.to_be_bytes());
    let mut out = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(None, ikm)
        .expand(&info, out.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn both_ends_derive_the_same_secret_and_labels_separate_it() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let (a, b) = (KeyPair::generate(&mut rng), KeyPair::generate(&mut rng));
        let round = RoundId::new("r1").unwrap();
        let (u, v) = (ClientId(3), ClientId(9));
        let ab = a
            .derive_pairwise(&b.public_bytes(), Purpose::PairwiseMask, &round, u, v)
            .unwrap();
        let ba = b
            .derive_pairwise(&a.public_bytes(), Purpose::PairwiseMask, &round, v, u)
            .unwrap();
        assert_eq!(*ab, *ba);
        let enc = a
            .derive_pairwise(&b.public_bytes(), Purpose::ShareEncryption, &round, u, v)
            .unwrap();
        assert_ne!(*ab, *enc);
        let other_round = RoundId::new("r2").unwrap();
        let ab2 = a
            .derive_pairwise(&b.public_bytes(), Purpose::PairwiseMask, &other_round, u, v)
            .unwrap();
        assert_ne!(*ab, *ab2);
    }

    #[test]
    fn low_order_keys_are_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let a = KeyPair::generate(&mut rng);
        let round = RoundId::new("r").unwrap();
        let zero = FixedBytes([0u8; 32]);
        let mut one = [0u8; 32];
        one[0] = 1;
        for bad in [zero, FixedBytes(one)] {
            assert!(is_low_order(&bad));
            assert_eq!(
                a.derive_pairwise(
                    &bad,
                    Purpose::PairwiseMask,
                    &round,
                    ClientId(1),
                    ClientId(2)
                ),
                Err(NonContributoryKey)
            );
        }
        assert!(!is_low_order(&a.public_bytes()));
    }

    #[test]
    fn a_reconstructed_secret_gives_the_same_public_key() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let a = KeyPair::generate(&mut rng);
        let again = KeyPair::from_secret_bytes(*a.secret_bytes());
        assert_eq!(a.public_bytes(), again.public_bytes());
    }
}
