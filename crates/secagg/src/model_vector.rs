//! A model as the one vector SecAgg+ sums, and the sum back as a model.
//!
//! The vector is the **update**: the local model minus the global model it
//! was trained from, over the global model's float tensors (F64, F32, F16,
//! BF16) in file order, each flattened row-major. Integer and bool tensors
//! are not averaged by any aggregation (`fedstep_core::float::role`), so
//! they are not in it: the next global model keeps the global's values.
//!
//! Both sides derive the layout from the global model's header alone
//! ([`VectorLayout::of`]), so the vector's length and order are fixed by
//! the round before any client sends anything, and an element range of the
//! vector is a run of byte ranges of the global model: the aggregator's
//! shard tasks add the mean to their own range ([`VectorLayout::add_mean`])
//! and write it where it goes, without the rest of the model.
//!
//! Values are computed in f64 and stored in each tensor's own dtype, as
//! the plain aggregation does (`fedstep_core::float`).

use std::ops::Range;

use fedstep_core::float::{decode_into, elem_bytes, encode_from, role, TensorRole};
use fedstep_core::model::{ModelHeader, TensorEntry};
use fedstep_core::ByteSource;

/// Elements converted per read (1 MiB of f64).
const CHUNK: usize = 128 * 1024;

/// One float tensor of the global model: where it sits in the vector and
/// in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub tensor: TensorEntry,
    /// Index of its first element in the vector.
    pub offset: u64,
}

impl Segment {
    fn elements(&self) -> u64 {
        self.tensor.elements() as u64
    }
}

/// Why a model cannot be turned into the round's vector, or the mean into
/// a model.
#[derive(Debug, thiserror::Error)]
pub enum VectorError {
    /// The local model lacks one of the global model's float tensors, or
    /// holds it with another dtype or shape: the client's doing.
    #[error("the local model's tensor `{name}`: {why}")]
    Mismatch {
        /// The tensor (its name, cut to 64 characters).
        name: String,
        /// What differs.
        why: String,
    },
    /// A range outside the vector, or a mean block of the wrong length: the
    /// caller's mistake.
    #[error("elements {start}..{end} are not inside the vector of {len}")]
    OutOfRange { start: u64, end: u64, len: u64 },
    /// A read or a write failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The float tensors of a global model, in file order, as one vector.
#[derive(Debug, Clone, PartialEq)]
pub struct VectorLayout {
    segments: Vec<Segment>,
    len: u64,
}

impl VectorLayout {
    /// The layout of `global`'s vector.
    pub fn of(global: &ModelHeader) -> VectorLayout {
        let mut floats: Vec<&TensorEntry> = global
            .tensors
            .iter()
            .filter(|t| {
                matches!(
                    role(t.dtype),
                    Some(TensorRole::Float32Acc | TensorRole::Float64Acc)
                )
            })
            .collect();
        floats.sort_by_key(|t| t.start);
        let mut len = 0u64;
        let segments = floats
            .into_iter()
            .map(|t| {
                let s = Segment {
                    tensor: t.clone(),
                    offset: len,
                };
                len += s.elements();
                s
            })
            .collect();
        VectorLayout { segments, len }
    }

    /// Elements in the vector.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the model has no float tensor at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The client's vector: `local − global` for every element, with
    /// `local`'s header read already (`local_header`). A local model whose
    /// float tensors do not match the global's by name, dtype and shape is
    /// refused. The whole vector is held: 4 bytes an element.
    pub fn update_vector(
        &self,
        global: &dyn ByteSource,
        local: &dyn ByteSource,
        local_header: &ModelHeader,
    ) -> Result<Vec<f32>, VectorError> {
        let mut out = Vec::with_capacity(self.len as usize);
        let (mut g, mut l) = (Vec::new(), Vec::new());
        let (mut gv, mut lv) = (vec![0f64; CHUNK], vec![0f64; CHUNK]);
        for s in &self.segments {
            let t = &s.tensor;
            let mine = local_header
                .find(&t.name)
                .ok_or_else(|| mismatch(t, "missing"))?;
            if mine.dtype != t.dtype || mine.shape != t.shape {
                return Err(mismatch(
                    t,
                    &format!(
                        "{:?} {:?}, not {:?} {:?} as in the global model",
                        mine.dtype, mine.shape, t.dtype, t.shape
                    ),
                ));
            }
            let eb = elem_bytes(t.dtype) as u64;
            let mut at = 0u64;
            while at < s.elements() {
                let n = (s.elements() - at).min(CHUNK as u64) as usize;
                read(global, t.start + at * eb, n * eb as usize, &mut g)?;
                read(local, mine.start + at * eb, n * eb as usize, &mut l)?;
                decode_into(t.dtype, &g, &mut gv[..n]);
                decode_into(t.dtype, &l, &mut lv[..n]);
                out.extend(gv[..n].iter().zip(&lv[..n]).map(|(g, l)| (l - g) as f32));
                at += n as u64;
            }
        }
        Ok(out)
    }

    /// The next global model's values for vector elements `start..` (as
    /// many as `mean` holds): `global + mean`, encoded in each tensor's
    /// dtype and handed to `write` with their byte offset in the model
    /// file (the next model has the global model's header, so its bytes sit
    /// where the global's do). One call per tensor the range touches, in
    /// order.
    pub fn add_mean(
        &self,
        global: &dyn ByteSource,
        start: u64,
        mean: &[f32],
        mut write: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> Result<(), VectorError> {
        let end = start + mean.len() as u64;
        if end > self.len {
            return Err(VectorError::OutOfRange {
                start,
                end,
                len: self.len,
            });
        }
        let (mut raw, mut values) = (Vec::new(), Vec::new());
        for (s, within) in self.touching(start..end) {
            let t = &s.tensor;
            let eb = elem_bytes(t.dtype) as u64;
            let n = (within.end - within.start) as usize;
            let offset = t.start + within.start * eb;
            read(global, offset, n * eb as usize, &mut raw)?;
            values.clear();
            values.resize(n, 0f64);
            decode_into(t.dtype, &raw, &mut values);
            let from = (s.offset + within.start - start) as usize;
            for (v, m) in values.iter_mut().zip(&mean[from..from + n]) {
                *v += f64::from(*m);
            }
            encode_from(t.dtype, &values, &mut raw);
            write(offset, &raw)?;
        }
        Ok(())
    }

    /// The segments `range` (of the vector) touches, each with the range of
    /// its own elements inside it.
    fn touching(&self, range: Range<u64>) -> impl Iterator<Item = (&Segment, Range<u64>)> {
        let first = self
            .segments
            .partition_point(|s| s.offset + s.elements() <= range.start);
        self.segments[first..]
            .iter()
            .take_while(move |s| s.offset < range.end)
            .map(move |s| {
                let from = range.start.max(s.offset) - s.offset;
                let to = range.end.min(s.offset + s.elements()) - s.offset;
                (s, from..to)
            })
            .filter(|(_, r)| r.start < r.end)
    }
}

fn mismatch(t: &TensorEntry, why: &str) -> VectorError {
    VectorError::Mismatch {
        name: t.name.chars().take(64).collect(),
        why: why.to_string(),
    }
}

fn read(src: &dyn ByteSource, offset: u64, len: usize, buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.resize(len, 0);
    src.read_exact_at(buf, offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedstep_core::model::read_header_from;
    use fedstep_core::Limits;
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;

    struct Mem(Vec<u8>);

    impl ByteSource for Mem {
        fn size(&self) -> std::io::Result<u64> {
            Ok(self.0.len() as u64)
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            let at = offset as usize;
            buf.copy_from_slice(&self.0[at..at + buf.len()]);
            Ok(())
        }
        fn describe(&self) -> String {
            "memory".into()
        }
    }

    /// A model with a BF16, an I64 and an F32 tensor (in that file order
    /// after safetensors sorts them), from per-tensor values.
    fn model(a: &[f64], b: &[f64], steps: i64) -> Mem {
        let mut bf16 = vec![0u8; 2 * a.len()];
        encode_from(Dtype::BF16, a, &mut bf16);
        let f32s: Vec<u8> = b.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect();
        let ints: Vec<u8> = [steps, -steps]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let views = [
            (
                "a.weight",
                TensorView::new(Dtype::BF16, vec![2, 3], &bf16).unwrap(),
            ),
            (
                "b.bias",
                TensorView::new(Dtype::F32, vec![5], &f32s).unwrap(),
            ),
            (
                "b.steps",
                TensorView::new(Dtype::I64, vec![2], &ints).unwrap(),
            ),
        ];
        Mem(safetensors::serialize(views, None).unwrap())
    }

    fn header(m: &Mem) -> ModelHeader {
        read_header_from(m, &Limits::default()).unwrap()
    }

    const GA: [f64; 6] = [0.5, -1.0, 2.0, 0.25, -0.125, 3.0];
    const GB: [f64; 5] = [1.0, 2.0, -3.0, 4.5, 0.0];

    #[test]
    fn the_vector_is_the_float_tensors_delta_and_the_mean_adds_back_by_any_range() {
        let global = model(&GA, &GB, 7);
        let layout = VectorLayout::of(&header(&global));
        assert_eq!(
            layout.len(),
            11,
            "6 BF16 and 5 F32 elements; the I64 is not in it"
        );
        // Deltas BF16 can hold exactly, so the round trip is exact.
        let da = [0.5, 0.25, -1.0, 0.0, 0.125, -0.5];
        let db = [0.1, -0.2, 0.3, 0.0, 1.5];
        let la: Vec<f64> = GA.iter().zip(&da).map(|(g, d)| g + d).collect();
        let lb: Vec<f64> = GB.iter().zip(&db).map(|(g, d)| g + d).collect();
        let local = model(&la, &lb, 99);
        let v = layout
            .update_vector(&global, &local, &header(&local))
            .unwrap();
        let order: Vec<&str> = layout
            .segments()
            .iter()
            .map(|s| s.tensor.name.as_str())
            .collect();
        let mut want = Vec::new();
        for name in &order {
            let d: &[f64] = if *name == "a.weight" { &da } else { &db };
            want.extend(d.iter().map(|&x| x as f32));
        }
        for (got, want) in v.iter().zip(&want) {
            assert!((got - want).abs() < 1e-6, "{v:?} vs {want:?}");
        }

        // The next model, written by ranges that cut tensors anywhere, is
        // the local model's floats and the global model's integers.
        for cut in [
            vec![0, 11],
            vec![0, 3, 6, 7, 11],
            vec![0, 1, 2, 4, 8, 10, 11],
        ] {
            let mut next = global.0.clone();
            for w in cut.windows(2) {
                let (s, e) = (w[0] as usize, w[1] as usize);
                layout
                    .add_mean(&global, s as u64, &v[s..e], |at, bytes| {
                        let at = at as usize;
                        next[at..at + bytes.len()].copy_from_slice(bytes);
                        Ok(())
                    })
                    .unwrap();
            }
            let expect = model(&la, &lb, 7);
            assert!(next == expect.0, "cut {cut:?}");
        }
    }

    #[test]
    fn a_local_model_of_another_shape_is_refused_and_ranges_are_checked() {
        let global = model(&GA, &GB, 7);
        let layout = VectorLayout::of(&header(&global));
        let bf16: Vec<u8> = [0u8; 12].to_vec();
        let other = Mem(safetensors::serialize(
            [(
                "a.weight",
                TensorView::new(Dtype::BF16, vec![3, 2], &bf16).unwrap(),
            )],
            None,
        )
        .unwrap());
        let err = layout
            .update_vector(&global, &other, &header(&other))
            .unwrap_err();
        assert!(matches!(err, VectorError::Mismatch { .. }), "{err}");
        let err = layout
            .add_mean(&global, 10, &[0.0, 0.0], |_, _| Ok(()))
            .unwrap_err();
        assert!(matches!(err, VectorError::OutOfRange { .. }), "{err}");
    }
}
