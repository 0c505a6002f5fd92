//! The weighted mean (FedAvg), the default combiner: `out = c_g · g +
//! Σ c_i · x_i` with c_i = normalized weight × clip scale, so a clipped
//! update is averaged as `g + s_i · (x_i − g)`. Listing it is optional.

use rayon::prelude::*;
use safetensors::Dtype;

use super::{CombineBlock, CombineKernel, Combiner, RoundCombiner, Stage, StageInfo, StageTable};
use crate::combine::CombineError;
use crate::float::{add_weighted_from, all_finite, decode_into, elem_bytes, Acc};
use crate::statistics::{NonFinite, StatsError};

const CHUNK: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mean;

impl Mean {
    pub fn stage(table: &StageTable) -> Result<Stage, String> {
        super::params::<NoParams>("mean", table)?;
        Ok(Stage::Combiner(Box::new(Mean)))
    }
}

/// A stage table with nothing but its `kind`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

impl StageInfo for Mean {
    fn kind(&self) -> &'static str {
        "mean"
    }
}

impl Combiner for Mean {
    fn is_weighted_mean(&self) -> bool {
        true
    }

    fn reads_global(&self, _scaled: bool, global_coef: f64) -> bool {
        global_coef.abs() > 1e-12
    }

    fn for_round(
        &self,
        _n: usize,
        _round: u64,
    ) -> (Box<dyn RoundCombiner>, Option<serde_json::Value>) {
        (Box::new(Mean), None)
    }
}

impl<A: Acc> CombineKernel<A> for Mean {
    fn combine_block(&self, b: &CombineBlock<'_, A>, out: &mut [A]) -> Result<(), CombineError> {
        let gc = b.global.map(|g| (b.global_coef, g));
        match mean_block(b.tensor.dtype, gc, b.raws, b.coefs, out) {
            Some(j) => Err(find_culprit::<A>(b, j)),
            None => Ok(()),
        }
    }
}

/// out = c_g · g + Σ c_i · x_i, in parallel over chunks of the block.
/// Returns the first non-finite output, if any: each chunk is checked right
/// after it is summed, while it is still in cache.
pub fn mean_block<A: Acc>(
    dtype: Dtype,
    global: Option<(A, &[A])>,
    raws: &[Vec<u8>],
    coefs: &[A],
    out: &mut [A],
) -> Option<usize> {
    let eb = elem_bytes(dtype);
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .filter_map(|(c, o)| {
            let lo = c * CHUNK;
            let m = o.len();
            let xs: Vec<&[u8]> = raws.iter().map(|r| &r[lo * eb..(lo + m) * eb]).collect();
            match global {
                Some((gc, g)) => {
                    for (oj, gj) in o.iter_mut().zip(&g[lo..lo + m]) {
                        *oj = gc * *gj;
                    }
                    add_weighted_from(dtype, &xs, coefs, o, false);
                }
                // Summed from zero in registers: no pass zeroes the chunk.
                None => add_weighted_from(dtype, &xs, coefs, o, true),
            }
            if all_finite(o) {
                None
            } else {
                o.iter().position(|v| !v.is_finite()).map(|j| lo + j)
            }
        })
        .min()
}

/// A non-finite output means some input was non-finite: name it (or, if
/// none is, the sum overflowed).
fn find_culprit<A: Acc>(b: &CombineBlock<'_, A>, at: usize) -> CombineError {
    let t = b.tensor;
    let eb = elem_bytes(t.dtype);
    for (i, raw) in b.raws.iter().enumerate() {
        let mut vals = vec![A::default(); raw.len() / eb];
        decode_into(t.dtype, raw, &mut vals);
        if let Some(j) = vals.iter().position(|v| !v.is_finite()) {
            return CombineError::Input(StatsError::NonFinite(NonFinite {
                input: i,
                tensor: t.name.clone(),
                index: b.first + j,
                value: vals[j].to_f64(),
            }));
        }
    }
    CombineError::Overflow {
        tensor: t.name.clone(),
        index: b.first + at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::float::encode_all_f64;

    /// Without the global model the first input sets the chunk instead of
    /// being added to zeros; that must not change a bit, so products of −0
    /// still sum to +0, as 0 + (−0) does.
    #[test]
    fn the_first_term_sums_as_if_added_to_zeros() {
        for dtype in [Dtype::F32, Dtype::BF16] {
            let n = 3 * CHUNK + 5;
            let raws = vec![
                encode_all_f64(dtype, &vec![-0.0; n]),
                encode_all_f64(dtype, &vec![-0.0; n]),
            ];
            let mut out = vec![1f32; n];
            assert_eq!(mean_block(dtype, None, &raws, &[0.5, 0.5], &mut out), None);
            assert!(
                out.iter().all(|v| v.to_bits() == 0),
                "{dtype:?}: +0 everywhere"
            );
            let mut out = vec![1f32; n];
            assert_eq!(mean_block(dtype, None, &raws[..1], &[1.0], &mut out), None);
            assert!(out.iter().all(|v| v.to_bits() == 0), "{dtype:?}: one input");
            let mut out = vec![1f32; n];
            assert_eq!(mean_block::<f32>(dtype, None, &[], &[], &mut out), None);
            assert!(out.iter().all(|v| v.to_bits() == 0), "{dtype:?}: no input");
        }
    }

    /// The first non-finite output is reported, whichever chunk holds it.
    #[test]
    fn the_first_non_finite_output_is_found() {
        let n = 3 * CHUNK + 5;
        let mut v = vec![1.0; n];
        v[2 * CHUNK + 3] = f64::INFINITY;
        v[CHUNK + 7] = f64::NAN;
        let raws = vec![encode_all_f64(Dtype::F32, &v)];
        let mut out = vec![0f32; n];
        let g = vec![0f32; n];
        assert_eq!(
            mean_block(Dtype::F32, Some((0.5, &g)), &raws, &[0.5], &mut out),
            Some(CHUNK + 7)
        );
        assert_eq!(
            mean_block(Dtype::F32, None, &raws, &[1.0], &mut out),
            Some(CHUNK + 7)
        );
    }
}
