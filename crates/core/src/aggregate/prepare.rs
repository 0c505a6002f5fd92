//! Opening an attempt: every update weighed from its claims and its header
//! read and checked, the global model, the reference layout, the stages'
//! previous state and the shard plan. Every task of an attempt (a shard's
//! statistics or combine pass, the decision, the records) starts from a
//! [`Prepared`]; opening one again from the same request gives the same
//! one, which is what lets those tasks run in different processes.

use std::collections::BTreeMap;

use super::AggregationRequest;
use crate::bytes::{is_unavailable, Input};
use crate::config::PipelineConfig;
use crate::error::{AggregateError, ModelError};
use crate::float::elem_bytes;
use crate::measurements::ClientStatus;
use crate::model::{check_compatible, ModelHeader, TensorEntry};
use crate::personalization::{check_masked_compatible, Personalization};
use crate::shard::ShardPlan;
use crate::stages::state_file::{OpenError, StateIn, StateLayout};
use crate::stages::Pipeline;
use crate::stream::{block_elements, Source};
use crate::update_meta::UpdateMeta;
use crate::weighting::{self, TypeFilter, Verdict};
use crate::writer::TensorSpec;

/// Per-client bookkeeping while the aggregation runs.
pub(super) struct Client {
    pub(super) meta: UpdateMeta,
    pub(super) num_examples: Option<u64>,
    pub(super) quality: Option<f64>,
    pub(super) raw_weight: f64,
    /// Permanent for this aggregation: rejected or excluded, with the reason.
    pub(super) dropped: Option<(ClientStatus, String)>,
    pub(super) source: Option<Source>,
}

/// What every attempt shares: decided once, before any value is read.
pub(super) struct Setup<'a> {
    pub(super) req: &'a AggregationRequest<'a>,
    pub(super) cfg: &'a PipelineConfig,
    pub(super) pipeline: &'a Pipeline,
    pub(super) global: Option<Source>,
    pub(super) reference: Vec<TensorEntry>,
    /// Who aggregates which stripes of the reference.
    pub(super) shards: ShardPlan,
    pub(super) metadata: BTreeMap<String, String>,
    pub(super) state: StateLayout,
    pub(super) state_in: Option<StateIn>,
}

/// An attempt, opened.
pub struct Prepared<'a> {
    pub(super) setup: Setup<'a>,
    pub(super) clients: Vec<Client>,
    pub(super) target_type: Option<String>,
}

/// How to cut the model into shards.
#[derive(Debug, Clone, Copy)]
pub struct Sharding {
    /// At most this many shards.
    pub shards: usize,
    /// Each at least this many bytes of the model (0: no minimum; an S3
    /// upload in parts needs [`crate::shard::MIN_PART_BYTES`]).
    pub min_shard_bytes: u64,
}

/// Opens an attempt at `req` with the model cut as `sharding` says.
/// `rejected` holds the updates (by index in `req.updates`) an earlier
/// attempt rejected mid-stream, with the reason.
pub fn prepare<'a>(
    req: &'a AggregationRequest<'a>,
    sharding: Sharding,
    rejected: &BTreeMap<usize, String>,
) -> Result<Prepared<'a>, AggregateError> {
    check_request(req)?;
    let (mut clients, target_type) = open_and_weigh(req)?;
    for (&i, reason) in rejected {
        if let Some(c) = clients.get_mut(i) {
            c.dropped = Some((ClientStatus::Rejected, reason.clone()));
            c.source = None;
        }
    }
    let setup = open_references(req, &mut clients, sharding)?;
    Ok(Prepared {
        setup,
        clients,
        target_type,
    })
}

impl Prepared<'_> {
    /// Who aggregates which stripes.
    pub fn shards(&self) -> &ShardPlan {
        &self.setup.shards
    }

    /// Whether the attempt writes the stages' state beside the model (a
    /// stage keeps state and the request has somewhere to write it).
    pub fn writes_state(&self) -> bool {
        self.setup.req.state_out.is_some() && !self.setup.state.is_empty()
    }

    /// Whether a statistics pass runs before the combine pass (a stage
    /// needs norms or distances).
    pub fn needs_statistics(&self) -> bool {
        self.setup.pipeline.needs_statistics()
    }

    /// The updates still in (indices into the request's), in order.
    pub(super) fn live(&self) -> Vec<usize> {
        (0..self.clients.len())
            .filter(|&i| self.clients[i].dropped.is_none())
            .collect()
    }

    /// The opened inputs of `live`.
    pub(super) fn inputs(&self, live: &[usize]) -> Vec<&Source> {
        live.iter()
            .map(|&i| self.clients[i].source.as_ref().expect("live"))
            .collect()
    }

    /// Block size for `inputs` inputs plus the global model within the
    /// budget.
    pub(super) fn block_size(&self, inputs: usize) -> usize {
        let max_eb = self
            .setup
            .reference
            .iter()
            .map(|t| elem_bytes(t.dtype))
            .max()
            .unwrap_or(4);
        block_elements(self.setup.cfg.memory_budget_mb() << 20, inputs + 1, max_eb)
    }

    pub(super) fn no_usable(&self) -> AggregateError {
        no_usable(&self.clients)
    }
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
    sharding: Sharding,
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
        shards: ShardPlan::even(&reference, sharding.shards, sharding.min_shard_bytes),
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

pub(super) fn specs(reference: &[TensorEntry]) -> Vec<TensorSpec> {
    reference
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect()
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

/// The system-side failure a header read hit, if that is what it was.
pub(super) fn unavailable(err: &ModelError, input: &Input) -> Option<AggregateError> {
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
