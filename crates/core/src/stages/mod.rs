//! The composable stages of the aggregation pipeline, in the spirit of
//! TensorFlow Federated's aggregators: each is one type, in one file, with
//! its own parameters (parsed from its `[[stages]]` table), checks, state
//! (if any) and typed measurements. [`registry`] maps each `kind` to its
//! constructor; [`pipeline`] assembles and checks the stages.
//!
//! Stages fall into four phases that always run in this order, one trait
//! per phase:
//!
//! 1. **update transforms** ([`UpdateTransform`]: `clip`, `adaptive_clip`,
//!    `zeroing`): per-client scale decisions from the norm of
//!    `update − global`;
//! 2. **one combiner** ([`Combiner`]: default weighted `mean`; `median`,
//!    `trimmed_mean`, `krum`): turns the transformed updates into one model;
//! 3. **noise** ([`Noise`]: `dp_noise`): Gaussian noise on the clipped mean;
//! 4. **one server optimizer** ([`ServerStep`]: `fedavgm`, `fedadam`,
//!    `fedyogi`, `fedadagrad`): treats `combined − global` as a
//!    pseudo-gradient.
//!
//! A config that lists stages out of phase order is refused rather than
//! silently reordered, so what runs is what the file says.
//!
//! Cross-stage rules ("dp_noise needs a clip before it", "FedSelect refuses
//! the median") are capabilities each stage declares ([`StageInfo`]), which
//! the pipeline builder queries; no other file matches on kind names.
//!
//! Block kernels: the combine pass calls a stage once per block through a
//! trait object, and the stage's per-element loop is generic over the
//! accumulator type ([`CombineKernel<A>`] etc., implemented for `f32` and
//! `f64`), so the hot loops stay monomorphic.

pub(crate) mod adaptive_clip;
pub(crate) mod bucketing;
pub(crate) mod clip;
pub(crate) mod dp_noise;
pub(crate) mod krum;
pub(crate) mod mean;
pub(crate) mod median;
pub(crate) mod pipeline;
pub(crate) mod registry;
pub(crate) mod server_optimizer;
pub(crate) mod state_file;
pub(crate) mod trimmed_mean;
pub(crate) mod zeroing;

use std::collections::BTreeMap;
use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::combine::CombineError;
use crate::float::Acc;
use crate::model::TensorEntry;

pub use pipeline::Pipeline;

/// One `[[stages]]` table as written (its `kind` included).
pub type StageTable = serde_json::Map<String, Value>;

/// What a stage keeps across rounds as scalars: `key → value`, stored in
/// the state file's metadata as `fedstep.<kind>.<key>`.
pub type Scalars = BTreeMap<String, String>;

/// The phases, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Transform,
    Combine,
    Noise,
    ServerOptimizer,
}

/// A built stage, by phase.
#[derive(Debug)]
pub enum Stage {
    Transform(Box<dyn UpdateTransform>),
    Combiner(Box<dyn Combiner>),
    Noise(Box<dyn Noise>),
    ServerOptimizer(Box<dyn ServerStep>),
}

/// What a stage declares about itself, whatever its phase.
pub trait StageInfo: Debug + Send + Sync {
    /// The `kind` it was configured with; also its key in the measurements.
    fn kind(&self) -> &'static str;

    /// Why `personalization = "fedselect"` cannot run with this stage
    /// (None: it can). See `personalization::check_pipeline`.
    fn fedselect_refusal(&self) -> Option<&'static str> {
        None
    }

    /// What the stage keeps in the state file across rounds (None:
    /// stateless).
    fn state(&self) -> Option<StateSpec> {
        None
    }
}

/// Lets the phase traits hand out their [`StageInfo`] as a trait object.
pub trait AsInfo {
    fn as_info(&self) -> &dyn StageInfo;
}

impl<T: StageInfo> AsInfo for T {
    fn as_info(&self) -> &dyn StageInfo {
        self
    }
}

/// A stage's state in the state file (see [`state_file`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StateSpec {
    /// The metadata key that marks a file as holding this stage's state,
    /// and the value it must have (`fedstep.optimizer` = `fedadam`).
    pub marker: Option<(&'static str, &'static str)>,
    /// Scalars stored as `fedstep.<kind>.<key>`; each must be present in a
    /// state file this stage reads.
    pub scalars: &'static [&'static str],
    /// Per float model tensor, one state tensor per slot, named
    /// `<slot>.<tensor>` in the tensor's accumulator dtype.
    pub tensor_slots: &'static [&'static str],
}

/// Per-round inputs of an update transform, over the clients that reached
/// it (index = position among them).
pub struct TransformRound<'a> {
    /// L2 norm of each raw update (local − global).
    pub norms: &'a [f64],
    /// The factor each update is multiplied by so far (in/out).
    pub scales: &'a mut [f64],
    /// Why an update was dropped by an earlier transform (in/out).
    pub dropped: &'a mut [Option<String>],
    /// What this stage stored last round (None: first round).
    pub state: Option<&'a Scalars>,
}

/// What an update transform did this round.
pub struct TransformOutcome {
    pub measurement: Value,
    /// The norm every kept update is now bounded by, when the transform
    /// guarantees one (what DP noise is calibrated to).
    pub norm_bound: Option<f64>,
    /// The state to store for the next round.
    pub next_state: Option<Scalars>,
}

/// Phase 1: decides per-client scale factors (or drops) from update norms.
pub trait UpdateTransform: StageInfo + AsInfo {
    /// Whether every kept update's norm is bounded afterwards (a clip):
    /// DP noise needs such a stage before it.
    fn bounds_norms(&self) -> bool {
        false
    }

    /// Errors are about the stored state (the parameters were checked
    /// when the stage was built).
    fn apply(&self, round: TransformRound<'_>) -> Result<TransformOutcome, String>;
}

/// One block of the combine pass, as a combiner sees it.
pub struct CombineBlock<'a, A> {
    pub tensor: &'a TensorEntry,
    /// Index of the block's first element in the tensor.
    pub first: usize,
    /// Each kept input's raw bytes for the block.
    pub raws: &'a [Vec<u8>],
    /// The global model's values, when the pass reads them.
    pub global: Option<&'a [A]>,
    /// Coefficient of the global model in a weighted mean (1 − Σ coefs).
    pub global_coef: A,
    /// Weighted mean: each input's normalized weight × clip scale.
    pub coefs: &'a [A],
    /// Each input's clip scale (robust combiners apply it to the update).
    pub scales: &'a [A],
    /// Whether any scale differs from 1.
    pub scaled: bool,
}

/// A combiner's per-element loop for accumulator type `A`.
pub trait CombineKernel<A: Acc> {
    fn combine_block(&self, block: &CombineBlock<'_, A>, out: &mut [A])
        -> Result<(), CombineError>;
}

/// A combiner ready for one round (buckets drawn, trim count known).
pub trait RoundCombiner: CombineKernel<f32> + CombineKernel<f64> + Send + Sync {}

impl<T: CombineKernel<f32> + CombineKernel<f64> + Send + Sync> RoundCombiner for T {}

/// A combiner's lower bound on the number of updates.
pub struct MinUpdates {
    pub need: usize,
    /// The stage and the parameter that sets the bound ("krum, byzantine = 1").
    pub setting: String,
    pub why: String,
}

/// What the combiner needs from the statistics pass before the round.
pub struct Selection {
    /// Positions (into the candidates) of the updates to combine.
    pub chosen: Vec<usize>,
    /// Why the others were left out.
    pub reason: String,
    pub measurement: Value,
}

/// Phase 2: turns the transformed updates into one model.
pub trait Combiner: StageInfo + AsInfo {
    /// Counts every update (or bucket) once, whatever its weight.
    fn ignores_weights(&self) -> bool {
        false
    }

    /// Whether the noise calibration "clip norm × largest weight" holds
    /// for this combiner (only a weighted mean of clipped updates).
    fn is_weighted_mean(&self) -> bool {
        false
    }

    /// Whether it needs every pairwise inner product of the updates.
    fn needs_gram(&self) -> bool {
        false
    }

    /// The fewest updates it can work with as configured, and why; job
    /// validation requires that many clients.
    fn min_updates(&self) -> Option<MinUpdates> {
        None
    }

    /// Chooses among the candidates from their pairwise squared distances
    /// (only called when [`needs_gram`](Self::needs_gram)).
    fn select(&self, _distances: &[Vec<f64>]) -> Result<Option<Selection>, String> {
        Ok(None)
    }

    /// Whether the result depends on the global model's values.
    fn reads_global(&self, scaled: bool, global_coef: f64) -> bool;

    /// Prepares the round over `n` updates; the measurement (if any) says
    /// how.
    fn for_round(&self, n: usize, round: u64) -> (Box<dyn RoundCombiner>, Option<Value>);
}

/// Adds noise to a block whose first element is element `first` of the
/// model (every tensor's elements counted in file order). The noise of an
/// element depends only on its position, so a shard adds exactly what the
/// whole pass would.
pub trait NoiseKernel<A: Acc> {
    fn add_block(&self, first: u64, out: &mut [A]);
}

pub trait RoundNoise: NoiseKernel<f32> + NoiseKernel<f64> + Send + Sync {}

impl<T: NoiseKernel<f32> + NoiseKernel<f64> + Send + Sync> RoundNoise for T {}

/// Phase 3: noise on the combined model.
pub trait Noise: StageInfo + AsInfo {
    /// Needs an earlier stage that bounds update norms.
    fn needs_norm_bound(&self) -> bool {
        true
    }

    /// Needs the weighted-mean combiner.
    fn needs_weighted_mean(&self) -> bool {
        true
    }

    /// The key of the round's noise stream, drawn once by whoever decides
    /// the round and given to every shard, so that they all draw from one
    /// stream (a key per shard would make the shards' noise differ from
    /// one pass's, and a key shown to anyone who sees the output would
    /// let them subtract the noise).
    fn draw_key(&self) -> NoiseKey;

    /// The noise for this round, calibrated to the norm bound and the
    /// largest normalized weight, drawn from `key`'s stream.
    fn for_round(
        &self,
        norm_bound: Option<f64>,
        max_weight: f64,
        round: u64,
        key: &NoiseKey,
    ) -> (Box<dyn RoundNoise>, Value);
}

/// The key of a round's noise stream (ChaCha20's 256-bit key).
pub type NoiseKey = [u8; 32];

/// A server optimizer's per-element step for accumulator type `A`.
pub trait StepKernel<A: Acc> {
    /// `x` holds the combined values on entry and the new global values on
    /// return; `g` is the old global; `slots` the state, one buffer per
    /// tensor slot (in/out).
    fn step(&self, g: &[A], x: &mut [A], slots: &mut [&mut [A]]);
}

/// Phase 4: a server optimizer.
pub trait ServerStep: StageInfo + AsInfo + StepKernel<f32> + StepKernel<f64> {
    /// Its measurement for a round that took step `step` of its state
    /// (`None`: it keeps none).
    fn measurement(&self, step: Option<u64>) -> Value;
}

/// Parses a stage's parameters from its table (`kind` left out), with the
/// stage's name in front of any error.
pub fn params<T: DeserializeOwned>(kind: &str, table: &StageTable) -> Result<T, String> {
    let mut rest = table.clone();
    rest.remove("kind");
    serde_json::from_value(Value::Object(rest)).map_err(|e| format!("{kind}: {e}"))
}

/// A stage's typed measurement as the JSON the records hold.
pub fn measured<T: Serialize>(m: &T) -> Value {
    serde_json::to_value(m).unwrap_or(Value::Null)
}
