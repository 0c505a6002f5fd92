//! An independent recomputation of FedSelect's masked mean from the files
//! in S3: element j of the next global model is the weighted mean of j over
//! the uploads that shared it (the round's global value if none did), in
//! f64. Like `fedavg.rs`, only the safetensors crate is shared with the code
//! under test: the file format (a U8 `__fedselect_shared__/<tensor>` per
//! masked tensor, 1 shared, 0 personal) is read here from its description,
//! not through fedstep-core, so a misreading on either side shows up.

use std::collections::BTreeMap;

use safetensors::{Dtype, SafeTensors};

use crate::fedavg::Tensors;

/// Tensor-name prefix of a mask (examples/aggregation/fedselect.toml).
pub const MASK_PREFIX: &str = "__fedselect_shared__/";

/// A model or an upload: its F32 tensors with their exact values, and the
/// masks it carries, by the tensor they mask.
#[derive(Clone)]
pub struct MaskedFile {
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    pub masks: BTreeMap<String, Vec<u8>>,
}

/// Reads a safetensors file of F32 tensors and U8 masks. Panics (naming
/// `what`) on anything else: another dtype, a mask without its tensor or of
/// another shape, a mask value other than 0 and 1.
pub fn read(what: &str, bytes: &[u8]) -> MaskedFile {
    let st = SafeTensors::deserialize(bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut tensors = BTreeMap::new();
    let mut masks = BTreeMap::new();
    let mut mask_shapes = BTreeMap::new();
    for (name, view) in st.tensors() {
        if let Some(tensor) = name.strip_prefix(MASK_PREFIX) {
            assert_eq!(view.dtype(), Dtype::U8, "{what}: mask {name} is not U8");
            let mask = view.data().to_vec();
            if let Some(j) = mask.iter().position(|&m| m > 1) {
                panic!("{what}: mask {name} holds {} at element {j}", mask[j]);
            }
            mask_shapes.insert(tensor.to_string(), view.shape().to_vec());
            masks.insert(tensor.to_string(), mask);
        } else {
            assert_eq!(view.dtype(), Dtype::F32, "{what}: {name}: only F32 here");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            tensors.insert(name, (view.shape().to_vec(), values));
        }
    }
    for (tensor, shape) in &mask_shapes {
        let (tshape, _) = tensors
            .get(tensor)
            .unwrap_or_else(|| panic!("{what}: a mask for {tensor}, which is not in the file"));
        assert_eq!(
            shape, tshape,
            "{what}: the mask of {tensor} has another shape"
        );
    }
    MaskedFile { tensors, masks }
}

impl MaskedFile {
    /// Whether element `j` of `tensor` is shared (no mask: every element is).
    pub fn shared(&self, tensor: &str, j: usize) -> bool {
        self.masks.get(tensor).is_none_or(|m| m[j] == 1)
    }

    /// The indices of `tensor`'s personal elements (mask 0).
    pub fn personal(&self, tensor: &str) -> Vec<usize> {
        self.masks
            .get(tensor)
            .map_or_else(Vec::new, |m| (0..m.len()).filter(|&j| m[j] == 0).collect())
    }

    /// The same values read as if every element were shared: what a plain
    /// (unmasked) FedAvg would have averaged.
    pub fn without_masks(&self) -> MaskedFile {
        MaskedFile {
            tensors: self.tensors.clone(),
            masks: BTreeMap::new(),
        }
    }
}

/// Per element j: Σ_{i shares j} wᵢ·xᵢⱼ / Σ_{i shares j} wᵢ, or the global
/// value when no update shares j. Panics when names or shapes disagree.
pub fn masked_mean(global: &MaskedFile, updates: &[(f64, MaskedFile)]) -> Tensors {
    for (i, (w, u)) in updates.iter().enumerate() {
        assert!(*w > 0.0, "update {i}: weight {w}");
        assert_eq!(
            u.tensors.keys().collect::<Vec<_>>(),
            global.tensors.keys().collect::<Vec<_>>(),
            "update {i}: tensor names differ from the global model's"
        );
    }
    let mut out = Tensors::new();
    for (name, (shape, g)) in &global.tensors {
        let mut mean = Vec::with_capacity(g.len());
        for (j, gj) in g.iter().enumerate() {
            let (mut sum, mut weight) = (0.0f64, 0.0f64);
            for (i, (w, u)) in updates.iter().enumerate() {
                let (ushape, values) = &u.tensors[name];
                assert_eq!(ushape, shape, "update {i}: {name} has another shape");
                if u.shared(name, j) {
                    sum += w * f64::from(values[j]);
                    weight += w;
                }
            }
            mean.push(if weight > 0.0 {
                sum / weight
            } else {
                f64::from(*gj)
            });
        }
        out.insert(name.clone(), (shape.clone(), mean));
    }
    out
}

/// The largest |model − expected| / (1 + |expected|) over the elements
/// `select(tensor, j)` picks (0 if it picks none).
pub fn max_deviation(
    model: &MaskedFile,
    expected: &Tensors,
    select: impl Fn(&str, usize) -> bool,
) -> f64 {
    let mut worst = 0.0f64;
    for (name, (shape, want)) in expected {
        let (mshape, got) = model
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("the model lacks tensor {name}"));
        assert_eq!(mshape, shape, "{name}: shapes differ");
        for (j, (g, w)) in got.iter().zip(want).enumerate() {
            if select(name, j) {
                worst = worst.max((f64::from(*g) - w).abs() / (1.0 + w.abs()));
            }
        }
    }
    worst
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(values: &[f32], mask: Option<&[u8]>) -> MaskedFile {
        MaskedFile {
            tensors: [("w".to_string(), (vec![values.len()], values.to_vec()))].into(),
            masks: mask
                .map(|m| [("w".to_string(), m.to_vec())].into())
                .unwrap_or_default(),
        }
    }

    #[test]
    fn averages_each_element_over_its_sharers() {
        let global = file(&[10.0, 10.0, 10.0], None);
        let updates = [
            (1.0, file(&[1.0, 10.0, 10.0], Some(&[1, 0, 0]))),
            (3.0, file(&[5.0, 2.0, 10.0], Some(&[1, 1, 0]))),
        ];
        let m = &masked_mean(&global, &updates)["w"].1;
        // (1·1 + 3·5)/4; only the second shares element 1; nobody element 2.
        assert_eq!(m, &vec![4.0, 2.0, 10.0]);
        let plain: Vec<(f64, MaskedFile)> = updates
            .iter()
            .map(|(w, u)| (*w, u.without_masks()))
            .collect();
        assert_eq!(masked_mean(&global, &plain)["w"].1, vec![4.0, 4.0, 10.0]);
        assert_eq!(updates[1].1.personal("w"), vec![2]);
        let dev = max_deviation(
            &file(&[4.0, 2.5, 10.0], None),
            &masked_mean(&global, &updates),
            |_, j| j == 1,
        );
        assert!((dev - 0.5 / 3.0).abs() < 1e-12, "{dev}");
    }

    #[test]
    fn reads_tensors_and_masks() {
        let w: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mask = [0u8, 1];
        let views = [
            (
                "w".to_string(),
                safetensors::tensor::TensorView::new(Dtype::F32, vec![2], &w).unwrap(),
            ),
            (
                format!("{MASK_PREFIX}w"),
                safetensors::tensor::TensorView::new(Dtype::U8, vec![2], &mask).unwrap(),
            ),
        ];
        let bytes = safetensors::serialize(views, None).unwrap();
        let f = read("test", &bytes);
        assert_eq!(f.tensors["w"].1, vec![1.5, -2.0]);
        assert_eq!(f.masks["w"], vec![0, 1]);
        assert!(!f.shared("w", 0) && f.shared("w", 1));
    }
}
