//! `max_client_share` through the whole aggregation: the cap moves the
//! model, not only the recorded weights; it is recorded every round; and it
//! meets the other stages sanely (Krum's selection, robust combiners that
//! ignore weights, FedSelect's masked mean, DP noise's calibration).

use fedstep_core::float::encode_all_f64;
use fedstep_core::UpdateMeta;
use fedstep_test_support::aggregate::*;
use fedstep_test_support::assert_close;
use safetensors::Dtype;

/// Lets the 10^12 claim past `limits.max_num_examples`, so that the cap,
/// not the limit, is what stands between it and the model.
const BELIEVE_ANY_CLAIM: &str = "[limits]\nmax_num_examples = 1000000000000\n";

fn with_cap(cap: f64, rest: &str) -> String {
    format!("max_client_share = {cap}\n{rest}\n{BELIEVE_ANY_CLAIM}")
}

/// Three honest clients at 0 with 10 examples each, one claiming 10^12
/// examples at 1.
fn honest_three_and_a_claimant(d: &Dir) -> Vec<fedstep_core::UpdateSource> {
    let mut ups: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|id| {
            let p = d.model(&format!("{id}.safetensors"), Dtype::F64, &[("w", &[0.0])]);
            update(&p, UpdateMeta::new(*id, 10))
        })
        .collect();
    let big = d.model("big.safetensors", Dtype::F64, &[("w", &[1.0])]);
    ups.push(update(&big, UpdateMeta::new("big", 1_000_000_000_000)));
    ups
}

#[test]
fn a_claim_of_a_trillion_examples_moves_the_mean_only_as_far_as_the_cap() {
    let d = Dir::new();
    let ups = honest_three_and_a_claimant(&d);
    let (_, uncapped) = run(&d, &ups, None, BELIEVE_ANY_CLAIM).unwrap();
    assert!(
        uncapped["w"].values[0] > 0.999_999_999,
        "without a cap the claimant owns the model"
    );

    let (o, m) = run(&d, &ups, None, &with_cap(0.5, "")).unwrap();
    assert_close(&m["w"].values, &[0.5], 1e-12);
    let w: Vec<f64> = o
        .measurements
        .clients
        .iter()
        .map(|c| c.weight.unwrap())
        .collect();
    let third = 0.5 / 3.0;
    assert_close(&w, &[third, third, third, 0.5], 1e-12);
    let cap = &o.measurements.stages["max_client_share"];
    assert_eq!(cap["max_client_share"], 0.5);
    assert_eq!(cap["capped"], 1);
    assert_eq!(cap["capped_clients"], serde_json::json!(["big"]));
    assert!(cap["largest_share_before"].as_f64().unwrap() > 0.999_999_999);
    assert!(cap.get("degraded").is_none() && cap.get("moot").is_none());
}

#[test]
fn the_cap_is_recorded_even_when_nobody_reaches_it() {
    let d = Dir::new();
    let ups = honest_three_and_a_claimant(&d);
    let (o, m) = run(&d, &ups[..3], None, &with_cap(0.5, "")).unwrap();
    assert_close(&m["w"].values, &[0.0], 0.0);
    let cap = &o.measurements.stages["max_client_share"];
    assert_eq!(cap["capped"], 0);
    assert_close(
        &[cap["largest_share_before"].as_f64().unwrap()],
        &[1.0 / 3.0],
        1e-15,
    );
    let (o, _) = run(&d, &ups, None, BELIEVE_ANY_CLAIM).unwrap();
    assert!(
        !o.measurements.stages.contains_key("max_client_share"),
        "off by default"
    );
}

#[test]
fn rejections_that_leave_too_few_clients_degrade_to_equal_shares() {
    let d = Dir::new();
    let mut ups = honest_three_and_a_claimant(&d);
    // b and c break their claims; a and big remain, and 2 × 0.4 < 1.
    ups[1].meta.num_examples = serde_json::json!(0);
    ups[2].meta.num_examples = serde_json::json!("many");
    let (o, m) = run(&d, &ups, None, &with_cap(0.4, "")).unwrap();
    assert_close(&m["w"].values, &[0.5], 1e-12);
    let cap = &o.measurements.stages["max_client_share"];
    let why = cap["degraded"].as_str().unwrap();
    assert!(why.contains("only 2 client(s)"), "{why}");
    assert_eq!(cap["capped_clients"], serde_json::json!(["big"]));
}

#[test]
fn the_cap_applies_among_the_updates_krum_selected() {
    let d = Dir::new();
    let g = d.model("g.safetensors", Dtype::F64, &[("w", &[0.0, 0.0])]);
    // Four alike updates and an outlier Krum drops; among the four, "big"
    // claims far more than the rest.
    let mut ups = Vec::new();
    for (id, v, n) in [
        ("a", 1.0, 10u64),
        ("b", 1.1, 10),
        ("c", 0.9, 10),
        ("big", 1.2, 1_000_000_000_000),
        ("far", 100.0, 10),
    ] {
        let p = d.model(&format!("{id}.safetensors"), Dtype::F64, &[("w", &[v, v])]);
        ups.push(update(&p, UpdateMeta::new(id, n)));
    }
    let stages = "[[stages]]\nkind = \"krum\"\nbyzantine = 1\nselect = 4";
    let (o, m) = run(&d, &ups, Some(&g), &with_cap(0.25, stages)).unwrap();
    // Equal shares over the four selected: (1 + 1.1 + 0.9 + 1.2) / 4.
    assert_close(&m["w"].values, &[1.05, 1.05], 1e-12);
    assert_eq!(o.measurements.stages["max_client_share"]["clients"], 4);
    assert_eq!(
        o.measurements.clients[4].weight, None,
        "far was not selected"
    );
}

#[test]
fn a_combiner_that_ignores_weights_makes_the_cap_moot_not_an_error() {
    let d = Dir::new();
    let ups = honest_three_and_a_claimant(&d);
    let (o, m) = run(
        &d,
        &ups,
        None,
        &with_cap(0.5, "[[stages]]\nkind = \"median\""),
    )
    .unwrap();
    // Median of 0, 0, 0, 1: the claim never mattered.
    assert_close(&m["w"].values, &[0.0], 0.0);
    let cap = &o.measurements.stages["max_client_share"];
    assert!(cap["moot"].as_str().unwrap().contains("median"), "{cap}");
    assert_eq!(o.measurements.clients[3].weight, Some(0.5));
}

#[test]
fn dp_noise_is_calibrated_to_the_capped_largest_weight() {
    let d = Dir::new();
    let g = d.model("g.safetensors", Dtype::F64, &[("w", &[0.0])]);
    let ups = honest_three_and_a_claimant(&d);
    let stages = "[[stages]]\nkind = \"clip\"\nmax_norm = 10.0\n\
                  [[stages]]\nkind = \"dp_noise\"\nnoise_multiplier = 0.1\nseed = 1";
    let (o, _) = run(&d, &ups, Some(&g), &with_cap(0.5, stages)).unwrap();
    let dp = &o.measurements.stages["dp_noise"];
    assert_eq!(dp["max_weight"], 0.5, "{dp}");
    assert_close(
        &[dp["stddev"].as_f64().unwrap()],
        &[0.1 * 10.0 * 0.5],
        1e-15,
    );
}

/// FedSelect averages each element over the clients that shared it, so the
/// cap bounds a client's share of the round, and of every element all
/// clients shared; on an element only a few shared, the capped weights are
/// renormalized over those few.
#[test]
fn fedselect_averages_elements_with_the_capped_weights() {
    let d = Dir::new();
    let f64s = |name: &str, v: &[f64]| {
        (
            name.to_string(),
            Dtype::F64,
            vec![v.len()],
            encode_all_f64(Dtype::F64, v),
        )
    };
    let g = d.raw("g.safetensors", vec![f64s("w", &[0.0, 0.0])]);
    // a keeps element 1 personal (it holds the global value there).
    let a = d.raw(
        "a.safetensors",
        vec![
            f64s("w", &[0.0, 0.0]),
            (
                "__fedselect_shared__/w".into(),
                Dtype::U8,
                vec![2],
                vec![1, 0],
            ),
        ],
    );
    let b = d.raw("b.safetensors", vec![f64s("w", &[0.0, 0.0])]);
    let big = d.raw("big.safetensors", vec![f64s("w", &[1.0, 1.0])]);
    let ups = [
        update(&a, UpdateMeta::new("a", 10)),
        update(&b, UpdateMeta::new("b", 10)),
        update(&big, UpdateMeta::new("big", 1_000_000_000_000)),
    ];
    let cfg = with_cap(0.5, "personalization = \"fedselect\"");
    let (_, m) = run(&d, &ups, Some(&g), &cfg).unwrap();
    // Shares 0.25, 0.25, 0.5. Element 0, all shared: 0.5. Element 1, b and
    // big shared: 0.5 / (0.25 + 0.5) = 2/3.
    assert_close(&m["w"].values, &[0.5, 2.0 / 3.0], 1e-12);
}
