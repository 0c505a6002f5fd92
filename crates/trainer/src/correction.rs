//! The client-drift corrections of a local SGD step (issue #19).
//!
//! Under label skew each client's local optimum is far from the global
//! one, so a few epochs of plain SGD pull the clients apart ("client
//! drift") and their average lands off every optimum. Both remedies here
//! change only the gradient a step applies:
//!
//! - **FedProx** (Li et al. 2020) adds μ/2·‖w − w_global‖² to the local
//!   loss; its gradient is μ·(w − w_global), a pull back toward the round's
//!   global model that grows with the distance travelled.
//! - **SCAFFOLD** (Karimireddy et al. 2020) adds c − c_i, the server's
//!   estimate of the global gradient minus this client's own estimate of
//!   its local one, so each step follows the global direction instead of
//!   the local one.
//!
//! So a corrected step is `w ← w − η·(g + μ·(w − w_global) + (c − c_i))`.
//! Written as a gradient correction rather than as extra loss terms so the
//! arithmetic is the papers' and can be checked by hand (tests below).

use candle_core::Tensor;

use crate::error::Result;

/// One tensor's corrected gradient: `grad + mu·(w − w_global) + drift`,
/// where `drift` is SCAFFOLD's `c − c_i` for this tensor (None: FedProx or
/// plain SGD). With `mu = 0` and no drift it is `grad` itself.
pub fn corrected_gradient(
    grad: &Tensor,
    w: &Tensor,
    w_global: &Tensor,
    mu: f64,
    drift: Option<&Tensor>,
) -> Result<Tensor> {
    let mut g = grad.clone();
    if mu != 0.0 {
        g = (g + ((w - w_global)? * mu)?)?;
    }
    if let Some(d) = drift {
        g = (g + d)?;
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_vec1::<f32>().unwrap()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn proximal_gradient_by_hand() {
        // w = [1, 2, -1], w_global = [0.5, 0.5, 0], μ = 0.1, g = [0.3, -0.2, 0]:
        // μ·(w − w_global) = [0.05, 0.15, -0.1]
        // g' = [0.35, -0.05, -0.1]
        let g = corrected_gradient(
            &t(&[0.3, -0.2, 0.0]),
            &t(&[1.0, 2.0, -1.0]),
            &t(&[0.5, 0.5, 0.0]),
            0.1,
            None,
        )
        .unwrap();
        close(&values(&g), &[0.35, -0.05, -0.1]);
        // One SGD step with η = 0.5 from w: w − η·g' = [0.825, 2.025, -0.95];
        // plain SGD would have gone to [0.85, 2.1, -1.0]: every coordinate
        // moved toward w_global.
    }

    #[test]
    fn proximal_term_vanishes_at_the_global_model_and_mu_zero_is_plain_sgd() {
        let g = t(&[0.3, -0.2]);
        let w = t(&[1.0, 2.0]);
        close(
            &values(&corrected_gradient(&g, &w, &w, 5.0, None).unwrap()),
            &[0.3, -0.2],
        );
        close(
            &values(&corrected_gradient(&g, &w, &t(&[9.0, 9.0]), 0.0, None).unwrap()),
            &[0.3, -0.2],
        );
    }

    #[test]
    fn scaffold_drift_is_added_and_combines_with_the_proximal_term() {
        // c − c_i = [0.1, -0.4]: g' = g + drift = [0.4, -0.6].
        let g = t(&[0.3, -0.2]);
        let w = t(&[1.0, 2.0]);
        let drift = t(&[0.1, -0.4]);
        close(
            &values(&corrected_gradient(&g, &w, &w, 0.0, Some(&drift)).unwrap()),
            &[0.4, -0.6],
        );
        // Both: + μ·(w − w_global) with μ = 1, w_global = [0, 0] → [1.4, 1.4].
        close(
            &values(&corrected_gradient(&g, &w, &t(&[0.0, 0.0]), 1.0, Some(&drift)).unwrap()),
            &[1.4, 1.4],
        );
    }
}
