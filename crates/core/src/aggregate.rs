//! One aggregation, file in → file out: weigh the updates, validate them,
//! run the statistics pass if a stage needs norms or distances, then the
//! combine pass that writes the new global model.
//!
//! A bad update never sinks the round: claims, headers, shapes and values
//! are checked and the offender is rejected with a reason. Values are
//! checked while streaming; when the plain mean finds a non-finite value
//! mid-way, the offender is rejected and the pass restarts without it (the
//! output is written to a temporary file, so nothing half-done is visible).
//! Bad input is rare, so the common path reads every input exactly once.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde_json::json;

use crate::bytes::{is_unavailable, Input, OutputTarget};
use crate::combine::{self, state_dtype, CombineError, CombinePlan, OptimizerIo};
use crate::config::PipelineConfig;
use crate::error::{AggregateError, ModelError};
use crate::float::{elem_bytes, role, TensorRole};
use crate::manifest::{UpdateMeta, UpdateSource};
use crate::measurements::{ClientMeasurement, ClientStatus, Measurements};
use crate::model::{check_compatible, TensorEntry};
use crate::personalization::{check_masked_compatible, Personalization};
use crate::share_cap;
use crate::stages::{krum, Combiner, Pipeline, Transform};
use crate::statistics::{self, StatsError};
use crate::stream::{block_elements, Source};
use crate::weighting::{self, Verdict};
use crate::writer::{ModelWriter, TensorSpec};

pub struct AggregationRequest<'a> {
    pub updates: &'a [UpdateSource],
    /// The model the clients trained from. Needed by clipping, zeroing and
    /// server optimizers; without it the updates' own tensors are the
    /// reference and integer tensors come from the first accepted update.
    pub global: Option<Input>,
    pub config: &'a PipelineConfig,
    pub out: &'a dyn OutputTarget,
    /// Server-optimizer state from the previous round (none: start at 0).
    pub state_in: Option<Input>,
    /// Where to write the optimizer's new state (required with an optimizer).
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
    /// Permanent: rejected or excluded, with the reason.
    out: Option<(ClientStatus, String)>,
    source: Option<Source>,
}

pub fn aggregate(req: &AggregationRequest<'_>) -> Result<AggregationOutcome, AggregateError> {
    let started = Instant::now();
    let cfg = req.config;
    cfg.check().map_err(AggregateError::Config)?;
    let pipeline = Pipeline::build(&cfg.stages).map_err(AggregateError::Config)?;
    let fedselect = cfg.personalization == Personalization::Fedselect;
    if fedselect && req.global.is_none() {
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
    if pipeline.optimizer.is_some() && req.state_out.is_none() {
        return Err(AggregateError::Config(
            "a server optimizer needs a path to write its state to".into(),
        ));
    }
    let limits = &cfg.limits;
    let global = match &req.global {
        Some(input) => Some(Source::new(input.clone(), limits).map_err(|source| {
            unavailable(&source, input).unwrap_or_else(|| AggregateError::Global {
                name: input.source().describe(),
                source,
            })
        })?),
        None => None,
    };

    let metas: Vec<UpdateMeta> = req.updates.iter().map(|u| u.meta.clone()).collect();
    let plan = weighting::plan(&metas, cfg.weighting, &cfg.type_filter(), limits)
        .map_err(AggregateError::NoUsableUpdate)?;
    let mut clients: Vec<Client> = Vec::with_capacity(metas.len());
    for (u, e) in req.updates.iter().zip(plan.entries) {
        let (raw_weight, out) = match e.verdict {
            Verdict::Weighted(w) => (w, None),
            Verdict::Rejected(r) => (0.0, Some((ClientStatus::Rejected, r))),
            Verdict::Excluded(r) => (0.0, Some((ClientStatus::Excluded, r))),
        };
        let mut c = Client {
            meta: u.meta.clone(),
            num_examples: e.num_examples,
            quality: e.multiplier,
            raw_weight,
            out,
            source: None,
        };
        if c.out.is_none() {
            match Source::new(u.input.clone(), limits) {
                Ok(s) => c.source = Some(s),
                Err(err) => {
                    if let Some(e) = unavailable(&err, &u.input) {
                        return Err(e);
                    }
                    c.out = Some((
                        ClientStatus::Rejected,
                        format!("model {}: {err}", u.input.source().describe()),
                    ))
                }
            }
        }
        clients.push(c);
    }

    let reference: Vec<TensorEntry> = match &global {
        Some(g) => g.header.tensors.clone(),
        None => majority_layout(&clients).ok_or_else(|| no_usable(&clients))?,
    };
    let reference_header = crate::model::ModelHeader {
        header_len: 0,
        file_len: 0,
        tensors: reference.clone(),
        metadata: BTreeMap::new(),
    };
    for c in clients.iter_mut().filter(|c| c.out.is_none()) {
        let s = c.source.as_ref().expect("open sources for live clients");
        let checked = if fedselect {
            check_masked_compatible(&reference_header, &s.header).map(|_| ())
        } else {
            check_compatible(&reference_header, &s.header).map_err(|e| e.to_string())
        };
        if let Err(err) = checked {
            c.out = Some((ClientStatus::Rejected, format!("model {}: {err}", s.name)));
            c.source = None;
        }
    }

    let state_in = match (&req.state_in, &pipeline.optimizer) {
        (Some(input), Some(opt)) => Some(open_state(
            input,
            &reference,
            opt.kind.name(),
            opt.slots(),
            limits,
        )?),
        _ => None,
    };
    let metadata = match &global {
        Some(g) => g.header.metadata.clone(),
        None => BTreeMap::new(),
    };
    let specs: Vec<TensorSpec> = reference
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    let max_eb = reference
        .iter()
        .map(|t| elem_bytes(t.dtype))
        .max()
        .unwrap_or(4);

    let mut passes = 0u32;
    let mut bytes_read = 0u64;
    loop {
        let live: Vec<usize> = (0..clients.len())
            .filter(|&i| clients[i].out.is_none())
            .collect();
        if live.is_empty() {
            return Err(no_usable(&clients));
        }
        let inputs: Vec<&Source> = live
            .iter()
            .map(|&i| clients[i].source.as_ref().expect("live"))
            .collect();
        let block_elems = block_elements(cfg.memory_budget_mb << 20, inputs.len() + 1, max_eb);
        let mut stages = BTreeMap::new();
        let mut scales = vec![1.0; live.len()];
        let mut norms: Option<Vec<f64>> = None;
        let mut dropped: Vec<Option<(ClientStatus, String)>> = vec![None; live.len()];

        if pipeline.needs_statistics() {
            passes += 1;
            let full = matches!(pipeline.combiner, Combiner::Krum(_));
            let stats =
                match statistics::run(&reference, global.as_ref(), &inputs, full, block_elems) {
                    Ok(s) => s,
                    Err(e) => {
                        reject_for(e, &live, &mut clients, req.global.as_ref())?;
                        continue;
                    }
                };
            bytes_read += stats.bytes_read;
            let n: Vec<f64> = (0..live.len()).map(|i| stats.gram[i][i].sqrt()).collect();
            let mut zeroed: Vec<Option<String>> = vec![None; live.len()];
            for t in &pipeline.transforms {
                let active: Vec<bool> = zeroed.iter().map(Option::is_none).collect();
                match t {
                    Transform::Clip(c) => {
                        stages.insert("clip".to_string(), c.apply(&n, &mut scales, &active));
                    }
                    Transform::Zeroing(z) => {
                        stages.insert(
                            "zeroing".to_string(),
                            z.apply(&n, &scales, &active, &mut zeroed),
                        );
                    }
                }
            }
            for (d, z) in dropped.iter_mut().zip(zeroed) {
                *d = z.map(|r| (ClientStatus::Zeroed, r));
            }
            if let Combiner::Krum(k) = &pipeline.combiner {
                let candidates: Vec<usize> =
                    (0..live.len()).filter(|&i| dropped[i].is_none()).collect();
                let gram: Vec<Vec<f64>> = candidates
                    .iter()
                    .map(|&i| candidates.iter().map(|&j| stats.gram[i][j]).collect())
                    .collect();
                let s: Vec<f64> = candidates.iter().map(|&i| scales[i]).collect();
                let (chosen, m) = k
                    .choose(&krum::distances_from_gram(&gram, &s))
                    .map_err(AggregateError::NoUsableUpdate)?;
                for (pos, &i) in candidates.iter().enumerate() {
                    if !chosen.contains(&pos) {
                        dropped[i] = Some((
                            ClientStatus::NotSelected,
                            format!("krum: not among the {} best-scored updates", k.select),
                        ));
                    }
                }
                stages.insert("krum".to_string(), m);
            }
            norms = Some(n);
        }

        // The combination set and its normalized weights.
        let kept: Vec<usize> = (0..live.len()).filter(|&i| dropped[i].is_none()).collect();
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
        if let Some(cap) = cfg.max_client_share {
            let capped = share_cap::cap_shares(&weights, cap);
            let ids: Vec<&str> = kept
                .iter()
                .map(|&i| clients[live[i]].meta.client_id.as_str())
                .collect();
            let moot = pipeline
                .combiner
                .ignores_weights()
                .then(|| pipeline.combiner.name());
            stages.insert(
                "max_client_share".to_string(),
                capped.measurement(cap, &ids, moot),
            );
            weights = capped.shares;
        }
        let buckets = pipeline.bucketing.assign(kept.len(), req.round);
        let trim = match &pipeline.combiner {
            Combiner::TrimmedMean(tm) => {
                let k = tm.trim_count(buckets.len());
                // β < 0.5 (checked when the pipeline is built) keeps 2k < n.
                debug_assert!(2 * k < buckets.len());
                stages.insert(
                    "trimmed_mean".to_string(),
                    json!({"beta": tm.beta, "trimmed_each_end": k, "buckets": buckets.len(),
                           "bucket_size": pipeline.bucketing.size}),
                );
                k
            }
            Combiner::Median => {
                stages.insert(
                    "median".to_string(),
                    json!({"updates": kept.len(), "buckets": buckets.len(),
                           "bucket_size": pipeline.bucketing.size}),
                );
                0
            }
            _ => 0,
        };
        let noise = match &pipeline.noise {
            Some(dp) => {
                let max_w = weights.iter().copied().fold(0.0, f64::max);
                let clip = pipeline.clip_norm().expect("checked by Pipeline::build");
                let sigma = dp.stddev(clip, max_w);
                stages.insert(
                    "dp_noise".to_string(),
                    json!({"noise_multiplier": dp.noise_multiplier, "clip_norm": clip,
                           "max_weight": max_w, "stddev": sigma, "seeded": dp.seed.is_some()}),
                );
                Some((dp.rng(req.round), sigma))
            }
            None => None,
        };

        let out = ModelWriter::create(req.out, &specs, &metadata).map_err(|source| {
            AggregateError::Output {
                name: req.out.describe(),
                source,
            }
        })?;
        let state_out = match (&pipeline.optimizer, req.state_out) {
            (Some(opt), Some(p)) => Some(create_state(p, &reference, opt, state_in.as_ref())?),
            _ => None,
        };
        let kept_inputs: Vec<&Source> = kept.iter().map(|&i| inputs[i]).collect();
        let kept_scales: Vec<f64> = kept.iter().map(|&i| scales[i]).collect();
        let plan = CombinePlan {
            reference: &reference,
            carry_source: global.as_ref().unwrap_or(kept_inputs[0]),
            global: global.as_ref(),
            inputs: kept_inputs,
            coefs: weights
                .iter()
                .zip(&kept_scales)
                .map(|(w, s)| w * s)
                .collect(),
            scales: kept_scales,
            combiner: &pipeline.combiner,
            trim,
            buckets,
            noise,
            optimizer: match (&pipeline.optimizer, &state_out) {
                (Some(optimizer), Some((w, _))) => Some(OptimizerIo {
                    optimizer,
                    state_in: state_in.as_ref(),
                    state_out: w,
                }),
                _ => None,
            },
            out: &out,
            block_elems,
            masked_weights: fedselect.then(|| weights.clone()),
        };
        passes += 1;
        match combine::run(plan) {
            Ok(done) => {
                bytes_read += done.bytes_read;
                if let Some(tally) = done.tally {
                    let float_elements: u64 = reference
                        .iter()
                        .filter(|t| is_float(t))
                        .map(|t| t.elements() as u64)
                        .sum();
                    let shared: serde_json::Map<String, serde_json::Value> = kept
                        .iter()
                        .zip(&tally.shared)
                        .map(|(&i, &n)| {
                            let id = clients[live[i]].meta.client_id.clone();
                            (id, json!(n as f64 / float_elements.max(1) as f64))
                        })
                        .collect();
                    stages.insert(
                        "fedselect".to_string(),
                        json!({"float_elements": float_elements,
                               "shared_fraction": shared,
                               "shared_by_nobody": tally.shared_by_nobody}),
                    );
                }
            }
            Err(CombineError::Input(e)) => {
                let kept_live: Vec<usize> = kept.iter().map(|&i| live[i]).collect();
                reject_for(e, &kept_live, &mut clients, req.global.as_ref())?;
                continue;
            }
            Err(CombineError::Write(source)) => {
                return Err(AggregateError::Output {
                    name: req.out.describe(),
                    source,
                })
            }
            Err(CombineError::Overflow { tensor, index }) => {
                return Err(AggregateError::NoUsableUpdate(format!(
                    "the new global model's `{tensor}` element {index} is not finite although every input is: \
                     the combination, the noise, the server optimizer or the tensor's dtype overflowed; \
                     nothing was written"
                )))
            }
            Err(CombineError::State(reason)) => {
                return Err(AggregateError::ServerState {
                    name: req
                        .state_in
                        .as_ref()
                        .map_or("-".into(), |i| i.source().describe()),
                    reason,
                })
            }
        }
        // The state first: a model whose state is missing would restart the
        // optimizer's moments at zero on the next round.
        if let Some((w, step)) = state_out {
            w.finish().map_err(|source| AggregateError::Output {
                name: req.state_out.map_or("-".into(), |t| t.describe()),
                source,
            })?;
            if let Some(opt) = &pipeline.optimizer {
                stages.insert(
                    opt.kind.name().to_string(),
                    json!({"step": step, "learning_rate": opt.learning_rate}),
                );
            }
        }
        let bytes_written = out.finish().map_err(|source| AggregateError::Output {
            name: req.out.describe(),
            source,
        })?;

        // Final per-client record.
        let mut weight_of: HashMap<usize, f64> = HashMap::new();
        for (k, &i) in kept.iter().enumerate() {
            weight_of.insert(live[i], weights[k]);
        }
        let mut live_pos: HashMap<usize, usize> = HashMap::new();
        for (p, &i) in live.iter().enumerate() {
            live_pos.insert(i, p);
        }
        let records: Vec<ClientMeasurement> = clients
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pos = live_pos.get(&i).copied();
                let (status, reason) = match (&c.out, pos.and_then(|p| dropped[p].clone())) {
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
                    update_norm: pos.and_then(|p| norms.as_ref().map(|n| n[p])),
                    scale: pos.filter(|_| norms.is_some()).map(|p| scales[p]),
                }
            })
            .collect();
        let count = |s: ClientStatus| records.iter().filter(|r| r.status == s).count();
        let parameters = reference.iter().map(|t| t.elements() as u64).sum();
        return Ok(AggregationOutcome {
            measurements: Measurements {
                weighting: format!("{:?}", cfg.weighting).to_lowercase(),
                llm_type: cfg.llm_type.clone(),
                target_llm_type: plan_target(&cfg.llm_type, &metas, cfg),
                combiner: pipeline.combiner.name().to_string(),
                accepted: count(ClientStatus::Accepted),
                rejected: count(ClientStatus::Rejected),
                excluded: count(ClientStatus::Excluded),
                clients: records,
                stages,
                tensors: reference.len(),
                parameters,
                bytes_read,
                bytes_written,
                passes,
                seconds: started.elapsed().as_secs_f64(),
            },
        });
    }
}

/// The target type the weighting chose (recomputed: cheap, and keeps the
/// weighting plan's lifetime simple).
fn plan_target(llm_type: &str, metas: &[UpdateMeta], cfg: &PipelineConfig) -> Option<String> {
    if llm_type == "none" {
        return None;
    }
    weighting::plan(metas, cfg.weighting, &cfg.type_filter(), &cfg.limits)
        .ok()
        .and_then(|p| p.target_type)
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
    c.out = Some((ClientStatus::Rejected, format!("model {name}: {reason}")));
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
        .map(|c| match &c.out {
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
        let Some(s) = c.source.as_ref().filter(|_| c.out.is_none()) else {
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

/// Opens and checks the previous optimizer state against the model layout.
fn open_state(
    input: &Input,
    reference: &[TensorEntry],
    optimizer: &str,
    slots: &[&str],
    limits: &crate::limits::Limits,
) -> Result<Source, AggregateError> {
    let bad = |reason: String| AggregateError::ServerState {
        name: input.source().describe(),
        reason,
    };
    let s = Source::new(input.clone(), limits)
        .map_err(|e| unavailable(&e, input).unwrap_or_else(|| bad(e.to_string())))?;
    match s.header.metadata.get("fedstep.optimizer") {
        Some(o) if o == optimizer => {}
        Some(o) => {
            return Err(bad(format!(
                "state was written by `{o}`, the pipeline uses `{optimizer}`"
            )))
        }
        None => {
            return Err(bad(
                "no `fedstep.optimizer` metadata: not a fedstep optimizer state".into(),
            ))
        }
    }
    for t in reference.iter().filter(|t| is_float(t)) {
        for slot in slots {
            let name = format!("{slot}.{}", t.name);
            match s.entry(&name) {
                Some(e) if e.shape == t.shape && e.dtype == state_dtype(t.dtype) => {}
                Some(e) => {
                    return Err(bad(format!(
                        "`{name}` is {:?} {:?}, expected {:?} {:?}",
                        e.dtype,
                        e.shape,
                        state_dtype(t.dtype),
                        t.shape
                    )))
                }
                None => return Err(bad(format!("`{name}` is missing"))),
            }
        }
    }
    Ok(s)
}

fn is_float(t: &TensorEntry) -> bool {
    matches!(
        role(t.dtype),
        Some(TensorRole::Float32Acc | TensorRole::Float64Acc)
    )
}

fn create_state(
    target: &dyn OutputTarget,
    reference: &[TensorEntry],
    opt: &crate::stages::ServerOptimizer,
    previous: Option<&Source>,
) -> Result<(ModelWriter, u64), AggregateError> {
    let step = previous
        .and_then(|s| s.header.metadata.get("fedstep.step"))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + 1;
    let mut specs = Vec::new();
    for t in reference.iter().filter(|t| is_float(t)) {
        for slot in opt.slots() {
            specs.push(TensorSpec {
                name: format!("{slot}.{}", t.name),
                dtype: state_dtype(t.dtype),
                shape: t.shape.clone(),
            });
        }
    }
    let metadata = BTreeMap::from([
        ("fedstep.optimizer".to_string(), opt.kind.name().to_string()),
        ("fedstep.step".to_string(), step.to_string()),
    ]);
    let w = ModelWriter::create(target, &specs, &metadata).map_err(|source| {
        AggregateError::Output {
            name: target.describe(),
            source,
        }
    })?;
    Ok((w, step))
}
