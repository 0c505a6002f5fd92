//! Helpers shared by fedstep's test suites (`[dev-dependencies]` of the
//! crates whose tests use them), so that each exists once:
//! - [`assert_close`] / [`assert_close_f32`]: elementwise comparisons;
//! - [`model`]: safetensors model files written for a test;
//! - [`aggregate`]: a temp dir of models and a one-call aggregation (the
//!   core's tests);
//! - [`federation`]: a federation in one process over the local adapters
//!   (the round engine's tests).
//!
//! Suite-specific helpers stay beside their suite: the fault harness in
//! `crates/cloud/tests/harness/`, the emulator setup in
//! `crates/aws/tests/common/`.

pub mod aggregate;
pub mod federation;
pub mod model;

/// Elementwise `|actual − expected| ≤ tol`, and equal lengths.
pub fn assert_close(actual: &[f64], expected: &[f64], tol: f64) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "length: {actual:?} vs {expected:?}"
    );
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= tol,
            "element {i}: {a} vs {e} (tol {tol}); {actual:?} vs {expected:?}"
        );
    }
}

/// f32 models: elementwise `|got − want| ≤ 1e-5·max(|want|, 1)` (computed
/// in f32), and equal lengths.
pub fn assert_close_f32(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs().max(1.0),
            "{got:?} != {want:?}"
        );
    }
}
