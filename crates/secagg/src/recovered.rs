//! What the server recovers in phase 4, handed to whichever workers hold the
//! summed masked vector (or shards of it).
//!
//! The sum of the phase-3 survivors' masked vectors is
//! `Σ w_u q(x_u) + Σ_u PRG(b_u) + (pairwise masks with dropped neighbours)`;
//! the pairwise masks between two survivors cancel. [`RecoveredMasks`] lists
//! the remaining masks as (seed, sign) corrections, so any worker can remove
//! them from any range of the vector ([`crate::prg`] is seekable) without the
//! secrets that produced them. The seeds reveal nothing beyond the sum: each
//! self-mask seed belongs to an input that is only ever seen summed, and each
//! pairwise seed belongs to a client whose input is not in the sum.

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::bytes::FixedBytes;
use crate::ids::ClientId;
use crate::prg::{apply_mask, MaskSign};
use crate::quantize::QuantizationConfig;

/// One mask to apply to the masked sum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskCorrection {
    /// The PRG seed.
    pub seed: FixedBytes<32>,
    /// Whether to add or subtract its stream.
    pub sign: MaskSign,
}

/// Everything needed to turn the masked sum into the weighted mean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveredMasks {
    /// The encoding of the inputs.
    pub quantization: QuantizationConfig,
    /// The full vector's length.
    pub vector_len: u64,
    /// The clients whose masked vectors must be summed, and no others.
    pub summed_clients: Vec<ClientId>,
    /// The sum of their weights.
    pub total_weight: u64,
    /// The masks to apply to the sum.
    pub corrections: Vec<MaskCorrection>,
}

/// A range or vector that does not fit the round.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnmaskError {
    /// `[start, start + len)` is not inside the vector.
    #[error("range {start}..{start}+{len} is outside a vector of {vector_len}")]
    OutOfRange {
        /// The slice's first index.
        start: u64,
        /// The slice's length.
        len: usize,
        /// The vector's length.
        vector_len: u64,
    },
    /// An element with bits above the ring width.
    #[error("element {index} is not in the ring")]
    NotInRing {
        /// Its index in the full vector.
        index: u64,
    },
}

impl Drop for RecoveredMasks {
    fn drop(&mut self) {
        // The seeds are secrets until the sum is unmasked; wipe them.
        for c in &mut self.corrections {
            c.seed.zeroize();
        }
    }
}

impl RecoveredMasks {
    /// Unmasks elements `[start, start + slice.len())` of the masked sum, in
    /// place.
    pub fn unmask_range_in_place(&self, slice: &mut [u64], start: u64) -> Result<(), UnmaskError> {
        let out_of_range = UnmaskError::OutOfRange {
            start,
            len: slice.len(),
            vector_len: self.vector_len,
        };
        let end = start
            .checked_add(slice.len() as u64)
            .ok_or(out_of_range.clone())?;
        if end > self.vector_len {
            return Err(out_of_range);
        }
        let ring = self.quantization.ring();
        if let Some(i) = slice.iter().position(|&x| !ring.contains(x)) {
            return Err(UnmaskError::NotInRing {
                index: start + i as u64,
            });
        }
        for c in &self.corrections {
            apply_mask(&c.seed.0, c.sign, start, slice, ring);
        }
        Ok(())
    }

    /// The unmasked elements `[start, start + masked.len())`.
    pub fn unmask_range(&self, masked: &[u64], start: u64) -> Result<Vec<u64>, UnmaskError> {
        let mut out = masked.to_vec();
        self.unmask_range_in_place(&mut out, start)?;
        Ok(out)
    }

    /// The unmasked sum `Σ w_u q(x_u)` of the whole masked sum.
    pub fn unmask(&self, masked_sum: &[u64]) -> Result<Vec<u64>, UnmaskError> {
        if masked_sum.len() as u64 != self.vector_len {
            return Err(UnmaskError::OutOfRange {
                start: 0,
                len: masked_sum.len(),
                vector_len: self.vector_len,
            });
        }
        self.unmask_range(masked_sum, 0)
    }

    /// The weighted mean from an unmasked sum (whole or a shard: the map is
    /// element-wise): dequantized and divided by the total weight.
    pub fn mean(&self, unmasked_sum: &[u64]) -> Vec<f32> {
        self.quantization
            .dequantize_mean(unmasked_sum, self.total_weight)
    }
}
