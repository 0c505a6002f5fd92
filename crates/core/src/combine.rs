//! The combine pass: streams every tensor block by block through the
//! combiner, the noise and the server optimizer, and writes the new global
//! model (and the optimizer's state tensors) as it goes. Stages are called
//! once per block; their per-element loops are theirs (see `stages`).

use rayon::prelude::*;

use crate::float::{decode_into, elem_bytes, encode_from, first_non_finite, role, Acc, TensorRole};
use crate::model::TensorEntry;
use crate::personalization::masked_mean::{masked_mean_block, MaskedBlock, Tally};
use crate::shard::Stripe;
use crate::stages::state_file::{is_float, slot_tensor, state_dtype};
use crate::stages::{
    CombineBlock, CombineKernel, Combiner, NoiseKernel, RoundCombiner, RoundNoise, ServerStep,
    StepKernel,
};
use crate::statistics::StatsError;
use crate::stream::{blocks, for_each_item, stripe_blocks, Block, Lane, ReadFailure, Source};
use crate::writer::ModelWriter;

const CHUNK: usize = 2048;

/// Everything the pass needs, decided beforehand.
pub struct CombinePlan<'a> {
    pub reference: &'a [TensorEntry],
    /// The stripes this pass writes (all of them, or one shard's).
    pub stripes: &'a [Stripe],
    /// Where integer/bool tensors are copied from.
    pub carry_source: &'a Source,
    pub global: Option<&'a Source>,
    pub inputs: Vec<&'a Source>,
    /// Mean combiner: coefficient of each input (normalized weight × scale).
    pub coefs: Vec<f64>,
    /// Per-input clip scale (robust combiners apply it to the update).
    pub scales: Vec<f64>,
    pub combiner: &'a dyn Combiner,
    /// The combiner's plan for this round (buckets, trim count).
    pub round_combiner: Box<dyn RoundCombiner>,
    pub noise: Option<&'a (dyn RoundNoise + 'static)>,
    pub optimizer: Option<OptimizerIo<'a>>,
    pub out: &'a ModelWriter,
    pub block_elems: usize,
    /// FedSelect: each input's normalized weight, for the per-element
    /// denominators of the masked mean (None: the pipeline's combiner).
    pub masked_weights: Option<Vec<f64>>,
}

/// What the pass did.
pub struct CombineOutput {
    pub bytes_read: u64,
    /// FedSelect: what the masks said.
    pub tally: Option<Tally>,
}

/// The server optimizer and where its state tensors come from and go.
pub struct OptimizerIo<'a> {
    pub optimizer: &'a (dyn ServerStep + 'static),
    pub slots: &'static [&'static str],
    pub state_in: Option<&'a Source>,
    /// `None` for a stateless step (no slots).
    pub state_out: Option<&'a ModelWriter>,
}

pub enum CombineError {
    Input(StatsError),
    Write(std::io::Error),
    /// The output went non-finite without any input being so (overflow).
    Overflow {
        tensor: String,
        index: usize,
    },
    /// The optimizer state could not be read.
    State(String),
}

impl From<StatsError> for CombineError {
    fn from(e: StatsError) -> Self {
        CombineError::Input(e)
    }
}

pub fn run(mut plan: CombinePlan<'_>) -> Result<CombineOutput, CombineError> {
    let mut bytes_read = 0u64;
    let n = plan.inputs.len();
    let scaled = plan.scales.iter().any(|&s| s != 1.0);
    let global_coef = 1.0 - plan.coefs.iter().sum::<f64>();
    let masked = plan.masked_weights.is_some();
    // Read the global model only when the result depends on it (the masked
    // mean always does: it is the value of elements nobody shared).
    let need_g = plan.global.is_some()
        && (masked || plan.optimizer.is_some() || plan.combiner.reads_global(scaled, global_coef));
    // Buffers per block: the inputs' values, the global model's, then (the
    // masked mean) each input's mask for the same range.
    let mut lanes: Vec<Lane<'_>> = plan.inputs.iter().map(|&s| Lane::Values(s)).collect();
    if need_g {
        lanes.extend(plan.global.map(Lane::Values));
    }
    if masked {
        lanes.extend(plan.inputs.iter().map(|&s| Lane::Mask(s)));
    }
    if !masked {
        announce_reads(&plan, need_g);
    }
    let mut tally = masked.then(|| Tally::new(n));
    // Noise is drawn by element position in the model, so a shard draws
    // what the whole pass would at the same elements.
    let mut element_offsets = std::collections::HashMap::new();
    let mut at = 0u64;
    for t in plan.reference {
        element_offsets.insert(t.name.clone(), at);
        at += t.elements() as u64;
    }
    let mut ctx = Ctx {
        element_offsets,
        global_coef,
        need_g,
        scaled,
        f32: Buffers::default(),
        f64: Buffers::default(),
    };
    let reference = plan.reference;
    let stripes = plan.stripes;
    let block_elems = plan.block_elems;
    let (carry_source, out) = (plan.carry_source, plan.out);
    let mut combine_block = |block: Block<'_>| -> Result<Vec<Vec<u8>>, CombineError> {
        let Block {
            tensor,
            range,
            raws,
        } = block;
        let (xs, rest) = raws.split_at(n);
        let (g, masks) = rest.split_at(usize::from(need_g));
        let g = g.first().map(Vec::as_slice);
        let masks = MaskBlocks {
            raws: masks,
            tally: tally.as_mut(),
        };
        bytes_read += raws.iter().map(|r| r.len() as u64).sum::<u64>();
        bytes_read += match role(tensor.dtype) {
            Some(TensorRole::Float64Acc) => {
                let mut b = std::mem::take(&mut ctx.f64);
                let r = float_block::<f64>(&mut plan, &ctx, tensor, range, xs, g, masks, &mut b);
                ctx.f64 = b;
                r?
            }
            _ => {
                let mut b = std::mem::take(&mut ctx.f32);
                let r = float_block::<f32>(&mut plan, &ctx, tensor, range, xs, g, masks, &mut b);
                ctx.f32 = b;
                r?
            }
        };
        Ok(raws)
    };
    // Tensors are produced in file order (a run of float tensors streamed
    // block by block, then the next run of carried-over ones, ...), so an
    // output uploaded in parts holds only the part being filled.
    let mut result = Ok(());
    let mut carried = 0u64;
    for run in
        stripes.chunk_by(|a, b| is_float(&reference[a.tensor]) == is_float(&reference[b.tensor]))
    {
        if is_float(&reference[run[0].tensor]) {
            let items = stripe_blocks(reference, run, |_| true, block_elems);
            result = for_each_item(items, &lanes, &mut combine_block);
            if result.is_err() {
                break;
            }
        } else {
            for s in run {
                carried += carry_over(carry_source, out, block_elems, &reference[s.tensor], s)?;
            }
        }
    }
    bytes_read += carried;
    match result {
        // A failed read of the global model's lane is the global model's fault.
        Err(CombineError::Input(StatsError::Read { input, error })) if need_g && input == n => Err(
            CombineError::Input(StatsError::Global(format!("reading: {error}"))),
        ),
        // A failed read of a mask lane is its input's fault.
        Err(CombineError::Input(StatsError::Read { input, error })) if input > n => {
            Err(CombineError::Input(StatsError::Read {
                input: input - n - usize::from(need_g),
                error,
            }))
        }
        Err(e) => Err(e),
        Ok(()) => Ok(CombineOutput { bytes_read, tally }),
    }
}

/// Tells every source the pass reads which of its bytes that is (a
/// reader fetching ahead then fetches only those): the float stripes of
/// each lane, and the other stripes of the source they are carried from.
/// Not with FedSelect, whose masks are tensors of their own.
fn announce_reads(plan: &CombinePlan<'_>, need_g: bool) {
    let reference = plan.reference;
    let (float, other): (Vec<&Stripe>, Vec<&Stripe>) = plan
        .stripes
        .iter()
        .partition(|s| is_float(&reference[s.tensor]));
    let lanes = plan
        .inputs
        .iter()
        .copied()
        .chain(plan.global.filter(|_| need_g));
    let mut announced: Vec<&Source> = Vec::new();
    for source in lanes.chain([plan.carry_source]) {
        if announced.iter().any(|a| std::ptr::eq(*a, source)) {
            continue;
        }
        announced.push(source);
        let is_lane = plan.inputs.iter().any(|i| std::ptr::eq(*i, source))
            || (need_g && plan.global.is_some_and(|g| std::ptr::eq(g, source)));
        let carries = std::ptr::eq(plan.carry_source, source);
        let stripes = float
            .iter()
            .filter(|_| is_lane)
            .chain(other.iter().filter(|_| carries))
            .copied();
        source.will_read_stripes(reference, stripes);
    }
}

/// The mask buffers of a block (empty without FedSelect) and where to
/// count what they said.
struct MaskBlocks<'b> {
    raws: &'b [Vec<u8>],
    tally: Option<&'b mut Tally>,
}

impl From<ReadFailure> for CombineError {
    fn from(f: ReadFailure) -> Self {
        CombineError::Input(StatsError::Read {
            input: f.source,
            error: f.error,
        })
    }
}

/// Per-pass decisions and reusable buffers.
struct Ctx {
    /// Each tensor's first element's position among all the model's.
    element_offsets: std::collections::HashMap<String, u64>,
    global_coef: f64,
    need_g: bool,
    scaled: bool,
    f32: Buffers<f32>,
    f64: Buffers<f64>,
}

#[derive(Default)]
struct Buffers<A> {
    g: Vec<A>,
    out: Vec<A>,
    /// The optimizer's state, one buffer per slot.
    slots: Vec<Vec<A>>,
    state_raw: Vec<u8>,
    out_raw: Vec<u8>,
}

/// Copies one stripe of a carried-over tensor; returns the bytes copied.
fn carry_over(
    source: &Source,
    out: &ModelWriter,
    block_elems: usize,
    t: &TensorEntry,
    stripe: &Stripe,
) -> Result<u64, CombineError> {
    let eb = elem_bytes(t.dtype);
    let mut buf = Vec::new();
    let first = stripe.elements.start;
    for range in blocks(stripe.elements.len(), block_elems) {
        buf.resize(range.len() * eb, 0);
        let off = ((first + range.start) * eb) as u64;
        source
            .read(&t.name, off, &mut buf)
            .map_err(|e| CombineError::State(format!("copying `{}`: {e}", t.name)))?;
        out.write_at(&t.name, off, &buf)
            .map_err(CombineError::Write)?;
    }
    Ok((stripe.elements.len() * eb) as u64)
}

/// Combines one block; returns the optimizer-state bytes it read.
#[allow(clippy::too_many_arguments)]
fn float_block<A: Acc>(
    plan: &mut CombinePlan<'_>,
    ctx: &Ctx,
    t: &TensorEntry,
    range: std::ops::Range<usize>,
    raws: &[Vec<u8>],
    graw: Option<&[u8]>,
    masks: MaskBlocks<'_>,
    b: &mut Buffers<A>,
) -> Result<u64, CombineError>
where
    dyn RoundCombiner: CombineKernel<A>,
    dyn RoundNoise: NoiseKernel<A>,
    dyn ServerStep: StepKernel<A>,
{
    let eb = elem_bytes(t.dtype);
    let len = range.len();
    let off = (range.start * eb) as u64;
    b.g.resize(len, A::default());
    if let Some(graw) = graw {
        decode_into(t.dtype, graw, &mut b.g);
    }
    b.out.resize(len, A::default());
    let coefs: Vec<A> = plan.coefs.iter().map(|&c| A::from_f64(c)).collect();
    if let Some(masked_weights) = &plan.masked_weights {
        let weights: Vec<A> = masked_weights.iter().map(|&w| A::from_f64(w)).collect();
        let block = MaskedBlock {
            dtype: t.dtype,
            tensor: &t.name,
            first: range.start,
            global: &b.g,
            values: raws,
            masks: masks.raws,
            coefs: &coefs,
            weights: &weights,
        };
        let counted = masked_mean_block(&block, &mut b.out)?;
        if let Some(tally) = masks.tally {
            tally.add(&counted);
        }
        if let Some(j) = b.out.iter().position(|v| !v.is_finite()) {
            return Err(CombineError::Overflow {
                tensor: t.name.clone(),
                index: range.start + j,
            });
        }
    } else {
        let scales: Vec<A> = plan.scales.iter().map(|&s| A::from_f64(s)).collect();
        let block = CombineBlock {
            tensor: t,
            first: range.start,
            raws,
            global: ctx.need_g.then_some(b.g.as_slice()),
            global_coef: A::from_f64(ctx.global_coef),
            coefs: &coefs,
            scales: &scales,
            scaled: ctx.scaled,
        };
        plan.round_combiner.combine_block(&block, &mut b.out)?;
    }
    if let Some(noise) = plan.noise {
        noise.add_block(
            ctx.element_offsets[&t.name] + range.start as u64,
            &mut b.out,
        );
    }
    let mut read = 0;
    if let Some(io) = &plan.optimizer {
        read = optimizer_block(io, t, range.start, len, b)?;
    }
    b.out_raw.resize(len * eb, 0);
    // The last word on finiteness, after every stage: noise, the server
    // optimizer and the output dtype can each overflow where the mean did
    // not, and a non-finite value must never reach the next global model.
    // Encoded and checked in parallel, a chunk at a time (the check reads
    // what was just encoded, still in cache): done on this thread alone,
    // it left the pool idle for a sixth of the pass.
    let dtype = t.dtype;
    let first_bad = b
        .out
        .par_chunks(CHUNK)
        .zip(b.out_raw.par_chunks_mut(CHUNK * eb))
        .enumerate()
        .filter_map(|(c, (values, raw))| {
            encode_from(dtype, values, raw);
            first_non_finite(dtype, raw).map(|j| c * CHUNK + j)
        })
        .min();
    if let Some(j) = first_bad {
        return Err(CombineError::Overflow {
            tensor: t.name.clone(),
            index: range.start + j,
        });
    }
    plan.out
        .write_at(&t.name, off, &b.out_raw)
        .map_err(CombineError::Write)?;
    Ok(read)
}

fn optimizer_block<A: Acc>(
    io: &OptimizerIo<'_>,
    t: &TensorEntry,
    first: usize,
    len: usize,
    b: &mut Buffers<A>,
) -> Result<u64, CombineError>
where
    dyn ServerStep: StepKernel<A>,
{
    let sdt = state_dtype(t.dtype);
    let seb = elem_bytes(sdt);
    let off = (first * seb) as u64;
    let mut read = 0u64;
    b.slots.resize_with(io.slots.len(), Vec::new);
    for (slot, buf) in io.slots.iter().zip(&mut b.slots) {
        buf.clear();
        buf.resize(len, A::default());
        if let Some(state) = io.state_in {
            b.state_raw.resize(len * seb, 0);
            state
                .read(&slot_tensor(slot, &t.name), off, &mut b.state_raw)
                .map_err(|e| CombineError::State(e.to_string()))?;
            decode_into(sdt, &b.state_raw, buf);
            read += (len * seb) as u64;
        }
    }
    // One work item per chunk: the output's chunk and each slot's.
    let mut per_slot: Vec<std::slice::ChunksMut<'_, A>> =
        b.slots.iter_mut().map(|s| s.chunks_mut(CHUNK)).collect();
    let work: Vec<(&mut [A], Vec<&mut [A]>)> = b
        .out
        .chunks_mut(CHUNK)
        .map(|o| {
            let slots = per_slot
                .iter_mut()
                .map(|s| s.next().expect("slot buffers are as long as the block"))
                .collect();
            (o, slots)
        })
        .collect();
    let g = &b.g;
    let opt = io.optimizer;
    work.into_par_iter()
        .enumerate()
        .for_each(|(c, (o, mut slots))| {
            opt.step(&g[c * CHUNK..c * CHUNK + o.len()], o, &mut slots)
        });
    let Some(state_out) = io.state_out else {
        return Ok(read);
    };
    for (slot, buf) in io.slots.iter().zip(&b.slots) {
        b.state_raw.resize(len * seb, 0);
        encode_from(sdt, buf, &mut b.state_raw);
        state_out
            .write_at(&slot_tensor(slot, &t.name), off, &b.state_raw)
            .map_err(CombineError::Write)?;
    }
    Ok(read)
}
