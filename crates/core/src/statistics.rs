//! The statistics pass: one streaming read of every input to compute the
//! Gram matrix of the updates (update = local − global, or the model itself
//! when there is no global) and to find non-finite values before anything is
//! combined. Norms come from its diagonal; Krum's distances from all of it.

use rayon::prelude::*;

use crate::float::{decode_into, elem_bytes, role, Acc, TensorRole};
use crate::model::TensorEntry;
use crate::shard::{Stripe, STRIPE_ELEMENTS};
use crate::stream::{for_each_item, stripe_blocks, Lane, ReadFailure, Source, BLOCK_ALIGN};

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

/// What a statistics pass over some stripes found: per float stripe, in
/// order, its partial Gram matrix (n × n, row-major; only the diagonal is
/// filled unless `full`).
pub struct StripeGrams {
    pub stripes: Vec<Vec<f64>>,
    pub bytes_read: u64,
}

const CHUNK: usize = BLOCK_ALIGN;

/// The Gram matrix from every float stripe's partial, in stripe order.
/// Each stripe's partial is the sum, in order, of its chunks' dot products
/// (chunks of `CHUNK` elements from the stripe's start), so the result is
/// the same bit for bit whether one pass or K shards computed the stripes.
pub fn gram(stripes: &[Vec<f64>], n: usize) -> Vec<Vec<f64>> {
    let mut sum = vec![0f64; n * n];
    for partial in stripes {
        for (a, b) in sum.iter_mut().zip(partial) {
            *a += b;
        }
    }
    (0..n)
        .map(|i| {
            (0..n)
                .map(|j| {
                    if j <= i {
                        sum[i * n + j]
                    } else {
                        sum[j * n + i]
                    }
                })
                .collect()
        })
        .collect()
}

/// The statistics pass over `stripes` (of `reference`): every input's
/// values checked, the partial Gram matrix of each float stripe.
pub fn run(
    reference: &[TensorEntry],
    stripes: &[Stripe],
    global: Option<&Source>,
    inputs: &[&Source],
    full: bool,
    block_elems: usize,
) -> Result<StripeGrams, StatsError> {
    let n = inputs.len();
    let mut partials: Vec<Vec<f64>> = Vec::new();
    let mut bytes_read = 0u64;
    let mut sources: Vec<Lane<'_>> = inputs.iter().map(|&s| Lane::Values(s)).collect();
    sources.extend(global.map(Lane::Values));
    let is_float = |t: &TensorEntry| {
        matches!(
            role(t.dtype),
            Some(TensorRole::Float32Acc | TensorRole::Float64Acc)
        )
    };
    // A reader fetching ahead then fetches only the stripes read here.
    for source in inputs.iter().copied().chain(global) {
        source.will_read_stripes(
            reference,
            stripes.iter().filter(|s| is_float(&reference[s.tensor])),
        );
    }
    let items = stripe_blocks(reference, stripes, is_float, block_elems);
    let result = for_each_item(items, &sources, |block| {
        let (xs, g) = block.raws.split_at(n);
        let g = g.first().map(Vec::as_slice);
        bytes_read += block.raws.iter().map(|r| r.len() as u64).sum::<u64>();
        // Stripes start at multiples of STRIPE_ELEMENTS of their tensor,
        // and blocks at their stripe's start.
        if block.range.start % STRIPE_ELEMENTS == 0 {
            partials.push(vec![0f64; n * n]);
        }
        let stripe = partials.last_mut().expect("a block starts each stripe");
        let chunks = match role(block.tensor.dtype) {
            Some(TensorRole::Float64Acc) => {
                block_gram::<f64>(block.tensor, block.range.start, g, xs, full)?
            }
            _ => block_gram::<f32>(block.tensor, block.range.start, g, xs, full)?,
        };
        for chunk in chunks {
            for (a, b) in stripe.iter_mut().zip(chunk) {
                *a += b;
            }
        }
        Ok(block.raws)
    });
    match result {
        Err(StatsError::Read { input, error }) if input == n => {
            return Err(StatsError::Global(format!("reading: {error}")))
        }
        other => other?,
    }
    Ok(StripeGrams {
        stripes: partials,
        bytes_read,
    })
}

impl From<ReadFailure> for StatsError {
    fn from(f: ReadFailure) -> Self {
        StatsError::Read {
            input: f.source,
            error: f.error,
        }
    }
}

/// Each chunk's partial Gram matrix, in chunk order.
fn block_gram<A: Acc>(
    t: &TensorEntry,
    first: usize,
    global: Option<&[u8]>,
    raws: &[Vec<u8>],
    full: bool,
) -> Result<Vec<Vec<f64>>, StatsError> {
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
        // In chunk order: the caller adds them up in that order.
        .collect()
}
