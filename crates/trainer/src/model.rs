//! The MLP's parameters and their safetensors form.
//!
//! The federation only ever moves safetensors bytes, so this file is the
//! contract with the aggregator: exactly four F32 tensors named
//! `fc1.weight` `[hidden, input]`, `fc1.bias` `[hidden]`, `fc2.weight`
//! `[classes, hidden]`, `fc2.bias` `[classes]` (PyTorch `nn.Linear` layout,
//! so a PyTorch client can join the same job). Anything else is rejected
//! with an error that names the offending tensor.

use std::collections::BTreeSet;

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Result, TrainerError};
use crate::seed::{rng, Purpose};

/// Tensor names in the order they are stored.
pub const TENSOR_NAMES: [&str; 4] = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"];

/// Architecture of the two-layer MLP `input -> hidden (ReLU) -> classes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlpShape {
    pub input: usize,
    pub hidden: usize,
    pub classes: usize,
}

impl MlpShape {
    /// Expected shape of each tensor in [`TENSOR_NAMES`] order.
    pub fn tensor_shapes(&self) -> [Vec<usize>; 4] {
        [
            vec![self.hidden, self.input],
            vec![self.hidden],
            vec![self.classes, self.hidden],
            vec![self.classes],
        ]
    }

    /// Total number of scalar parameters.
    pub fn param_count(&self) -> usize {
        self.tensor_shapes()
            .iter()
            .map(|s| s.iter().product::<usize>())
            .sum()
    }

    fn validate(&self) -> Result<()> {
        if self.input == 0 || self.hidden == 0 || self.classes == 0 {
            return Err(TrainerError::Model(format!(
                "every layer width must be > 0, got {self:?}"
            )));
        }
        Ok(())
    }
}

/// MLP weights as plain host vectors, independent of the tensor backend.
#[derive(Debug, Clone, PartialEq)]
pub struct MlpParams {
    shape: MlpShape,
    /// In [`TENSOR_NAMES`] order, row-major.
    tensors: [Vec<f32>; 4],
}

impl MlpParams {
    /// Fresh weights, uniform in `±1/sqrt(fan_in)` for weights and biases:
    /// PyTorch's `nn.Linear` default, so learning rates tuned against a
    /// PyTorch reference carry over. Drawn from our own seeded stream so
    /// every client and every rerun starts from identical weights.
    pub fn init(shape: MlpShape, seed: u64) -> Result<Self> {
        shape.validate()?;
        let mut rng = rng(seed, Purpose::WeightInit, 0);
        let fan_ins = [shape.input, shape.input, shape.hidden, shape.hidden];
        let tensors = std::array::from_fn(|i| {
            let bound = 1.0 / (fan_ins[i] as f32).sqrt();
            let n: usize = shape.tensor_shapes()[i].iter().product();
            (0..n).map(|_| rng.random_range(-bound..bound)).collect()
        });
        Ok(Self { shape, tensors })
    }

    /// All zeros: SCAFFOLD's control variates before the first round.
    pub fn zeros(shape: MlpShape) -> Result<Self> {
        shape.validate()?;
        let tensors = shape.tensor_shapes().map(|s| vec![0.0; s.iter().product()]);
        Ok(Self { shape, tensors })
    }

    /// Builds parameters from explicit values (e.g. an averaged model).
    /// Takes the tensors in [`TENSOR_NAMES`] order.
    pub fn from_tensors(shape: MlpShape, tensors: [Vec<f32>; 4]) -> Result<Self> {
        shape.validate()?;
        for ((name, want), got) in TENSOR_NAMES.iter().zip(shape.tensor_shapes()).zip(&tensors) {
            let n: usize = want.iter().product();
            if got.len() != n {
                return Err(TrainerError::Model(format!(
                    "{name}: {} values, shape {want:?} needs {n}",
                    got.len()
                )));
            }
            if let Some(i) = got.iter().position(|v| !v.is_finite()) {
                return Err(TrainerError::Model(format!(
                    "{name}: value {i} is not finite"
                )));
            }
        }
        Ok(Self { shape, tensors })
    }

    pub fn shape(&self) -> MlpShape {
        self.shape
    }

    /// Values of each tensor, in [`TENSOR_NAMES`] order.
    pub fn tensors(&self) -> &[Vec<f32>; 4] {
        &self.tensors
    }

    /// Errors unless the architecture is exactly `expected`.
    pub fn expect_shape(&self, expected: MlpShape) -> Result<()> {
        if self.shape != expected {
            return Err(TrainerError::Model(format!(
                "architecture {:?} differs from expected {expected:?}",
                self.shape
            )));
        }
        Ok(())
    }

    /// Serialises to safetensors bytes.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let bytes: Vec<Vec<u8>> = self
            .tensors
            .iter()
            .map(|t| t.iter().flat_map(|v| v.to_le_bytes()).collect())
            .collect();
        let views = TENSOR_NAMES
            .iter()
            .zip(self.shape.tensor_shapes())
            .zip(&bytes)
            .map(|((name, shape), data)| {
                let view = safetensors::tensor::TensorView::new(Dtype::F32, shape, data)
                    .map_err(|e| TrainerError::Model(format!("{name}: {e}")))?;
                Ok((*name, view))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize(views, None)
            .map_err(|e| TrainerError::Model(format!("cannot serialise: {e}")))
    }

    /// Parses and validates safetensors bytes: exactly the four expected
    /// names, F32, consistent shapes, finite values. The architecture is
    /// read from the shapes, so a client needs no out-of-band config to
    /// train whatever model the server started.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| TrainerError::Model(format!("not a valid safetensors file: {e}")))?;
        let names: BTreeSet<&str> = st.names().into_iter().collect();
        let expected: BTreeSet<&str> = TENSOR_NAMES.into_iter().collect();
        if names != expected {
            let missing: Vec<_> = expected.difference(&names).collect();
            let extra: Vec<_> = names.difference(&expected).collect();
            return Err(TrainerError::Model(format!(
                "tensor names differ from the MLP's: missing {missing:?}, unexpected {extra:?}"
            )));
        }
        let mut dims: Vec<Vec<usize>> = Vec::with_capacity(4);
        let mut tensors: Vec<Vec<f32>> = Vec::with_capacity(4);
        for name in TENSOR_NAMES {
            let view = st
                .tensor(name)
                .map_err(|e| TrainerError::Model(format!("{name}: {e}")))?;
            if view.dtype() != Dtype::F32 {
                return Err(TrainerError::Model(format!(
                    "{name}: dtype {:?}, expected F32",
                    view.dtype()
                )));
            }
            dims.push(view.shape().to_vec());
            // `data()` is not guaranteed to be 4-byte aligned: decode bytes.
            tensors.push(
                view.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            );
        }
        let (w1, w2) = (&dims[0], &dims[2]);
        if w1.len() != 2 || w2.len() != 2 {
            return Err(TrainerError::Model(format!(
                "fc1.weight and fc2.weight must be 2-D, got {w1:?} and {w2:?}"
            )));
        }
        let shape = MlpShape {
            input: w1[1],
            hidden: w1[0],
            classes: w2[0],
        };
        for ((name, want), got) in TENSOR_NAMES.iter().zip(shape.tensor_shapes()).zip(&dims) {
            if &want != got {
                return Err(TrainerError::Model(format!(
                    "{name}: shape {got:?}, expected {want:?} for {shape:?}"
                )));
            }
        }
        let tensors: [Vec<f32>; 4] = tensors
            .try_into()
            .map_err(|_| TrainerError::Model("expected four tensors".into()))?;
        Self::from_tensors(shape, tensors)
    }

    /// Backend variables the optimiser can update.
    pub(crate) fn to_vars(&self, device: &Device) -> Result<MlpVars> {
        let shapes = self.shape.tensor_shapes();
        let vars = std::array::from_fn(|i| {
            Var::from_slice(&self.tensors[i], shapes[i].as_slice(), device)
        });
        let [a, b, c, d] = vars;
        Ok(MlpVars {
            shape: self.shape,
            vars: [a?, b?, c?, d?],
        })
    }
}

/// Fresh model bytes for an `input -> hidden -> classes` MLP.
pub fn init_model(input: usize, hidden: usize, classes: usize, seed: u64) -> Result<Vec<u8>> {
    MlpParams::init(
        MlpShape {
            input,
            hidden,
            classes,
        },
        seed,
    )?
    .to_safetensors()
}

/// The MLP as trainable backend variables.
pub(crate) struct MlpVars {
    shape: MlpShape,
    vars: [Var; 4],
}

impl MlpVars {
    pub(crate) fn vars(&self) -> Vec<Var> {
        self.vars.to_vec()
    }

    /// Logits `[batch, classes]` for inputs `[batch, input]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [w1, b1, w2, b2] = &self.vars;
        let h = x.matmul(&w1.t()?)?.broadcast_add(b1)?.relu()?;
        Ok(h.matmul(&w2.t()?)?.broadcast_add(b2)?)
    }

    pub(crate) fn to_params(&self) -> Result<MlpParams> {
        let mut out: Vec<Vec<f32>> = Vec::with_capacity(4);
        for v in &self.vars {
            out.push(
                v.as_tensor()
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
        let tensors: [Vec<f32>; 4] = out
            .try_into()
            .map_err(|_| TrainerError::Model("expected four tensors".into()))?;
        // Re-validates finiteness: a diverged run is reported, not shipped.
        MlpParams::from_tensors(self.shape, tensors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const SHAPE: MlpShape = MlpShape {
        input: 5,
        hidden: 3,
        classes: 4,
    };

    #[test]
    fn round_trip_is_exact_and_init_is_seeded() {
        let p = MlpParams::init(SHAPE, 9).unwrap();
        let bytes = p.to_safetensors().unwrap();
        let q = MlpParams::from_safetensors(&bytes).unwrap();
        assert_eq!(p, q);
        assert_eq!(q.shape(), SHAPE);
        assert_eq!(bytes, init_model(5, 3, 4, 9).unwrap());
        assert_ne!(bytes, init_model(5, 3, 4, 10).unwrap());
        let bound = 1.0 / 5f32.sqrt();
        assert!(p.tensors()[0].iter().all(|v| v.abs() <= bound));
        assert_eq!(SHAPE.param_count(), 15 + 3 + 12 + 4);
        // Names and shapes as the aggregator and PyTorch expect.
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("fc1.weight").unwrap().shape(), &[3, 5]);
        assert_eq!(st.tensor("fc2.bias").unwrap().shape(), &[4]);
    }

    /// Serialises arbitrary (name, dtype, shape) tensors filled with zeros.
    fn raw(tensors: &[(&str, Dtype, Vec<usize>)]) -> Vec<u8> {
        let data: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, dt, s)| vec![0u8; s.iter().product::<usize>() * dt.bitsize() / 8])
            .collect();
        let views: HashMap<String, safetensors::tensor::TensorView> = tensors
            .iter()
            .zip(&data)
            .map(|((n, dt, s), d)| {
                (
                    n.to_string(),
                    safetensors::tensor::TensorView::new(*dt, s.clone(), d).unwrap(),
                )
            })
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    fn good() -> Vec<(&'static str, Dtype, Vec<usize>)> {
        TENSOR_NAMES
            .into_iter()
            .zip(SHAPE.tensor_shapes())
            .map(|(n, s)| (n, Dtype::F32, s))
            .collect()
    }

    fn load_err(t: &[(&str, Dtype, Vec<usize>)]) -> String {
        MlpParams::from_safetensors(&raw(t))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(MlpParams::from_safetensors(&raw(&good())).is_ok());

        let mut t = good();
        t[3].0 = "head.bias";
        let msg = load_err(&t);
        assert!(
            msg.contains("missing [\"fc2.bias\"]") && msg.contains("\"head.bias\""),
            "{msg}"
        );

        let mut t = good();
        t.push(("extra", Dtype::F32, vec![1]));
        assert!(load_err(&t).contains("unexpected [\"extra\"]"));

        let mut t = good();
        t[1].1 = Dtype::F16;
        assert!(load_err(&t).contains("fc1.bias: dtype F16"));

        let mut t = good();
        t[1].2 = vec![4];
        assert!(load_err(&t).contains("fc1.bias: shape [4], expected [3]"));

        let mut t = good();
        t[2].2 = vec![4, 2];
        assert!(load_err(&t).contains("fc2.weight: shape [4, 2]"));

        let mut t = good();
        t[0].2 = vec![15];
        assert!(load_err(&t).contains("must be 2-D"));

        let msg = MlpParams::from_safetensors(b"garbage")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not a valid safetensors"), "{msg}");

        let p = MlpParams::from_safetensors(&raw(&good())).unwrap();
        assert!(p.expect_shape(SHAPE).is_ok());
        assert!(p.expect_shape(MlpShape { hidden: 4, ..SHAPE }).is_err());
    }

    #[test]
    fn non_finite_weights_are_rejected() {
        let p = MlpParams::init(SHAPE, 1).unwrap();
        let mut t = p.tensors().clone();
        t[2][0] = f32::NAN;
        let msg = MlpParams::from_tensors(SHAPE, t).unwrap_err().to_string();
        assert!(msg.contains("fc2.weight: value 0 is not finite"), "{msg}");
    }
}
