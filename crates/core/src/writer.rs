//! Streaming safetensors writer.
//!
//! The header is known before any value is computed (same names, shapes and
//! dtypes as the reference model), so it is written first and the tensor
//! data follows with positioned writes. Where the bytes go is an
//! [`OutputTarget`]: a local file (written under a temporary name and
//! renamed on `finish`) or an upload in parts; either way a crash or an
//! error never leaves a half-written model where a reader expects a whole
//! one.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use crate::bytes::{ByteSink, FileTarget, OutputTarget};
use crate::float::elem_bytes;

/// One tensor to be written: its name, dtype and shape.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

pub struct ModelWriter {
    sink: Box<dyn ByteSink>,
    /// name → absolute offset of the tensor's first byte, and its length.
    places: HashMap<String, (u64, u64)>,
    len: u64,
}

/// Where every byte of an output goes, decided before anything is
/// written: the header and each tensor's place. Shards use it to know
/// which bytes of the output are theirs before any of them writes.
#[derive(Debug, Clone)]
pub struct OutputLayout {
    /// The 8-byte length and the header JSON, padded.
    head: Vec<u8>,
    /// name → absolute offset of the tensor's first byte, and its length.
    places: HashMap<String, (u64, u64)>,
    len: u64,
}

/// A safetensors header with its metadata in key order and its tensors in
/// data order: the same bytes for the same layout, in any process.
struct Header<'a> {
    metadata: &'a BTreeMap<String, String>,
    tensors: &'a [(String, TensorInfo)],
}

impl serde::Serialize for Header<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.tensors.len() + 1))?;
        if !self.metadata.is_empty() {
            map.serialize_entry("__metadata__", self.metadata)?;
        }
        for (name, info) in self.tensors {
            map.serialize_entry(name, info)?;
        }
        map.end()
    }
}

impl OutputLayout {
    /// Tensor data is laid out in the order of `tensors`.
    pub fn new(
        tensors: &[TensorSpec],
        metadata: &BTreeMap<String, String>,
    ) -> std::io::Result<OutputLayout> {
        let mut infos = Vec::with_capacity(tensors.len());
        let mut offset = 0usize;
        for t in tensors {
            let bytes = t.shape.iter().product::<usize>() * elem_bytes(t.dtype);
            infos.push((
                t.name.clone(),
                TensorInfo {
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    data_offsets: (offset, offset + bytes),
                },
            ));
            offset += bytes;
        }
        // Checked by the safetensors crate, written by us: its `Metadata`
        // keeps `__metadata__` in a HashMap, whose order changes from one
        // process to the next, and every shard, each in its own process,
        // must compute the same header bytes.
        let meta = (!metadata.is_empty()).then(|| {
            metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        });
        Metadata::new(meta, infos.clone()).map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut json = serde_json::to_vec(&Header {
            metadata,
            tensors: &infos,
        })
        .map_err(std::io::Error::other)?;
        // Pad with spaces to a multiple of 8 so that data starts aligned, as
        // the reference implementation does; readers may then map it in place.
        while json.len() % 8 != 0 {
            json.push(b' ');
        }
        let data_start = 8 + json.len() as u64;
        let mut head = Vec::with_capacity(data_start as usize);
        head.extend_from_slice(&(json.len() as u64).to_le_bytes());
        head.extend_from_slice(&json);
        let places = infos
            .into_iter()
            .map(|(name, info)| {
                let (s, e) = info.data_offsets;
                (name, (data_start + s as u64, (e - s) as u64))
            })
            .collect();
        Ok(OutputLayout {
            head,
            places,
            len: data_start + offset as u64,
        })
    }

    /// Total size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a layout has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Where tensor `name` lies: its absolute offset and length in bytes.
    pub fn place(&self, name: &str) -> Option<(u64, u64)> {
        self.places.get(name).copied()
    }
}

impl ModelWriter {
    /// Starts an output at `target` and writes the header. Tensor data is
    /// laid out in the order of `tensors`.
    pub fn create(
        target: &dyn OutputTarget,
        tensors: &[TensorSpec],
        metadata: &BTreeMap<String, String>,
    ) -> std::io::Result<Self> {
        Self::create_with(target, OutputLayout::new(tensors, metadata)?)
    }

    /// Starts an output of a layout decided beforehand.
    pub fn create_with(target: &dyn OutputTarget, layout: OutputLayout) -> std::io::Result<Self> {
        let sink = target.create(layout.len)?;
        sink.write_at(0, &layout.head)?;
        Ok(ModelWriter {
            sink,
            places: layout.places,
            len: layout.len,
        })
    }

    /// Writes `bytes` into tensor `name` starting `offset` bytes into it.
    pub fn write_at(&self, name: &str, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        let &(start, len) = self
            .places
            .get(name)
            .ok_or_else(|| std::io::Error::other(format!("no tensor `{name}` in this file")))?;
        if offset + bytes.len() as u64 > len {
            return Err(std::io::Error::other(format!(
                "write past the end of tensor `{name}`"
            )));
        }
        self.sink.write_at(start + offset, bytes)
    }

    /// Makes the output visible at its destination. Returns its size.
    pub fn finish(self) -> std::io::Result<u64> {
        self.sink.finish()?;
        Ok(self.len)
    }
}

/// Writes a small in-memory model in one call: (name, dtype, shape, bytes).
pub fn write_model(
    dest: &Path,
    tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)],
    metadata: &BTreeMap<String, String>,
) -> std::io::Result<u64> {
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(name, dtype, shape, _)| TensorSpec {
            name: name.clone(),
            dtype: *dtype,
            shape: shape.clone(),
        })
        .collect();
    let w = ModelWriter::create(&FileTarget::new(dest), &specs, metadata)?;
    for (name, dtype, shape, bytes) in tensors {
        let expected = shape.iter().product::<usize>() * elem_bytes(*dtype);
        if bytes.len() != expected {
            return Err(std::io::Error::other(format!(
                "tensor `{name}`: {} bytes given, shape {shape:?} of {dtype:?} needs {expected}",
                bytes.len()
            )));
        }
        w.write_at(name, 0, bytes)?;
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::float::encode_all_f64;
    use crate::limits::Limits;
    use crate::model::{load_dense, open};

    #[test]
    fn written_files_read_back_with_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_model(
            &path,
            &[
                (
                    "b".into(),
                    Dtype::F16,
                    vec![3],
                    encode_all_f64(Dtype::F16, &[1.0, 2.0, 3.0]),
                ),
                (
                    "a".into(),
                    Dtype::I64,
                    vec![2],
                    7i64.to_le_bytes().repeat(2),
                ),
            ],
            &meta,
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("b").unwrap().shape(), &[3]);
        assert_eq!(st.tensor("a").unwrap().dtype(), Dtype::I64);
        let (_, header) = open(&path, &Limits::default()).unwrap();
        assert_eq!(header.metadata, meta);
        assert_eq!((header.header_len + 8) % 8, 0, "data must start aligned");
        let dense = load_dense(&path, &Limits::default()).unwrap();
        assert_eq!(dense["b"].values, vec![1.0, 2.0, 3.0]);
        // No temporary left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn an_unfinished_writer_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let spec = TensorSpec {
            name: "w".into(),
            dtype: Dtype::F32,
            shape: vec![4],
        };
        let w = ModelWriter::create(&FileTarget::new(&path), &[spec], &BTreeMap::new()).unwrap();
        assert!(w.write_at("w", 12, &[0u8; 8]).is_err(), "past the end");
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn rejects_bytes_that_do_not_match_the_shape() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_model(
            &dir.path().join("m.safetensors"),
            &[("w".into(), Dtype::F32, vec![2], vec![0u8; 4])],
            &BTreeMap::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("`w`"), "{err}");
    }
}
