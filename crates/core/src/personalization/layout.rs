//! Telling a masked file's value tensors from its masks, and the header
//! rules a mask must follow. Mask *values* (only 0/1) are checked where the
//! data is read: while streaming on the server, in [`read_masked`] on the
//! client.
//!
//! [`read_masked`]: super::read_masked

use std::collections::BTreeMap;

use safetensors::Dtype;

use super::{mask_name, masked_tensor};
use crate::float::{role, TensorRole};
use crate::model::{check_compatible, ModelHeader, TensorEntry};

/// A masked file's header, split: the model's tensors and, per float tensor
/// that has one, its mask.
#[derive(Debug, Clone)]
pub struct MaskedLayout {
    /// Every tensor that is not a mask, in file order.
    pub values: Vec<TensorEntry>,
    /// Model tensor name → its mask's entry.
    pub masks: BTreeMap<String, TensorEntry>,
}

pub fn is_float(dtype: Dtype) -> bool {
    matches!(
        role(dtype),
        Some(TensorRole::Float32Acc | TensorRole::Float64Acc)
    )
}

impl MaskedLayout {
    /// Splits `header`. A mask must be U8, belong to a float tensor of the
    /// same file (no stray masks, none for integer or bool tensors: those
    /// are carried over, never averaged, so they cannot be personal) and
    /// have its tensor's shape.
    pub fn of(header: &ModelHeader) -> Result<MaskedLayout, String> {
        let values: Vec<TensorEntry> = header
            .tensors
            .iter()
            .filter(|t| masked_tensor(&t.name).is_none())
            .cloned()
            .collect();
        let mut masks = BTreeMap::new();
        for m in &header.tensors {
            let Some(base) = masked_tensor(&m.name) else {
                continue;
            };
            let Some(t) = values.iter().find(|t| t.name == base) else {
                return Err(format!(
                    "stray mask `{}`: the file has no tensor `{base}` for it to mask",
                    m.name
                ));
            };
            if !is_float(t.dtype) {
                return Err(format!(
                    "mask `{}` is for `{base}`, a {:?} tensor: only float tensors are \
                     averaged, so only they can have personal elements",
                    m.name, t.dtype
                ));
            }
            if m.dtype != Dtype::U8 {
                return Err(format!(
                    "mask `{}` has dtype {:?}: masks are U8 (1 shared, 0 personal)",
                    m.name, m.dtype
                ));
            }
            if m.shape != t.shape {
                return Err(format!(
                    "mask `{}` has shape {:?}, its tensor `{base}` has {:?}",
                    m.name, m.shape, t.shape
                ));
            }
            masks.insert(base.to_string(), m.clone());
        }
        Ok(MaskedLayout { values, masks })
    }

    /// The value tensors as a header, for [`check_compatible`].
    pub fn values_header(&self) -> ModelHeader {
        ModelHeader {
            header_len: 0,
            file_len: 0,
            tensors: self.values.clone(),
            metadata: BTreeMap::new(),
        }
    }

    /// The mask entry of tensor `name`, if it has one.
    pub fn mask_of(&self, name: &str) -> Option<&TensorEntry> {
        self.masks.get(name)
    }

    /// Names of every mask, as stored.
    pub fn mask_names(&self) -> impl Iterator<Item = String> + '_ {
        self.masks.keys().map(|k| mask_name(k))
    }
}

/// The server's layout check for a possibly-masked update: its value
/// tensors match the reference exactly (names, dtypes, shapes) and its
/// masks follow [`MaskedLayout::of`]'s rules. A tensor without a mask is
/// fully shared.
pub fn check_masked_compatible(
    reference: &ModelHeader,
    candidate: &ModelHeader,
) -> Result<MaskedLayout, String> {
    let layout = MaskedLayout::of(candidate)?;
    check_compatible(reference, &layout.values_header()).map_err(|e| e.to_string())?;
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, dtype: Dtype, shape: &[usize]) -> TensorEntry {
        TensorEntry {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            start: 0,
            end: 0,
        }
    }

    fn header(tensors: Vec<TensorEntry>) -> ModelHeader {
        ModelHeader {
            header_len: 0,
            file_len: 0,
            tensors,
            metadata: BTreeMap::new(),
        }
    }

    #[test]
    fn splits_values_from_masks() {
        let h = header(vec![
            entry("w", Dtype::F32, &[2, 3]),
            entry("__fedselect_shared__/w", Dtype::U8, &[2, 3]),
            entry("b", Dtype::F16, &[3]),
            entry("step", Dtype::I64, &[1]),
        ]);
        let l = MaskedLayout::of(&h).unwrap();
        let names: Vec<&str> = l.values.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["w", "b", "step"]);
        assert!(l.mask_of("w").is_some() && l.mask_of("b").is_none());
        let reference = header(vec![
            entry("w", Dtype::F32, &[2, 3]),
            entry("b", Dtype::F16, &[3]),
            entry("step", Dtype::I64, &[1]),
        ]);
        check_masked_compatible(&reference, &h).unwrap();
    }

    #[test]
    fn every_header_rule_is_named() {
        let w = || entry("w", Dtype::F32, &[4]);
        for (tensors, want) in [
            (
                vec![w(), entry("__fedselect_shared__/v", Dtype::U8, &[4])],
                "stray mask `__fedselect_shared__/v`",
            ),
            (
                vec![
                    w(),
                    entry("step", Dtype::I64, &[4]),
                    entry("__fedselect_shared__/step", Dtype::U8, &[4]),
                ],
                "a I64 tensor",
            ),
            (
                vec![w(), entry("__fedselect_shared__/w", Dtype::BOOL, &[4])],
                "dtype BOOL: masks are U8",
            ),
            (
                vec![w(), entry("__fedselect_shared__/w", Dtype::U8, &[2, 2])],
                "shape [2, 2], its tensor `w` has [4]",
            ),
            (
                vec![
                    w(),
                    entry(
                        "__fedselect_shared__/__fedselect_shared__/w",
                        Dtype::U8,
                        &[4],
                    ),
                ],
                "stray mask",
            ),
        ] {
            let err = MaskedLayout::of(&header(tensors)).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
        // Value tensors are still checked against the reference.
        let err = check_masked_compatible(
            &header(vec![w()]),
            &header(vec![entry("w", Dtype::F32, &[5])]),
        )
        .unwrap_err();
        assert!(err.contains("`w` has shape [5]"), "{err}");
    }
}
