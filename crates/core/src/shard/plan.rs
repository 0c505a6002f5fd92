//! The shard plan: which stripes each shard aggregates, and which bytes of
//! each output (the model, the stages' state) it therefore writes, cut into
//! numbered upload parts.
//!
//! Shards are runs of whole stripes of about equal model bytes. Every byte
//! of an output belongs to exactly one shard: its tensors' slices for the
//! shard's stripes, plus the header for the shard that writes the file's
//! first tensor bytes. Parts are numbered in byte order across the whole
//! output, so the shards' parts put together (an S3 multipart upload's
//! completion, or a concatenation) are the file a single pass writes.

use std::ops::Range;

use safetensors::Dtype;

use super::stripes::{stripes, Stripe};
use crate::float::elem_bytes;
use crate::model::TensorEntry;
use crate::writer::OutputLayout;

/// The largest upload part the plan cuts (S3 allows 5 MiB to 5 GiB, and
/// 10,000 parts: 16 MiB parts reach 156 GiB per output). A part is held in
/// memory whole until it is uploaded.
pub const PART_BYTES: u64 = 16 << 20;

/// The smallest part S3 takes, but for an upload's last.
pub const MIN_PART_BYTES: u64 = 5 << 20;

/// Which stripes each shard owns.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    stripes: Vec<Stripe>,
    /// Per shard, a range of indices into `stripes`; consecutive, covering.
    shards: Vec<Range<usize>>,
}

/// One upload part of an output: its number (from 1, in byte order), the
/// shard that writes it and its bytes in the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub number: u32,
    pub shard: usize,
    pub bytes: Range<u64>,
}

impl ShardPlan {
    /// At most `k` shards (at least one) of about equal model bytes. Fewer
    /// when the model has fewer stripes than `k`, or when `k` shards would
    /// hold less than `min_bytes` each (an upload's parts but the last must
    /// be at least 5 MiB: [`MIN_PART_BYTES`]); every shard but the last
    /// holds at least `min_bytes`.
    pub fn even(reference: &[TensorEntry], k: usize, min_bytes: u64) -> ShardPlan {
        let stripes = stripes(reference);
        let bytes: Vec<u64> = stripes.iter().map(|s| stripe_bytes(reference, s)).collect();
        let total: u64 = bytes.iter().sum();
        // No minimum (0) allows any number of shards.
        let by_size = total
            .checked_div(min_bytes)
            .map_or(usize::MAX, |n| n.max(1) as usize);
        let k = k.min(by_size).clamp(1, stripes.len().max(1)) as u64;
        let mut shards = Vec::new();
        let (mut start, mut done, mut this) = (0usize, 0u64, 0u64);
        for (i, b) in bytes.iter().enumerate() {
            done += b;
            this += b;
            let cut = shards.len() as u64 + 1;
            // Cut once this shard reaches its share of the total
            // (cumulative, so rounding never piles up on the last shard)
            // and holds at least `min_bytes`: shares fall between stripes,
            // so a shard could otherwise end up one small stripe, under
            // S3's smallest part (found on the emulators: EntityTooSmall).
            if cut < k && done * k >= total * cut && this >= min_bytes && i + 1 < stripes.len() {
                shards.push(start..i + 1);
                start = i + 1;
                this = 0;
            }
        }
        shards.push(start..stripes.len());
        ShardPlan { stripes, shards }
    }

    /// Shards of at least `shard_bytes` model bytes each (the last one may
    /// be smaller).
    pub fn by_bytes(reference: &[TensorEntry], shard_bytes: u64) -> ShardPlan {
        let stripes = stripes(reference);
        let mut shards = Vec::new();
        let (mut start, mut acc) = (0usize, 0u64);
        for (i, s) in stripes.iter().enumerate() {
            acc += stripe_bytes(reference, s);
            if acc >= shard_bytes.max(1) && i + 1 < stripes.len() {
                shards.push(start..i + 1);
                start = i + 1;
                acc = 0;
            }
        }
        shards.push(start..stripes.len());
        ShardPlan { stripes, shards }
    }

    /// How many shards.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Never true: a plan has at least one shard.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// Every stripe of the model, in order.
    pub fn stripes(&self) -> &[Stripe] {
        &self.stripes
    }

    /// The stripes shard `i` owns, in order.
    pub fn shard(&self, i: usize) -> &[Stripe] {
        &self.stripes[self.shards[i].clone()]
    }

    /// The range of stripe indices shard `i` owns.
    pub fn stripe_range(&self, i: usize) -> Range<usize> {
        self.shards[i].clone()
    }

    /// The upload parts of an output laid out as `layout`, whose tensors
    /// each come from one model tensor: `derived(t)` names the output's
    /// tensors made from model tensor `t` (the model itself: `t`; the
    /// state: one per slot, none for a carried-over tensor). Each shard's
    /// bytes are cut into parts of at most `part_bytes`, in nearly equal
    /// pieces. Fails when the derived tensors do not tile the output's data
    /// exactly (a layout that does not match the plan).
    pub fn parts(
        &self,
        reference: &[TensorEntry],
        layout: &OutputLayout,
        derived: impl Fn(&TensorEntry) -> Vec<(String, Dtype)>,
        part_bytes: u64,
    ) -> Result<Vec<Part>, String> {
        // (start, end, shard) of every slice every shard writes.
        let mut slices: Vec<(u64, u64, usize)> = Vec::new();
        for (shard, range) in self.shards.iter().enumerate() {
            for s in &self.stripes[range.clone()] {
                let t = &reference[s.tensor];
                for (name, dtype) in derived(t) {
                    let (at, len) = layout
                        .place(&name)
                        .ok_or_else(|| format!("no tensor `{name}` in the output"))?;
                    let eb = elem_bytes(dtype) as u64;
                    let (a, b) = (s.elements.start as u64 * eb, s.elements.end as u64 * eb);
                    if b > len {
                        return Err(format!("`{name}` is shorter than the model's `{}`", t.name));
                    }
                    if a < b {
                        slices.push((at + a, at + b, shard));
                    }
                }
            }
        }
        slices.sort_unstable();
        // Merge each shard's adjacent slices; the first one takes the header.
        let mut runs: Vec<(u64, u64, usize)> = Vec::new();
        let mut expect = slices.first().map_or(layout.len(), |s| s.0);
        for (a, b, shard) in slices {
            if a != expect {
                return Err(format!(
                    "the output's bytes {expect}..{a} belong to no shard, or to two"
                ));
            }
            expect = b;
            match runs.last_mut() {
                Some(last) if last.2 == shard => last.1 = b,
                _ => runs.push((a, b, shard)),
            }
        }
        if expect != layout.len() {
            return Err(format!(
                "the output's bytes {expect}..{} belong to no shard",
                layout.len()
            ));
        }
        match runs.first_mut() {
            Some(first) => first.0 = 0,
            // No tensor bytes at all: the header is the whole file, shard 0's.
            None => runs.push((0, layout.len(), 0)),
        }
        let part_bytes = part_bytes.max(1);
        let mut parts = Vec::new();
        for (a, b, shard) in runs {
            let pieces = (b - a).div_ceil(part_bytes).max(1);
            for p in 0..pieces {
                let lo = a + (b - a) * p / pieces;
                let hi = a + (b - a) * (p + 1) / pieces;
                parts.push(Part {
                    number: parts.len() as u32 + 1,
                    shard,
                    bytes: lo..hi,
                });
            }
        }
        Ok(parts)
    }
}

/// The model bytes of one stripe.
fn stripe_bytes(reference: &[TensorEntry], s: &Stripe) -> u64 {
    (s.elements.len() * elem_bytes(reference[s.tensor].dtype)) as u64
}

#[cfg(test)]
mod tests {
    use super::super::stripes::STRIPE_ELEMENTS;
    use super::*;
    use crate::writer::TensorSpec;
    use std::collections::BTreeMap;

    fn reference(sizes: &[(usize, Dtype)]) -> (Vec<TensorEntry>, OutputLayout) {
        let specs: Vec<TensorSpec> = sizes
            .iter()
            .enumerate()
            .map(|(i, &(n, dtype))| TensorSpec {
                name: format!("t{i}"),
                dtype,
                shape: vec![n],
            })
            .collect();
        let layout = OutputLayout::new(&specs, &BTreeMap::new()).unwrap();
        let entries = specs
            .iter()
            .map(|s| {
                let (start, len) = layout.place(&s.name).unwrap();
                TensorEntry {
                    name: s.name.clone(),
                    dtype: s.dtype,
                    shape: s.shape.clone(),
                    start,
                    end: start + len,
                }
            })
            .collect();
        (entries, layout)
    }

    fn same(t: &TensorEntry) -> Vec<(String, Dtype)> {
        vec![(t.name.clone(), t.dtype)]
    }

    #[test]
    fn even_shards_split_by_bytes_at_stripe_boundaries() {
        let s = STRIPE_ELEMENTS;
        let (r, _) = reference(&[(3 * s, Dtype::F32), (5, Dtype::I64), (s + 7, Dtype::BF16)]);
        let plan = ShardPlan::even(&r, 2, 0);
        assert_eq!(plan.stripes().len(), 6);
        assert_eq!(plan.len(), 2);
        // 12 MiB + 40 B + 2 MiB + 14 B: the first shard reaches half at its
        // second stripe.
        assert_eq!(plan.stripe_range(0), 0..2);
        assert_eq!(plan.stripe_range(1), 2..6);
        assert_eq!(
            ShardPlan::even(&r, 100, 0).len(),
            6,
            "at most one shard a stripe"
        );
        assert_eq!(ShardPlan::even(&r, 0, 0).len(), 1);
        // 14 MiB: at most two shards of at least 5 MiB.
        assert_eq!(ShardPlan::even(&r, 6, MIN_PART_BYTES).len(), 2);
        assert_eq!(ShardPlan::by_bytes(&r, 8 << 20).stripe_range(0), 0..2);
        // 22 MiB of f32 (stripes of 4, 4, 4, 4, 4, 2 MiB) asked for 4
        // shards of at least 5 MiB: the shares fall after 8, 12 and 20 MiB,
        // which would leave 4 MiB shards; every shard but the last keeps
        // at least 5 MiB instead.
        let (r, _) = reference(&[(5 * s + s / 2, Dtype::F32)]);
        let plan = ShardPlan::even(&r, 4, MIN_PART_BYTES);
        let sizes: Vec<u64> = (0..plan.len())
            .map(|i| {
                plan.shard(i)
                    .iter()
                    .map(|st| st.elements.len() as u64 * 4)
                    .sum()
            })
            .collect();
        assert_eq!(sizes, [8 << 20, 8 << 20, 6 << 20]);
    }

    #[test]
    fn parts_tile_the_output_and_the_first_holds_the_header() {
        let s = STRIPE_ELEMENTS;
        let (r, layout) = reference(&[(3 * s, Dtype::F32), (5, Dtype::I64), (s + 7, Dtype::BF16)]);
        for k in 1..=6 {
            let plan = ShardPlan::even(&r, k, 0);
            let parts = plan.parts(&r, &layout, same, 5 << 20).unwrap();
            assert_eq!(parts[0].bytes.start, 0);
            assert_eq!(parts.last().unwrap().bytes.end, layout.len());
            for (i, w) in parts.windows(2).enumerate() {
                assert_eq!(w[0].bytes.end, w[1].bytes.start);
                assert!(w[0].shard <= w[1].shard);
                assert_eq!(w[0].number as usize, i + 1);
            }
            assert!(parts.iter().all(|p| p.bytes.end - p.bytes.start <= 5 << 20));
            let shards: std::collections::BTreeSet<usize> = parts.iter().map(|p| p.shard).collect();
            assert_eq!(shards.len(), plan.len(), "every shard writes a part");
        }
    }

    #[test]
    fn parts_refuse_a_layout_the_plan_does_not_cover() {
        let (r, _) = reference(&[(10, Dtype::F32), (10, Dtype::F32)]);
        let (_, bigger) = reference(&[(10, Dtype::F32), (10, Dtype::F32), (3, Dtype::F32)]);
        let plan = ShardPlan::even(&r, 2, 0);
        let err = plan.parts(&r, &bigger, same, 1 << 20).unwrap_err();
        assert!(err.contains("belong to no shard"), "{err}");
    }
}
