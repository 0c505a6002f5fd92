//! Arithmetic in the ring Z_2^b in which masked vectors live.
//!
//! Every element is stored in a `u64` whatever `b` is: for `b < 64` the high
//! bits are kept zero by reducing after each wrapping operation. Wrapping
//! arithmetic on `u64` followed by masking the low `b` bits is exactly
//! arithmetic modulo 2^b, so one representation serves `b = 32` and `b = 64`
//! (and any width in between) without generic code in every caller.

use serde::{Deserialize, Serialize};

/// The ring Z_2^b, `b` in `MIN_BITS..=64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Ring {
    bits: u32,
}

/// Fewer bits leave no room for a quantized sum worth having.
pub const MIN_BITS: u32 = 8;

/// A ring width outside `MIN_BITS..=64`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ring width must be {MIN_BITS}..=64 bits, got {0}")]
pub struct RingWidthError(pub u32);

impl TryFrom<u32> for Ring {
    type Error = RingWidthError;
    fn try_from(bits: u32) -> Result<Self, Self::Error> {
        Ring::new(bits)
    }
}

impl From<Ring> for u32 {
    fn from(ring: Ring) -> u32 {
        ring.bits
    }
}

impl Ring {
    /// Z_2^bits.
    pub fn new(bits: u32) -> Result<Self, RingWidthError> {
        if (MIN_BITS..=64).contains(&bits) {
            Ok(Ring { bits })
        } else {
            Err(RingWidthError(bits))
        }
    }

    /// Z_2^32.
    pub const U32: Ring = Ring { bits: 32 };
    /// Z_2^64.
    pub const U64: Ring = Ring { bits: 64 };

    /// `b`.
    pub fn bits(self) -> u32 {
        self.bits
    }

    /// The bit mask of the low `b` bits.
    pub fn mask(self) -> u64 {
        if self.bits == 64 {
            u64::MAX
        } else {
            (1u64 << self.bits) - 1
        }
    }

    /// `x mod 2^b`.
    pub fn reduce(self, x: u64) -> u64 {
        x & self.mask()
    }

    /// Whether `x` is a canonical element (no bits above `b`); untrusted
    /// vectors are checked with this rather than silently reduced.
    pub fn contains(self, x: u64) -> bool {
        x & !self.mask() == 0
    }

    /// `a + b mod 2^b`.
    pub fn add(self, a: u64, b: u64) -> u64 {
        self.reduce(a.wrapping_add(b))
    }

    /// `a - b mod 2^b`.
    pub fn sub(self, a: u64, b: u64) -> u64 {
        self.reduce(a.wrapping_sub(b))
    }

    /// `acc[i] += x[i]` for all `i`. The lengths must match (a caller bug
    /// otherwise: untrusted lengths are checked at the boundary).
    pub fn add_assign(self, acc: &mut [u64], x: &[u64]) {
        assert_eq!(acc.len(), x.len(), "ring vectors of different lengths");
        for (a, &v) in acc.iter_mut().zip(x) {
            *a = self.add(*a, v);
        }
    }

    /// `acc[i] -= x[i]` for all `i`.
    pub fn sub_assign(self, acc: &mut [u64], x: &[u64]) {
        assert_eq!(acc.len(), x.len(), "ring vectors of different lengths");
        for (a, &v) in acc.iter_mut().zip(x) {
            *a = self.sub(*a, v);
        }
    }

    /// The element-wise sum of equally long vectors (the aggregator's job on
    /// masked inputs).
    pub fn sum<'a>(self, len: usize, vectors: impl IntoIterator<Item = &'a [u64]>) -> Vec<u64> {
        let mut acc = vec![0u64; len];
        for v in vectors {
            self.add_assign(&mut acc, v);
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_modulo_two_to_the_b() {
        let r = Ring::U32;
        assert_eq!(r.add(u32::MAX as u64, 1), 0);
        assert_eq!(r.sub(0, 1), u32::MAX as u64);
        let r = Ring::U64;
        assert_eq!(r.add(u64::MAX, 2), 1);
        assert_eq!(r.sub(0, 1), u64::MAX);
        let r = Ring::new(12).unwrap();
        assert_eq!(r.add(4095, 1), 0);
        assert!(!r.contains(4096));
    }

    #[test]
    fn widths_are_checked() {
        assert!(Ring::new(7).is_err());
        assert!(Ring::new(65).is_err());
        assert!(serde_json::from_str::<Ring>("65").is_err());
        assert_eq!(serde_json::from_str::<Ring>("32").unwrap(), Ring::U32);
    }

    #[test]
    fn add_then_sub_is_identity() {
        let r = Ring::U32;
        let x = vec![1, u32::MAX as u64, 77];
        let m = vec![u32::MAX as u64, 5, 1 << 31];
        let mut y = x.clone();
        r.add_assign(&mut y, &m);
        r.sub_assign(&mut y, &m);
        assert_eq!(x, y);
    }
}
