//! The seekable pseudo-random generator that expands a 32-byte seed into a
//! mask vector.
//!
//! Element `i` of the mask for seed `s` is the `i`-th little-endian 8-byte
//! word of the ChaCha20 keystream under key `s` (and an all-zero nonce),
//! reduced into the ring. Because ChaCha20 can seek to any block, a worker
//! that holds only elements `[a, b)` of the summed vector unmasks exactly
//! those without generating the prefix. The fixed nonce is safe because every
//! seed is used for one mask only: pairwise seeds come from HKDF with the
//! round id and both client ids in the label, and self-mask seeds are fresh
//! randomness each round.
//!
//! ChaCha20's 32-bit block counter covers 2^38 keystream bytes, i.e. 2^35
//! elements; [`MAX_VECTOR_LEN`] keeps well inside that.

use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use chacha20::ChaCha20;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::ring::Ring;

/// The longest vector a mask may cover (2^32 elements, 32 GiB of u64).
pub const MAX_VECTOR_LEN: u64 = 1 << 32;

/// Elements generated per keystream call: bounds the scratch buffer.
const CHUNK: usize = 1024;

/// Whether a mask is added to or subtracted from a vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskSign {
    /// `v += mask`.
    Add,
    /// `v -= mask`.
    Subtract,
}

impl MaskSign {
    /// The other sign.
    pub fn opposite(self) -> MaskSign {
        match self {
            MaskSign::Add => MaskSign::Subtract,
            MaskSign::Subtract => MaskSign::Add,
        }
    }
}

/// `values[j] ±= mask(seed)[start + j]` for every `j`, in the ring.
///
/// Panics if `start + values.len()` exceeds [`MAX_VECTOR_LEN`]; lengths are
/// checked against the round's configured vector length at the boundary.
pub fn apply_mask(seed: &[u8; 32], sign: MaskSign, start: u64, values: &mut [u64], ring: Ring) {
    let end = start.checked_add(values.len() as u64);
    assert!(
        end.is_some_and(|e| e <= MAX_VECTOR_LEN),
        "mask range {start}+{} exceeds MAX_VECTOR_LEN",
        values.len()
    );
    let mut cipher = ChaCha20::new(seed.into(), &[0u8; 12].into());
    cipher.seek(start * 8);
    let mut buf = [0u8; CHUNK * 8];
    for chunk in values.chunks_mut(CHUNK) {
        let bytes = &mut buf[..chunk.len() * 8];
        bytes.fill(0);
        cipher.apply_keystream(bytes);
        for (v, word) in chunk.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            let m = ring.reduce(u64::from_le_bytes(w));
            *v = match sign {
                MaskSign::Add => ring.add(*v, m),
                MaskSign::Subtract => ring.sub(*v, m),
            };
        }
    }
    buf.zeroize();
}

/// Elements `[start, start + len)` of the mask for `seed`.
pub fn mask_range(seed: &[u8; 32], start: u64, len: usize, ring: Ring) -> Vec<u64> {
    let mut out = vec![0u64; len];
    apply_mask(seed, MaskSign::Add, start, &mut out, ring);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeking_matches_the_prefix_stream() {
        let seed = [7u8; 32];
        for ring in [Ring::U32, Ring::U64, Ring::new(20).unwrap()] {
            let whole = mask_range(&seed, 0, 3000, ring);
            for (a, b) in [(0, 1), (1, 9), (5, 1500), (1023, 2049), (2999, 3000)] {
                assert_eq!(
                    mask_range(&seed, a, (b - a) as usize, ring),
                    whole[a as usize..b as usize]
                );
            }
            assert!(whole.iter().all(|&x| ring.contains(x)));
        }
    }

    #[test]
    fn add_then_subtract_cancels_and_seeds_differ() {
        let mut v: Vec<u64> = (0..100).collect();
        apply_mask(&[1; 32], MaskSign::Add, 10, &mut v, Ring::U32);
        assert_ne!(v, (0..100).collect::<Vec<u64>>());
        apply_mask(&[1; 32], MaskSign::Subtract, 10, &mut v, Ring::U32);
        assert_eq!(v, (0..100).collect::<Vec<u64>>());
        assert_ne!(
            mask_range(&[1; 32], 0, 8, Ring::U64),
            mask_range(&[2; 32], 0, 8, Ring::U64)
        );
    }
}
