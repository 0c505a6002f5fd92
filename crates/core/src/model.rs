//! Reading safetensors headers from files without loading the data.
//!
//! The `safetensors` crate parses and checks headers (`Metadata` validates
//! that offsets are contiguous and match shape × dtype), but its
//! `read_metadata` wants the whole file in memory. Aggregation must stay at
//! "a block per client", so we read only the 8-byte prefix and the header —
//! after checking the declared header length against a limit and the file
//! size, so a header bomb costs nothing — and hand those bytes to the crate.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use safetensors::tensor::Metadata;
use safetensors::Dtype;

use crate::bytes::ByteSource;
use crate::error::ModelError;
use crate::float::{self, role};
use crate::limits::Limits;

/// One tensor's place in a file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte offsets in the file (header included).
    pub start: u64,
    pub end: u64,
}

impl TensorEntry {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn byte_len(&self) -> u64 {
        self.end - self.start
    }
}

/// A parsed, validated header: tensors in data order, plus `__metadata__`.
#[derive(Debug, Clone)]
pub struct ModelHeader {
    pub header_len: u64,
    pub file_len: u64,
    pub tensors: Vec<TensorEntry>,
    pub metadata: BTreeMap<String, String>,
}

impl ModelHeader {
    pub fn find(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }
    pub fn data_bytes(&self) -> u64 {
        self.file_len - 8 - self.header_len
    }
}

/// Reads and validates the header of `file` within `limits`.
pub fn read_header(file: &File, limits: &Limits) -> Result<ModelHeader, ModelError> {
    let file_len = file.metadata()?.len();
    read_header_with(file_len, |buf, off| file.read_exact_at(buf, off), limits)
}

/// Reads and validates the header of any byte source (an S3 object read
/// with ranged GETs reads only the prefix and the header here).
pub fn read_header_from(src: &dyn ByteSource, limits: &Limits) -> Result<ModelHeader, ModelError> {
    let file_len = src.size()?;
    read_header_with(file_len, |buf, off| src.read_exact_at(buf, off), limits)
}

fn read_header_with(
    file_len: u64,
    read_at: impl Fn(&mut [u8], u64) -> std::io::Result<()>,
    limits: &Limits,
) -> Result<ModelHeader, ModelError> {
    let mut prefix = [0u8; 8];
    if file_len >= 8 {
        read_at(&mut prefix, 0)?;
    }
    let header_len = declared_header_len(prefix, file_len, limits)?;
    let mut header = vec![0u8; header_len as usize];
    read_at(&mut header, 8)?;
    parse_header(&header, file_len, limits)
}

/// Checks the 8-byte length prefix against the limit and the file size
/// before anything is allocated for the header.
fn declared_header_len(prefix: [u8; 8], file_len: u64, limits: &Limits) -> Result<u64, ModelError> {
    if file_len < 8 {
        return Err(ModelError::TooShort { len: file_len });
    }
    let header_len = u64::from_le_bytes(prefix);
    if header_len > limits.max_header_bytes {
        return Err(ModelError::HeaderTooLarge {
            declared: header_len,
            limit: limits.max_header_bytes,
        });
    }
    if header_len > file_len - 8 {
        return Err(ModelError::HeaderBeyondFile {
            declared: header_len,
            file_len,
        });
    }
    Ok(header_len)
}

fn parse_header(header: &[u8], file_len: u64, limits: &Limits) -> Result<ModelHeader, ModelError> {
    let header_len = header.len() as u64;
    if header.first() != Some(&b'{') {
        return Err(ModelError::InvalidHeader(
            "header is not a JSON object".into(),
        ));
    }
    let metadata: Metadata =
        serde_json::from_slice(header).map_err(|e| ModelError::InvalidHeader(e.to_string()))?;
    let data_start = 8 + header_len;
    let expected = metadata.data_len() as u64;
    let actual = file_len - data_start;
    if expected != actual {
        return Err(ModelError::DataSizeMismatch { expected, actual });
    }
    let infos = metadata.tensors();
    if infos.len() > limits.max_tensors {
        return Err(ModelError::TooManyTensors {
            count: infos.len(),
            limit: limits.max_tensors,
        });
    }
    let mut tensors = Vec::with_capacity(infos.len());
    for name in metadata.offset_keys() {
        let info = infos[&name];
        if role(info.dtype).is_none() {
            return Err(ModelError::UnsupportedDtype {
                tensor: name,
                dtype: format!("{:?}", info.dtype),
            });
        }
        tensors.push(TensorEntry {
            dtype: info.dtype,
            shape: info.shape.clone(),
            start: data_start + info.data_offsets.0 as u64,
            end: data_start + info.data_offsets.1 as u64,
            name,
        });
    }
    let metadata = metadata
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    Ok(ModelHeader {
        header_len,
        file_len,
        tensors,
        metadata,
    })
}

/// Opens `path` and reads its header.
pub fn open(path: &Path, limits: &Limits) -> Result<(File, ModelHeader), ModelError> {
    let file = File::open(path)?;
    let header = read_header(&file, limits)?;
    Ok((file, header))
}

/// Checks that `candidate` has exactly the reference's tensors, shapes and
/// dtypes. Offsets may differ: each file is read at its own offsets.
pub fn check_compatible(
    reference: &ModelHeader,
    candidate: &ModelHeader,
) -> Result<(), ModelError> {
    let theirs: HashMap<&str, &TensorEntry> = candidate
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    for ours in &reference.tensors {
        let Some(t) = theirs.get(ours.name.as_str()) else {
            return Err(ModelError::MissingTensor {
                tensor: ours.name.clone(),
            });
        };
        if t.dtype != ours.dtype {
            return Err(ModelError::DtypeMismatch {
                tensor: ours.name.clone(),
                expected: format!("{:?}", ours.dtype),
                actual: format!("{:?}", t.dtype),
            });
        }
        if t.shape != ours.shape {
            return Err(ModelError::ShapeMismatch {
                tensor: ours.name.clone(),
                expected: ours.shape.clone(),
                actual: t.shape.clone(),
            });
        }
    }
    if candidate.tensors.len() != reference.tensors.len() {
        let ours: std::collections::HashSet<&str> =
            reference.tensors.iter().map(|t| t.name.as_str()).collect();
        if let Some(extra) = candidate
            .tensors
            .iter()
            .find(|t| !ours.contains(t.name.as_str()))
        {
            return Err(ModelError::UnexpectedTensor {
                tensor: extra.name.clone(),
            });
        }
    }
    Ok(())
}

/// A whole tensor in memory, values widened to f64. For small models (the
/// simulator, tests, tools); aggregation never loads whole models.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Float tensors: the values. Integer/bool tensors: empty (see `raw`).
    pub values: Vec<f64>,
    /// The tensor's little-endian bytes as stored.
    pub raw: Vec<u8>,
}

/// Loads every tensor of a (small) model into memory.
pub fn load_dense(
    path: &Path,
    limits: &Limits,
) -> Result<BTreeMap<String, DenseTensor>, ModelError> {
    let (file, header) = open(path, limits)?;
    let mut out = BTreeMap::new();
    for t in &header.tensors {
        let mut raw = vec![0u8; t.byte_len() as usize];
        file.read_exact_at(&mut raw, t.start)?;
        let values = match role(t.dtype) {
            Some(float::TensorRole::CarryOver) | None => Vec::new(),
            Some(_) => float::decode_all_f64(t.dtype, &raw),
        };
        out.insert(
            t.name.clone(),
            DenseTensor {
                dtype: t.dtype,
                shape: t.shape.clone(),
                values,
                raw,
            },
        );
    }
    Ok(out)
}

/// Reads a whole file into memory (for callers that already have bytes in
/// hand, e.g. a trainer), then parses its header.
pub fn header_from_bytes(bytes: &[u8], limits: &Limits) -> Result<ModelHeader, ModelError> {
    let file_len = bytes.len() as u64;
    let mut prefix = [0u8; 8];
    if let Some(p) = bytes.get(..8) {
        prefix.copy_from_slice(p);
    }
    let header_len = declared_header_len(prefix, file_len, limits)?;
    parse_header(&bytes[8..8 + header_len as usize], file_len, limits)
}
