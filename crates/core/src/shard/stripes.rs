//! Stripes: the fixed grid every pass over the model walks, so that how
//! the work is split (one task or K shards) never changes a result.
//!
//! A stripe is at most [`STRIPE_ELEMENTS`] consecutive elements of one
//! tensor, starting at a multiple of it; a tensor's first stripe starts at
//! its first element. Passes read block by block *inside* a stripe (a block
//! never straddles two), and the statistics pass sums per stripe, then the
//! stripes in order. A shard is a run of whole stripes, so a shard computes
//! exactly the stripe sums the whole pass would, and adding them up in
//! stripe order gives the same norms bit for bit whatever the shards.

use std::ops::Range;

use crate::model::TensorEntry;

/// Elements per stripe: 4 MiB of F32, small next to a shard (the smallest
/// upload part is 5 MiB), large next to a read block.
pub const STRIPE_ELEMENTS: usize = 1 << 20;

/// Consecutive elements of one tensor of the reference layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stripe {
    /// Index of the tensor in the reference layout (file order).
    pub tensor: usize,
    pub elements: Range<usize>,
}

/// Every stripe of `reference`, in file order.
pub fn stripes(reference: &[TensorEntry]) -> Vec<Stripe> {
    stripes_of(reference, STRIPE_ELEMENTS)
}

pub(crate) fn stripes_of(reference: &[TensorEntry], size: usize) -> Vec<Stripe> {
    reference
        .iter()
        .enumerate()
        .flat_map(|(tensor, t)| {
            let n = t.elements();
            (0..n.div_ceil(size).max(1)).map(move |s| Stripe {
                tensor,
                elements: s * size..((s + 1) * size).min(n),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::Dtype;

    fn entry(elements: usize) -> TensorEntry {
        TensorEntry {
            name: format!("t{elements}"),
            dtype: Dtype::F32,
            shape: vec![elements],
            start: 0,
            end: 4 * elements as u64,
        }
    }

    #[test]
    fn stripes_tile_every_tensor_in_order() {
        let s = stripes_of(&[entry(10), entry(0), entry(4)], 4);
        let got: Vec<(usize, Range<usize>)> =
            s.into_iter().map(|s| (s.tensor, s.elements)).collect();
        assert_eq!(
            got,
            vec![(0, 0..4), (0, 4..8), (0, 8..10), (1, 0..0), (2, 0..4)]
        );
    }
}
