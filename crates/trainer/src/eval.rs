//! Accuracy and loss of a model on a dataset.

use candle_core::{DType, Device, Tensor};

use crate::dataset::Dataset;
use crate::error::{Result, TrainerError};
use crate::model::{MlpParams, MlpShape, MlpVars};

/// Rows per forward pass: bounds memory on MNIST-sized data (60k x 784)
/// while keeping the per-call overhead negligible on small sets.
const EVAL_CHUNK: usize = 4096;

/// How well a model fits a dataset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Eval {
    /// Fraction of samples whose arg-max logit equals the label.
    pub accuracy: f64,
    /// Mean cross-entropy (natural log).
    pub loss: f64,
    pub num_examples: usize,
}

/// Evaluates safetensors model bytes on `data`.
pub fn evaluate(model_bytes: &[u8], data: &Dataset) -> Result<Eval> {
    evaluate_params(&MlpParams::from_safetensors(model_bytes)?, data)
}

/// Evaluates already-decoded parameters on `data`.
pub fn evaluate_params(params: &MlpParams, data: &Dataset) -> Result<Eval> {
    evaluate_vars(&params.to_vars(&Device::Cpu)?, params.shape(), data)
}

/// Errors when the model cannot consume `data`; done before any tensor
/// work so the message talks about datasets and models, not matmul shapes.
pub(crate) fn check_compatible(shape: MlpShape, data: &Dataset) -> Result<()> {
    if shape.input != data.dim() || shape.classes != data.classes() {
        return Err(TrainerError::Mismatch(format!(
            "model maps {} inputs to {} classes, dataset has {} features and {} classes",
            shape.input,
            shape.classes,
            data.dim(),
            data.classes()
        )));
    }
    if data.is_empty() {
        return Err(TrainerError::Dataset("dataset has no samples".into()));
    }
    Ok(())
}

pub(crate) fn evaluate_vars(net: &MlpVars, shape: MlpShape, data: &Dataset) -> Result<Eval> {
    check_compatible(shape, data)?;
    let (mut correct, mut loss_sum) = (0usize, 0f64);
    for start in (0..data.len()).step_by(EVAL_CHUNK) {
        let end = (start + EVAL_CHUNK).min(data.len());
        let n = end - start;
        let x = Tensor::from_slice(
            &data.features()[start * data.dim()..end * data.dim()],
            (n, data.dim()),
            &Device::Cpu,
        )?;
        let labels: Vec<u32> = data.labels()[start..end]
            .iter()
            .map(|&l| u32::from(l))
            .collect();
        let y = Tensor::from_vec(labels, n, &Device::Cpu)?;
        let logits = net.forward(&x)?;
        let mean_loss = candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()?;
        loss_sum += f64::from(mean_loss) * n as f64;
        correct += logits
            .argmax(1)?
            .eq(&y)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()? as usize;
    }
    Ok(Eval {
        accuracy: correct as f64 / data.len() as f64,
        loss: loss_sum / data.len() as f64,
        num_examples: data.len(),
    })
}
