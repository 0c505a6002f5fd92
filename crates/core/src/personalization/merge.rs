//! Putting a client's personal values back into the next global model
//! before it trains.

use std::path::Path;

use super::format::read_masked;
use super::split::same_layout;
use super::PersonalizationError;
use crate::float::elem_bytes;
use crate::limits::Limits;
use crate::model;
use crate::writer::write_model;

/// What [`merge_personal`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeSummary {
    /// Elements that took the personal value.
    pub personal_elements: usize,
}

/// Writes to `out` the model `global` with every personal element (mask 0
/// in the `personal` file) replaced by its personal value. Shared elements
/// and tensors without a mask take the global value; so do integer/bool
/// tensors. The output is a plain model (no masks) with the global model's
/// metadata. The personal file must have the global model's layout.
pub fn merge_personal(
    global: &Path,
    personal: &Path,
    out: &Path,
    limits: &Limits,
) -> Result<MergeSummary, PersonalizationError> {
    let g = model::load_dense(global, limits).map_err(|source| PersonalizationError::Model {
        path: global.to_path_buf(),
        source,
    })?;
    let (_, header) =
        model::open(global, limits).map_err(|source| PersonalizationError::Model {
            path: global.to_path_buf(),
            source,
        })?;
    let p = read_masked(personal, limits)?;
    same_layout(global, &g, personal, &p.tensors)?;
    let mut merged = 0usize;
    let mut tensors = Vec::with_capacity(g.len());
    // File order, so the merged model looks like the global one.
    for entry in &header.tensors {
        let gt = &g[&entry.name];
        let mut raw = gt.raw.clone();
        if let Some(mask) = p.masks.get(&entry.name) {
            let eb = elem_bytes(gt.dtype);
            let pt = &p.tensors[&entry.name];
            for (j, _) in mask.iter().enumerate().filter(|&(_, &m)| m == 0) {
                let at = j * eb..(j + 1) * eb;
                raw[at.clone()].copy_from_slice(&pt.raw[at]);
                merged += 1;
            }
        }
        tensors.push((entry.name.clone(), gt.dtype, gt.shape.clone(), raw));
    }
    write_model(out, &tensors, &header.metadata).map_err(|source| PersonalizationError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(MergeSummary {
        personal_elements: merged,
    })
}
