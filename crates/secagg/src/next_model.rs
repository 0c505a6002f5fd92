//! A secure round's result as a model file: the global model with the
//! unmasked weighted mean of the summed clients' deltas added to its float
//! tensors, everything else (the header, integer and bool tensors) copied.
//! Written in file order through a [`ByteSink`], so an upload in parts
//! holds only what is in flight: one block of the sum (`masked_sum`) and one
//! copy buffer, whatever the model's size or the number of clients.

use std::collections::BTreeMap;
use std::io;

use fedstep_core::bytes::ByteSink;
use fedstep_core::ByteSource;

use crate::ids::ClientId;
use crate::masked_file::MaskedFile;
use crate::masked_sum::{mean_over_range, SumError};
use crate::model_vector::VectorLayout;
use crate::recovered::RecoveredMasks;

/// Bytes copied from the global model per read.
const COPY_BYTES: u64 = 4 << 20;

/// Writes the next global model into `sink` (created for `global_len`
/// bytes, the global model's size: the next model has its header), from
/// the summed clients' masked `files` and the recovered `masks`. The
/// caller finishes the sink.
pub fn write_next_model(
    global: &dyn ByteSource,
    global_len: u64,
    layout: &VectorLayout,
    files: &BTreeMap<ClientId, MaskedFile>,
    masks: &RecoveredMasks,
    sink: &dyn ByteSink,
) -> Result<(), SumError> {
    let mut copied = Copied {
        global,
        sink,
        upto: 0,
        buf: Vec::new(),
    };
    mean_over_range(files, masks, 0..layout.len(), |start, mean| {
        layout
            .add_mean(global, start, mean, |offset, bytes| {
                copied.copy_to(offset)?;
                sink.write_at(offset, bytes)?;
                copied.upto = offset + bytes.len() as u64;
                Ok(())
            })
            .map_err(|e| match e {
                crate::model_vector::VectorError::Io(e) => e,
                other => io::Error::other(other.to_string()),
            })
    })?;
    copied.copy_to(global_len).map_err(SumError::Output)
}

/// How far the output is written, and the copy of the global model's bytes
/// between the float ranges.
struct Copied<'a> {
    global: &'a dyn ByteSource,
    sink: &'a dyn ByteSink,
    upto: u64,
    buf: Vec<u8>,
}

impl Copied<'_> {
    /// Copies the global model's bytes from where the output stands to
    /// `offset`.
    fn copy_to(&mut self, offset: u64) -> io::Result<()> {
        while self.upto < offset {
            let n = (offset - self.upto).min(COPY_BYTES) as usize;
            self.buf.resize(n, 0);
            self.global.read_exact_at(&mut self.buf, self.upto)?;
            self.sink.write_at(self.upto, &self.buf)?;
            self.upto += n as u64;
        }
        Ok(())
    }
}
