//! Coordinate-wise median (Yin et al., 2018): robust to a minority of
//! arbitrary updates. Unweighted by design: a weight would let one client
//! claiming many examples move the median, which is what it must resist.
//! `bucket` > 1 first averages random groups of that many updates (see
//! `bucketing`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::bucketing::{coordinatewise, Bucketing};
use super::{
    measured, params, CombineBlock, CombineKernel, Combiner, RoundCombiner, Stage, StageInfo,
    StageTable,
};
use crate::combine::CombineError;
use crate::float::Acc;

#[derive(Debug, Clone, PartialEq)]
pub struct Median {
    pub bucketing: Bucketing,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MedianParams {
    #[serde(default = "one")]
    bucket: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Serialize)]
pub struct MedianMeasurement {
    pub updates: usize,
    pub buckets: usize,
    pub bucket_size: usize,
}

impl Median {
    pub fn stage(table: &StageTable) -> Result<Stage, String> {
        let p: MedianParams = params("median", table)?;
        let bucketing = Bucketing::new(p.bucket).map_err(|e| format!("median: {e}"))?;
        Ok(Stage::Combiner(Box::new(Median { bucketing })))
    }
}

/// why the median cannot run under FedSelect (shared with the trimmed mean).
pub const RANKS_MASKED_VALUES: &str =
    "it ranks every client's value of an element, but with masks each element \
     has its own set of sharers, and personal elements (which hold the global \
     value) would count as votes for the old model; use the mean";

impl StageInfo for Median {
    fn kind(&self) -> &'static str {
        "median"
    }

    fn fedselect_refusal(&self) -> Option<&'static str> {
        Some(RANKS_MASKED_VALUES)
    }
}

impl Combiner for Median {
    fn ignores_weights(&self) -> bool {
        true
    }

    fn reads_global(&self, scaled: bool, _global_coef: f64) -> bool {
        scaled
    }

    fn for_round(&self, n: usize, round: u64) -> (Box<dyn RoundCombiner>, Option<Value>) {
        let buckets = self.bucketing.assign(n, round);
        let m = measured(&MedianMeasurement {
            updates: n,
            buckets: buckets.len(),
            bucket_size: self.bucketing.size,
        });
        (Box::new(MedianRound { buckets }), Some(m))
    }
}

struct MedianRound {
    buckets: Vec<Vec<usize>>,
}

impl<A: Acc> CombineKernel<A> for MedianRound {
    fn combine_block(&self, b: &CombineBlock<'_, A>, out: &mut [A]) -> Result<(), CombineError> {
        coordinatewise(b, &self.buckets, |column| median(column), out)
    }
}

/// The median of `values` (reorders them). Even counts average the two
/// middle values. `values` must be non-empty and hold no NaN.
pub fn median<A: Acc>(values: &mut [A]) -> A {
    let n = values.len();
    let mid = n / 2;
    let cmp = |a: &A, b: &A| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal);
    let (lower, upper_mid, _) = values.select_nth_unstable_by(mid, cmp);
    let upper_mid = *upper_mid;
    if n % 2 == 1 {
        upper_mid
    } else {
        let lower_mid = lower
            .iter()
            .copied()
            .fold(None, |m: Option<A>, v| match m {
                Some(m) if m >= v => Some(m),
                _ => Some(v),
            })
            .unwrap_or(upper_mid);
        (lower_mid + upper_mid) / A::from_f64(2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_and_even_counts() {
        assert_eq!(median(&mut [3.0f32, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0f64, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut [7.0f32]), 7.0);
        // One huge outlier does not move it.
        assert_eq!(median(&mut [1.0f32, 1e30, 2.0, 1.5, 1.2]), 1.5);
    }
}
