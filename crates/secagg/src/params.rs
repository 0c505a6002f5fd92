//! The public parameters of a round, agreed by the server and every client
//! before it starts.

use serde::{Deserialize, Serialize};

use crate::ids::RoundId;
use crate::quantize::QuantizationConfig;

/// What every participant of a round must agree on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundParams {
    /// Labels every derived key and seeds the neighbour graph.
    pub round: RoundId,
    /// The requested neighbour-graph degree k (odd k is rounded up; k ≥ n − 1
    /// is plain SecAgg's complete graph).
    pub neighbours: usize,
    /// A phase that ends with fewer survivors than this fails the round.
    /// Also the floor on how many inputs are summed, so a sum never
    /// reveals one client's input. At least 3.
    pub min_clients: usize,
    /// The length of every input vector.
    pub vector_len: u64,
    /// The fixed-point encoding of the inputs.
    pub quantization: QuantizationConfig,
}

/// The Shamir threshold for a neighbour graph of degree `degree`:
/// `⌊2d/3⌋ + 1` (at least 2).
///
/// Why: reconstruction needs `t` of a client's `d` neighbours to survive to
/// the last phase, so up to `d − t ≈ d/3` of them may drop. And `2t > d`:
/// any two sets of `t` neighbours overlap, so a server that tells some
/// neighbours a client dropped (asking for its secret-key shares) and others
/// that it survived (asking for its self-mask shares) cannot gather both
/// quorums from disjoint honest clients; an honest client asked for both of
/// the same client refuses. Privacy then holds against fewer than `t`
/// corrupted neighbours of any client, together with the server.
pub fn threshold_for_degree(degree: usize) -> usize {
    (2 * degree / 3 + 1).max(2)
}

/// The degree of the neighbour graph of `clients` clients asked for `k`
/// neighbours each: k rounded up to even (one step each way around the
/// cycle), at most n − 1, which is plain SecAgg's complete graph.
pub fn degree_for(clients: usize, k: usize) -> usize {
    k.saturating_add(k % 2).min(clients.saturating_sub(1))
}

/// SecAgg+'s O(log n) neighbourhood for `clients` clients: 2⌈log₂ n⌉,
/// the complete graph (n − 1) below that.
pub fn default_neighbours(clients: usize) -> usize {
    let log2 = (usize::BITS - (clients.max(2) - 1).leading_zeros()) as usize;
    (2 * log2).min(clients.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_degree_is_logarithmic_and_at_most_the_others() {
        assert_eq!(default_neighbours(3), 2);
        assert_eq!(default_neighbours(8), 6);
        assert_eq!(default_neighbours(32), 10);
        assert_eq!(default_neighbours(64), 12);
        assert_eq!(default_neighbours(65), 14);
    }

    #[test]
    fn threshold_is_a_two_thirds_majority() {
        assert_eq!(threshold_for_degree(2), 2);
        assert_eq!(threshold_for_degree(3), 3);
        assert_eq!(threshold_for_degree(4), 3);
        assert_eq!(threshold_for_degree(6), 5);
        assert_eq!(threshold_for_degree(9), 7);
        for d in 2..300 {
            let t = threshold_for_degree(d);
            assert!(2 * t > d && t <= d, "d={d} t={t}");
        }
    }
}
