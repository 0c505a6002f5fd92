//! One aggregation, file in → file out: weigh the updates, validate them,
//! run the statistics pass if a stage needs norms or distances, then the
//! combine pass that writes the new global model.
//!
//! A bad update never sinks the round: claims, headers, shapes and values
//! are checked and the offender is rejected with a reason. Values are
//! checked while streaming; when a pass finds a bad value mid-way, the
//! offender is rejected and the attempt restarts without it (outputs are
//! written to temporary files, so nothing half-done is visible). Bad input
//! is rare, so the common path reads every input exactly once.
//!
//! [`aggregate`] reads as its steps: open the inputs and weigh them, check
//! their layouts, open the stages' state, then attempt the round (statistics
//! and transforms, the combination set and its weights, the combine pass,
//! the outputs) until no client is rejected mid-stream, and build the
//! records.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use crate::bytes::{is_unavailable, Input, OutputTarget};
use crate::combine::{self, CombineError, CombinePlan, OptimizerIo};
use crate::config::PipelineConfig;
use crate::error::{AggregateError, ModelError};
use crate::float::elem_bytes;
use crate::measurements::{ClientMeasurement, ClientStatus, Measurements};
use crate::model::{check_compatible, ModelHeader, TensorEntry};
use crate::personalization::{check_masked_compatible, Personalization};
use crate::shard::{InPlace, PartDest, ShardOutput, ShardPlan, PART_BYTES};
use crate::share_cap;
use crate::stages::krum::distances_from_gram;
use crate::stages::state_file::{is_float, OpenError, StateIn, StateLayout};
use crate::stages::{measured, Pipeline, Scalars, TransformRound};
use crate::statistics::{self, StatsError};
use crate::stream::{block_elements, Source};
use crate::update_meta::{UpdateMeta, UpdateSource};
use crate::weighting::{self, TypeFilter, Verdict};
use crate::writer::{ModelWriter, OutputLayout, TensorSpec};

pub struct AggregationRequest<'a> {
    pub updates: &'a [UpdateSource],
    /// The model the clients trained from. Needed by clipping, zeroing and
    /// server optimizers; without it the updates' own tensors are the
    /// reference and integer tensors come from the first accepted update.
    pub global: Option<Input>,
    pub config: &'a PipelineConfig,
    pub out: &'a dyn OutputTarget,
    /// The stages' state from the previous round (none: every stage starts
    /// afresh). Read only when some stage keeps state.
    pub state_in: Option<Input>,
    /// Where to write the stages' new state: required when some stage keeps
    /// state, and written only then.
    pub state_out: Option<&'a dyn OutputTarget>,
    /// The round number: keys the DP noise stream so rounds never share noise.
    pub round: u64,
}

#[derive(Debug)]
pub struct AggregationOutcome {
    pub measurements: Measurements,
}

/// Per-client bookkeeping while the aggregation runs.
struct Client {
    meta: UpdateMeta,
    num_examples: Option<u64>,
    quality: Option<f64>,
    raw_weight: f64,
    /// Permanent for this aggregation: rejected or excluded, with the reason.
    dropped: Option<(ClientStatus, String)>,
    source: Option<Source>,
}

/// What every attempt shares: decided once, before any value is read.
struct Setup<'a> {
    req: &'a AggregationRequest<'a>,
    cfg: &'a PipelineConfig,
    pipeline: &'a Pipeline,
    global: Option<Source>,
    reference: Vec<TensorEntry>,
    /// Who aggregates which stripes of the reference.
    shards: ShardPlan,
    metadata: BTreeMap<String, String>,
    state: StateLayout,
    state_in: Option<StateIn>,
}

/// Reads and passes over the data, across attempts.
#[derive(Default)]
struct Effort {
    passes: u32,
    bytes_read: u64,
}

/// What a successful attempt produced.
struct Attempt {
    /// Positions (into `live`) of the clients that reached the transforms.
    live: Vec<usize>,
    screened: Screened,
    combination: Combination,
    stages: BTreeMap<String, Value>,
    bytes_written: u64,
}

/// An attempt either completes or rejects a client mid-stream and must be
/// run again without it.
enum Outcome<T> {
    Done(T),
    Retry,
}

pub fn aggregate(req: &AggregationRequest<'_>) -> Result<AggregationOutcome, AggregateError> {
    aggregate_sharded(req, 1)
}

/// [`aggregate`] with the model cut into at most `shards` shards (see
/// `shard`), each run as its own statistics and combine pass over its
/// stripes and written as its own parts of the outputs, one after another
/// in this process. The outputs are the same bit for bit whatever
/// `shards` is; this is what the workflow's shard tasks do across Lambdas,
/// and how that promise is tested.
pub fn aggregate_sharded(
    req: &AggregationRequest<'_>,
    shards: usize,
) -> Result<AggregationOutcome, AggregateError> {
    let started = Instant::now();
    let cfg = req.config;
    check_request(req)?;
    let (mut clients, target_type) = open_and_weigh(req)?;
    let setup = open_references(req, &mut clients, shards)?;
    let mut effort = Effort::default();
    let attempt = loop {
        match attempt(&setup, &mut clients, &mut effort)? {
            Outcome::Done(a) => break a,
            Outcome::Retry => continue,
        }
    };
    let clients = build_records(&clients, &attempt);
    let count = |s: ClientStatus| clients.iter().filter(|r| r.status == s).count();
    Ok(AggregationOutcome {
        measurements: Measurements {
            weighting: format!("{:?}", cfg.weighting()).to_lowercase(),
            llm_type: cfg.type_filter_name().to_string(),
            target_llm_type: target_type,
            combiner: setup.pipeline.combiner_name().to_string(),
            accepted: count(ClientStatus::Accepted),
            rejected: count(ClientStatus::Rejected),
            excluded: count(ClientStatus::Excluded),
            clients,
            stages: attempt.stages,
            tensors: setup.reference.len(),
            parameters: setup.reference.iter().map(|t| t.elements() as u64).sum(),
            bytes_read: effort.bytes_read,
            bytes_written: attempt.bytes_written,
            passes: effort.passes,
            seconds: started.elapsed().as_secs_f64(),
        },
    })
}

/// What the request must provide for the configured stages.
fn check_request(req: &AggregationRequest<'_>) -> Result<(), AggregateError> {
    let cfg = req.config;
    let pipeline = cfg.pipeline();
    if cfg.personalization() == Personalization::Fedselect && req.global.is_none() {
        return Err(AggregateError::Config(
            "personalization = \"fedselect\" needs the global model: an element no client \
             shared keeps its global value, and personal elements are checked against it"
                .into(),
        ));
    }
    if pipeline.needs_global() && req.global.is_none() {
        return Err(AggregateError::Config(
            "clip, zeroing and server optimizers work on updates (local − global): \
             a global model is required"
                .into(),
        ));
    }
    if pipeline.is_stateful() && req.state_out.is_none() {
        let kinds: Vec<&str> = pipeline
            .stages()
            .filter(|s| s.state().is_some())
            .map(|s| s.kind())
            .collect();
        return Err(AggregateError::Config(format!(
            "a stage that keeps state across rounds ({}) needs a path to write its state to",
            kinds.join(", ")
        )));
    }
    Ok(())
}

/// Weighs every update from its claims and opens the header of each one
/// still in; returns the clients and the round's target type.
fn open_and_weigh(
    req: &AggregationRequest<'_>,
) -> Result<(Vec<Client>, Option<String>), AggregateError> {
    let cfg = req.config;
    let limits = cfg.limits();
    let metas: Vec<UpdateMeta> = req.updates.iter().map(|u| u.meta.clone()).collect();
    let type_filter = cfg.type_filter();
    let plan = weighting::plan(&metas, cfg.weighting(), &type_filter, limits)
        .map_err(AggregateError::NoUsableUpdate)?;
    let target_type = plan.target_type.filter(|_| type_filter != TypeFilter::None);
    let mut clients: Vec<Client> = Vec::with_capacity(metas.len());
    for (u, e) in req.updates.iter().zip(plan.entries) {
        let (raw_weight, dropped) = match e.verdict {
            Verdict::Weighted(w) => (w, None),
            Verdict::Rejected(r) => (0.0, Some((ClientStatus::Rejected, r))),
            Verdict::Excluded(r) => (0.0, Some((ClientStatus::Excluded, r))),
        };
        let mut c = Client {
            meta: u.meta.clone(),
            num_examples: e.num_examples,
            quality: e.multiplier,
            raw_weight,
            dropped,
            source: None,
        };
        if c.dropped.is_none() {
            match Source::new(u.input.clone(), limits) {
                Ok(s) => c.source = Some(s),
                Err(err) => {
                    if let Some(e) = unavailable(&err, &u.input) {
                        return Err(e);
                    }
                    c.dropped = Some((
                        ClientStatus::Rejected,
                        format!("model {}: {err}", u.input.source().describe()),
                    ))
                }
            }
        }
        clients.push(c);
    }
    Ok((clients, target_type))
}

/// Opens the global model, decides the reference layout, rejects updates
/// that do not match it, and opens the stages' previous state.
fn open_references<'a>(
    req: &'a AggregationRequest<'a>,
    clients: &mut [Client],
    shards: usize,
) -> Result<Setup<'a>, AggregateError> {
    let cfg = req.config;
    let limits = cfg.limits();
    let global = match &req.global {
        Some(input) => Some(Source::new(input.clone(), limits).map_err(|source| {
            unavailable(&source, input).unwrap_or_else(|| AggregateError::Global {
                name: input.source().describe(),
                source,
            })
        })?),
        None => None,
    };
    let reference: Vec<TensorEntry> = match &global {
        Some(g) => g.header.tensors.clone(),
        None => majority_layout(clients).ok_or_else(|| no_usable(clients))?,
    };
    check_layouts(clients, &reference, cfg.personalization());
    let state = StateLayout::of(cfg.pipeline());
    let state_in = match &req.state_in {
        Some(input) if !state.is_empty() => {
            let opened = state.open(input, &reference, limits);
            Some(opened.map_err(|e| state_error(e, input))?)
        }
        _ => None,
    };
    Ok(Setup {
        req,
        cfg,
        pipeline: cfg.pipeline(),
        metadata: global
            .as_ref()
            .map(|g| g.header.metadata.clone())
            .unwrap_or_default(),
        global,
        shards: ShardPlan::even(&reference, shards),
        reference,
        state,
        state_in,
    })
}

/// Rejects every update whose tensors do not match the reference layout.
fn check_layouts(clients: &mut [Client], reference: &[TensorEntry], p: Personalization) {
    let reference_header = ModelHeader {
        header_len: 0,
        file_len: 0,
        tensors: reference.to_vec(),
        metadata: BTreeMap::new(),
    };
    for c in clients.iter_mut().filter(|c| c.dropped.is_none()) {
        let s = c.source.as_ref().expect("open sources for live clients");
        let checked = match p {
            Personalization::Fedselect => {
                check_masked_compatible(&reference_header, &s.header).map(|_| ())
            }
            Personalization::None => {
                check_compatible(&reference_header, &s.header).map_err(|e| e.to_string())
            }
        };
        if let Err(err) = checked {
            c.dropped = Some((ClientStatus::Rejected, format!("model {}: {err}", s.name)));
            c.source = None;
        }
    }
}

/// One attempt at the round over the clients still in.
fn attempt(
    setup: &Setup<'_>,
    clients: &mut [Client],
    effort: &mut Effort,
) -> Result<Outcome<Attempt>, AggregateError> {
    let live: Vec<usize> = (0..clients.len())
        .filter(|&i| clients[i].dropped.is_none())
        .collect();
    if live.is_empty() {
        return Err(no_usable(clients));
    }
    let mut stages = BTreeMap::new();
    let inputs: Vec<&Source> = live
        .iter()
        .map(|&i| clients[i].source.as_ref().expect("live"))
        .collect();
    let screened = match screen(setup, &inputs, effort, &mut stages) {
        Ok(s) => s,
        Err(Screening::Input(e)) => {
            reject_for(e, &live, clients, setup.req.global.as_ref())?;
            return Ok(Outcome::Retry);
        }
        Err(Screening::Fatal(e)) => return Err(e),
    };
    let combination = combination(setup, clients, &live, &screened, &mut stages)?;
    let written = match combine_pass(setup, &inputs, &screened, &combination, effort, &mut stages) {
        Ok(w) => w,
        Err(PassError::Input(e)) => {
            let kept_live: Vec<usize> = combination.kept.iter().map(|&k| live[k]).collect();
            reject_for(e, &kept_live, clients, setup.req.global.as_ref())?;
            return Ok(Outcome::Retry);
        }
        Err(PassError::Fatal(e)) => return Err(e),
    };
    let bytes_written = finish_outputs(setup, written, &combination, clients, &live, &mut stages)?;
    Ok(Outcome::Done(Attempt {
        live,
        screened,
        combination,
        stages,
        bytes_written,
    }))
}

/// The statistics pass and what the stages decide from it, per live client.
struct Screened {
    /// The factor each update is multiplied by (clipping).
    scales: Vec<f64>,
    /// Update norms, when a statistics pass ran.
    norms: Option<Vec<f64>>,
    /// Zeroed or not selected, with the reason.
    left_out: Vec<Option<(ClientStatus, String)>>,
    /// The norm every kept update is bounded by (the tightest clip).
    norm_bound: Option<f64>,
    /// Each stateful transform's state for the next round.
    next_state: BTreeMap<&'static str, Scalars>,
}

enum Screening {
    /// A client's data is bad: reject it and retry.
    Input(StatsError),
    Fatal(AggregateError),
}

/// Runs the statistics pass (if a stage needs norms or distances), the
/// update transforms, and the combiner's selection (Krum).
fn screen(
    setup: &Setup<'_>,
    inputs: &[&Source],
    effort: &mut Effort,
    stages: &mut BTreeMap<String, Value>,
) -> Result<Screened, Screening> {
    let n = inputs.len();
    let mut screened = Screened {
        scales: vec![1.0; n],
        norms: None,
        left_out: vec![None; n],
        norm_bound: None,
        next_state: BTreeMap::new(),
    };
    let pipeline = setup.pipeline;
    if !pipeline.needs_statistics() {
        return Ok(screened);
    }
    effort.passes += 1;
    let full = pipeline.combiner.needs_gram();
    let block_elems = block_size(setup, n);
    let global = setup.global.as_ref();
    // One statistics pass per shard (the workflow's statistics map), each
    // over its own stripes; the Gram matrix adds up every stripe in order.
    let mut stripe_grams = Vec::new();
    for shard in 0..setup.shards.len() {
        let stripes = setup.shards.shard(shard);
        let stats = statistics::run(&setup.reference, stripes, global, inputs, full, block_elems)
            .map_err(Screening::Input)?;
        effort.bytes_read += stats.bytes_read;
        stripe_grams.extend(stats.stripes);
    }
    let gram = statistics::gram(&stripe_grams, n);
    let norms: Vec<f64> = (0..n).map(|i| gram[i][i].sqrt()).collect();
    let mut zeroed: Vec<Option<String>> = vec![None; n];
    for t in &pipeline.transforms {
        let state = setup
            .state_in
            .as_ref()
            .and_then(|s| s.scalars.get(t.kind()));
        let outcome = t
            .apply(TransformRound {
                norms: &norms,
                scales: &mut screened.scales,
                dropped: &mut zeroed,
                state,
            })
            .map_err(|reason| Screening::Fatal(state_refused(setup.req, t.kind(), reason)))?;
        stages.insert(t.kind().to_string(), outcome.measurement);
        if let Some(b) = outcome.norm_bound {
            screened.norm_bound = Some(screened.norm_bound.map_or(b, |a: f64| a.min(b)));
        }
        if let Some(next) = outcome.next_state {
            screened.next_state.insert(t.kind(), next);
        }
    }
    for (d, z) in screened.left_out.iter_mut().zip(zeroed) {
        *d = z.map(|r| (ClientStatus::Zeroed, r));
    }
    if full {
        let candidates: Vec<usize> = (0..n).filter(|&i| screened.left_out[i].is_none()).collect();
        let gram: Vec<Vec<f64>> = candidates
            .iter()
            .map(|&i| candidates.iter().map(|&j| gram[i][j]).collect())
            .collect();
        let s: Vec<f64> = candidates.iter().map(|&i| screened.scales[i]).collect();
        let selection = pipeline
            .combiner
            .select(&distances_from_gram(&gram, &s))
            .map_err(|e| Screening::Fatal(AggregateError::NoUsableUpdate(e)))?;
        if let Some(sel) = selection {
            for (pos, &i) in candidates.iter().enumerate() {
                if !sel.chosen.contains(&pos) {
                    screened.left_out[i] = Some((ClientStatus::NotSelected, sel.reason.clone()));
                }
            }
            stages.insert(pipeline.combiner.kind().to_string(), sel.measurement);
        }
    }
    screened.norms = Some(norms);
    Ok(screened)
}

/// The updates combined and their normalized weights.
struct Combination {
    /// Positions (into `live`) of the updates combined.
    kept: Vec<usize>,
    /// Their normalized weights, after the share cap.
    weights: Vec<f64>,
}

/// Chooses the combination set (live and not left out) and normalizes its
/// weights, then applies the share cap.
fn combination(
    setup: &Setup<'_>,
    clients: &[Client],
    live: &[usize],
    screened: &Screened,
    stages: &mut BTreeMap<String, Value>,
) -> Result<Combination, AggregateError> {
    let kept: Vec<usize> = (0..live.len())
        .filter(|&i| screened.left_out[i].is_none())
        .collect();
    if kept.is_empty() {
        return Err(AggregateError::NoUsableUpdate(
            "every valid update was dropped by the robustness stages".into(),
        ));
    }
    let total: f64 = kept.iter().map(|&i| clients[live[i]].raw_weight).sum();
    if !(total > 0.0 && total.is_finite()) {
        return Err(AggregateError::NoUsableUpdate(format!(
            "the accepted updates' weights sum to {total}; nothing to average"
        )));
    }
    let mut weights: Vec<f64> = kept
        .iter()
        .map(|&i| clients[live[i]].raw_weight / total)
        .collect();
    // The cap goes on the final set (after zeroing and Krum), before
    // anything reads the weights: the mean's coefficients, FedSelect's
    // denominators and the DP noise's largest weight all see it.
    if let Some(cap) = setup.cfg.max_client_share() {
        let capped = share_cap::cap_shares(&weights, cap);
        let ids: Vec<&str> = kept
            .iter()
            .map(|&i| clients[live[i]].meta.client_id.as_str())
            .collect();
        let combiner = &setup.pipeline.combiner;
        let moot = combiner.ignores_weights().then(|| combiner.kind());
        stages.insert(
            "max_client_share".to_string(),
            capped.measurement(cap, &ids, moot),
        );
        weights = capped.shares;
    }
    Ok(Combination { kept, weights })
}

/// The outputs a completed combine pass leaves to finish: every shard's
/// bytes written, nothing visible yet.
struct Written {
    out: Arc<InPlace>,
    len: u64,
    state: Option<(Arc<InPlace>, u64)>,
    tally: Option<crate::personalization::masked_mean::Tally>,
}

enum PassError {
    /// A client's data is bad: reject it and retry.
    Input(StatsError),
    Fatal(AggregateError),
}

/// Prepares the round's combiner and noise, opens the outputs, and runs
/// the combine pass, one shard after another, each writing its own parts
/// of the outputs.
fn combine_pass(
    setup: &Setup<'_>,
    inputs: &[&Source],
    screened: &Screened,
    combination: &Combination,
    effort: &mut Effort,
    stages: &mut BTreeMap<String, Value>,
) -> Result<Written, PassError> {
    let (req, pipeline) = (setup.req, setup.pipeline);
    let Combination { kept, weights } = combination;
    let (_, m) = pipeline.combiner.for_round(kept.len(), req.round);
    if let Some(m) = m {
        stages.insert(pipeline.combiner.kind().to_string(), m);
    }
    // One noise for every shard: it is keyed by element position.
    let noise = pipeline.noise.as_ref().map(|n| {
        let max_w = weights.iter().copied().fold(0.0, f64::max);
        let (noise, m) = n.for_round(screened.norm_bound, max_w, req.round);
        stages.insert(n.kind().to_string(), m);
        noise
    });
    fn fatal(target: &dyn OutputTarget) -> impl Fn(std::io::Error) -> PassError + '_ {
        move |source| PassError::Fatal(output_error(target, source))
    }
    let layout =
        OutputLayout::new(&specs(&setup.reference), &setup.metadata).map_err(fatal(req.out))?;
    let model_parts = setup
        .shards
        .parts(
            &setup.reference,
            &layout,
            |t| vec![(t.name.clone(), t.dtype)],
            PART_BYTES,
        )
        .map_err(|e| fatal(req.out)(std::io::Error::other(e)))?;
    let len = layout.len();
    let out = InPlace::create(req.out, len).map_err(fatal(req.out))?;
    let state = match req.state_out.filter(|_| !setup.state.is_empty()) {
        Some(target) => {
            let step = setup.state_in.as_ref().map_or(0, |s| s.step) + 1;
            let layout = setup
                .state
                .output_layout(&setup.reference, step, &screened.next_state)
                .map_err(fatal(target))?;
            let parts = setup
                .shards
                .parts(
                    &setup.reference,
                    &layout,
                    |t| setup.state.tensors_of(t),
                    PART_BYTES,
                )
                .map_err(|e| fatal(target)(std::io::Error::other(e)))?;
            let whole = InPlace::create(target, layout.len()).map_err(fatal(target))?;
            Some((target, layout, parts, whole, step))
        }
        None => None,
    };
    let kept_inputs: Vec<&Source> = kept.iter().map(|&i| inputs[i]).collect();
    let kept_scales: Vec<f64> = kept.iter().map(|&i| screened.scales[i]).collect();
    let coefs: Vec<f64> = weights
        .iter()
        .zip(&kept_scales)
        .map(|(w, s)| w * s)
        .collect();
    let masked = setup.cfg.personalization() == Personalization::Fedselect;
    let mut tally: Option<crate::personalization::masked_mean::Tally> = None;
    for shard in 0..setup.shards.len() {
        let shard_out = ShardOutput::new(&model_parts, shard, PartDest::InPlace(out.clone()));
        let writer =
            ModelWriter::create_with(&shard_out, layout.clone()).map_err(fatal(req.out))?;
        let state_writer = match &state {
            Some((target, layout, parts, whole, _)) => {
                let shard_out = ShardOutput::new(parts, shard, PartDest::InPlace(whole.clone()));
                Some(ModelWriter::create_with(&shard_out, layout.clone()).map_err(fatal(*target))?)
            }
            None => None,
        };
        let (round_combiner, _) = pipeline.combiner.for_round(kept.len(), req.round);
        let plan = CombinePlan {
            reference: &setup.reference,
            stripes: setup.shards.shard(shard),
            carry_source: setup.global.as_ref().unwrap_or(kept_inputs[0]),
            global: setup.global.as_ref(),
            inputs: kept_inputs.clone(),
            coefs: coefs.clone(),
            scales: kept_scales.clone(),
            combiner: pipeline.combiner.as_ref(),
            round_combiner,
            noise: noise.as_deref(),
            optimizer: match (&pipeline.optimizer, &state_writer) {
                (Some(optimizer), Some(w)) => Some(OptimizerIo {
                    optimizer: optimizer.as_ref(),
                    slots: optimizer.state().map_or(&[], |s| s.tensor_slots),
                    state_in: setup.state_in.as_ref().map(|s| &s.source),
                    state_out: w,
                }),
                _ => None,
            },
            out: &writer,
            block_elems: block_size(setup, inputs.len()),
            masked_weights: masked.then(|| weights.clone()),
        };
        effort.passes += u32::from(shard == 0);
        let done = match combine::run(plan) {
            Ok(done) => done,
            Err(CombineError::Input(e)) => return Err(PassError::Input(e)),
            Err(CombineError::Write(source)) => return Err(fatal(req.out)(source)),
            Err(CombineError::Overflow { tensor, index }) => {
                return Err(PassError::Fatal(AggregateError::NoUsableUpdate(format!(
                    "the new global model's `{tensor}` element {index} is not finite although every input is: \
                     the combination, the noise, the server optimizer or the tensor's dtype overflowed; \
                     nothing was written"
                ))))
            }
            Err(CombineError::State(reason)) => {
                return Err(PassError::Fatal(AggregateError::ServerState {
                    name: req
                        .state_in
                        .as_ref()
                        .map_or("-".into(), |i| i.source().describe()),
                    reason,
                }))
            }
        };
        effort.bytes_read += done.bytes_read;
        if let Some(t) = done.tally {
            tally
                .get_or_insert_with(|| {
                    crate::personalization::masked_mean::Tally::new(t.shared.len())
                })
                .add(&t);
        }
        // Each shard's writers check that it wrote every byte of its parts.
        writer.finish().map_err(fatal(req.out))?;
        if let (Some(w), Some((target, ..))) = (state_writer, &state) {
            w.finish().map_err(fatal(*target))?;
        }
    }
    Ok(Written {
        out,
        len,
        state: state.map(|(_, _, _, whole, step)| (whole, step)),
        tally,
    })
}

/// Makes the outputs visible (the state first) and records what the
/// optimizer and FedSelect did; returns the model's size.
fn finish_outputs(
    setup: &Setup<'_>,
    written: Written,
    combination: &Combination,
    clients: &[Client],
    live: &[usize],
    stages: &mut BTreeMap<String, Value>,
) -> Result<u64, AggregateError> {
    let req = setup.req;
    if let Some(tally) = written.tally {
        let float_elements: u64 = setup
            .reference
            .iter()
            .filter(|t| is_float(t))
            .map(|t| t.elements() as u64)
            .sum();
        let ids: Vec<&str> = combination
            .kept
            .iter()
            .map(|&i| clients[live[i]].meta.client_id.as_str())
            .collect();
        stages.insert(
            "fedselect".to_string(),
            measured(&tally.measurement(&ids, float_elements)),
        );
    }
    // The state first: a model whose state is missing would restart the
    // stages' state (the optimizer's moments) on the next round.
    if let Some((whole, step)) = written.state {
        let target = req.state_out.expect("state is written only to a target");
        whole
            .finish()
            .map_err(|source| output_error(target, source))?;
        if let Some(opt) = &setup.pipeline.optimizer {
            stages.insert(opt.kind().to_string(), opt.measurement(step));
        }
    }
    written
        .out
        .finish()
        .map_err(|source| output_error(req.out, source))?;
    Ok(written.len)
}

/// The final per-client record: every input exactly once.
fn build_records(clients: &[Client], attempt: &Attempt) -> Vec<ClientMeasurement> {
    let Attempt {
        live,
        screened,
        combination,
        ..
    } = attempt;
    let weight_of: HashMap<usize, f64> = combination
        .kept
        .iter()
        .zip(&combination.weights)
        .map(|(&k, &w)| (live[k], w))
        .collect();
    let live_pos: HashMap<usize, usize> = live.iter().enumerate().map(|(p, &i)| (i, p)).collect();
    let records: Vec<ClientMeasurement> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let pos = live_pos.get(&i).copied();
            let left_out = pos.and_then(|p| screened.left_out[p].clone());
            let (status, reason) = match (&c.dropped, left_out) {
                (Some((s, r)), _) => (*s, Some(r.clone())),
                (None, Some((s, r))) => (s, Some(r)),
                (None, None) => (ClientStatus::Accepted, None),
            };
            ClientMeasurement {
                client_id: c.meta.client_id.clone(),
                status,
                reason,
                num_examples: c.num_examples,
                llm_type: c.meta.llm_type.clone(),
                quality: c.quality,
                weight: weight_of.get(&i).copied(),
                update_norm: pos.and_then(|p| screened.norms.as_ref().map(|n| n[p])),
                scale: pos
                    .filter(|_| screened.norms.is_some())
                    .map(|p| screened.scales[p]),
            }
        })
        .collect();
    // Every input appears exactly once: accepted ones are exactly the
    // combination set, every other one has a reason.
    debug_assert_eq!(records.len(), clients.len());
    debug_assert_eq!(
        records
            .iter()
            .filter(|r| r.status == ClientStatus::Accepted)
            .count(),
        combination.kept.len()
    );
    debug_assert!(records
        .iter()
        .all(|r| (r.status == ClientStatus::Accepted) == r.reason.is_none()));
    records
}

/// Block size for `inputs` inputs plus the global model within the budget.
fn block_size(setup: &Setup<'_>, inputs: usize) -> usize {
    let max_eb = setup
        .reference
        .iter()
        .map(|t| elem_bytes(t.dtype))
        .max()
        .unwrap_or(4);
    block_elements(setup.cfg.memory_budget_mb() << 20, inputs + 1, max_eb)
}

fn specs(reference: &[TensorEntry]) -> Vec<TensorSpec> {
    reference
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect()
}

fn output_error(target: &dyn OutputTarget, source: std::io::Error) -> AggregateError {
    AggregateError::Output {
        name: target.describe(),
        source,
    }
}

/// A transform can only fail on what it stored last round (its parameters
/// were checked when the config was parsed): the state file is at fault.
fn state_refused(req: &AggregationRequest<'_>, kind: &str, reason: String) -> AggregateError {
    AggregateError::ServerState {
        name: req
            .state_in
            .as_ref()
            .map_or("-".into(), |i| i.source().describe()),
        reason: format!("{kind}: {reason}"),
    }
}

fn state_error(e: OpenError, input: &Input) -> AggregateError {
    let bad = |reason: String| AggregateError::ServerState {
        name: input.source().describe(),
        reason,
    };
    match e {
        OpenError::Model(e) => unavailable(&e, input).unwrap_or_else(|| bad(e.to_string())),
        OpenError::Foreign(reason) => bad(reason),
    }
}

/// Turns a streaming failure into a rejection of the client it names, or a
/// fatal error when the global model is at fault or the read failed for
/// the system's reasons.
fn reject_for(
    e: StatsError,
    live: &[usize],
    clients: &mut [Client],
    global: Option<&Input>,
) -> Result<(), AggregateError> {
    let (i, reason) = match e {
        StatsError::NonFinite(nf) => (
            live[nf.input],
            format!(
                "tensor `{}` holds a non-finite value ({}) at element {}",
                nf.tensor, nf.value, nf.index
            ),
        ),
        StatsError::Read { input, error } => {
            if is_unavailable(&error) {
                return Err(AggregateError::Unavailable {
                    name: clients[live[input]]
                        .source
                        .as_ref()
                        .map_or_else(String::new, |s| s.name.clone()),
                    reason: error.to_string(),
                });
            }
            (live[input], format!("reading the model failed: {error}"))
        }
        StatsError::Invalid { input, reason } => (live[input], reason),
        StatsError::Global(reason) => {
            return Err(AggregateError::Global {
                name: global.map_or("-".into(), |g| g.source().describe()),
                source: ModelError::InvalidHeader(reason),
            })
        }
    };
    let c = &mut clients[i];
    let name = c
        .source
        .as_ref()
        .map(|s| s.name.clone())
        .unwrap_or_default();
    c.dropped = Some((ClientStatus::Rejected, format!("model {name}: {reason}")));
    c.source = None;
    Ok(())
}

/// The system-side failure a header read hit, if that is what it was.
fn unavailable(err: &ModelError, input: &Input) -> Option<AggregateError> {
    match err {
        ModelError::Io(e) if is_unavailable(e) => Some(AggregateError::Unavailable {
            name: input.source().describe(),
            reason: e.to_string(),
        }),
        _ => None,
    }
}

fn no_usable(clients: &[Client]) -> AggregateError {
    let reasons: Vec<String> = clients
        .iter()
        .map(|c| match &c.dropped {
            Some((_, r)) => format!("{}: {r}", c.meta.client_id),
            None => format!("{}: ok", c.meta.client_id),
        })
        .collect();
    AggregateError::NoUsableUpdate(reasons.join("; "))
}

/// (name, dtype, shape) of every tensor, sorted by name.
type Layout = Vec<(String, String, Vec<usize>)>;

/// Without a global model, the layout (names, dtypes, shapes) most updates
/// share is the reference, so one malformed update cannot make every other
/// update look wrong. Ties go to the earliest update.
fn majority_layout(clients: &[Client]) -> Option<Vec<TensorEntry>> {
    // (layout, how many updates share it, first update with it)
    let mut counts: Vec<(Layout, usize, usize)> = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let Some(s) = c.source.as_ref().filter(|_| c.dropped.is_none()) else {
            continue;
        };
        let mut sig: Layout = s
            .header
            .tensors
            .iter()
            .map(|t| (t.name.clone(), format!("{:?}", t.dtype), t.shape.clone()))
            .collect();
        sig.sort();
        match counts.iter_mut().find(|(s, _, _)| *s == sig) {
            Some(entry) => entry.1 += 1,
            None => counts.push((sig, 1, i)),
        }
    }
    let best = counts
        .iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)))?;
    clients[best.2]
        .source
        .as_ref()
        .map(|s| s.header.tensors.clone())
}
