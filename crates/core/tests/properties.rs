//! Properties that must hold for any input: FedAvg of identical models is
//! that model, normalized weights sum to one, and the result of a weighted
//! mean lies within the inputs' range, element by element.

mod common;

use common::{run, update, Dir};
use fedstep_core::UpdateMeta;
use proptest::prelude::*;
use safetensors::Dtype;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn fedavg_of_identical_models_is_that_model(
        values in prop::collection::vec(-1e3f64..1e3, 1..200),
        counts in prop::collection::vec(1u64..10_000, 1..6),
    ) {
        let d = Dir::new();
        let ups: Vec<_> = counts.iter().enumerate().map(|(i, n)| {
            let p = d.model(&format!("u{i}.safetensors"), Dtype::F32, &[("w", &values)]);
            update(&p, UpdateMeta::new(format!("u{i}"), *n))
        }).collect();
        let (o, m) = run(&d, &ups, None, "").unwrap();
        let expected: Vec<f64> = values.iter().map(|v| *v as f32 as f64).collect();
        for (a, e) in m["w"].values.iter().zip(&expected) {
            prop_assert!((a - e).abs() <= 1e-6 * (1.0 + e.abs()), "{a} vs {e}");
        }
        let total: f64 = o.measurements.clients.iter().filter_map(|c| c.weight).sum();
        prop_assert!((total - 1.0).abs() < 1e-12, "weights sum to {total}");
    }

    #[test]
    fn weighted_mean_stays_within_the_inputs(
        rows in prop::collection::vec(prop::collection::vec(-1e3f64..1e3, 16), 2..6),
        uniform in any::<bool>(),
    ) {
        let d = Dir::new();
        let ups: Vec<_> = rows.iter().enumerate().map(|(i, r)| {
            let p = d.model(&format!("u{i}.safetensors"), Dtype::F64, &[("w", r)]);
            update(&p, UpdateMeta::new(format!("u{i}"), 1 + 7 * i as u64))
        }).collect();
        let cfg = if uniform { "weighting = \"uniform\"" } else { "" };
        let (_, m) = run(&d, &ups, None, cfg).unwrap();
        for (j, v) in m["w"].values.iter().enumerate() {
            let lo = rows.iter().map(|r| r[j]).fold(f64::INFINITY, f64::min);
            let hi = rows.iter().map(|r| r[j]).fold(f64::NEG_INFINITY, f64::max);
            prop_assert!(*v >= lo - 1e-9 && *v <= hi + 1e-9, "{v} outside [{lo}, {hi}]");
        }
    }
}
