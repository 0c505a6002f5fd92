//! A masked input as a file: what a client uploads in phase 3 and what the
//! aggregator's shard tasks read in place.
//!
//! A safetensors file with exactly one tensor, [`TENSOR`], one dimension of
//! the round's vector length, holding the masked vector's ring elements as
//! little-endian `U32` (rings of at most 32 bits) or `U64`. Nothing else:
//! no float tensor, so the file is useless to anyone without the sum, and
//! its layout is fixed by the round, so any element range is a byte range
//! a shard can fetch without reading the rest.
//!
//! The file is the client's: [`MaskedFile::open`] checks its header, and a
//! failure there excludes that client in phase 3, before any mask is
//! recovered for its input. A read the store could not serve
//! (`fedstep_core::bytes::Unavailable`) is the system's failure, not the
//! client's ([`MaskedFileError::is_unavailable`]).

use fedstep_core::model::{read_header_from, TensorEntry};
use fedstep_core::{Input, Limits, ModelError};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::ring::Ring;

/// The one tensor of a masked file.
pub const TENSOR: &str = "secagg.masked";

/// How many tensor names or dimensions an error quotes, and how much of a
/// name: a refusal's reason stays short whatever the header holds.
const SHOWN: usize = 4;
const NAME_CHARS: usize = 48;

/// The element type a ring's elements are stored as.
pub fn dtype_for(ring: Ring) -> Dtype {
    if ring.bits() <= 32 {
        Dtype::U32
    } else {
        Dtype::U64
    }
}

fn element_bytes(dtype: Dtype) -> usize {
    if dtype == Dtype::U32 {
        4
    } else {
        8
    }
}

/// Why a masked file cannot be summed; every variant but an unavailable
/// read is its client's doing.
#[derive(Debug, thiserror::Error)]
pub enum MaskedFileError {
    /// Not a readable safetensors file within the limits.
    #[error("masked input: {0}")]
    Header(#[from] ModelError),
    /// Tensors other than exactly [`TENSOR`].
    #[error("masked input: holds {found:?}, not the one tensor `{TENSOR}`")]
    Tensors {
        /// The first few tensor names found, each cut to a few dozen
        /// characters (the header is the client's writing).
        found: Vec<String>,
    },
    /// The tensor's dtype or shape does not fit the round.
    #[error("masked input: `{TENSOR}` is {dtype:?} {shape:?}, the round needs {want:?} [{len}]")]
    Layout {
        /// What the file declares.
        dtype: Dtype,
        /// Its declared shape (the first few dimensions).
        shape: Vec<usize>,
        /// What the round's ring needs.
        want: Dtype,
        /// The round's vector length.
        len: u64,
    },
    /// A read failed (the object changed or vanished, or the store was
    /// unavailable: see [`MaskedFileError::is_unavailable`]).
    #[error("masked input: reading it failed: {0}")]
    Read(std::io::Error),
}

impl MaskedFileError {
    /// The store could not serve a read: the system's failure, worth a
    /// retry, not the client's.
    pub fn is_unavailable(&self) -> bool {
        match self {
            MaskedFileError::Read(e) => fedstep_core::bytes::is_unavailable(e),
            MaskedFileError::Header(ModelError::Io(e)) => fedstep_core::bytes::is_unavailable(e),
            _ => false,
        }
    }
}

/// The file a client uploads for its masked vector (elements must already
/// be in `ring`, as `Client::mask_input` returns them).
pub fn encode(masked: &[u64], ring: Ring) -> Result<Vec<u8>, safetensors::SafeTensorError> {
    let dtype = dtype_for(ring);
    let data: Vec<u8> = if dtype == Dtype::U32 {
        masked
            .iter()
            .flat_map(|&x| (ring.reduce(x) as u32).to_le_bytes())
            .collect()
    } else {
        masked.iter().flat_map(|&x| x.to_le_bytes()).collect()
    };
    let view = TensorView::new(dtype, vec![masked.len()], &data)?;
    safetensors::serialize([(TENSOR, view)], None)
}

/// A client's masked file, its header checked against the round, open for
/// ranged reads of its elements.
#[derive(Clone)]
pub struct MaskedFile {
    source: Input,
    data_start: u64,
    element_bytes: usize,
    ring: Ring,
    vector_len: u64,
}

impl MaskedFile {
    /// Reads and checks the header: exactly [`TENSOR`], of the ring's
    /// dtype and shape `[vector_len]`.
    pub fn open(
        source: Input,
        ring: Ring,
        vector_len: u64,
        limits: &Limits,
    ) -> Result<MaskedFile, MaskedFileError> {
        let header = read_header_from(source.source(), limits)?;
        let entry: &TensorEntry = match header.tensors.as_slice() {
            [only] if only.name == TENSOR => only,
            others => {
                return Err(MaskedFileError::Tensors {
                    found: others
                        .iter()
                        .take(SHOWN)
                        .map(|t| t.name.chars().take(NAME_CHARS).collect())
                        .collect(),
                })
            }
        };
        let want = dtype_for(ring);
        if entry.dtype != want || entry.shape.len() != 1 || entry.elements() as u64 != vector_len {
            return Err(MaskedFileError::Layout {
                dtype: entry.dtype,
                shape: entry.shape.iter().take(SHOWN).copied().collect(),
                want,
                len: vector_len,
            });
        }
        Ok(MaskedFile {
            source,
            data_start: entry.start,
            element_bytes: element_bytes(want),
            ring,
            vector_len,
        })
    }

    /// Adds elements `[start, start + sum.len())` of this file into `sum`
    /// (ring addition). `buf` is scratch space, reused across calls.
    ///
    /// An element with bits above the ring's width is read modulo 2^b, not
    /// refused: by this point (phase 4) the masks are recovered for this
    /// client's input being in the sum, so it cannot be left out any more,
    /// and a client sending wrong elements corrupts the sum whatever is
    /// checked (an active attack, outside the honest-but-curious model).
    /// Its file's layout is what [`MaskedFile::open`] checks in phase 3,
    /// when the client can still be excluded.
    pub fn add_range_into(
        &self,
        sum: &mut [u64],
        start: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), MaskedFileError> {
        let end = start + sum.len() as u64;
        assert!(end <= self.vector_len, "range checked by the caller");
        buf.resize(sum.len() * self.element_bytes, 0);
        let offset = self.data_start + start * self.element_bytes as u64;
        self.source
            .source()
            .read_exact_at(buf, offset)
            .map_err(MaskedFileError::Read)?;
        let ring = self.ring;
        if self.element_bytes == 4 {
            for (s, b) in sum.iter_mut().zip(buf.chunks_exact(4)) {
                let x = u64::from(u32::from_le_bytes(b.try_into().expect("4 bytes")));
                *s = ring.add(*s, ring.reduce(x));
            }
        } else {
            for (s, b) in sum.iter_mut().zip(buf.chunks_exact(8)) {
                let x = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                *s = ring.add(*s, ring.reduce(x));
            }
        }
        Ok(())
    }
}
