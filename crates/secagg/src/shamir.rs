//! t-of-n Shamir sharing of 32-byte secrets.
//!
//! Sharing is byte-wise over GF(2^8) with `vsss-rs`'s constant-time `Gf256`
//! (each byte of the secret is the constant term of its own random
//! polynomial of degree t − 1). Because the field elements are bytes, the
//! 32-byte secrets (the `s` secret key and the self-mask seed) are shared
//! directly: no scalar is shared and no key is derived from one. The price
//! is at most 255 shares per secret, i.e. at most 255 neighbours per client
//! (checked by the round parameters).
//!
//! A share is 33 bytes: its x-coordinate (1..=255, never 0) and 32 bytes of
//! y. Plain Shamir cannot tell a wrong share from a right one; the server
//! checks a reconstructed `s` key against the advertised public key, and each
//! share's x-coordinate against the holder it was dealt to.

use rand_core::{CryptoRng, RngCore};
use zeroize::{Zeroize, Zeroizing};

use crate::bytes::FixedBytes;
use crate::keys::Secret32;

/// One share as it travels: x-coordinate then 32 bytes of y.
pub type ShamirShare = FixedBytes<33>;

/// The most shares one secret can have in GF(2^8).
pub const MAX_SHARES: usize = 255;

/// Why sharing or reconstruction failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShamirError {
    /// The threshold and share count cannot work.
    #[error("cannot share {threshold}-of-{shares}: need 2 <= threshold <= shares <= {MAX_SHARES}")]
    Parameters {
        /// t.
        threshold: usize,
        /// n.
        shares: usize,
    },
    /// Fewer than `t` shares.
    #[error("{have} shares, {needed} needed")]
    TooFewShares {
        /// Shares given.
        have: usize,
        /// t.
        needed: usize,
    },
    /// A zero or repeated x-coordinate.
    #[error("shares with zero or repeated x-coordinates")]
    BadCoordinates,
}

/// `shares` shares of `secret`, any `threshold` of which reconstruct it;
/// share `i` (0-based) has x-coordinate `i + 1`.
pub fn split<R: RngCore + CryptoRng>(
    secret: &[u8; 32],
    threshold: usize,
    shares: usize,
    rng: &mut R,
) -> Result<Vec<ShamirShare>, ShamirError> {
    if !(2 <= threshold && threshold <= shares && shares <= MAX_SHARES) {
        return Err(ShamirError::Parameters { threshold, shares });
    }
    let mut raw = vsss_rs::Gf256::split_array(threshold, shares, secret, rng)
        .map_err(|_| ShamirError::Parameters { threshold, shares })?;
    let mut out = Vec::with_capacity(shares);
    for share in &raw {
        // Each share is the 1-byte id then one byte per secret byte.
        let array: [u8; 33] = share
            .as_slice()
            .try_into()
            .map_err(|_| ShamirError::Parameters { threshold, shares })?;
        out.push(FixedBytes(array));
    }
    raw.iter_mut().for_each(|s| s.zeroize());
    Ok(out)
}

/// The x-coordinate of a share.
pub fn x_coordinate(share: &ShamirShare) -> u8 {
    share.0[0]
}

/// The secret from at least `threshold` shares (the first `threshold` are
/// used). Fewer shares are an error, never a wrong secret.
pub fn reconstruct(shares: &[ShamirShare], threshold: usize) -> Result<Secret32, ShamirError> {
    if shares.len() < threshold || threshold < 2 {
        return Err(ShamirError::TooFewShares {
            have: shares.len(),
            needed: threshold.max(2),
        });
    }
    let used = &shares[..threshold];
    let mut xs: Vec<u8> = used.iter().map(x_coordinate).collect();
    xs.sort_unstable();
    if xs[0] == 0 || xs.windows(2).any(|w| w[0] == w[1]) {
        return Err(ShamirError::BadCoordinates);
    }
    let mut raw: Vec<Vec<u8>> = used.iter().map(|s| s.0.to_vec()).collect();
    let combined = vsss_rs::Gf256::combine_array(&raw).map_err(|_| ShamirError::BadCoordinates);
    raw.iter_mut().for_each(|s| s.zeroize());
    let mut combined = Zeroizing::new(combined?);
    let mut out = Zeroizing::new([0u8; 32]);
    if combined.len() != 32 {
        return Err(ShamirError::BadCoordinates);
    }
    out.copy_from_slice(&combined);
    combined.zeroize();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn any_t_shares_reconstruct() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        let shares = split(&secret, 3, 5, &mut rng).unwrap();
        assert_eq!(
            shares.iter().map(x_coordinate).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        for subset in [[0, 1, 2], [4, 2, 0], [1, 3, 4]] {
            let chosen: Vec<_> = subset.iter().map(|&i| shares[i].clone()).collect();
            assert_eq!(*reconstruct(&chosen, 3).unwrap(), secret);
        }
        // More shares than needed also work.
        assert_eq!(*reconstruct(&shares, 3).unwrap(), secret);
    }

    #[test]
    fn fewer_than_t_is_an_error() {
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let shares = split(&[1; 32], 3, 5, &mut rng).unwrap();
        assert_eq!(
            reconstruct(&shares[..2], 3),
            Err(ShamirError::TooFewShares { have: 2, needed: 3 })
        );
    }

    #[test]
    fn t_minus_one_shares_say_nothing_of_the_secret() {
        // Two secrets, same randomness: the first t-1 shares differ, so the
        // shares are not a function of the secret alone; and for t = 2 a
        // single share's y is uniformly distributed (checked loosely: it
        // does not equal the secret).
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let shares = split(&[0xAB; 32], 2, 3, &mut rng).unwrap();
        assert_ne!(&shares[0].0[1..], &[0xAB; 32][..]);
    }

    #[test]
    fn bad_parameters_and_coordinates() {
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        assert!(split(&[0; 32], 1, 3, &mut rng).is_err());
        assert!(split(&[0; 32], 4, 3, &mut rng).is_err());
        assert!(split(&[0; 32], 2, 256, &mut rng).is_err());
        let shares = split(&[0; 32], 2, 3, &mut rng).unwrap();
        let dup = vec![shares[0].clone(), shares[0].clone()];
        assert_eq!(reconstruct(&dup, 2), Err(ShamirError::BadCoordinates));
        let mut zero = shares[1].clone();
        zero.0[0] = 0;
        assert_eq!(
            reconstruct(&[shares[0].clone(), zero], 2),
            Err(ShamirError::BadCoordinates)
        );
    }
}
