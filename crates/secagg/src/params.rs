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

#[cfg(test)]
mod tests {
    use super::*;

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
