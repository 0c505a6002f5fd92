//! Properties that must hold for any input: FedAvg of identical models is
//! that model, normalized weights sum to one, the result of a weighted
//! mean lies within the inputs' range, element by element, and every input
//! appears exactly once in the measurements.

use fedstep_core::measurements::ClientStatus;
use fedstep_core::UpdateMeta;
use fedstep_test_support::aggregate::{run, update, Dir};
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

    /// Whatever happens to each update (bad claims, a non-finite value
    /// found mid-stream and the retry, zeroing, Krum), the records list
    /// every input once, in order, and only the combined ones as accepted.
    #[test]
    fn every_input_appears_exactly_once(
        kinds in prop::collection::vec(0u8..4, 1..8),
        krum in any::<bool>(),
    ) {
        let d = Dir::new();
        let g = d.model("g.safetensors", Dtype::F32, &[("w", &[0.0; 8])]);
        let ups: Vec<_> = kinds.iter().enumerate().map(|(i, kind)| {
            // 0: fine, 1: a claim of 0 examples, 2: a NaN, 3: far too large.
            let mut w = vec![0.1 * i as f64; 8];
            match kind {
                2 => w[5] = f64::NAN,
                3 => w[0] = 1e6,
                _ => {}
            }
            let p = d.model(&format!("u{i}.safetensors"), Dtype::F32, &[("w", &w)]);
            let examples = if *kind == 1 { 0 } else { 1 + i as u64 };
            update(&p, UpdateMeta::new(format!("u{i}"), examples))
        }).collect();
        let combiner = if krum { "\n[[stages]]\nkind = \"krum\"\nbyzantine = 1" } else { "" };
        let cfg = format!("[[stages]]\nkind = \"zeroing\"\nmax_norm = 100.0{combiner}");
        let Ok((o, _)) = run(&d, &ups, Some(&g), &cfg) else {
            // No usable update: an error, not a partial record.
            prop_assert!(kinds.iter().all(|&k| k != 0));
            return Ok(());
        };
        let m = &o.measurements;
        let ids: Vec<&str> = m.clients.iter().map(|c| c.client_id.as_str()).collect();
        let want: Vec<String> = (0..kinds.len()).map(|i| format!("u{i}")).collect();
        prop_assert_eq!(ids, want.iter().map(String::as_str).collect::<Vec<_>>());
        let accepted = m.clients.iter().filter(|c| c.status == ClientStatus::Accepted);
        prop_assert_eq!(accepted.clone().count(), m.accepted);
        prop_assert!(accepted.clone().all(|c| c.weight.is_some() && c.reason.is_none()));
        prop_assert!(m.clients.iter().all(|c| (c.status == ClientStatus::Accepted) || c.reason.is_some()));
        for (c, kind) in m.clients.iter().zip(&kinds) {
            let expected = match kind {
                1 | 2 => ClientStatus::Rejected,
                3 => ClientStatus::Zeroed,
                _ => c.status, // accepted, or not selected by Krum
            };
            prop_assert_eq!(c.status, expected, "{}", c.client_id);
        }
    }
}
