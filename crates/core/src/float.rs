//! The dtypes fedstep averages, and their little-endian decode/encode.
//!
//! safetensors data is not aligned, so values are decoded with
//! `from_le_bytes` rather than cast in place.

use half::f16;
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
        Dtype::F32 => zip_steps(bytes, out, &f, f32::from_le_bytes),
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
        Dtype::BF16 => zip_steps(bytes, out, &f, |c| bf16_bits_to_f32(u16::from_le_bytes(c))),
        other => unreachable!("float decode called for non-float dtype {other:?}"),
    }
}

/// Elements per step of the decode and encode loops.
const STEP: usize = 8;

/// [`zip_decoded`] for a dtype of `W` bytes that widens to f32 with `dec`,
/// `STEP` elements at a time: each step decodes a fixed-size array and then
/// applies `f` to it, which the compiler turns into vector loads, shuffles
/// and arithmetic. (Element by element over `chunks_exact(2)`, BF16 was
/// loaded a byte at a time and reassembled with scalar inserts.)
#[inline(always)]
fn zip_steps<A: Acc, const W: usize>(
    bytes: &[u8],
    out: &mut [A],
    f: &impl Fn(&mut A, A),
    dec: impl Fn([u8; W]) -> f32,
) {
    // As `zip`: as many elements as both sides hold.
    let n = out.len().min(bytes.len() / W);
    let (out, bytes) = (&mut out[..n], &bytes[..n * W]);
    let mut out_steps = out.chunks_exact_mut(STEP);
    let mut byte_steps = bytes.chunks_exact(STEP * W);
    for (o, b) in (&mut out_steps).zip(&mut byte_steps) {
        let mut x = [0f32; STEP];
        for (k, xk) in x.iter_mut().enumerate() {
            *xk = dec(element(b, k));
        }
        for (ok, xk) in o.iter_mut().zip(x) {
            f(ok, A::from_f32(xk));
        }
    }
    let rest = byte_steps.remainder();
    for (k, o) in out_steps.into_remainder().iter_mut().enumerate() {
        f(o, A::from_f32(dec(element(rest, k))));
    }
}

/// The `k`th `W`-byte element of `bytes`.
#[inline(always)]
fn element<const W: usize>(bytes: &[u8], k: usize) -> [u8; W] {
    bytes[k * W..(k + 1) * W]
        .try_into()
        .expect("a slice of W bytes")
}

/// `bf16::to_f32` without branches (so that it vectorizes), bit for bit:
/// a NaN gets its quiet bit set, every other value is the top half of an
/// f32.
#[inline(always)]
fn bf16_bits_to_f32(bits: u16) -> f32 {
    let quiet = if bits & 0x7FFF > 0x7F80 { 0x0040 } else { 0 };
    f32::from_bits(u32::from(bits | quiet) << 16)
}

/// `bf16::from_f32` without branches (so that it vectorizes), bit for bit:
/// round to nearest, ties to even; a NaN keeps its top mantissa bits and
/// gets its quiet bit set.
#[inline(always)]
fn f32_to_bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let top = (x >> 16) as u16;
    let nan = x & 0x7FFF_FFFF > 0x7F80_0000;
    // Round up when the first dropped bit is set and the value is not
    // exactly halfway to an even result (any lower bit, or an odd top).
    let up = x & 0x8000 != 0 && x & 0x0001_7FFF != 0;
    // Wrapping: the sum overflows only for NaNs, which take the other arm.
    let rounded = top.wrapping_add(u16::from(up));
    if nan {
        top | 0x0040
    } else {
        rounded
    }
}

/// Decodes `out.len()` elements of `bytes`.
pub fn decode_into<A: Acc>(dtype: Dtype, bytes: &[u8], out: &mut [A]) {
    zip_decoded(dtype, bytes, out, |o, x| *o = x);
}

/// `out[j] += Σ_i coefs[i] · x_i[j]` over the inputs `raws` (each holding
/// `out.len()` elements), or with `from_zero` `out[j] = 0 + Σ_i …` whatever
/// `out` held. Each element's terms are added in input order, as a pass per
/// input did, so the bits are the same; but a step of elements is summed
/// over every input in registers and stored once, instead of loading and
/// storing the accumulator once per input. This is the mean's hot loop.
pub fn add_weighted_from<A: Acc>(
    dtype: Dtype,
    raws: &[&[u8]],
    coefs: &[A],
    out: &mut [A],
    from_zero: bool,
) {
    match dtype {
        Dtype::F32 => sum_steps(raws, coefs, out, from_zero, |c| {
            A::from_f32(f32::from_le_bytes(c))
        }),
        Dtype::F64 => sum_steps(raws, coefs, out, from_zero, |c| {
            A::from_f64(f64::from_le_bytes(c))
        }),
        Dtype::F16 => sum_steps(raws, coefs, out, from_zero, |c| {
            A::from_f32(f16::from_le_bytes(c).to_f32())
        }),
        // A plain shift, without `bf16_bits_to_f32`'s quieting of NaNs: the
        // two differ only in a NaN's payload, a NaN term makes the sum a NaN
        // either way, and a non-finite sum is rejected, never written. The
        // quieting was half the instructions of this loop.
        Dtype::BF16 => sum_steps(raws, coefs, out, from_zero, |c| {
            A::from_f32(f32::from_bits(u32::from(u16::from_le_bytes(c)) << 16))
        }),
        other => unreachable!("float decode called for non-float dtype {other:?}"),
    }
}

/// Elements per step of [`add_weighted_from`]: sixteen f32 are four vector
/// registers of accumulators, enough to keep the adds independent.
const SUM_STEP: usize = 16;

#[inline(always)]
fn sum_steps<A: Acc, const W: usize>(
    raws: &[&[u8]],
    coefs: &[A],
    out: &mut [A],
    from_zero: bool,
    dec: impl Fn([u8; W]) -> A,
) {
    let n = out.len();
    let raws = &raws[..raws.len().min(coefs.len())];
    assert!(
        raws.iter().all(|r| r.len() >= n * W),
        "every input holds the block"
    );
    let whole = n / SUM_STEP * SUM_STEP;
    let (steps, rest) = out.split_at_mut(whole);
    for (s, o) in steps.chunks_exact_mut(SUM_STEP).enumerate() {
        let mut acc = [A::default(); SUM_STEP];
        if !from_zero {
            acc.copy_from_slice(o);
        }
        let lo = s * SUM_STEP * W;
        for (raw, &c) in raws.iter().zip(coefs) {
            let b = &raw[lo..lo + SUM_STEP * W];
            for (k, a) in acc.iter_mut().enumerate() {
                *a += c * dec(element(b, k));
            }
        }
        o.copy_from_slice(&acc);
    }
    for (j, o) in rest.iter_mut().enumerate() {
        let mut a = if from_zero { A::default() } else { *o };
        for (raw, &c) in raws.iter().zip(coefs) {
            a += c * dec(element(raw, whole + j));
        }
        *o = a;
    }
}

/// Whether every value is finite. No early exit, so that the check
/// vectorizes; callers look for the position only when this says no.
pub fn all_finite<A: Acc>(values: &[A]) -> bool {
    values.iter().fold(true, |ok, v| ok & v.is_finite())
}

/// Encodes `values` into `out` (which holds exactly `values.len()` elements).
pub fn encode_from<A: Acc>(dtype: Dtype, values: &[A], out: &mut [u8]) {
    match dtype {
        Dtype::F32 => encode_steps(values, out, f32::to_le_bytes),
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
        Dtype::BF16 => encode_steps(values, out, |v| f32_to_bf16_bits(v).to_le_bytes()),
        other => unreachable!("encode_from called for non-float dtype {other:?}"),
    }
}

/// [`encode_from`] for a dtype of `W` bytes encoded from f32 by `enc`,
/// `STEP` elements at a time (see [`zip_steps`]).
#[inline(always)]
fn encode_steps<A: Acc, const W: usize>(
    values: &[A],
    out: &mut [u8],
    enc: impl Fn(f32) -> [u8; W],
) {
    let n = values.len().min(out.len() / W);
    let (values, out) = (&values[..n], &mut out[..n * W]);
    let mut value_steps = values.chunks_exact(STEP);
    let mut byte_steps = out.chunks_exact_mut(STEP * W);
    for (v, b) in (&mut value_steps).zip(&mut byte_steps) {
        for (k, c) in b.chunks_exact_mut(W).enumerate() {
            c.copy_from_slice(&enc(v[k].to_f32()));
        }
    }
    let rest = byte_steps.into_remainder();
    for (v, c) in value_steps.remainder().iter().zip(rest.chunks_exact_mut(W)) {
        c.copy_from_slice(&enc(v.to_f32()));
    }
}

/// The first element of an encoded float buffer that is not finite: an Inf
/// or NaN, including a value that was finite in the accumulator and
/// overflowed the tensor's narrower dtype when encoded (above 65504 in F16).
pub fn first_non_finite(dtype: Dtype, raw: &[u8]) -> Option<usize> {
    // Every output block goes through here, and is nearly always clean:
    // screen runs of elements with a check that has no early exit (so that
    // it vectorizes), and search for the position only in a run that fails.
    const RUN: usize = 1024;
    let eb = elem_bytes(dtype);
    raw.chunks(RUN * eb).enumerate().find_map(|(r, run)| {
        let clean = match dtype {
            Dtype::F32 => all_of(run, |c| f32::from_le_bytes(c).is_finite()),
            Dtype::F64 => all_of(run, |c| f64::from_le_bytes(c).is_finite()),
            // An all-ones exponent is Inf or NaN in both half formats.
            Dtype::F16 => all_of(run, |c| u16::from_le_bytes(c) & 0x7C00 != 0x7C00),
            Dtype::BF16 => all_of(run, |c| u16::from_le_bytes(c) & 0x7F80 != 0x7F80),
            other => unreachable!("first_non_finite called for non-float dtype {other:?}"),
        };
        (!clean).then(|| position_non_finite(dtype, run).map(|j| r * RUN + j))?
    })
}

/// Whether `ok` holds for every `W`-byte element of `raw`, `STEP` elements
/// at a time and without an early exit.
#[inline(always)]
fn all_of<const W: usize>(raw: &[u8], ok: impl Fn([u8; W]) -> bool) -> bool {
    let mut steps = raw.chunks_exact(STEP * W);
    let mut all = true;
    for s in &mut steps {
        for k in 0..STEP {
            all &= ok(element(s, k));
        }
    }
    let rest = steps.remainder();
    (0..rest.len() / W).fold(all, |all, k| all & ok(element(rest, k)))
}

/// [`first_non_finite`] element by element.
fn position_non_finite(dtype: Dtype, raw: &[u8]) -> Option<usize> {
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
    use half::bf16;

    /// Every BF16 bit pattern decodes as `half` decodes it (the scalar path
    /// the step loops replaced), NaN payloads included.
    #[test]
    fn bf16_decode_is_bit_identical_to_half() {
        for bits in 0..=u16::MAX {
            let want = bf16::from_bits(bits).to_f32().to_bits();
            assert_eq!(bf16_bits_to_f32(bits).to_bits(), want, "{bits:#06x}");
        }
        let bytes: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
        let mut out = vec![0f32; 1 << 16];
        decode_into(Dtype::BF16, &bytes, &mut out);
        for (bits, v) in (0..=u16::MAX).zip(&out) {
            assert_eq!(v.to_bits(), bf16::from_bits(bits).to_f32().to_bits());
        }
    }

    /// BF16 encoding equals `half`'s for every sign, exponent and top
    /// mantissa (all 2^16 upper halves: zeros, subnormals, infinities,
    /// NaNs) combined with the lower halves that decide rounding: exact,
    /// just below, at and just above the tie, and the largest.
    #[test]
    fn bf16_encode_is_bit_identical_to_half() {
        let lows = [
            0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFF, 0x1234,
        ];
        let values: Vec<f32> = (0..=u16::MAX)
            .flat_map(|hi| lows.map(|lo| f32::from_bits(u32::from(hi) << 16 | lo)))
            .collect();
        let mut out = vec![0u8; values.len() * 2];
        encode_from(Dtype::BF16, &values, &mut out);
        for (v, c) in values.iter().zip(out.chunks_exact(2)) {
            let want = bf16::from_f32(*v).to_bits();
            assert_eq!(f32_to_bf16_bits(*v), want, "{:#010x}", v.to_bits());
            assert_eq!(
                u16::from_le_bytes([c[0], c[1]]),
                want,
                "{:#010x}",
                v.to_bits()
            );
        }
        // Through f64 accumulators too (F64 → f32 → BF16, as before).
        let wide: Vec<f64> = values.iter().map(|&v| f64::from(v) * 1.000_000_1).collect();
        let mut out = vec![0u8; wide.len() * 2];
        encode_from(Dtype::BF16, &wide, &mut out);
        for (v, c) in wide.iter().zip(out.chunks_exact(2)) {
            let want = bf16::from_f32(*v as f32).to_bits();
            assert_eq!(u16::from_le_bytes([c[0], c[1]]), want);
        }
    }

    /// The screened search finds what the element-by-element one finds, in
    /// any run and at any position within it.
    #[test]
    fn screened_search_finds_the_first_non_finite() {
        for dtype in [Dtype::F64, Dtype::F32, Dtype::F16, Dtype::BF16] {
            for n in [0, 1, 7, 8, 9, 1023, 1024, 1025, 3000] {
                let clean = encode_all_f64(dtype, &vec![0.5; n]);
                assert_eq!(first_non_finite(dtype, &clean), None, "{dtype:?} {n}");
                for at in [0, n / 3, n.saturating_sub(1)]
                    .into_iter()
                    .filter(|&a| a < n)
                {
                    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                        let mut v = vec![0.5; n];
                        v[at] = bad;
                        if at + 1 < n {
                            v[n - 1] = bad;
                        }
                        let raw = encode_all_f64(dtype, &v);
                        assert_eq!(
                            first_non_finite(dtype, &raw),
                            Some(at),
                            "{dtype:?} {n} {at}"
                        );
                        assert_eq!(position_non_finite(dtype, &raw), Some(at));
                    }
                }
            }
        }
    }

    /// The register-blocked weighted sum equals a pass per input (the
    /// loop it replaced) bit for bit, at every length, from zero or not.
    #[test]
    fn weighted_sums_equal_a_pass_per_input() {
        let coefs = [0.3f32, -1.7, 0.125, 3.0e-3, 0.9];
        for dtype in [Dtype::F64, Dtype::F32, Dtype::F16, Dtype::BF16] {
            for n in [0, 1, 15, 16, 17, 40, 2048] {
                let raws: Vec<Vec<u8>> = (0..coefs.len())
                    .map(|i| {
                        let v: Vec<f64> = (0..n)
                            .map(|j| ((i * 31 + j * 7) % 97) as f64 * 0.37 - 17.0)
                            .collect();
                        encode_all_f64(dtype, &v)
                    })
                    .collect();
                let refs: Vec<&[u8]> = raws.iter().map(Vec::as_slice).collect();
                let start: Vec<f32> = (0..n).map(|j| j as f32 * -0.01).collect();
                for from_zero in [true, false] {
                    let mut want = if from_zero {
                        vec![0f32; n]
                    } else {
                        start.clone()
                    };
                    for (raw, &c) in raws.iter().zip(&coefs) {
                        let mut x = vec![0f32; n];
                        decode_into(dtype, raw, &mut x);
                        for (w, x) in want.iter_mut().zip(x) {
                            *w += c * x;
                        }
                    }
                    let mut got = start.clone();
                    add_weighted_from(dtype, &refs, &coefs, &mut got, from_zero);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "{dtype:?} {n} {from_zero}");
                }
            }
        }
        // Any NaN or infinite term, signalling BF16 NaNs included, makes the
        // sum non-finite (so the block is rejected whatever the payload).
        for bad in [0x7F81u16, 0xFF81, 0x7FC0, 0x7F80, 0xFF80] {
            let mut raw = encode_all_f64(Dtype::BF16, &[1.0; 40]);
            raw[2 * 33..2 * 34].copy_from_slice(&bad.to_le_bytes());
            let other = encode_all_f64(Dtype::BF16, &[1.0; 40]);
            let mut got = vec![0f32; 40];
            add_weighted_from(Dtype::BF16, &[&other, &raw], &[0.5, 0.5], &mut got, true);
            assert!(!got[33].is_finite(), "{bad:#06x}");
            assert!(got.iter().enumerate().all(|(j, v)| j == 33 || *v == 1.0));
            for from_zero in [true, false] {
                let mut got = vec![0f32; 40];
                add_weighted_from(Dtype::BF16, &[&raw[..]], &[0.5], &mut got, from_zero);
                assert!(!got[33].is_finite(), "{bad:#06x}");
            }
        }
    }

    /// The step loops handle every length (whole steps and a remainder)
    /// and stop where the shorter side ends, as `zip` did.
    #[test]
    fn step_loops_cover_every_length() {
        for dtype in [Dtype::F32, Dtype::BF16] {
            let eb = elem_bytes(dtype);
            for n in 0..40 {
                let values: Vec<f32> = (0..n).map(|i| i as f32 * 0.75 - 3.0).collect();
                let bytes =
                    encode_all_f64(dtype, &values.iter().map(|&v| v.into()).collect::<Vec<_>>());
                let mut out = vec![0f32; n];
                decode_into(dtype, &bytes, &mut out);
                assert_eq!(out, values, "{dtype:?} {n}");
                let mut short = vec![0f32; n / 2];
                decode_into(dtype, &bytes, &mut short);
                assert_eq!(short, values[..n / 2], "{dtype:?} {n}");
                let mut enc = vec![0xAAu8; (n + 2) * eb];
                encode_from(dtype, &values, &mut enc);
                assert_eq!(enc[..n * eb], bytes, "{dtype:?} {n}");
                assert!(enc[n * eb..].iter().all(|&b| b == 0xAA), "{dtype:?} {n}");
            }
        }
    }

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
