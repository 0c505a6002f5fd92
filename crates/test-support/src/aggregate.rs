//! A temp dir of models and a one-call aggregation: what the core's
//! aggregation tests build on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedstep_core::float::encode_all_f64;
use fedstep_core::model::{load_dense, DenseTensor};
use fedstep_core::writer::write_model;
use fedstep_core::{aggregate, AggregationOutcome, AggregationRequest, Limits, PipelineConfig};
use fedstep_core::{AggregateError, FileTarget, Input, OutputTarget, UpdateMeta, UpdateSource};
use safetensors::Dtype;

/// A temp dir of model files.
pub struct Dir {
    pub tmp: tempfile::TempDir,
}

impl Default for Dir {
    fn default() -> Self {
        Self::new()
    }
}

impl Dir {
    pub fn new() -> Self {
        Dir {
            tmp: tempfile::tempdir().unwrap(),
        }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
    /// Writes a model of float tensors (all `dtype`) plus optional extras.
    pub fn model(&self, name: &str, dtype: Dtype, tensors: &[(&str, &[f64])]) -> PathBuf {
        let t: Vec<_> = tensors
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    dtype,
                    vec![v.len()],
                    encode_all_f64(dtype, v),
                )
            })
            .collect();
        self.raw(name, t)
    }
    pub fn raw(&self, name: &str, tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>) -> PathBuf {
        let p = self.path(name);
        write_model(&p, &tensors, &BTreeMap::new()).unwrap();
        p
    }
    pub fn bytes(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

pub fn update(path: &Path, meta: UpdateMeta) -> UpdateSource {
    UpdateSource::file(path, meta)
}

pub fn run(
    dir: &Dir,
    updates: &[UpdateSource],
    global: Option<&Path>,
    config: &str,
) -> Result<(AggregationOutcome, BTreeMap<String, DenseTensor>), AggregateError> {
    run_with_state(dir, updates, global, config, None, None, 1)
}

pub fn run_with_state(
    dir: &Dir,
    updates: &[UpdateSource],
    global: Option<&Path>,
    config: &str,
    state_in: Option<&Path>,
    state_out: Option<&Path>,
    round: u64,
) -> Result<(AggregationOutcome, BTreeMap<String, DenseTensor>), AggregateError> {
    let cfg = PipelineConfig::from_toml(config).unwrap();
    let out = dir.path(&format!("out-{round}.safetensors"));
    let state_out = state_out.map(FileTarget::new);
    let outcome = aggregate(&AggregationRequest {
        updates,
        global: global.map(Input::file),
        config: &cfg,
        out: &FileTarget::new(&out),
        state_in: state_in.map(Input::file),
        state_out: state_out.as_ref().map(|t| t as &dyn OutputTarget),
        round,
    })?;
    let model = load_dense(&out, &Limits::default()).unwrap();
    Ok((outcome, model))
}
