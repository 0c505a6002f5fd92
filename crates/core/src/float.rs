//! The dtypes fedstep averages, and their little-endian decode/encode.
//!
//! safetensors data is not aligned, so values are decoded with
//! `from_le_bytes` rather than cast in place.

use half::{bf16, f16};
use safetensors::Dtype;

/// How a tensor of a given dtype takes part in aggregation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// Averaged, accumulating in f32.
    Float32Acc,
    /// Averaged, accumulating in f64 (F64 tensors only).
    Float64Acc,
    /// Integer or bool: never averaged; the reference model's value is kept.
    CarryOver,
}

pub fn role(dtype: Dtype) -> Option<TensorRole> {
    match dtype {
        Dtype::F32 | Dtype::F16 | Dtype::BF16 => Some(TensorRole::Float32Acc),
        Dtype::F64 => Some(TensorRole::Float64Acc),
        Dtype::BOOL
        | Dtype::U8
        | Dtype::I8
        | Dtype::I16
        | Dtype::U16
        | Dtype::I32
        | Dtype::U32
        | Dtype::I64
        | Dtype::U64 => Some(TensorRole::CarryOver),
        _ => None,
    }
}

/// Bytes per element for byte-sized dtypes (all dtypes fedstep accepts).
pub fn elem_bytes(dtype: Dtype) -> usize {
    dtype.bitsize() / 8
}

/// An accumulator type: f32 for 32-bit-and-smaller floats, f64 for F64.
pub trait Acc:
    Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + std::fmt::Debug
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + 'static
{
    fn from_f64(v: f64) -> Self;
    fn from_f32(v: f32) -> Self;
    fn to_f64(self) -> f64;
    fn to_f32(self) -> f32;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    fn is_finite(self) -> bool;
    fn signum(self) -> Self;
}

impl Acc for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn abs(self) -> Self {
        f32::abs(self)
    }
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
    fn signum(self) -> Self {
        if self > 0.0 {
            1.0
        } else if self < 0.0 {
            -1.0
        } else {
            0.0
        }
    }
}

impl Acc for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
    fn from_f32(v: f32) -> Self {
        v as f64
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn abs(self) -> Self {
        f64::abs(self)
    }
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
    fn signum(self) -> Self {
        if self > 0.0 {
            1.0
        } else if self < 0.0 {
            -1.0
        } else {
            0.0
        }
    }
}

/// Calls `f(&mut out[j], x[j])` with `x` decoded from little-endian `bytes`
/// on the fly. The dtype match is hoisted out of the loop and `f` is
/// inlined, so each dtype gets its own tight loop: this is the aggregation
/// hot path.
#[inline(always)]
fn zip_decoded<A: Acc>(dtype: Dtype, bytes: &[u8], out: &mut [A], f: impl Fn(&mut A, A)) {
    match dtype {
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                f(o, A::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
            }
        }
        Dtype::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                let a = [c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]];
                f(o, A::from_f64(f64::from_le_bytes(a)));
            }
        }
        Dtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                f(o, A::from_f32(f16::from_le_bytes([c[0], c[1]]).to_f32()));
            }
        }
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                f(o, A::from_f32(bf16::from_le_bytes([c[0], c[1]]).to_f32()));
            }
        }
        other => unreachable!("float decode called for non-float dtype {other:?}"),
    }
}

/// Decodes `out.len()` elements of `bytes`.
pub fn decode_into<A: Acc>(dtype: Dtype, bytes: &[u8], out: &mut [A]) {
    zip_decoded(dtype, bytes, out, |o, x| *o = x);
}

/// `out[j] += coef · x[j]`: one pass over the input instead of decode-then-add.
pub fn axpy_from<A: Acc>(dtype: Dtype, coef: A, bytes: &[u8], out: &mut [A]) {
    zip_decoded(dtype, bytes, out, |o, x| *o += coef * x);
}

/// Encodes `values` into `out` (which holds exactly `values.len()` elements).
pub fn encode_from<A: Acc>(dtype: Dtype, values: &[A], out: &mut [u8]) {
    match dtype {
        Dtype::F32 => {
            for (v, c) in values.iter().zip(out.chunks_exact_mut(4)) {
                c.copy_from_slice(&v.to_f32().to_le_bytes());
            }
        }
        Dtype::F64 => {
            for (v, c) in values.iter().zip(out.chunks_exact_mut(8)) {
                c.copy_from_slice(&v.to_f64().to_le_bytes());
            }
        }
        Dtype::F16 => {
            for (v, c) in values.iter().zip(out.chunks_exact_mut(2)) {
                c.copy_from_slice(&f16::from_f32(v.to_f32()).to_le_bytes());
            }
        }
        Dtype::BF16 => {
            for (v, c) in values.iter().zip(out.chunks_exact_mut(2)) {
                c.copy_from_slice(&bf16::from_f32(v.to_f32()).to_le_bytes());
            }
        }
        other => unreachable!("encode_from called for non-float dtype {other:?}"),
    }
}

/// The first element of an encoded float buffer that is not finite: an Inf
/// or NaN, including a value that was finite in the accumulator and
/// overflowed the tensor's narrower dtype when encoded (above 65504 in F16).
pub fn first_non_finite(dtype: Dtype, raw: &[u8]) -> Option<usize> {
    let all_ones = |mask: u16| {
        raw.chunks_exact(2)
            .position(|c| u16::from_le_bytes([c[0], c[1]]) & mask == mask)
    };
    match dtype {
        Dtype::F32 => raw
            .chunks_exact(4)
            .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
        Dtype::F64 => raw
            .chunks_exact(8)
            .position(|c| !f64::from_le_bytes(c.try_into().expect("8-byte chunk")).is_finite()),
        // An all-ones exponent is Inf or NaN in both half formats.
        Dtype::F16 => all_ones(0x7C00),
        Dtype::BF16 => all_ones(0x7F80),
        other => unreachable!("first_non_finite called for non-float dtype {other:?}"),
    }
}

/// Decodes a whole little-endian float buffer into f64 (for tests, small
/// models and the simulator; the aggregation hot path decodes in place).
pub fn decode_all_f64(dtype: Dtype, bytes: &[u8]) -> Vec<f64> {
    let mut out = vec![0f64; bytes.len() / elem_bytes(dtype)];
    decode_into(dtype, bytes, &mut out);
    out
}

/// Encodes f64 values as a little-endian buffer of `dtype`.
pub fn encode_all_f64(dtype: Dtype, values: &[f64]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * elem_bytes(dtype)];
    encode_from(dtype, values, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_outputs_are_found_after_encoding() {
        assert_eq!(
            first_non_finite(Dtype::F32, &encode_all_f64(Dtype::F32, &[1.0, 2.0])),
            None
        );
        let f16 = encode_all_f64(Dtype::F16, &[1.0, 65504.0, 70000.0]);
        assert_eq!(
            first_non_finite(Dtype::F16, &f16),
            Some(2),
            "70000 overflows F16"
        );
        let bf16 = encode_all_f64(Dtype::BF16, &[f64::NAN, 1.0]);
        assert_eq!(first_non_finite(Dtype::BF16, &bf16), Some(0));
        let f64s = encode_all_f64(Dtype::F64, &[0.0, f64::NEG_INFINITY]);
        assert_eq!(first_non_finite(Dtype::F64, &f64s), Some(1));
    }

    #[test]
    fn round_trips_every_float_dtype() {
        let values = [0.0, 1.5, -2.25, 1024.0];
        for dtype in [Dtype::F64, Dtype::F32, Dtype::F16, Dtype::BF16] {
            let bytes = encode_all_f64(dtype, &values);
            assert_eq!(bytes.len(), values.len() * elem_bytes(dtype));
            assert_eq!(decode_all_f64(dtype, &bytes), values, "{dtype:?}");
        }
    }

    #[test]
    fn half_precision_rounds_to_nearest() {
        // 1 + 2^-11 is halfway between two f16 values; ties go to even (1.0).
        let bytes = encode_all_f64(Dtype::F16, &[1.0 + 2f64.powi(-11), 0.1]);
        let back = decode_all_f64(Dtype::F16, &bytes);
        assert_eq!(back[0], 1.0);
        assert!((back[1] - 0.1).abs() < 1e-4 && back[1] != 0.1);
    }

    #[test]
    fn roles_follow_the_policy() {
        assert_eq!(role(Dtype::F64), Some(TensorRole::Float64Acc));
        assert_eq!(role(Dtype::BF16), Some(TensorRole::Float32Acc));
        assert_eq!(role(Dtype::I64), Some(TensorRole::CarryOver));
        assert_eq!(role(Dtype::BOOL), Some(TensorRole::CarryOver));
        assert_eq!(role(Dtype::F8_E4M3), None);
    }
}
