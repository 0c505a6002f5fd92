//! The state file: what stages keep from one round to the next, as one
//! safetensors file per round (`state_in` → `state_out`).
//!
//! - `fedstep.step`: how many rounds the state has been carried (1 after
//!   the first);
//! - per stateful stage, the marker its [`StateSpec`] names (the server
//!   optimizers: `fedstep.optimizer` = their kind, as files have always
//!   been written) and its scalars as `fedstep.<kind>.<key>`;
//! - per float model tensor and per tensor slot, `<slot>.<tensor>` in the
//!   tensor's accumulator dtype (the optimizers' `m.<name>`, `v.<name>`).
//!   Tensor slots are read and written block by block by the combine pass,
//!   for the server-optimizer phase (the only stage that sees the model's
//!   values element by element after combining).
//!
//! A file another pipeline wrote is refused with the reason (a different
//! optimizer, a missing stage's scalars, a tensor of the wrong shape), never
//! silently reinterpreted. Without `state_in` every stage starts afresh
//! (the optimizers' moments at zero).

use std::collections::BTreeMap;

use safetensors::Dtype;

use super::{Pipeline, Scalars, StageInfo, StateSpec};
use crate::bytes::Input;
use crate::float::{role, TensorRole};
use crate::limits::Limits;
use crate::model::TensorEntry;
use crate::stream::Source;
use crate::writer::{OutputLayout, TensorSpec};

const STEP: &str = "fedstep.step";

/// The dtype state tensors are kept in for a model tensor.
pub fn state_dtype(model_dtype: Dtype) -> Dtype {
    match role(model_dtype) {
        Some(TensorRole::Float64Acc) => Dtype::F64,
        _ => Dtype::F32,
    }
}

/// A state tensor's name.
pub fn slot_tensor(slot: &str, tensor: &str) -> String {
    format!("{slot}.{tensor}")
}

fn scalar_key(kind: &str, key: &str) -> String {
    format!("fedstep.{kind}.{key}")
}

/// The tensors that get state: the averaged (float) ones.
pub fn is_float(t: &TensorEntry) -> bool {
    matches!(
        role(t.dtype),
        Some(TensorRole::Float32Acc | TensorRole::Float64Acc)
    )
}

/// What the pipeline's stages keep, in stage order.
pub struct StateLayout {
    stages: Vec<(&'static str, StateSpec)>,
}

impl StateLayout {
    pub fn of(pipeline: &Pipeline) -> StateLayout {
        StateLayout {
            stages: pipeline
                .stages()
                .filter_map(|s: &dyn StageInfo| s.state().map(|spec| (s.kind(), spec)))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    fn tensor_slots(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.stages
            .iter()
            .flat_map(|(_, s)| s.tensor_slots.iter().copied())
    }

    /// Opens and checks the previous round's state against the stages and
    /// the model layout. Errors are reasons (the caller names the file).
    pub fn open(
        &self,
        input: &Input,
        reference: &[TensorEntry],
        limits: &Limits,
    ) -> Result<StateIn, OpenError> {
        let source = Source::new(input.clone(), limits).map_err(OpenError::Model)?;
        let bad = |reason: String| Err(OpenError::Foreign(reason));
        let meta = &source.header.metadata;
        let mut scalars = BTreeMap::new();
        for (kind, spec) in &self.stages {
            if let Some((key, want)) = spec.marker {
                match meta.get(key) {
                    Some(o) if o == want => {}
                    Some(o) => {
                        return bad(format!(
                            "state was written by `{o}`, the pipeline uses `{want}`"
                        ))
                    }
                    None => {
                        return bad(format!(
                            "no `{key}` metadata: not a fedstep state of `{want}`"
                        ))
                    }
                }
            }
            let mut mine = Scalars::new();
            for key in spec.scalars {
                let full = scalar_key(kind, key);
                match meta.get(&full) {
                    Some(v) => {
                        mine.insert(key.to_string(), v.clone());
                    }
                    None => {
                        return bad(format!(
                            "no `{full}` metadata: not a state written by a pipeline with `{kind}`"
                        ))
                    }
                }
            }
            scalars.insert(*kind, mine);
        }
        for t in reference.iter().filter(|t| is_float(t)) {
            for slot in self.tensor_slots() {
                let name = slot_tensor(slot, &t.name);
                match source.entry(&name) {
                    Some(e) if e.shape == t.shape && e.dtype == state_dtype(t.dtype) => {}
                    Some(e) => {
                        return bad(format!(
                            "`{name}` is {:?} {:?}, expected {:?} {:?}",
                            e.dtype,
                            e.shape,
                            state_dtype(t.dtype),
                            t.shape
                        ))
                    }
                    None => return bad(format!("`{name}` is missing")),
                }
            }
        }
        let step = meta
            .get(STEP)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        Ok(StateIn {
            source,
            step,
            scalars,
        })
    }

    /// The state file's layout. Slot-major (every `m.*` in model order, then
    /// every `v.*`), so the slice of the model one shard owns is one run of
    /// bytes per slot. Files are read by tensor name, so a state written in
    /// the older tensor-major order still opens.
    pub fn output_layout(
        &self,
        reference: &[TensorEntry],
        step: u64,
        next: &BTreeMap<&'static str, Scalars>,
    ) -> std::io::Result<OutputLayout> {
        let mut specs = Vec::new();
        for slot in self.tensor_slots() {
            for t in reference.iter().filter(|t| is_float(t)) {
                specs.push(TensorSpec {
                    name: slot_tensor(slot, &t.name),
                    dtype: state_dtype(t.dtype),
                    shape: t.shape.clone(),
                });
            }
        }
        let mut metadata = BTreeMap::from([(STEP.to_string(), step.to_string())]);
        for (kind, spec) in &self.stages {
            if let Some((key, value)) = spec.marker {
                metadata.insert(key.to_string(), value.to_string());
            }
            for (key, value) in next.get(kind).into_iter().flatten() {
                metadata.insert(scalar_key(kind, key), value.clone());
            }
        }
        OutputLayout::new(&specs, &metadata)
    }

    /// The state tensors derived from model tensor `t` (one per slot; none
    /// for a carried-over tensor).
    pub fn tensors_of(&self, t: &TensorEntry) -> Vec<(String, Dtype)> {
        if !is_float(t) {
            return Vec::new();
        }
        self.tensor_slots()
            .map(|slot| (slot_tensor(slot, &t.name), state_dtype(t.dtype)))
            .collect()
    }
}

/// The previous round's state, checked.
pub struct StateIn {
    /// Where the tensor slots are read from.
    pub source: Source,
    /// The step it was written at.
    pub step: u64,
    /// Each stateful stage's scalars, by kind.
    pub scalars: BTreeMap<&'static str, Scalars>,
}

/// Why a state file could not be used.
pub enum OpenError {
    /// Not a readable model file (or unavailable).
    Model(crate::error::ModelError),
    /// Readable, but not what this pipeline's stages wrote.
    Foreign(String),
}
