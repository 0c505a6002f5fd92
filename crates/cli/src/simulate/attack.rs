//! A byzantine client's update: train honestly, then send
//! `global − s·(local − global)` — the honest step reversed and blown up —
//! under the honest example count. FedAvg follows it; median, trimmed mean
//! and Krum should not.

use anyhow::Result;
use fedstep_trainer::MlpParams;

pub fn sign_flip(global: &[u8], local: &[u8], scale: f64) -> Result<Vec<u8>> {
    let g = MlpParams::from_safetensors(global)?;
    let l = MlpParams::from_safetensors(local)?;
    l.expect_shape(g.shape())?;
    let s = scale as f32;
    let mut out = g.tensors().clone();
    for (o, lt) in out.iter_mut().zip(l.tensors()) {
        for (x, &lv) in o.iter_mut().zip(lt) {
            *x -= s * (lv - *x);
        }
    }
    Ok(MlpParams::from_tensors(g.shape(), out)?.to_safetensors()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedstep_trainer::init_model;

    #[test]
    fn reverses_and_scales_the_step() {
        let g = init_model(4, 3, 2, 1).unwrap();
        let l = init_model(4, 3, 2, 2).unwrap();
        let b = sign_flip(&g, &l, 10.0).unwrap();
        let (g, l, b) = (
            MlpParams::from_safetensors(&g).unwrap(),
            MlpParams::from_safetensors(&l).unwrap(),
            MlpParams::from_safetensors(&b).unwrap(),
        );
        for ((gt, lt), bt) in g.tensors().iter().zip(l.tensors()).zip(b.tensors()) {
            for ((gv, lv), bv) in gt.iter().zip(lt).zip(bt) {
                assert!((bv - (gv - 10.0 * (lv - gv))).abs() < 1e-5);
            }
        }
    }
}
