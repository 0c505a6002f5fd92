//! Bucketing (Karimireddy, He & Jaggi, "Byzantine-robust learning on
//! heterogeneous datasets via bucketing", ICLR 2022): before a robust
//! combiner, shuffle the updates into buckets of `size` and average each
//! bucket. Coordinate-wise median and trimmed mean assume the honest updates
//! are alike; with non-IID clients they are not, and the median throws away
//! whatever only one client learned. Averaging small random groups makes the
//! inputs of the robust statistic more alike while a byzantine update still
//! poisons only its own bucket.
//!
//! The shuffle is seeded by the round number, so a byzantine client is not
//! paired with the same honest client every round, and a round is
//! reproducible.
//!
//! Also here: the block loop both coordinate-wise combiners share (bucket
//! means per coordinate, then the statistic), generic over the statistic so
//! it stays monomorphic.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::CombineBlock;
use crate::combine::CombineError;
use crate::float::{decode_into, elem_bytes, Acc};
use crate::statistics::{NonFinite, StatsError};

const CHUNK: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucketing {
    pub size: usize,
}

impl Bucketing {
    pub fn new(size: usize) -> Result<Self, String> {
        if size == 0 {
            return Err("bucket must be at least 1 (1 = no bucketing)".into());
        }
        Ok(Bucketing { size })
    }

    /// Groups `0..n` into buckets of `size` (the last may be smaller).
    pub fn assign(&self, n: usize, round: u64) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..n).collect();
        if self.size > 1 {
            let mut rng = ChaCha8Rng::seed_from_u64(0x6275_636b_6574 ^ round);
            order.shuffle(&mut rng);
        }
        order.chunks(self.size).map(<[usize]>::to_vec).collect()
    }
}

/// Per coordinate: each bucket's mean of the (clip-scaled) values, then
/// `statistic` over the bucket means. Names an input holding a non-finite
/// value.
pub fn coordinatewise<A: Acc>(
    b: &CombineBlock<'_, A>,
    buckets: &[Vec<usize>],
    statistic: impl Fn(&mut [A]) -> A + Sync,
    out: &mut [A],
) -> Result<(), CombineError> {
    let t = b.tensor;
    let eb = elem_bytes(t.dtype);
    let n = b.raws.len();
    // The clip scale applies to the update, so it needs the global model.
    let global = b.global.filter(|_| b.scaled);
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .try_for_each(|(c, o)| {
            let lo = c * CHUNK;
            let m = o.len();
            let mut x = vec![A::default(); n * m];
            for i in 0..n {
                let xi = &mut x[i * m..(i + 1) * m];
                decode_into(t.dtype, &b.raws[i][lo * eb..(lo + m) * eb], xi);
                if let Some(j) = xi.iter().position(|v| !v.is_finite()) {
                    return Err(CombineError::Input(StatsError::NonFinite(NonFinite {
                        input: i,
                        tensor: t.name.clone(),
                        index: b.first + lo + j,
                        value: xi[j].to_f64(),
                    })));
                }
            }
            let value = |i: usize, j: usize| {
                let xv = x[i * m + j];
                match global {
                    Some(g) => g[lo + j] + b.scales[i] * (xv - g[lo + j]),
                    None => xv,
                }
            };
            let mut column = vec![A::default(); buckets.len()];
            for (j, oj) in o.iter_mut().enumerate() {
                for (c, bucket) in column.iter_mut().zip(buckets) {
                    let mut sum = A::default();
                    for &i in bucket {
                        sum += value(i, j);
                    }
                    *c = sum / A::from_f64(bucket.len() as f64);
                }
                *oj = statistic(&mut column);
            }
            Ok(())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_partition_the_updates() {
        let b = Bucketing::new(2).unwrap();
        let groups = b.assign(5, 3);
        assert_eq!(
            groups.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![2, 2, 1]
        );
        let mut all: Vec<usize> = groups.concat();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 3, 4]);
        assert_eq!(groups, b.assign(5, 3), "same round, same buckets");
        assert!(
            (0..20).any(|r| b.assign(5, r) != groups),
            "rounds reshuffle"
        );
        assert_eq!(
            Bucketing::new(1).unwrap().assign(3, 9),
            vec![vec![0], vec![1], vec![2]]
        );
        assert!(Bucketing::new(0).is_err());
    }
}
