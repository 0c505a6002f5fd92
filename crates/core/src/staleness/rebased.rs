//! An update rebased onto the newest version, read block by block.

use std::io;
use std::sync::OnceLock;

use crate::bytes::{ByteSource, Input, Unavailable};
use crate::float::{decode_into, elem_bytes, encode_from, role, TensorRole};
use crate::limits::Limits;
use crate::model::{read_header_from, TensorEntry};

/// `x' = g_r + s · (x − g_b)` (see the module docs) as a byte source with
/// x's layout: the header and every non-float tensor are x's own bytes;
/// each float tensor's values are computed, in f64 and written in the
/// tensor's dtype, from the same elements of the three inputs. Reads are
/// positioned like any input's, so the aggregation streams it.
///
/// x is untrusted: a header the core would refuse is passed through
/// untouched, so the core rejects the update with its usual reason. The
/// two global models are the server's own: a failure to read either is
/// the system's (marked unavailable, so the attempt is retried rather than
/// the client rejected). A tensor of x that they do not both have with x's
/// dtype and shape is passed through, and the core's layout check then
/// rejects x against the current version.
pub struct Rebased {
    update: Input,
    base: Input,
    current: Input,
    weight: f64,
    limits: Limits,
    plan: OnceLock<Plan>,
}

/// Where each of x's float tensors is in the three files; empty when x's
/// header does not parse (everything is x's own bytes then).
#[derive(Default)]
struct Plan {
    tensors: Vec<Mapped>,
}

struct Mapped {
    /// x's entry (absolute offsets in x).
    x: TensorEntry,
    base_start: u64,
    current_start: u64,
}

impl Rebased {
    /// `update` trained from `base`, rebased onto `current` with the
    /// staleness discount `weight` (s(τ), in (0, 1]).
    pub fn new(update: Input, base: Input, current: Input, weight: f64, limits: Limits) -> Self {
        Rebased {
            update,
            base,
            current,
            weight,
            limits,
            plan: OnceLock::new(),
        }
    }

    fn plan(&self) -> io::Result<&Plan> {
        if let Some(p) = self.plan.get() {
            return Ok(p);
        }
        let plan = match read_header_from(self.update.source(), &self.limits) {
            Err(_) => Plan::default(),
            Ok(x) => {
                let base = read_header_from(self.base.source(), &self.limits)
                    .map_err(|e| servers("the base version's model", e))?;
                let current = read_header_from(self.current.source(), &self.limits)
                    .map_err(|e| servers("the current version's model", e))?;
                let same = |t: &TensorEntry, other: Option<&TensorEntry>| {
                    other
                        .filter(|o| o.dtype == t.dtype && o.shape == t.shape)
                        .map(|o| o.start)
                };
                let tensors = x
                    .tensors
                    .into_iter()
                    .filter(|t| {
                        matches!(
                            role(t.dtype),
                            Some(TensorRole::Float32Acc | TensorRole::Float64Acc)
                        )
                    })
                    .filter_map(|t| {
                        let base_start = same(&t, base.find(&t.name))?;
                        let current_start = same(&t, current.find(&t.name))?;
                        Some(Mapped {
                            x: t,
                            base_start,
                            current_start,
                        })
                    })
                    .collect();
                Plan { tensors }
            }
        };
        Ok(self.plan.get_or_init(|| plan))
    }

    /// Fills `out` with x' over the byte range `[from, to)` of tensor `m`
    /// (offsets absolute in x).
    fn rebase(&self, m: &Mapped, from: u64, to: u64, out: &mut [u8]) -> io::Result<()> {
        let eb = elem_bytes(m.x.dtype) as u64;
        // Whole elements covering the range.
        let first = (from - m.x.start) / eb;
        let last = (to - m.x.start).div_ceil(eb);
        let n = (last - first) as usize;
        let mut raw = vec![0u8; n * eb as usize];
        let mut read = |input: &Input, start: u64, values: &mut [f64]| -> io::Result<()> {
            input.source().read_exact_at(&mut raw, start + first * eb)?;
            decode_into(m.x.dtype, &raw, values);
            Ok(())
        };
        let (mut x, mut b, mut r) = (vec![0f64; n], vec![0f64; n], vec![0f64; n]);
        read(&self.update, m.x.start, &mut x)?;
        read(&self.base, m.base_start, &mut b)
            .map_err(|e| servers("reading the base version's model", e))?;
        read(&self.current, m.current_start, &mut r)
            .map_err(|e| servers("reading the current version's model", e))?;
        for ((v, b), r) in x.iter_mut().zip(&b).zip(&r) {
            *v = r + self.weight * (*v - b);
        }
        encode_from(m.x.dtype, &x, &mut raw);
        let skip = (from - m.x.start - first * eb) as usize;
        out.copy_from_slice(&raw[skip..skip + out.len()]);
        Ok(())
    }
}

/// A failure on one of the two global models is the system's, not the
/// client's: marked [`Unavailable`], so the aggregation is retried (and can
/// fail the round) instead of rejecting the update.
fn servers(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(Unavailable(format!("{what}: {e}")))
}

impl ByteSource for Rebased {
    fn size(&self) -> io::Result<u64> {
        self.update.source().size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Each float tensor's overlap is recomputed (its x bytes read there,
        // once); x's own bytes are read only for what lies between.
        let end = offset + buf.len() as u64;
        let own = |from: u64, to: u64, buf: &mut [u8]| {
            let out = &mut buf[(from - offset) as usize..(to - offset) as usize];
            self.update.source().read_exact_at(out, from)
        };
        let mut at = offset;
        // In data order (the header lists them so), so `at` only grows.
        for m in &self.plan()?.tensors {
            let (from, to) = (m.x.start.max(offset), m.x.end.min(end));
            if from >= to {
                continue;
            }
            if at < from {
                own(at, from, buf)?;
            }
            let out = &mut buf[(from - offset) as usize..(to - offset) as usize];
            self.rebase(m, from, to, out)?;
            at = to;
        }
        if at < end {
            own(at, end, buf)?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.update.source().describe()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use half::{bf16, f16};
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;

    use super::*;

    struct Mem(Vec<u8>);

    impl ByteSource for Mem {
        fn size(&self) -> io::Result<u64> {
            Ok(self.0.len() as u64)
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let start = usize::try_from(offset).map_err(io::Error::other)?;
            let src = self
                .0
                .get(start..start + buf.len())
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn describe(&self) -> String {
            "mem".into()
        }
    }

    /// A model with an F32, a BF16, an F16, an F64 and an I64 tensor whose
    /// values are `f(i)`.
    fn model(f: impl Fn(usize) -> f64, meta: &str) -> Vec<u8> {
        let f32s: Vec<u8> = (0..5).flat_map(|i| (f(i) as f32).to_le_bytes()).collect();
        let bf16s: Vec<u8> = (0..3)
            .flat_map(|i| bf16::from_f64(f(i)).to_le_bytes())
            .collect();
        let f16s: Vec<u8> = (0..4)
            .flat_map(|i| f16::from_f64(f(i)).to_le_bytes())
            .collect();
        let f64s: Vec<u8> = (0..2).flat_map(|i| f(i).to_le_bytes()).collect();
        let i64s: Vec<u8> = (0..2).flat_map(|i| (f(i) as i64).to_le_bytes()).collect();
        let views = vec![
            ("a", TensorView::new(Dtype::F32, vec![5], &f32s).unwrap()),
            ("b", TensorView::new(Dtype::BF16, vec![3], &bf16s).unwrap()),
            ("c", TensorView::new(Dtype::F16, vec![2, 2], &f16s).unwrap()),
            ("d", TensorView::new(Dtype::F64, vec![2], &f64s).unwrap()),
            (
                "steps",
                TensorView::new(Dtype::I64, vec![2], &i64s).unwrap(),
            ),
        ];
        let meta = HashMap::from([("who".to_string(), meta.to_string())]);
        safetensors::serialize(views, Some(meta)).unwrap()
    }

    fn input(bytes: Vec<u8>) -> Input {
        Input::new(Arc::new(Mem(bytes)))
    }

    fn whole(src: &dyn ByteSource) -> Vec<u8> {
        let mut buf = vec![0u8; src.size().unwrap() as usize];
        src.read_exact_at(&mut buf, 0).unwrap();
        buf
    }

    fn values(bytes: &[u8], name: &str) -> Vec<f64> {
        let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
        let t = st.tensor(name).unwrap();
        let mut out = vec![0f64; t.shape().iter().product()];
        decode_into(t.dtype(), t.data(), &mut out);
        out
    }

    #[test]
    fn every_float_tensor_is_the_current_version_plus_the_discounted_delta() {
        let x = model(|i| 1.0 + i as f64, "client");
        let b = model(|i| 0.5 * i as f64, "base-version");
        let r = model(|i| -2.0 + 0.25 * i as f64, "current");
        let s = 0.5;
        let rebased = Rebased::new(input(x.clone()), input(b), input(r), s, Limits::default());
        let out = whole(&rebased);
        assert_eq!(out.len(), x.len());
        // x's header (metadata included) is kept: the file is x's layout.
        let st = safetensors::SafeTensors::read_metadata(&out).unwrap();
        assert_eq!(st.1.metadata().as_ref().unwrap()["who"], "client");
        for (name, n, tol) in [
            ("a", 5, 1e-6),
            ("b", 3, 2e-2),
            ("c", 4, 2e-3),
            ("d", 2, 0.0),
        ] {
            let got = values(&out, name);
            for (i, g) in got.iter().enumerate().take(n) {
                let want = (-2.0 + 0.25 * i as f64) + s * ((1.0 + i as f64) - 0.5 * i as f64);
                assert!(
                    (g - want).abs() <= tol * want.abs().max(1.0),
                    "{name}[{i}]: {g} vs {want}"
                );
            }
        }
        // Integer tensors are the client's own.
        let st = safetensors::SafeTensors::deserialize(&out).unwrap();
        let xs = safetensors::SafeTensors::deserialize(&x).unwrap();
        assert_eq!(
            st.tensor("steps").unwrap().data(),
            xs.tensor("steps").unwrap().data()
        );
    }

    #[test]
    fn any_range_reads_the_same_bytes_as_the_whole() {
        let x = model(|i| 3.0 - i as f64, "x");
        let b = model(|i| 0.1 * i as f64, "b");
        let r = model(|i| 1.0 + i as f64, "r");
        let rebased = Rebased::new(input(x), input(b), input(r), 0.7, Limits::default());
        let all = whole(&rebased);
        for start in 0..all.len() {
            for len in [1, 2, 3, 5, 7, 13] {
                if start + len > all.len() {
                    continue;
                }
                let mut buf = vec![0u8; len];
                rebased.read_exact_at(&mut buf, start as u64).unwrap();
                assert_eq!(buf, all[start..start + len], "range {start}+{len}");
            }
        }
    }

    #[test]
    fn weight_one_and_equal_versions_give_the_update_back() {
        let x = model(|i| 0.125 * i as f64 - 1.0, "x");
        let g = model(|i| 2.0 * i as f64, "g");
        let rebased = Rebased::new(
            input(x.clone()),
            input(g.clone()),
            input(g),
            1.0,
            Limits::default(),
        );
        // Exactly representable values: g + (x − g) = x in f64.
        assert_eq!(whole(&rebased), x);
    }

    #[test]
    fn a_header_the_core_refuses_is_passed_through() {
        let garbage = b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a model".to_vec();
        let g = model(|i| i as f64, "g");
        let rebased = Rebased::new(
            input(garbage.clone()),
            input(g.clone()),
            input(g),
            0.5,
            Limits::default(),
        );
        assert_eq!(whole(&rebased), garbage);
    }

    #[test]
    fn a_tensor_the_versions_lack_is_the_clients_bytes() {
        let x = model(|i| i as f64, "x");
        let other = {
            let data: Vec<u8> = (0..3).flat_map(|i| (i as f32).to_le_bytes()).collect();
            let views = vec![("a", TensorView::new(Dtype::F32, vec![3], &data).unwrap())];
            safetensors::serialize(views, None).unwrap()
        };
        let rebased = Rebased::new(
            input(x.clone()),
            input(other.clone()),
            input(other),
            0.5,
            Limits::default(),
        );
        assert_eq!(whole(&rebased), x);
    }

    #[test]
    fn a_global_model_that_cannot_be_read_is_the_systems_failure() {
        let x = model(|i| i as f64, "x");
        let g = model(|i| i as f64, "g");
        let truncated = g[..g.len() - 4].to_vec();
        let rebased = Rebased::new(
            input(x.clone()),
            input(truncated),
            input(g),
            0.5,
            Limits::default(),
        );
        let mut buf = vec![0u8; x.len()];
        let err = rebased.read_exact_at(&mut buf, 0).unwrap_err();
        assert!(crate::bytes::is_unavailable(&err), "{err}");
    }
}
