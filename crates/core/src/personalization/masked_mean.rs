//! The server side of FedSelect: the masked weighted mean of one block.
//!
//! For element j, with S_j the inputs whose mask says "shared",
//!
//! ```text
//! out_j = g_j + Σ_{i∈S_j} c_i (x_ij − g_j) / Σ_{i∈S_j} w_i     (S_j non-empty)
//! out_j = g_j                                                  (nobody shared j)
//! ```
//!
//! where w_i is input i's normalized weight (examples / uniform / quality)
//! and c_i = w_i × its clip scale (1 without clipping). When every input
//! shares j this is exactly the plain weighted mean (Σ w_i = 1). An input
//! without a mask for the tensor shares every element.
//!
//! The values block and the mask block arrive together (same element
//! range), so the masked mean streams like the plain one. Mask values and
//! the "personal elements carry the global value" rule are checked here,
//! where the data is; a violation rejects that input with the tensor, the
//! element and the rule.

use rayon::prelude::*;
use safetensors::Dtype;

use crate::float::{decode_into, elem_bytes, Acc};
use crate::statistics::{NonFinite, StatsError};

const CHUNK: usize = 2048;

/// One block of one tensor, from every input.
pub struct MaskedBlock<'a, A> {
    pub dtype: Dtype,
    pub tensor: &'a str,
    /// Index of the block's first element within the tensor.
    pub first: usize,
    pub global: &'a [A],
    /// Per input: the values block, raw.
    pub values: &'a [Vec<u8>],
    /// Per input: the mask block (one byte per element), or empty when the
    /// input has no mask for this tensor (all shared).
    pub masks: &'a [Vec<u8>],
    /// Per input: normalized weight × clip scale.
    pub coefs: &'a [A],
    /// Per input: normalized weight.
    pub weights: &'a [A],
}

/// What the masks said, summed over blocks.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Tally {
    /// Per input: elements it shared.
    pub shared: Vec<u64>,
    /// Elements no input shared (they keep the global value).
    pub shared_by_nobody: u64,
}

/// What the masks said over the round, as the records hold it.
#[derive(Debug, serde::Serialize)]
pub struct FedSelectMeasurement {
    pub float_elements: u64,
    /// Per client: the fraction of the float elements it shared.
    pub shared_fraction: std::collections::BTreeMap<String, f64>,
    pub shared_by_nobody: u64,
}

impl Tally {
    /// The measurement, given each input's client id and the model's
    /// number of float elements.
    pub fn measurement(&self, ids: &[&str], float_elements: u64) -> FedSelectMeasurement {
        FedSelectMeasurement {
            float_elements,
            shared_fraction: ids
                .iter()
                .zip(&self.shared)
                .map(|(id, &n)| (id.to_string(), n as f64 / float_elements.max(1) as f64))
                .collect(),
            shared_by_nobody: self.shared_by_nobody,
        }
    }

    pub fn new(inputs: usize) -> Tally {
        Tally {
            shared: vec![0; inputs],
            shared_by_nobody: 0,
        }
    }

    pub fn add(&mut self, other: &Tally) {
        for (a, b) in self.shared.iter_mut().zip(&other.shared) {
            *a += b;
        }
        self.shared_by_nobody += other.shared_by_nobody;
    }
}

/// Writes the masked mean of `b` into `out` (the block's length).
pub fn masked_mean_block<A: Acc>(
    b: &MaskedBlock<'_, A>,
    out: &mut [A],
) -> Result<Tally, StatsError> {
    let n = b.values.len();
    let eb = elem_bytes(b.dtype);
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .map(|(c, o)| {
            let lo = c * CHUNK;
            let m = o.len();
            let g = &b.global[lo..lo + m];
            if let Some(j) = g.iter().position(|v| !v.is_finite()) {
                return Err(StatsError::Global(format!(
                    "tensor `{}` holds a non-finite value at element {}",
                    b.tensor,
                    b.first + lo + j
                )));
            }
            let mut tally = Tally::new(n);
            let mut num = vec![A::default(); m];
            let mut den = vec![A::default(); m];
            let mut x = vec![A::default(); m];
            for i in 0..n {
                decode_into(b.dtype, &b.values[i][lo * eb..(lo + m) * eb], &mut x);
                let mask = (!b.masks[i].is_empty()).then(|| &b.masks[i][lo..lo + m]);
                let (ci, wi) = (b.coefs[i], b.weights[i]);
                // Checks first, then a branch-free accumulation the compiler
                // can vectorize: the checks stop at the first violation, and
                // the common inputs (no mask, or a valid one) pay one pass.
                if let Some(j) = x.iter().position(|v| !v.is_finite()) {
                    return Err(StatsError::NonFinite(NonFinite {
                        input: i,
                        tensor: b.tensor.to_string(),
                        index: b.first + lo + j,
                        value: x[j].to_f64(),
                    }));
                }
                let shared = match mask {
                    None => {
                        for j in 0..m {
                            num[j] += ci * (x[j] - g[j]);
                            den[j] += wi;
                        }
                        m as u64
                    }
                    Some(mk) => {
                        check_mask(b, i, lo, mk, &x, g)?;
                        let (zero, one) = (A::default(), A::from_f64(1.0));
                        let mut shared = 0u64;
                        for j in 0..m {
                            // A personal element holds the global value
                            // (checked above), so its term is 0 anyway;
                            // the mask only keeps it out of the denominator.
                            let s = if mk[j] == 1 { one } else { zero };
                            num[j] += ci * (x[j] - g[j]);
                            den[j] += s * wi;
                            // Checked to be 0 or 1: the sum counts the sharers.
                            shared += u64::from(mk[j]);
                        }
                        shared
                    }
                };
                tally.shared[i] += shared;
            }
            for j in 0..m {
                o[j] = if den[j] > A::default() {
                    g[j] + num[j] / den[j]
                } else {
                    tally.shared_by_nobody += 1;
                    g[j]
                };
            }
            Ok(tally)
        })
        .try_reduce(
            || Tally::new(n),
            |mut a, b| {
                a.add(&b);
                Ok(a)
            },
        )
}

/// A mask holds only 0/1, and a personal element (0) must hold the
/// global value: personal values never reach the server.
fn check_mask<A: Acc>(
    b: &MaskedBlock<'_, A>,
    input: usize,
    lo: usize,
    mask: &[u8],
    x: &[A],
    g: &[A],
) -> Result<(), StatsError> {
    let bad = mask
        .iter()
        .zip(x.iter().zip(g))
        .position(|(&mk, (xv, gv))| mk > 1 || (mk == 0 && xv != gv));
    let Some(j) = bad else {
        return Ok(());
    };
    let reason = if mask[j] > 1 {
        format!(
            "mask `{}` holds {} at element {}: masks hold only 0 (personal) or 1 (shared)",
            super::mask_name(b.tensor),
            mask[j],
            b.first + lo + j
        )
    } else {
        format!(
            "tensor `{}` element {} is personal (mask 0) but holds {}, not the global value {}: \
             personal values must not be uploaded",
            b.tensor,
            b.first + lo + j,
            x[j].to_f64(),
            g[j].to_f64()
        )
    };
    Err(StatsError::Invalid { input, reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::float::encode_all_f64;

    fn run(
        g: &[f64],
        xs: &[&[f64]],
        masks: &[&[u8]],
        weights: &[f64],
        scales: &[f64],
    ) -> Result<(Vec<f64>, Tally), StatsError> {
        let values: Vec<Vec<u8>> = xs.iter().map(|x| encode_all_f64(Dtype::F64, x)).collect();
        let masks: Vec<Vec<u8>> = masks.iter().map(|m| m.to_vec()).collect();
        let coefs: Vec<f64> = weights.iter().zip(scales).map(|(w, s)| w * s).collect();
        let mut out = vec![0.0; g.len()];
        let t = masked_mean_block(
            &MaskedBlock {
                dtype: Dtype::F64,
                tensor: "w",
                first: 10,
                global: g,
                values: &values,
                masks: &masks,
                coefs: &coefs,
                weights,
            },
            &mut out,
        )?;
        Ok((out, t))
    }

    #[test]
    fn each_element_is_averaged_over_its_sharers() {
        let g = [0.0, 1.0, 2.0, 3.0];
        // Weights 0.5, 0.3, 0.2. Personal elements carry the global value.
        let a = [1.0, 1.0, 4.0, 3.0];
        let b = [3.0, 5.0, 2.0, 3.0];
        let c = [5.0, 9.0, 2.0, 3.0];
        let (out, t) = run(
            &g,
            &[&a, &b, &c],
            &[&[1, 0, 1, 0], &[1, 1, 0, 0], &[1, 1, 0, 0]],
            &[0.5, 0.3, 0.2],
            &[1.0; 3],
        )
        .unwrap();
        // 0: all share: 0.5·1 + 0.3·3 + 0.2·5 = 2.4
        // 1: b, c share: 1 + (0.3·4 + 0.2·8)/0.5 = 1 + 2.8/0.5 = 6.6
        // 2: a alone: 2 + 0.5·2/0.5 = 4
        // 3: nobody: the global value 3
        let want = [2.4, 6.6, 4.0, 3.0];
        for (o, w) in out.iter().zip(want) {
            assert!((o - w).abs() < 1e-12, "{out:?}");
        }
        assert_eq!(t.shared, vec![2, 2, 2]);
        assert_eq!(t.shared_by_nobody, 1);
    }

    #[test]
    fn clip_scales_the_update_and_the_denominator_stays_the_weight() {
        // a (weight 0.6, clip scale 0.5) and b (weight 0.4, no mask: shares
        // all) both share both elements, so the denominator is 1:
        // element 0 = 1 + 0.6·0.5·(5 − 1) + 0.4·(3 − 1) = 3.0,
        // element 1 = 1 + 0.6·0.5·(5 − 1) + 0.4·(1 − 1) = 2.2.
        let (out, _) = run(
            &[1.0, 1.0],
            &[&[5.0, 5.0], &[3.0, 1.0]],
            &[&[1, 1], &[]],
            &[0.6, 0.4],
            &[0.5, 1.0],
        )
        .unwrap();
        assert!(
            (out[0] - 3.0).abs() < 1e-12 && (out[1] - 2.2).abs() < 1e-12,
            "{out:?}"
        );
    }

    #[test]
    fn violations_name_the_input_tensor_element_and_rule() {
        let err = run(
            &[0.0, 0.0],
            &[&[1.0, 1.0], &[0.0, 7.0]],
            &[&[], &[1, 0]],
            &[0.5, 0.5],
            &[1.0; 2],
        );
        match err {
            Err(StatsError::Invalid { input: 1, reason }) => {
                assert!(
                    reason.contains("`w` element 11 is personal") && reason.contains("holds 7"),
                    "{reason}"
                )
            }
            _ => panic!("expected a personal-value violation"),
        }
        let err = run(&[0.0], &[&[1.0]], &[&[3]], &[1.0], &[1.0]);
        match err {
            Err(StatsError::Invalid { input: 0, reason }) => {
                assert!(
                    reason.contains("`__fedselect_shared__/w` holds 3 at element 10"),
                    "{reason}"
                )
            }
            _ => panic!("expected a mask-value violation"),
        }
        let err = run(&[0.0], &[&[f64::NAN]], &[&[0]], &[1.0], &[1.0]);
        assert!(matches!(
            err,
            Err(StatsError::NonFinite(NonFinite {
                input: 0,
                index: 10,
                ..
            }))
        ));
        let err = run(&[f64::INFINITY], &[&[1.0]], &[&[1]], &[1.0], &[1.0]);
        assert!(matches!(err, Err(StatsError::Global(_))));
    }
}
