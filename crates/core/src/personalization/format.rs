//! The masked file format: ONE safetensors file holding the model's tensors
//! plus, per float tensor `name` that has one, a U8 tensor
//! `__fedselect_shared__/name` of the same shape, 1 where the element is
//! shared and 0 where it is personal.
//!
//! Two files use it:
//!
//! - the **upload**: shared elements hold the local value, personal ones
//!   the *global* value (not 0). Then `local − global` is 0 wherever the
//!   client keeps its value, so clipping and zeroing measure exactly what
//!   is shared, with no mask-aware statistics; and the server can check
//!   that nothing personal was sent (a personal element must equal the
//!   global value, bit for bit after decoding).
//! - the **personal file** the client keeps: personal elements hold the
//!   personal value, shared ones 0.
//!
//! Why U8 rather than bit-packed: a mask block lines up element for element
//! with its values block, so the server streams both with the same block
//! ranges and no bit arithmetic; masks cost 1 byte per element (a quarter
//! of an F32 tensor) and compress to almost nothing in transit.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;

use super::layout::MaskedLayout;
use super::{mask_name, PersonalizationError};
use crate::limits::Limits;
use crate::model::{self, DenseTensor};
use crate::writer::write_model;

/// A whole masked file in memory (client side; models a client trains fit
/// in its memory anyway).
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedModel {
    /// The model's tensors, by name (masks not included).
    pub tensors: BTreeMap<String, DenseTensor>,
    /// Tensor name → its mask (1 shared, 0 personal).
    pub masks: BTreeMap<String, Vec<u8>>,
    pub metadata: BTreeMap<String, String>,
}

impl MaskedModel {
    /// Personal elements across all tensors.
    pub fn personal_elements(&self) -> usize {
        self.masks
            .values()
            .map(|m| m.iter().filter(|&&v| v == 0).count())
            .sum()
    }
}

/// Reads and validates a masked file: the header rules of
/// [`MaskedLayout::of`], and every mask value 0 or 1.
pub fn read_masked(path: &Path, limits: &Limits) -> Result<MaskedModel, PersonalizationError> {
    let invalid = |reason: String| PersonalizationError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let (_, header) = model::open(path, limits).map_err(|source| PersonalizationError::Model {
        path: path.to_path_buf(),
        source,
    })?;
    let layout = MaskedLayout::of(&header).map_err(invalid)?;
    let mut all =
        model::load_dense(path, limits).map_err(|source| PersonalizationError::Model {
            path: path.to_path_buf(),
            source,
        })?;
    let mut masks = BTreeMap::new();
    for name in layout.masks.keys() {
        let mname = mask_name(name);
        let mask = all.remove(&mname).map(|t| t.raw).unwrap_or_default();
        if let Some(j) = mask.iter().position(|&v| v > 1) {
            return Err(invalid(format!(
                "mask `{mname}` holds {} at element {j}: masks hold only 0 (personal) or 1 (shared)",
                mask[j]
            )));
        }
        masks.insert(name.clone(), mask);
    }
    Ok(MaskedModel {
        tensors: all,
        masks,
        metadata: header.metadata,
    })
}

/// Writes `tensors` plus a mask per entry of `masks` (each must name a
/// tensor of `tensors` and have its element count; the caller built them
/// from the same layout, so a mismatch is a bug reported as an error).
pub fn write_masked(
    path: &Path,
    tensors: &BTreeMap<String, DenseTensor>,
    masks: &BTreeMap<String, Vec<u8>>,
    metadata: &BTreeMap<String, String>,
) -> Result<u64, PersonalizationError> {
    let mut out: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.dtype, t.shape.clone(), t.raw.clone()))
        .collect();
    for (name, mask) in masks {
        let t = tensors
            .get(name)
            .ok_or_else(|| PersonalizationError::Invalid {
                path: path.to_path_buf(),
                reason: format!("a mask for `{name}`, which is not among the tensors to write"),
            })?;
        out.push((mask_name(name), Dtype::U8, t.shape.clone(), mask.clone()));
    }
    write_model(path, &out, metadata).map_err(|source| PersonalizationError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::float::encode_all_f64;

    fn dense(dtype: Dtype, values: &[f64]) -> DenseTensor {
        DenseTensor {
            dtype,
            shape: vec![values.len()],
            values: values.to_vec(),
            raw: encode_all_f64(dtype, values),
        }
    }

    #[test]
    fn round_trips_values_masks_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let tensors = BTreeMap::from([
            ("w".to_string(), dense(Dtype::F32, &[1.0, 2.0, 3.0])),
            ("b".to_string(), dense(Dtype::BF16, &[0.5])),
            (
                "step".to_string(),
                DenseTensor {
                    dtype: Dtype::I64,
                    shape: vec![1],
                    values: vec![],
                    raw: 9i64.to_le_bytes().to_vec(),
                },
            ),
        ]);
        let masks = BTreeMap::from([("w".to_string(), vec![1, 0, 1])]);
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_masked(&path, &tensors, &masks, &meta).unwrap();
        let back = read_masked(&path, &Limits::default()).unwrap();
        assert_eq!(back.tensors, tensors);
        assert_eq!(back.masks, masks);
        assert_eq!(back.metadata, meta);
        assert_eq!(back.personal_elements(), 1);
        // It is an ordinary safetensors file.
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(
            st.tensor("__fedselect_shared__/w").unwrap().dtype(),
            Dtype::U8
        );
    }

    #[test]
    fn rejects_mask_values_other_than_zero_and_one_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        let tensors = BTreeMap::from([("w".to_string(), dense(Dtype::F32, &[1.0, 2.0]))]);
        let masks = BTreeMap::from([("w".to_string(), vec![1, 2])]);
        write_masked(&path, &tensors, &masks, &BTreeMap::new()).unwrap();
        let err = read_masked(&path, &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad.safetensors")
                && err.contains("`__fedselect_shared__/w` holds 2 at element 1"),
            "{err}"
        );
        let err = write_masked(
            &path,
            &tensors,
            &BTreeMap::from([("v".to_string(), vec![1])]),
            &BTreeMap::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`v`"), "{err}");
    }
}
