//! Checks what a trainer handed back before anything is uploaded: the
//! model must be a well-formed safetensors file within the limits, with
//! exactly the global model's tensors (names, shapes, dtypes), and the
//! claimed example count must be within the limits. The aggregator checks
//! all of this again (and finiteness, which needs the data); checking here
//! turns a doomed upload into a clear local error.

use std::path::Path;

use fedstep_core::model::{self, ModelHeader};
use fedstep_core::Limits;

use crate::trainer::TrainReport;

/// Returns the output model's header.
pub fn check_output(
    global: &ModelHeader,
    output: &Path,
    report: &TrainReport,
    limits: &Limits,
) -> Result<ModelHeader, String> {
    let name = output.display();
    let (_, header) = model::open(output, limits).map_err(|e| format!("model file {name}: {e}"))?;
    model::check_compatible(global, &header)
        .map_err(|e| format!("model file {name} does not match the global model: {e}"))?;
    if report.num_examples == 0 || report.num_examples > limits.max_num_examples {
        return Err(format!(
            "num_examples {} is outside 1..={}",
            report.num_examples, limits.max_num_examples
        ));
    }
    if let Some((k, v)) = report.metrics.iter().find(|(_, v)| !v.is_finite()) {
        return Err(format!("metric {k} = {v} is not finite"));
    }
    Ok(header)
}
