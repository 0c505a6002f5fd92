//! The aggregator's side of phase 4 on files: the survivors' masked files
//! summed over one element range, block by block, the recovered masks
//! removed, and the weighted mean handed on. Memory is one block of the
//! sum and one block of bytes, whatever the vector's length or the number
//! of clients, and a range is any slice of the vector: a shard task of the
//! workflow's Map (issue #14) sums its own range and nobody reads a whole
//! file.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::ids::ClientId;
use crate::masked_file::{MaskedFile, MaskedFileError};
use crate::recovered::{RecoveredMasks, UnmaskError};

/// Elements summed per block (1 MiB of `u64` sum).
pub const BLOCK_ELEMENTS: usize = 128 * 1024;

/// Why a range could not be summed.
#[derive(Debug, thiserror::Error)]
pub enum SumError {
    /// The files handed in are not exactly the recovered masks' summed
    /// clients: the masks would not cancel. The caller's mistake.
    #[error("masked files for {got:?}, but the masks are recovered for {want:?}")]
    WrongClients {
        /// Clients with a file.
        got: Vec<ClientId>,
        /// Clients the masks expect.
        want: Vec<ClientId>,
    },
    /// The range is not inside the vector.
    #[error(transparent)]
    Range(#[from] UnmaskError),
    /// A client's file could not be read (it changed or vanished after its
    /// header was checked, or the store was unavailable). The masks are
    /// recovered for its input being in the sum, so it cannot be left out
    /// now: the caller fails or retries the attempt with this reason.
    #[error("client {client}: {error}")]
    Client {
        /// Whose file.
        client: ClientId,
        /// What was wrong with it.
        error: MaskedFileError,
    },
    /// The output refused a block.
    #[error("writing the mean: {0}")]
    Output(std::io::Error),
}

/// Sums `files` (one per summed client) over `range`, unmasks and
/// dequantizes, and hands each block's weighted mean to `emit` with its
/// first element's index, in order.
pub fn mean_over_range(
    files: &BTreeMap<ClientId, MaskedFile>,
    masks: &RecoveredMasks,
    range: Range<u64>,
    mut emit: impl FnMut(u64, &[f32]) -> std::io::Result<()>,
) -> Result<(), SumError> {
    let got: Vec<ClientId> = files.keys().copied().collect();
    let mut want = masks.summed_clients.clone();
    want.sort();
    if got != want {
        return Err(SumError::WrongClients { got, want });
    }
    if range.start > range.end || range.end > masks.vector_len {
        return Err(UnmaskError::OutOfRange {
            start: range.start,
            len: range.end.saturating_sub(range.start) as usize,
            vector_len: masks.vector_len,
        }
        .into());
    }
    let mut sum = Vec::new();
    let mut bytes = Vec::new();
    let mut start = range.start;
    while start < range.end {
        let len = (range.end - start).min(BLOCK_ELEMENTS as u64) as usize;
        sum.clear();
        sum.resize(len, 0u64);
        for (&client, file) in files {
            file.add_range_into(&mut sum, start, &mut bytes)
                .map_err(|error| SumError::Client { client, error })?;
        }
        masks.unmask_range_in_place(&mut sum, start)?;
        emit(start, &masks.mean(&sum)).map_err(SumError::Output)?;
        start += len as u64;
    }
    Ok(())
}
