//! The client's split after local training: which elements become
//! personal, what is uploaded, what is kept.

use std::collections::BTreeMap;
use std::path::Path;

use super::format::{read_masked, write_masked};
use super::fractions::PersonalFractions;
use super::layout::is_float;
use super::mask::compute_mask;
use super::PersonalizationError;
use crate::float::elem_bytes;
use crate::limits::Limits;
use crate::model::{self, DenseTensor};

/// What [`split_update`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitSummary {
    /// Float elements in the model.
    pub float_elements: usize,
    /// Of those, how many are personal now.
    pub personal_elements: usize,
}

/// Splits a locally trained model into the upload and the personal file.
///
/// - `global`: the model of this round, as the server sent it;
/// - `local`: the model after local training (started from the merge of
///   `global` and `previous`);
/// - `fractions`: each float tensor's personal share this round
///   ([`Ramp::at`]); an override naming no float tensor is an error;
/// - `previous`: last round's personal file, if any: its personal elements
///   stay personal.
///
/// Writes `upload` (local values where shared, the global value where
/// personal, plus masks) and `personal` (personal values, 0 where shared,
/// plus masks); see [the format](super::format). Non-float tensors go to
/// both files with their local value and no mask.
///
/// [`Ramp::at`]: super::Ramp::at
pub fn split_update(
    global: &Path,
    local: &Path,
    fractions: &PersonalFractions,
    previous: Option<&Path>,
    upload: &Path,
    personal: &Path,
    limits: &Limits,
) -> Result<SplitSummary, PersonalizationError> {
    let load = |p: &Path| {
        model::load_dense(p, limits).map_err(|source| PersonalizationError::Model {
            path: p.to_path_buf(),
            source,
        })
    };
    let g = load(global)?;
    let l = load(local)?;
    same_layout(global, &g, local, &l)?;
    let float_names = l
        .iter()
        .filter(|(_, t)| is_float(t.dtype))
        .map(|(n, _)| n.as_str());
    fractions
        .check_names(float_names)
        .map_err(|reason| PersonalizationError::Invalid {
            path: local.to_path_buf(),
            reason,
        })?;
    let prev = match previous {
        Some(p) => {
            let m = read_masked(p, limits)?;
            same_layout(global, &g, p, &m.tensors)?;
            Some(m.masks)
        }
        None => None,
    };
    let mut up = BTreeMap::new();
    let mut keep = BTreeMap::new();
    let mut masks = BTreeMap::new();
    let mut summary = SplitSummary {
        float_elements: 0,
        personal_elements: 0,
    };
    for (name, lt) in &l {
        let gt = &g[name];
        if !is_float(lt.dtype) {
            up.insert(name.clone(), lt.clone());
            keep.insert(name.clone(), lt.clone());
            continue;
        }
        let before = prev.as_ref().and_then(|p| p.get(name)).map(Vec::as_slice);
        let mask =
            compute_mask(&lt.values, &gt.values, fractions.of(name), before).map_err(|reason| {
                PersonalizationError::Invalid {
                    path: local.to_path_buf(),
                    reason: format!("tensor `{name}`: {reason}"),
                }
            })?;
        let eb = elem_bytes(lt.dtype);
        let mut up_raw = lt.raw.clone();
        let mut keep_raw = vec![0u8; lt.raw.len()];
        for (j, &m) in mask.iter().enumerate() {
            let at = j * eb..(j + 1) * eb;
            if m == 0 {
                // Bit-exact copies: the server compares decoded values.
                up_raw[at.clone()].copy_from_slice(&gt.raw[at.clone()]);
                keep_raw[at.clone()].copy_from_slice(&lt.raw[at]);
                summary.personal_elements += 1;
            }
        }
        summary.float_elements += mask.len();
        up.insert(name.clone(), with_raw(lt, up_raw));
        keep.insert(name.clone(), with_raw(lt, keep_raw));
        masks.insert(name.clone(), mask);
    }
    let meta = BTreeMap::new();
    write_masked(upload, &up, &masks, &meta)?;
    write_masked(personal, &keep, &masks, &meta)?;
    Ok(summary)
}

fn with_raw(t: &DenseTensor, raw: Vec<u8>) -> DenseTensor {
    DenseTensor {
        dtype: t.dtype,
        shape: t.shape.clone(),
        values: crate::float::decode_all_f64(t.dtype, &raw),
        raw,
    }
}

/// Same tensor names, dtypes and shapes in `b` as in `a`.
pub(crate) fn same_layout(
    a_path: &Path,
    a: &BTreeMap<String, DenseTensor>,
    b_path: &Path,
    b: &BTreeMap<String, DenseTensor>,
) -> Result<(), PersonalizationError> {
    let invalid = |reason: String| PersonalizationError::Invalid {
        path: b_path.to_path_buf(),
        reason,
    };
    for (name, at) in a {
        match b.get(name) {
            None => {
                return Err(invalid(format!(
                    "tensor `{name}` is missing ({} has it)",
                    a_path.display()
                )))
            }
            Some(bt) if bt.dtype != at.dtype || bt.shape != at.shape => {
                return Err(invalid(format!(
                    "tensor `{name}` is {:?} {:?}, {} has {:?} {:?}",
                    bt.dtype,
                    bt.shape,
                    a_path.display(),
                    at.dtype,
                    at.shape
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = b.keys().find(|k| !a.contains_key(*k)) {
        return Err(invalid(format!(
            "tensor `{extra}` is not in {}",
            a_path.display()
        )));
    }
    Ok(())
}
