//! The statistics pass: one streaming read of every input to compute the
//! Gram matrix of the updates (update = local − global, or the model itself
//! when there is no global) and to find non-finite values before anything is
//! combined. Norms come from its diagonal; Krum's distances from all of it.

use rayon::prelude::*;

use crate::float::{decode_into, elem_bytes, role, Acc, TensorRole};
use crate::model::TensorEntry;
use crate::stream::{for_each_block, ReadFailure, Source};

/// A value that is not finite, found in input `input` (index into the
/// inputs given to the pass).
#[derive(Debug, Clone, PartialEq)]
pub struct NonFinite {
    pub input: usize,
    pub tensor: String,
    pub index: usize,
    pub value: f64,
}

#[derive(Debug)]
pub enum StatsError {
    NonFinite(NonFinite),
    /// Reading input `input` failed.
    Read {
        input: usize,
        error: std::io::Error,
    },
    /// The global model could not be read or holds a non-finite value.
    Global(String),
    /// Input `input` broke a rule on its values (e.g. a FedSelect mask);
    /// `reason` names the tensor, the element and the rule.
    Invalid {
        input: usize,
        reason: String,
    },
}

pub struct Statistics {
    /// gram[i][j] = ⟨u_i, u_j⟩ (only the diagonal unless `full`).
    pub gram: Vec<Vec<f64>>,
    pub bytes_read: u64,
}

const CHUNK: usize = 2048;

pub fn run(
    reference: &[TensorEntry],
    global: Option<&Source>,
    inputs: &[&Source],
    full: bool,
    block_elems: usize,
) -> Result<Statistics, StatsError> {
    let n = inputs.len();
    let mut gram = vec![0f64; n * n];
    let mut bytes_read = 0u64;
    let mut sources = inputs.to_vec();
    sources.extend(global);
    let is_float = |t: &TensorEntry| {
        matches!(
            role(t.dtype),
            Some(TensorRole::Float32Acc | TensorRole::Float64Acc)
        )
    };
    let result = for_each_block(reference, is_float, &sources, block_elems, |block| {
        let (xs, g) = block.raws.split_at(n);
        let g = g.first().map(Vec::as_slice);
        bytes_read += block.raws.iter().map(|r| r.len() as u64).sum::<u64>();
        let partial = match role(block.tensor.dtype) {
            Some(TensorRole::Float64Acc) => {
                block_gram::<f64>(block.tensor, block.range.start, g, xs, full)?
            }
            _ => block_gram::<f32>(block.tensor, block.range.start, g, xs, full)?,
        };
        for (a, b) in gram.iter_mut().zip(partial) {
            *a += b;
        }
        Ok(block.raws)
    });
    match result {
        Err(StatsError::Read { input, error }) if input == n => {
            return Err(StatsError::Global(format!("reading: {error}")))
        }
        other => other?,
    }
    let gram = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| {
                    if j <= i {
                        gram[i * n + j]
                    } else {
                        gram[j * n + i]
                    }
                })
                .collect()
        })
        .collect();
    Ok(Statistics { gram, bytes_read })
}

impl From<ReadFailure> for StatsError {
    fn from(f: ReadFailure) -> Self {
        StatsError::Read {
            input: f.source,
            error: f.error,
        }
    }
}

fn block_gram<A: Acc>(
    t: &TensorEntry,
    first: usize,
    global: Option<&[u8]>,
    raws: &[Vec<u8>],
    full: bool,
) -> Result<Vec<f64>, StatsError> {
    let n = raws.len();
    let eb = elem_bytes(t.dtype);
    let len = raws.first().map_or(0, |r| r.len() / eb);
    let chunks = len.div_ceil(CHUNK);
    (0..chunks)
        .into_par_iter()
        .map(|c| {
            let lo = c * CHUNK;
            let hi = (lo + CHUNK).min(len);
            let m = hi - lo;
            let mut g = vec![A::default(); m];
            if let Some(gb) = global {
                decode_into(t.dtype, &gb[lo * eb..hi * eb], &mut g);
                if let Some(j) = g.iter().position(|v| !v.is_finite()) {
                    return Err(StatsError::Global(format!(
                        "tensor `{}` holds a non-finite value at element {}",
                        t.name,
                        first + lo + j
                    )));
                }
            }
            let mut u = vec![A::default(); n * m];
            for i in 0..n {
                let ui = &mut u[i * m..(i + 1) * m];
                decode_into(t.dtype, &raws[i][lo * eb..hi * eb], ui);
                if let Some(j) = ui.iter().position(|v| !v.is_finite()) {
                    return Err(StatsError::NonFinite(NonFinite {
                        input: i,
                        tensor: t.name.clone(),
                        index: first + lo + j,
                        value: ui[j].to_f64(),
                    }));
                }
                if global.is_some() {
                    for (x, gv) in ui.iter_mut().zip(&g) {
                        *x = *x - *gv;
                    }
                }
            }
            let mut partial = vec![0f64; n * n];
            for i in 0..n {
                let ui = &u[i * m..(i + 1) * m];
                let js = if full { 0..=i } else { i..=i };
                for j in js {
                    let uj = &u[j * m..(j + 1) * m];
                    partial[i * n + j] = ui
                        .iter()
                        .zip(uj)
                        .map(|(a, b)| a.to_f64() * b.to_f64())
                        .sum();
                }
            }
            Ok(partial)
        })
        .try_reduce(
            || vec![0f64; n * n],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
                Ok(a)
            },
        )
}
