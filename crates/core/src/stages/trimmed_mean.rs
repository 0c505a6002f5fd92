//! Coordinate-wise trimmed mean (Yin et al., 2018): per coordinate, drop the
//! ⌊β·n⌋ largest and ⌊β·n⌋ smallest values and average the rest (n = number
//! of buckets when `bucket` > 1, see `bucketing`). Unweighted, for the same
//! reason as the median.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::bucketing::{coordinatewise, Bucketing};
use super::median::RANKS_MASKED_VALUES;
use super::{
    measured, params, CombineBlock, CombineKernel, Combiner, RoundCombiner, Stage, StageInfo,
    StageTable,
};
use crate::combine::CombineError;
use crate::float::Acc;

#[derive(Debug, Clone, PartialEq)]
pub struct TrimmedMean {
    pub beta: f64,
    pub bucketing: Bucketing,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrimmedMeanParams {
    beta: f64,
    #[serde(default = "one")]
    bucket: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Serialize)]
pub struct TrimmedMeanMeasurement {
    pub beta: f64,
    pub trimmed_each_end: usize,
    pub buckets: usize,
    pub bucket_size: usize,
}

impl TrimmedMean {
    pub fn new(beta: f64, bucket: usize) -> Result<Self, String> {
        if !(0.0..0.5).contains(&beta) {
            return Err(format!(
                "trimmed_mean: beta must be in [0, 0.5), got {beta}"
            ));
        }
        let bucketing = Bucketing::new(bucket).map_err(|e| format!("trimmed_mean: {e}"))?;
        Ok(TrimmedMean { beta, bucketing })
    }

    pub fn stage(table: &StageTable) -> Result<Stage, String> {
        let p: TrimmedMeanParams = params("trimmed_mean", table)?;
        Ok(Stage::Combiner(Box::new(TrimmedMean::new(
            p.beta, p.bucket,
        )?)))
    }

    /// How many values are dropped at each end for `n` updates.
    pub fn trim_count(&self, n: usize) -> usize {
        (self.beta * n as f64).floor() as usize
    }
}

/// The trimmed mean of `values` (sorts them). Callers check
/// `2 · trim < values.len()` first.
pub fn trimmed_mean<A: Acc>(values: &mut [A], trim: usize) -> A {
    values.sort_unstable_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let kept = &values[trim..values.len() - trim];
    let mut sum = A::default();
    for v in kept {
        sum += *v;
    }
    sum / A::from_f64(kept.len() as f64)
}

impl StageInfo for TrimmedMean {
    fn kind(&self) -> &'static str {
        "trimmed_mean"
    }

    fn fedselect_refusal(&self) -> Option<&'static str> {
        Some(RANKS_MASKED_VALUES)
    }
}

impl Combiner for TrimmedMean {
    fn ignores_weights(&self) -> bool {
        true
    }

    fn reads_global(&self, scaled: bool, _global_coef: f64) -> bool {
        scaled
    }

    fn for_round(&self, n: usize, round: u64) -> (Box<dyn RoundCombiner>, Option<Value>) {
        let buckets = self.bucketing.assign(n, round);
        let trim = self.trim_count(buckets.len());
        // β < 0.5 (checked when the stage is built) keeps 2k < n.
        debug_assert!(2 * trim < buckets.len());
        let m = measured(&TrimmedMeanMeasurement {
            beta: self.beta,
            trimmed_each_end: trim,
            buckets: buckets.len(),
            bucket_size: self.bucketing.size,
        });
        (Box::new(TrimmedMeanRound { buckets, trim }), Some(m))
    }
}

struct TrimmedMeanRound {
    buckets: Vec<Vec<usize>>,
    trim: usize,
}

impl<A: Acc> CombineKernel<A> for TrimmedMeanRound {
    fn combine_block(&self, b: &CombineBlock<'_, A>, out: &mut [A]) -> Result<(), CombineError> {
        coordinatewise(
            b,
            &self.buckets,
            |column| trimmed_mean(column, self.trim),
            out,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_both_tails() {
        let t = TrimmedMean::new(0.2, 1).unwrap();
        assert_eq!(t.trim_count(5), 1);
        // Drop -100 and 100; mean of 1, 2, 3.
        assert_eq!(trimmed_mean(&mut [100.0f64, 1.0, -100.0, 3.0, 2.0], 1), 2.0);
        assert_eq!(trimmed_mean(&mut [1.0f32, 2.0], 0), 1.5);
        assert!(TrimmedMean::new(0.5, 1).is_err());
        assert!(TrimmedMean::new(0.2, 0).is_err());
    }
}
