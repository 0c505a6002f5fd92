//! The SecAgg+ neighbour graph: who shares secrets and masks with whom.
//!
//! SecAgg+ replaces SecAgg's complete graph by a sparse one of degree k
//! (O(log n) suffices for its guarantees), so each client does O(k) key
//! agreements, shares and masks instead of O(n). The graph must be public
//! and the same for everyone, yet not chosen by the server, so it is derived
//! from the round id alone: the clients are placed on a cycle in the order of
//! `SHA-256("fedstep-secagg/v1/graph" ‖ len(round) ‖ round ‖ id)` (a
//! pseudo-random permutation nobody picks), and each is joined to the
//! `k/2` clients on either side (a Harary graph). That graph is exactly
//! `k`-regular for even `k`; an odd `k` is rounded up to the next even
//! number. When `k ≥ n − 1` every pair is joined: plain SecAgg.
//! The relation is symmetric by construction.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use crate::ids::{ClientId, RoundId};
use crate::params::degree_for;

/// Each client's neighbours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourGraph {
    neighbours: BTreeMap<ClientId, BTreeSet<ClientId>>,
    degree: usize,
}

impl NeighbourGraph {
    /// The graph of `clients` for `round` with requested degree `k`
    /// (duplicated ids count once).
    pub fn new(round: &RoundId, clients: &[ClientId], k: usize) -> Self {
        let distinct: BTreeSet<ClientId> = clients.iter().copied().collect();
        let n = distinct.len();
        let degree = degree_for(n, k);
        let mut neighbours: BTreeMap<ClientId, BTreeSet<ClientId>> =
            distinct.iter().map(|&c| (c, BTreeSet::new())).collect();
        if n == 0 {
            return NeighbourGraph {
                neighbours,
                degree: 0,
            };
        }
        if degree == n - 1 {
            for (&c, set) in neighbours.iter_mut() {
                set.extend(distinct.iter().copied().filter(|&d| d != c));
            }
            return NeighbourGraph {
                neighbours,
                degree: n - 1,
            };
        }
        let mut cycle: Vec<(ClientId, [u8; 32])> = distinct
            .iter()
            .map(|&c| (c, position_key(round, c)))
            .collect();
        cycle.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        // degree <= n - 2, so the offsets 1..=degree/2 on both sides are
        // distinct.
        for (i, &(c, _)) in cycle.iter().enumerate() {
            for off in 1..=degree / 2 {
                let right = cycle[(i + off) % n].0;
                let left = cycle[(i + n - off) % n].0;
                neighbours.entry(c).or_default().extend([right, left]);
            }
        }
        NeighbourGraph { neighbours, degree }
    }

    /// The neighbours of `client` (empty for a client not in the graph).
    pub fn neighbours_of(&self, client: ClientId) -> impl Iterator<Item = ClientId> + '_ {
        self.neighbours.get(&client).into_iter().flatten().copied()
    }

    /// Whether `a` and `b` are neighbours.
    pub fn are_neighbours(&self, a: ClientId, b: ClientId) -> bool {
        self.neighbours.get(&a).is_some_and(|s| s.contains(&b))
    }

    /// The degree of every client.
    pub fn degree(&self) -> usize {
        self.degree
    }

    /// The clients, sorted.
    pub fn clients(&self) -> impl Iterator<Item = ClientId> + '_ {
        self.neighbours.keys().copied()
    }

    /// The x-coordinate (1-based position among `dealer`'s sorted
    /// neighbours) of the share `dealer` deals to `holder`.
    pub fn share_coordinate(&self, dealer: ClientId, holder: ClientId) -> Option<u8> {
        let position = self
            .neighbours
            .get(&dealer)?
            .iter()
            .position(|&c| c == holder)?;
        u8::try_from(position + 1).ok()
    }
}

fn position_key(round: &RoundId, client: ClientId) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"fedstep-secagg/v1/graph");
    h.update((round.as_bytes().len() as u32).to_be_bytes());
    h.update(round.as_bytes());
    h.update(client.0.to_be_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u32) -> Vec<ClientId> {
        (0..n).map(|i| ClientId(100 + i * 7)).collect()
    }

    #[test]
    fn sparse_graph_is_regular_symmetric_and_deterministic() {
        let round = RoundId::new("round-7").unwrap();
        for (n, k, degree) in [(20, 4, 4), (20, 5, 6), (9, 2, 2), (50, 10, 10)] {
            let g = NeighbourGraph::new(&round, &ids(n), k);
            assert_eq!(g.degree(), degree);
            for c in g.clients() {
                assert_eq!(g.neighbours_of(c).count(), degree, "n={n} k={k}");
                assert!(!g.are_neighbours(c, c));
                for d in g.neighbours_of(c) {
                    assert!(g.are_neighbours(d, c));
                }
            }
            let mut shuffled = ids(n);
            shuffled.reverse();
            assert_eq!(g, NeighbourGraph::new(&round, &shuffled, k));
        }
    }

    #[test]
    fn rounds_get_different_graphs() {
        let a = NeighbourGraph::new(&RoundId::new("a").unwrap(), &ids(30), 4);
        let b = NeighbourGraph::new(&RoundId::new("b").unwrap(), &ids(30), 4);
        assert_ne!(a, b);
    }

    #[test]
    fn large_k_is_the_complete_graph() {
        let round = RoundId::new("r").unwrap();
        for k in [4, 5, 100] {
            let g = NeighbourGraph::new(&round, &ids(5), k);
            assert_eq!(g.degree(), 4);
            assert!(g.clients().all(|c| g.neighbours_of(c).count() == 4));
        }
    }

    #[test]
    fn share_coordinates_follow_sorted_neighbours() {
        let g = NeighbourGraph::new(&RoundId::new("r").unwrap(), &ids(4), 3);
        let d = ClientId(100);
        assert_eq!(g.share_coordinate(d, ClientId(107)), Some(1));
        assert_eq!(g.share_coordinate(d, ClientId(121)), Some(3));
        assert_eq!(g.share_coordinate(d, d), None);
    }
}
