//! The weighted mean (FedAvg), the default combiner: `out = c_g · g +
//! Σ c_i · x_i` with c_i = normalized weight × clip scale, so a clipped
//! update is averaged as `g + s_i · (x_i − g)`. Listing it is optional.

use rayon::prelude::*;
use safetensors::Dtype;

use super::{CombineBlock, CombineKernel, Combiner, RoundCombiner, Stage, StageInfo, StageTable};
use crate::combine::CombineError;
use crate::float::{axpy_from, decode_into, elem_bytes, Acc};
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
        mean_block(b.tensor.dtype, gc, b.raws, b.coefs, out);
        match out.par_iter().position_any(|v| !v.is_finite()) {
            Some(j) => Err(find_culprit::<A>(b, j)),
            None => Ok(()),
        }
    }
}

/// out = c_g · g + Σ c_i · x_i, in parallel over chunks of the block.
pub fn mean_block<A: Acc>(
    dtype: Dtype,
    global: Option<(A, &[A])>,
    raws: &[Vec<u8>],
    coefs: &[A],
    out: &mut [A],
) {
    let eb = elem_bytes(dtype);
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let lo = c * CHUNK;
        let m = o.len();
        match global {
            Some((gc, g)) => {
                for (oj, gj) in o.iter_mut().zip(&g[lo..lo + m]) {
                    *oj = gc * *gj;
                }
            }
            None => o.fill(A::default()),
        }
        for (raw, &coef) in raws.iter().zip(coefs) {
            axpy_from(dtype, coef, &raw[lo * eb..(lo + m) * eb], o);
        }
    });
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
