//! An independent recomputation of FedAvg from the files in S3: the
//! weighted mean of the uploaded models, in f64, compared with the global
//! model the aggregator wrote. Only the safetensors crate is shared with
//! the code under test; the arithmetic is this file's own.

use std::collections::BTreeMap;

use safetensors::{Dtype, SafeTensors};

/// Tensors by name: (shape, values as f64).
pub type Tensors = BTreeMap<String, (Vec<usize>, Vec<f64>)>;

/// The tensors of an F32 safetensors file, by name, as f64.
pub fn read_f32(bytes: &[u8]) -> Tensors {
    let st = SafeTensors::deserialize(bytes).expect("a safetensors file");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{name}: only F32 models here");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

/// The largest |global − Σ wᵢ·updateᵢ / Σ wᵢ| over every element, after
/// checking the names and shapes agree. Panics on a layout mismatch.
pub fn max_deviation(global: &[u8], updates: &[(f64, Vec<u8>)]) -> f64 {
    let global = read_f32(global);
    let total: f64 = updates.iter().map(|(w, _)| w).sum();
    assert!(total > 0.0, "the weights sum to {total}");
    let updates: Vec<(f64, Tensors)> = updates
        .iter()
        .map(|(w, bytes)| (w / total, read_f32(bytes)))
        .collect();
    let mut worst = 0.0f64;
    for (name, (shape, values)) in &global {
        let mut mean = vec![0.0f64; values.len()];
        for (w, tensors) in &updates {
            let (ushape, uvalues) = tensors
                .get(name)
                .unwrap_or_else(|| panic!("an update lacks tensor {name}"));
            assert_eq!(
                ushape, shape,
                "{name}: update shape differs from the global model's"
            );
            for (m, u) in mean.iter_mut().zip(uvalues) {
                *m += w * u;
            }
        }
        for (g, m) in values.iter().zip(&mean) {
            worst = worst.max((g - m).abs() / (1.0 + m.abs()));
        }
    }
    for (_, tensors) in &updates {
        assert_eq!(
            tensors.keys().collect::<Vec<_>>(),
            global.keys().collect::<Vec<_>>(),
            "an update's tensor names differ from the global model's"
        );
    }
    worst
}
