//! SCAFFOLD's client side (Karimireddy et al. 2020, Algorithm 1 with
//! option II): the corrected local training and the new client control
//! variate.
//!
//! A control variate has the model's four tensors (same names, shapes,
//! F32), so it travels and is stored as an [`MlpParams`]. After K local
//! steps of size η from the global model x to the trained model y, the
//! client's variate becomes
//!
//! `c_i⁺ = c_i − c + (x − y)/(K·η)`
//!
//! (the average corrected gradient it followed, minus the drift
//! correction it applied), and it sends `Δc_i = c_i⁺ − c_i` with its
//! update. Option II costs nothing beyond the training itself; option I
//! (a full-batch gradient at x) would cost an extra pass over the data.

use crate::error::{Result, TrainerError};
use crate::eval::Eval;
use crate::model::MlpParams;

/// What a SCAFFOLD client's local round produced.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaffoldOutcome {
    /// The trained model y.
    pub trained: MlpParams,
    /// Its evaluation on the local data.
    pub eval: Eval,
    /// The client's new control variate c_i⁺, to keep (private).
    pub client_variate: MlpParams,
    /// `c_i⁺ − c_i`, to upload with the update.
    pub delta: MlpParams,
    /// K, the number of local SGD steps taken.
    pub steps: usize,
}

/// `Δc_i = (x − y)/(K·η) − c` and `c_i⁺ = c_i + Δc_i` (see the module
/// docs), computed per element in f64. Errors if the shapes differ or a
/// value is not finite (a diverged run is reported, not shipped).
pub fn client_variate_update(
    client_variate: &MlpParams,
    server_variate: &MlpParams,
    global: &MlpParams,
    trained: &MlpParams,
    steps: usize,
    learning_rate: f64,
) -> Result<(MlpParams, MlpParams)> {
    let shape = global.shape();
    for p in [client_variate, server_variate, trained] {
        p.expect_shape(shape)?;
    }
    if steps == 0 || !(learning_rate.is_finite() && learning_rate > 0.0) {
        return Err(TrainerError::Config(format!(
            "SCAFFOLD needs at least one step of a positive learning rate, got {steps} steps of {learning_rate}"
        )));
    }
    let scale = 1.0 / (steps as f64 * learning_rate);
    let mut delta: [Vec<f32>; 4] = Default::default();
    let mut next: [Vec<f32>; 4] = Default::default();
    for i in 0..4 {
        let (ci, c) = (&client_variate.tensors()[i], &server_variate.tensors()[i]);
        let (x, y) = (&global.tensors()[i], &trained.tensors()[i]);
        delta[i] = (0..x.len())
            .map(|k| ((f64::from(x[k]) - f64::from(y[k])) * scale - f64::from(c[k])) as f32)
            .collect();
        // c_i⁺ = c_i + Δc_i exactly as sent, so the server's running sum of
        // the Δc_i stays the sum of the clients' variates.
        next[i] = ci.iter().zip(&delta[i]).map(|(a, d)| a + d).collect();
    }
    Ok((
        MlpParams::from_tensors(shape, next)?,
        MlpParams::from_tensors(shape, delta)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MlpShape;

    const SHAPE: MlpShape = MlpShape {
        input: 1,
        hidden: 1,
        classes: 1,
    };

    /// A 1-1-1 MLP whose four tensors hold one value each.
    fn p(v: [f32; 4]) -> MlpParams {
        MlpParams::from_tensors(SHAPE, v.map(|x| vec![x])).unwrap()
    }

    fn flat(p: &MlpParams) -> Vec<f32> {
        p.tensors().iter().map(|t| t[0]).collect()
    }

    #[test]
    fn control_variate_update_by_hand() {
        // x = [1, 0, 2, -1], y = [0.8, 0.1, 2.0, -0.7], K = 4, η = 0.05:
        // (x − y)/(Kη) = [0.2, -0.1, 0, -0.3]/0.2 = [1, -0.5, 0, -1.5]
        // c = [0.5, 0.5, 0, 1] → Δc_i = [0.5, -1, 0, -2.5]
        // c_i = [0.1, 0, 0, 0.2] → c_i⁺ = [0.6, -1, 0, -2.3]
        let (next, delta) = client_variate_update(
            &p([0.1, 0.0, 0.0, 0.2]),
            &p([0.5, 0.5, 0.0, 1.0]),
            &p([1.0, 0.0, 2.0, -1.0]),
            &p([0.8, 0.1, 2.0, -0.7]),
            4,
            0.05,
        )
        .unwrap();
        let close = |a: Vec<f32>, b: [f32; 4]| {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
            }
        };
        close(flat(&delta), [0.5, -1.0, 0.0, -2.5]);
        close(flat(&next), [0.6, -1.0, 0.0, -2.3]);
    }

    #[test]
    fn refuses_mismatched_shapes_and_zero_steps() {
        let z = p([0.0; 4]);
        let other = MlpParams::init(
            MlpShape {
                input: 2,
                hidden: 1,
                classes: 1,
            },
            0,
        )
        .unwrap();
        assert!(client_variate_update(&other, &z, &z, &z, 1, 0.1).is_err());
        assert!(client_variate_update(&z, &z, &z, &z, 0, 0.1).is_err());
        assert!(client_variate_update(&z, &z, &z, &z, 1, 0.0).is_err());
    }
}
