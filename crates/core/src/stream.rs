//! Block-wise reading of tensors from many files at once.
//!
//! Each input is read with positioned reads at its own offsets (a file's
//! `pread`, an S3 object's ranged GET: see `bytes.rs`), a block of elements
//! at a time, into a buffer that is reused across blocks.

use std::collections::HashMap;

use crate::bytes::Input;
use crate::error::ModelError;
use crate::limits::Limits;
use crate::model::{self, ModelHeader, TensorEntry};
use crate::shard::Stripe;

/// An input whose header has been read and validated.
pub struct Source {
    /// What to call it in messages (a path, an object key).
    pub name: String,
    pub input: Input,
    pub header: ModelHeader,
    index: HashMap<String, usize>,
}

impl Source {
    /// Reads and validates `input`'s header (only the prefix and the header
    /// are read).
    pub fn new(input: Input, limits: &Limits) -> Result<Source, ModelError> {
        let header = model::read_header_from(input.source(), limits)?;
        let index = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Source {
            name: input.source().describe(),
            input,
            header,
            index,
        })
    }

    /// Tells the input which of its bytes a pass over `stripes` (of the
    /// `reference` layout) reads: each stripe's span of this input's tensor
    /// of the same name, merged where they touch ([`ByteSource::will_read`]:
    /// a hint, nothing is read).
    ///
    /// [`ByteSource::will_read`]: crate::ByteSource::will_read
    pub fn will_read_stripes<'s>(
        &self,
        reference: &[TensorEntry],
        stripes: impl IntoIterator<Item = &'s Stripe>,
    ) {
        let mut ranges: Vec<std::ops::Range<u64>> = Vec::new();
        for s in stripes {
            let Some(t) = self.entry(&reference[s.tensor].name) else {
                continue;
            };
            let Some(size) = t.byte_len().checked_div(t.elements() as u64) else {
                continue;
            };
            let span =
                t.start + s.elements.start as u64 * size..t.start + s.elements.end as u64 * size;
            match ranges.last_mut() {
                Some(last) if last.end == span.start => last.end = span.end,
                _ => ranges.push(span),
            }
        }
        self.input.source().will_read(&ranges);
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.index.get(name).map(|&i| &self.header.tensors[i])
    }

    /// Reads `buf.len()` bytes of tensor `name` starting `byte_offset` bytes
    /// into it. The header was validated, so the range is inside the input
    /// unless it changed underneath us — which is an I/O error.
    pub fn read(&self, name: &str, byte_offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let t = self
            .entry(name)
            .ok_or_else(|| std::io::Error::other(format!("tensor `{name}` vanished")))?;
        if byte_offset + buf.len() as u64 > t.byte_len() {
            return Err(std::io::Error::other(format!(
                "read past the end of tensor `{name}`"
            )));
        }
        self.input
            .source()
            .read_exact_at(buf, t.start + byte_offset)
    }
}

/// One block of one tensor, read from every source.
pub struct Block<'r> {
    pub tensor: &'r TensorEntry,
    pub range: std::ops::Range<usize>,
    /// One buffer per source, same order as the sources given.
    pub raws: Vec<Vec<u8>>,
}

/// A read that failed: which source, and why.
pub struct ReadFailure {
    pub source: usize,
    pub error: std::io::Error,
}

/// What one buffer of a block holds.
#[derive(Clone, Copy)]
pub enum Lane<'s> {
    /// The block of the tensor itself.
    Values(&'s Source),
    /// The same element range of the tensor's FedSelect mask (one byte per
    /// element), or an empty buffer when the source has no mask for it.
    Mask(&'s Source),
}

/// The blocks of `stripes` (of `reference`) whose tensor `select` takes,
/// in order: each stripe cut into blocks of `block_elems` from its own
/// start, so a block never straddles two stripes.
pub fn stripe_blocks<'r>(
    reference: &'r [TensorEntry],
    stripes: &[Stripe],
    select: impl Fn(&TensorEntry) -> bool,
    block_elems: usize,
) -> Vec<(&'r TensorEntry, std::ops::Range<usize>)> {
    stripes
        .iter()
        .filter(|s| select(&reference[s.tensor]))
        .flat_map(|s| {
            let first = s.elements.start;
            blocks(s.elements.len(), block_elems)
                .map(move |r| (&reference[s.tensor], first + r.start..first + r.end))
        })
        .collect()
}

/// Calls `f` on every block of `items` (tensor, element range), in order,
/// while a second thread reads the next block: reading (memory copies out
/// of the page cache, ranged GETs) overlaps with combining instead of
/// alternating with it. Two buffer sets circulate, so memory stays at two
/// blocks per lane. A block's buffers follow `lanes`, so a mask arrives
/// with its values (same element range, same read-ahead).
pub fn for_each_item<'r, E: From<ReadFailure> + Send>(
    items: Vec<(&'r TensorEntry, std::ops::Range<usize>)>,
    lanes: &[Lane<'_>],
    mut f: impl FnMut(Block<'r>) -> Result<Vec<Vec<u8>>, E>,
) -> Result<(), E> {
    let sources = lanes;
    std::thread::scope(|scope| {
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Result<Block<'r>, ReadFailure>>(1);
        let (empty_tx, empty_rx) = std::sync::mpsc::sync_channel::<Vec<Vec<u8>>>(2);
        for _ in 0..2 {
            let _ = empty_tx.send(vec![Vec::new(); sources.len()]);
        }
        scope.spawn(move || {
            for (tensor, range) in items {
                let Ok(mut raws) = empty_rx.recv() else {
                    return;
                };
                let eb = crate::float::elem_bytes(tensor.dtype);
                let off = (range.start * eb) as u64;
                let mut failed = None;
                for (i, (buf, lane)) in raws.iter_mut().zip(sources).enumerate() {
                    let read = match lane {
                        Lane::Values(src) => {
                            buf.resize(range.len() * eb, 0);
                            src.read(&tensor.name, off, buf)
                        }
                        Lane::Mask(src) => {
                            let name = crate::personalization::mask_name(&tensor.name);
                            if src.entry(&name).is_some() {
                                buf.resize(range.len(), 0);
                                src.read(&name, range.start as u64, buf)
                            } else {
                                buf.clear();
                                Ok(())
                            }
                        }
                    };
                    if let Err(error) = read {
                        failed = Some(ReadFailure { source: i, error });
                        break;
                    }
                }
                let msg = match failed {
                    Some(e) => Err(e),
                    None => Ok(Block {
                        tensor,
                        range,
                        raws,
                    }),
                };
                if full_tx.send(msg).is_err() {
                    return;
                }
            }
        });
        for msg in full_rx {
            let raws = f(msg?)?;
            // The reader may already be done; then nobody needs the buffers.
            let _ = empty_tx.send(raws);
        }
        Ok(())
    })
}

/// Splits `elements` into consecutive blocks of at most `block` elements.
pub fn blocks(elements: usize, block: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let block = block.max(1);
    (0..elements.div_ceil(block)).map(move |b| b * block..((b + 1) * block).min(elements))
}

/// How many elements a block holds so that all buffers fit `budget_bytes`:
/// one raw block per input plus a handful of accumulator-sized buffers.
/// A multiple of [`BLOCK_ALIGN`], so that the passes' chunks fall on the
/// same grid whatever the block size (see `statistics.rs`).
pub fn block_elements(budget_bytes: u64, inputs: usize, max_elem_bytes: usize) -> usize {
    let per_element = (inputs + 1) * max_elem_bytes + 6 * 8;
    let fit = ((budget_bytes as usize) / per_element).clamp(BLOCK_ALIGN, 1 << 24);
    fit / BLOCK_ALIGN * BLOCK_ALIGN
}

/// Blocks hold a multiple of this many elements (the passes' chunk size).
pub const BLOCK_ALIGN: usize = 2048;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_the_range_exactly() {
        let b: Vec<_> = blocks(10, 4).collect();
        assert_eq!(b, vec![0..4, 4..8, 8..10]);
        assert_eq!(blocks(0, 4).count(), 0);
        assert_eq!(blocks(4, 4).collect::<Vec<_>>(), vec![0..4]);
    }
}
