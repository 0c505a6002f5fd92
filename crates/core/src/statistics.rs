//! The statistics pass: one streaming read of every input to compute the
//! Gram matrix of the updates (update = local − global, or the model itself
//! when there is no global) and to find non-finite values before anything is
//! combined. Norms come from its diagonal; Krum's distances from all of it.

use rayon::prelude::*;

use crate::float::{decode_into, elem_bytes, role, Acc, TensorRole};
use crate::model::TensorEntry;
use crate::stream::{blocks, Source};

/// A value that is not finite, found in input `input` (index into the
/// inputs given to the pass).
#[derive(Debug, Clone, PartialEq)]
pub struct NonFinite {
    pub input: usize,
    pub tensor: String,
    pub index: usize,
    pub value: f64,
}

pub enum StatsError {
    NonFinite(NonFinite),
    /// Reading input `input` failed.
    Read {
        input: usize,
        error: std::io::Error,
    },
    /// The global model could not be read or holds a non-finite value.
    Global(String),
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
    let mut raws: Vec<Vec<u8>> = vec![Vec::new(); n];
    let mut graw = Vec::new();
    let mut bytes_read = 0u64;
    for t in reference {
        let acc64 = match role(t.dtype) {
            Some(TensorRole::Float32Acc) => false,
            Some(TensorRole::Float64Acc) => true,
            _ => continue,
        };
        let eb = elem_bytes(t.dtype);
        for range in blocks(t.elements(), block_elems) {
            let off = (range.start * eb) as u64;
            let bytes = range.len() * eb;
            read_all(inputs, &t.name, off, bytes, &mut raws)?;
            bytes_read += (bytes * n) as u64;
            if let Some(g) = global {
                graw.resize(bytes, 0);
                g.read(&t.name, off, &mut graw)
                    .map_err(|e| StatsError::Global(format!("reading `{}`: {e}", t.name)))?;
                bytes_read += bytes as u64;
            }
            let g = global.map(|_| graw.as_slice());
            let partial = if acc64 {
                block_gram::<f64>(t, range.start, g, &raws, full)?
            } else {
                block_gram::<f32>(t, range.start, g, &raws, full)?
            };
            for (a, b) in gram.iter_mut().zip(partial) {
                *a += b;
            }
        }
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

/// Reads the same byte range of one tensor from every input, in parallel.
pub(crate) fn read_all(
    inputs: &[&Source],
    name: &str,
    offset: u64,
    bytes: usize,
    raws: &mut [Vec<u8>],
) -> Result<(), StatsError> {
    raws.par_iter_mut()
        .zip(inputs.par_iter())
        .enumerate()
        .try_for_each(|(i, (buf, src))| {
            buf.resize(bytes, 0);
            src.read(name, offset, buf)
                .map_err(|error| StatsError::Read { input: i, error })
        })
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
