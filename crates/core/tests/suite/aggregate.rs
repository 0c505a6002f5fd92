//! End-to-end aggregation over files: formulas worked by hand, every dtype,
//! every stage and every rejection path.

use fedstep_core::float::encode_all_f64;
use fedstep_core::measurements::ClientStatus;
use fedstep_core::{AggregateError, UpdateMeta};
use fedstep_test_support::aggregate::*;
use fedstep_test_support::assert_close;
use safetensors::Dtype;

#[test]
fn fedavg_weights_by_examples_and_carries_integers_from_the_global() {
    let d = Dir::new();
    let int = |v: i64| {
        (
            "step".to_string(),
            Dtype::I64,
            vec![1],
            v.to_le_bytes().to_vec(),
        )
    };
    let f = |vals: &[f64]| {
        (
            "w".to_string(),
            Dtype::F32,
            vec![2],
            encode_all_f64(Dtype::F32, vals),
        )
    };
    let g = d.raw("g.safetensors", vec![f(&[0.0, 0.0]), int(7)]);
    let a = d.raw("a.safetensors", vec![f(&[1.0, 2.0]), int(100)]);
    let b = d.raw("b.safetensors", vec![f(&[4.0, -1.0]), int(200)]);
    let ups = [
        update(&a, UpdateMeta::new("a", 10)),
        update(&b, UpdateMeta::new("b", 30)),
    ];
    let (o, m) = run(&d, &ups, Some(&g), "").unwrap();
    // (10·[1,2] + 30·[4,−1]) / 40 = [3.25, −0.25]
    assert_close(&m["w"].values, &[3.25, -0.25], 1e-6);
    assert_eq!(
        m["step"].raw,
        7i64.to_le_bytes().to_vec(),
        "integers keep the global value"
    );
    let w: Vec<f64> = o
        .measurements
        .clients
        .iter()
        .map(|c| c.weight.unwrap())
        .collect();
    assert_close(&w, &[0.25, 0.75], 1e-12);
    assert_eq!(o.measurements.accepted, 2);
    assert_eq!(
        o.measurements.passes, 1,
        "plain FedAvg reads every input once"
    );
}

#[test]
fn uniform_weighting_and_no_global() {
    let d = Dir::new();
    let a = d.raw(
        "a.safetensors",
        vec![
            (
                "w".into(),
                Dtype::F32,
                vec![2],
                encode_all_f64(Dtype::F32, &[1.0, 2.0]),
            ),
            ("mask".into(), Dtype::BOOL, vec![2], vec![1, 0]),
        ],
    );
    let b = d.raw(
        "b.safetensors",
        vec![
            (
                "w".into(),
                Dtype::F32,
                vec![2],
                encode_all_f64(Dtype::F32, &[3.0, 6.0]),
            ),
            ("mask".into(), Dtype::BOOL, vec![2], vec![0, 1]),
        ],
    );
    let ups = [
        update(&a, UpdateMeta::new("a", 1)),
        update(&b, UpdateMeta::new("b", 99)),
    ];
    let (_, m) = run(&d, &ups, None, "weighting = \"uniform\"").unwrap();
    assert_close(&m["w"].values, &[2.0, 4.0], 1e-6);
    assert_eq!(
        m["mask"].raw,
        vec![1, 0],
        "bool tensors come from the first accepted update"
    );
}

#[test]
fn every_float_dtype_accumulates_wide_and_writes_back_its_own_dtype() {
    for (dtype, tol) in [
        (Dtype::F64, 1e-15),
        (Dtype::F32, 1e-6),
        (Dtype::F16, 1e-3),
        (Dtype::BF16, 1e-2),
    ] {
        let d = Dir::new();
        let a = d.model("a.safetensors", dtype, &[("w", &[1.0, 0.5, -2.0])]);
        let b = d.model("b.safetensors", dtype, &[("w", &[2.0, 1.0, 2.0])]);
        let c = d.model("c.safetensors", dtype, &[("w", &[3.0, 0.25, 4.0])]);
        let ups = [
            update(&a, UpdateMeta::new("a", 1)),
            update(&b, UpdateMeta::new("b", 1)),
            update(&c, UpdateMeta::new("c", 2)),
        ];
        let (_, m) = run(&d, &ups, None, "").unwrap();
        assert_eq!(m["w"].dtype, dtype);
        // (1 + 2 + 6)/4, (0.5 + 1 + 0.5)/4, (−2 + 2 + 8)/4
        assert_close(&m["w"].values, &[2.25, 0.5, 2.0], tol);
    }
}

#[test]
fn quality_weighting_end_to_end() {
    let d = Dir::new();
    let a = d.model("a.safetensors", Dtype::F32, &[("w", &[0.0])]);
    let b = d.model("b.safetensors", Dtype::F32, &[("w", &[1.0])]);
    let ups = [
        // quality 0.5 → weight 50
        update(
            &a,
            UpdateMeta::new("a", 100)
                .with_type("SpikingEvoTextLM")
                .with_metric("perplexity", std::f64::consts::E)
                .with_metric("loss", 1.0),
        ),
        // quality 1 → weight 50
        update(
            &b,
            UpdateMeta::new("b", 50)
                .with_type("SpikingEvoTextLM")
                .with_metric("perplexity", 1.0)
                .with_metric("loss", 0.0),
        ),
    ];
    let (o, m) = run(
        &d,
        &ups,
        None,
        "weighting = \"quality\"\nllm_type = \"auto\"",
    )
    .unwrap();
    assert_close(&m["w"].values, &[0.5], 1e-6);
    assert_eq!(
        o.measurements.target_llm_type.as_deref(),
        Some("SpikingEvoTextLM")
    );
    assert_close(&[o.measurements.clients[0].quality.unwrap()], &[0.5], 1e-12);
}

#[test]
fn other_types_are_excluded_and_recorded() {
    let d = Dir::new();
    let a = d.model("a.safetensors", Dtype::F32, &[("w", &[1.0])]);
    let b = d.model("b.safetensors", Dtype::F32, &[("w", &[100.0])]);
    let ups = [
        update(
            &a,
            UpdateMeta::new("a", 1)
                .with_type("SpikingEvoVisionEncoder")
                .with_metric("object_detection_accuracy", 0.5),
        ),
        update(
            &b,
            UpdateMeta::new("b", 1).with_type("SpikingEvoAudioEncoder"),
        ),
    ];
    let cfg = "weighting = \"quality\"\nllm_type = \"SpikingEvoVisionEncoder\"";
    let (o, m) = run(&d, &ups, None, cfg).unwrap();
    assert_close(&m["w"].values, &[1.0], 1e-6);
    assert_eq!(o.measurements.clients[1].status, ClientStatus::Excluded);
    assert!(o.measurements.clients[1]
        .reason
        .as_deref()
        .unwrap()
        .contains("SpikingEvoAudioEncoder"));
    let err = run(&d, &ups[1..], None, cfg).unwrap_err();
    assert!(
        err.to_string()
            .contains("no valid update of the target llm_type"),
        "{err}"
    );
}

/// Every structural problem rejects only the offending update, with a reason
/// naming the client, the tensor and the rule.
#[test]
fn broken_updates_are_rejected_while_the_round_goes_on() {
    let d = Dir::new();
    let good = |name: &str, v: f64| d.model(name, Dtype::F32, &[("w", &[v, v]), ("b", &[v])]);
    let g = good("g.safetensors", 0.0);
    let ok1 = good("ok1.safetensors", 1.0);
    let ok2 = good("ok2.safetensors", 3.0);
    let shape = d.model(
        "shape.safetensors",
        Dtype::F32,
        &[("w", &[1.0, 1.0, 1.0]), ("b", &[1.0])],
    );
    let dtype = d.model(
        "dtype.safetensors",
        Dtype::F16,
        &[("w", &[1.0, 1.0]), ("b", &[1.0])],
    );
    let missing = d.model("missing.safetensors", Dtype::F32, &[("w", &[1.0, 1.0])]);
    let extra = d.model(
        "extra.safetensors",
        Dtype::F32,
        &[("w", &[1.0, 1.0]), ("b", &[1.0]), ("z", &[1.0])],
    );
    let nan = d.model(
        "nan.safetensors",
        Dtype::F32,
        &[("w", &[1.0, f64::NAN]), ("b", &[1.0])],
    );
    let inf = d.model(
        "inf.safetensors",
        Dtype::F32,
        &[("w", &[1.0, 1.0]), ("b", &[f64::INFINITY])],
    );
    let full = std::fs::read(&ok1).unwrap();
    let truncated = d.bytes("truncated.safetensors", &full[..full.len() - 3]);
    let mut bomb = (500_000_000u64).to_le_bytes().to_vec();
    bomb.extend_from_slice(b"{}");
    let bomb = d.bytes("bomb.safetensors", &bomb);
    let mut past = (64u64).to_le_bytes().to_vec();
    past.extend_from_slice(b"{}");
    let past = d.bytes("past.safetensors", &past);
    let mut json = (5u64).to_le_bytes().to_vec();
    json.extend_from_slice(b"{\"w\":");
    let json = d.bytes("json.safetensors", &json);
    let overlap_header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    let mut overlap = (overlap_header.len() as u64).to_le_bytes().to_vec();
    overlap.extend_from_slice(overlap_header);
    overlap.extend_from_slice(&[0u8; 12]);
    let overlap = d.bytes("overlap.safetensors", &overlap);
    let tiny = d.bytes("tiny.safetensors", b"abc");

    let cases = [
        (&shape, "`w` has shape [3], the reference has [2]"),
        (&dtype, "`w` has dtype F16, the reference has F32"),
        (&missing, "tensor `b` is missing"),
        (&extra, "tensor `z` is not in the reference"),
        (&nan, "`w` holds a non-finite value (NaN) at element 1"),
        (&inf, "`b` holds a non-finite value (inf) at element 0"),
        (&truncated, "tensor data should be"),
        (&bomb, "exceeds the limit"),
        (&past, "runs past the end"),
        (&json, "invalid header"),
        (&overlap, "invalid offset for tensor"),
        (&tiny, "shorter than the 8-byte"),
    ];
    let mut ups = vec![
        update(&ok1, UpdateMeta::new("ok1", 1)),
        update(&ok2, UpdateMeta::new("ok2", 1)),
    ];
    for (i, (p, _)) in cases.iter().enumerate() {
        ups.push(update(p, UpdateMeta::new(format!("bad{i}"), 1)));
    }
    for cfg in [
        "",
        "[[stages]]\nkind = \"clip\"\nmax_norm = 100.0",
        "[[stages]]\nkind = \"median\"",
    ] {
        let (o, m) = run(&d, &ups, Some(&g), cfg).unwrap();
        assert_close(&m["w"].values, &[2.0, 2.0], 1e-6);
        assert_close(&m["b"].values, &[2.0], 1e-6);
        assert_eq!(o.measurements.accepted, 2, "{cfg}");
        assert_eq!(o.measurements.rejected, cases.len(), "{cfg}");
        for (i, (_, want)) in cases.iter().enumerate() {
            let c = &o.measurements.clients[i + 2];
            assert_eq!(c.client_id, format!("bad{i}"));
            assert_eq!(c.status, ClientStatus::Rejected);
            let reason = c.reason.as_deref().unwrap();
            assert!(
                reason.contains(want),
                "{cfg}: bad{i}: `{reason}` should say `{want}`"
            );
        }
    }
}

#[test]
fn nan_found_mid_stream_restarts_without_the_offender() {
    let d = Dir::new();
    // Two tensors: the NaN is in the second, after the first was combined.
    let a = d.model(
        "a.safetensors",
        Dtype::F32,
        &[("first", &[1.0; 3000]), ("second", &[1.0; 10])],
    );
    let mut v = vec![5.0; 10];
    v[9] = f64::NAN;
    let b = d.model(
        "b.safetensors",
        Dtype::F32,
        &[("first", &[5.0; 3000]), ("second", &v)],
    );
    let c = d.model(
        "c.safetensors",
        Dtype::F32,
        &[("first", &[3.0; 3000]), ("second", &[3.0; 10])],
    );
    let ups = [
        update(&a, UpdateMeta::new("a", 1)),
        update(&b, UpdateMeta::new("b", 1)),
        update(&c, UpdateMeta::new("c", 1)),
    ];
    let (o, m) = run(&d, &ups, None, "").unwrap();
    assert_close(&m["first"].values, &[2.0; 3000], 1e-6);
    assert_close(&m["second"].values, &[2.0; 10], 1e-6);
    assert_eq!(o.measurements.passes, 2);
    assert!(o.measurements.clients[1]
        .reason
        .as_deref()
        .unwrap()
        .contains("`second`"));
}

#[test]
fn all_rejected_is_a_clear_error_and_writes_nothing() {
    let d = Dir::new();
    let bad = d.bytes("bad.safetensors", b"\x02\0\0\0\0\0\0\0{}");
    let ups = [update(&bad, UpdateMeta::new("only", 0))];
    let err = run(&d, &ups, None, "").unwrap_err();
    assert!(matches!(err, AggregateError::NoUsableUpdate(_)));
    assert!(err.to_string().contains("only: num_examples is 0"), "{err}");
    assert!(!d.path("out-1.safetensors").exists());
}

#[test]
fn clipping_bounds_each_update_norm() {
    let d = Dir::new();
    let g = d.model("g.safetensors", Dtype::F32, &[("w", &[1.0, 1.0])]);
    let a = d.model("a.safetensors", Dtype::F32, &[("w", &[4.0, 5.0])]); // Δ = [3, 4], norm 5
    let b = d.model("b.safetensors", Dtype::F32, &[("w", &[1.0, 2.0])]); // Δ = [0, 1], norm 1
    let ups = [
        update(&a, UpdateMeta::new("a", 1)),
        update(&b, UpdateMeta::new("b", 1)),
    ];
    let (o, m) = run(
        &d,
        &ups,
        Some(&g),
        "[[stages]]\nkind = \"clip\"\nmax_norm = 1.0",
    )
    .unwrap();
    // Clipped Δa = [0.6, 0.8]; mean Δ = [0.3, 0.9]; new = [1.3, 1.9].
    assert_close(&m["w"].values, &[1.3, 1.9], 1e-6);
    let c = &o.measurements.clients;
    assert_close(
        &[c[0].update_norm.unwrap(), c[0].scale.unwrap()],
        &[5.0, 0.2],
        1e-9,
    );
    assert_eq!(o.measurements.stages["clip"]["clipped_count"], 1);
    assert_eq!(o.measurements.passes, 2);
}

#[test]
fn zeroing_drops_a_huge_update() {
    let d = Dir::new();
    let g = d.model("g.safetensors", Dtype::F32, &[("w", &[0.0, 0.0])]);
    let a = d.model("a.safetensors", Dtype::F32, &[("w", &[1.0, 1.0])]);
    let b = d.model("b.safetensors", Dtype::F32, &[("w", &[3.0, 3.0])]);
    let big = d.model("big.safetensors", Dtype::F32, &[("w", &[1e6, 1e6])]);
    let ups = [
        update(&a, UpdateMeta::new("a", 1)),
        update(&b, UpdateMeta::new("b", 1)),
        update(&big, UpdateMeta::new("big", 1)),
    ];
    let (o, m) = run(
        &d,
        &ups,
        Some(&g),
        "[[stages]]\nkind = \"zeroing\"\nmax_norm = 100.0",
    )
    .unwrap();
    assert_close(&m["w"].values, &[2.0, 2.0], 1e-6);
    assert_eq!(o.measurements.clients[2].status, ClientStatus::Zeroed);
    assert!(o.measurements.clients[2]
        .reason
        .as_deref()
        .unwrap()
        .contains("zeroing bound 100"));
    assert_eq!(o.measurements.clients[2].weight, None);
}

#[test]
fn robust_combiners_resist_an_outlier() {
    let d = Dir::new();
    let vals = [1.0, 2.0, 3.0, 4.0, 1000.0];
    let ups: Vec<_> = vals
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let p = d.model(
                &format!("u{i}.safetensors"),
                Dtype::F32,
                &[("w", &[*v, -*v])],
            );
            update(&p, UpdateMeta::new(format!("u{i}"), 1 + i as u64))
        })
        .collect();
    let (_, m) = run(&d, &ups, None, "[[stages]]\nkind = \"median\"").unwrap();
    assert_close(&m["w"].values, &[3.0, -3.0], 1e-6);
    let (o, m) = run(
        &d,
        &ups,
        None,
        "[[stages]]\nkind = \"trimmed_mean\"\nbeta = 0.2",
    )
    .unwrap();
    assert_close(&m["w"].values, &[3.0, -3.0], 1e-6);
    assert_eq!(o.measurements.stages["trimmed_mean"]["trimmed_each_end"], 1);
    // Multi-Krum with f = 1 keeps 3 of the 4 honest points, weighted by examples.
    let (o, m) = run(
        &d,
        &ups,
        None,
        "[[stages]]\nkind = \"krum\"\nbyzantine = 1\nselect = 3",
    )
    .unwrap();
    let statuses: Vec<_> = o.measurements.clients.iter().map(|c| c.status).collect();
    assert_eq!(statuses[4], ClientStatus::NotSelected);
    assert!(m["w"].values[0] < 4.0, "{:?}", m["w"].values);
    // Krum (select 1) returns one honest update exactly.
    let (_, m) = run(&d, &ups, None, "[[stages]]\nkind = \"krum\"\nbyzantine = 1").unwrap();
    assert!(vals[..4].contains(&m["w"].values[0]), "{:?}", m["w"].values);
    // Four updates cannot hold one Byzantine among them (2f + 3 = 5): the
    // round still closes, with the lowered tolerance recorded.
    let (o, _) = run(
        &d,
        &ups[..4],
        None,
        "[[stages]]\nkind = \"krum\"\nbyzantine = 1",
    )
    .unwrap();
    let why = o.measurements.stages["krum"]["degraded"].as_str().unwrap();
    assert!(why.contains("2·1 + 3 = 5"), "{why}");
    assert_eq!(o.measurements.accepted, 1);
}

#[test]
fn median_applies_clipping_to_updates_not_models() {
    let d = Dir::new();
    let g = d.model("g.safetensors", Dtype::F32, &[("w", &[10.0])]);
    let ups: Vec<_> = [12.0, 11.0, 30.0]
        .iter()
        .enumerate()
        .map(|(i, v)| {
            update(
                &d.model(&format!("u{i}.safetensors"), Dtype::F32, &[("w", &[*v])]),
                UpdateMeta::new(format!("u{i}"), 1),
            )
        })
        .collect();
    // Δ = 2, 1, 20 → clipped to 1, 1, 1 → median Δ 1 → 11.
    let cfg = "[[stages]]\nkind = \"clip\"\nmax_norm = 1.0\n[[stages]]\nkind = \"median\"";
    let (_, m) = run(&d, &ups, Some(&g), cfg).unwrap();
    assert_close(&m["w"].values, &[11.0], 1e-6);
}

#[test]
fn dp_noise_is_seeded_and_calibrated() {
    let d = Dir::new();
    let n = 20_000;
    let g = d.model("g.safetensors", Dtype::F64, &[("w", &vec![0.0; n])]);
    let a = d.model("a.safetensors", Dtype::F64, &[("w", &vec![0.0; n])]);
    let b = d.model("b.safetensors", Dtype::F64, &[("w", &vec![0.0; n])]);
    let ups = [
        update(&a, UpdateMeta::new("a", 1)),
        update(&b, UpdateMeta::new("b", 3)),
    ];
    let cfg = "[[stages]]\nkind = \"clip\"\nmax_norm = 2.0\n[[stages]]\nkind = \"dp_noise\"\nnoise_multiplier = 0.5\nseed = 9";
    let (o, m1) = run(&d, &ups, Some(&g), cfg).unwrap();
    // σ = 0.5 · 2 · max weight 0.75 = 0.75
    assert_eq!(o.measurements.stages["dp_noise"]["stddev"], 0.75);
    let v = &m1["w"].values;
    let sd = (v.iter().map(|x| x * x).sum::<f64>() / n as f64).sqrt();
    assert!((sd - 0.75).abs() < 0.02, "{sd}");
    let (_, m2) = run(&d, &ups, Some(&g), cfg).unwrap();
    assert_eq!(
        m1["w"].values, m2["w"].values,
        "same seed, same round, same noise"
    );
    let (_, m3) = run_with_state(&d, &ups, Some(&g), cfg, None, None, 2).unwrap();
    assert_ne!(
        m1["w"].values, m3["w"].values,
        "another round draws other noise"
    );
}

#[test]
fn dp_noise_is_calibrated_to_the_tightest_clip() {
    let d = Dir::new();
    let g = d.model("g.safetensors", Dtype::F64, &[("w", &[0.0; 4])]);
    let a = d.model("a.safetensors", Dtype::F64, &[("w", &[1.0; 4])]);
    let ups = [update(&a, UpdateMeta::new("a", 1))];
    let cfg = "[[stages]]\nkind = \"clip\"\nmax_norm = 2.0\n[[stages]]\nkind = \"clip\"\nmax_norm = 1.0\n\
               [[stages]]\nkind = \"dp_noise\"\nnoise_multiplier = 1.0\nseed = 1";
    let (o, _) = run(&d, &ups, Some(&g), cfg).unwrap();
    assert_eq!(o.measurements.stages["dp_noise"]["clip_norm"], 1.0);
}

#[test]
fn a_stateless_pipeline_writes_no_state() {
    // The cloud engine always passes a state target and keeps the object
    // only if it was written.
    let d = Dir::new();
    let g = d.model("g.safetensors", Dtype::F32, &[("w", &[0.0, 0.0])]);
    let a = d.model("a.safetensors", Dtype::F32, &[("w", &[2.0, -2.0])]);
    let ups = [update(&a, UpdateMeta::new("a", 1))];
    let state = d.path("state.safetensors");
    let cfg = "[[stages]]\nkind = \"clip\"\nmax_norm = 1.0";
    run_with_state(&d, &ups, Some(&g), cfg, None, Some(&state), 1).unwrap();
    assert!(!state.exists());
    // A stateful one needs the target.
    let err = run(&d, &ups, Some(&g), "[[stages]]\nkind = \"fedavgm\"").unwrap_err();
    assert!(
        err.to_string()
            .contains("needs a path to write its state to"),
        "{err}"
    );
}

#[test]
fn server_optimizer_state_persists_across_rounds() {
    let d = Dir::new();
    let g1 = d.model("g1.safetensors", Dtype::F32, &[("w", &[0.0, 0.0])]);
    let a = d.model("a.safetensors", Dtype::F32, &[("w", &[2.0, -2.0])]);
    let ups = [update(&a, UpdateMeta::new("a", 1))];
    let cfg = "[[stages]]\nkind = \"fedavgm\"\nlearning_rate = 0.5\nmomentum = 0.9";
    let s1 = d.path("state1.safetensors");
    let (o, m) = run_with_state(&d, &ups, Some(&g1), cfg, None, Some(&s1), 1).unwrap();
    // Δ = [2, −2]; m = Δ; x = 0 + 0.5·m = [1, −1]
    assert_close(&m["w"].values, &[1.0, -1.0], 1e-6);
    assert_eq!(o.measurements.stages["fedavgm"]["step"], 1);
    // Round 2 from x = [1, −1], same client model: Δ = [1, −1];
    // m = 0.9·[2, −2] + [1, −1] = [2.8, −2.8]; x = [1, −1] + 0.5·m = [2.4, −2.4]
    let g2 = d.path("out-1.safetensors");
    let s2 = d.path("state2.safetensors");
    let (o, m) = run_with_state(&d, &ups, Some(&g2), cfg, Some(&s1), Some(&s2), 2).unwrap();
    assert_close(&m["w"].values, &[2.4, -2.4], 1e-5);
    assert_eq!(o.measurements.stages["fedavgm"]["step"], 2);
    // A state written by another optimizer is refused with a reason.
    let err = run_with_state(
        &d,
        &ups,
        Some(&g2),
        "[[stages]]\nkind = \"fedadam\"",
        Some(&s1),
        Some(&s2),
        3,
    )
    .unwrap_err();
    assert!(err.to_string().contains("written by `fedavgm`"), "{err}");
}

#[test]
fn a_server_optimizer_that_overflows_the_dtype_writes_no_model() {
    // The mean of finite F16 inputs is finite (60000), but FedAvgM with
    // learning rate 2 steps to 120000, past F16's 65504: the model must not
    // be written with an Inf in it.
    let d = Dir::new();
    let g = d.model("g.safetensors", Dtype::F16, &[("w", &[0.0, 1.0])]);
    let a = d.model("a.safetensors", Dtype::F16, &[("w", &[60000.0, 1.0])]);
    let ups = [update(&a, UpdateMeta::new("a", 1))];
    let cfg = "[[stages]]\nkind = \"fedavgm\"\nlearning_rate = 2.0\nmomentum = 0.0";
    let s = d.path("state.safetensors");
    let err = run_with_state(&d, &ups, Some(&g), cfg, None, Some(&s), 1).unwrap_err();
    assert!(matches!(err, AggregateError::NoUsableUpdate(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("`w` element 0 is not finite"), "{msg}");
    assert!(!d.path("out-1.safetensors").exists(), "nothing was written");
    // The same step in F32 is representable and goes through.
    let g = d.model("g32.safetensors", Dtype::F32, &[("w", &[0.0, 1.0])]);
    let a = d.model("a32.safetensors", Dtype::F32, &[("w", &[60000.0, 1.0])]);
    let ups = [update(&a, UpdateMeta::new("a", 1))];
    let (_, m) = run_with_state(&d, &ups, Some(&g), cfg, None, Some(&s), 1).unwrap();
    assert_close(&m["w"].values, &[120000.0, 1.0], 1e-3);
}

#[test]
fn fedadam_through_files_matches_the_formula() {
    let d = Dir::new();
    let g = d.model("g.safetensors", Dtype::F64, &[("w", &[0.0])]);
    let a = d.model("a.safetensors", Dtype::F64, &[("w", &[0.5])]);
    let ups = [update(&a, UpdateMeta::new("a", 1))];
    let s = d.path("s.safetensors");
    let (_, m) = run_with_state(
        &d,
        &ups,
        Some(&g),
        "[[stages]]\nkind = \"fedadam\"\nlearning_rate = 0.1",
        None,
        Some(&s),
        1,
    )
    .unwrap();
    assert_close(&m["w"].values, &[0.1 * 0.05 / 0.051], 1e-12);
    let state = fedstep_core::model::load_dense(&s, &Default::default()).unwrap();
    assert_eq!(state["m.w"].dtype, Dtype::F64);
    assert_close(&state["v.w"].values, &[0.0025], 1e-15);
}

#[test]
fn stages_that_need_a_global_say_so() {
    let d = Dir::new();
    let a = d.model("a.safetensors", Dtype::F32, &[("w", &[1.0])]);
    let err = run(
        &d,
        &[update(&a, UpdateMeta::new("a", 1))],
        None,
        "[[stages]]\nkind = \"clip\"\nmax_norm = 1.0",
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("global model is required"),
        "{err}"
    );
}

#[test]
fn many_blocks_give_the_same_answer_as_one() {
    let d = Dir::new();
    let n = 300_000;
    let va: Vec<f64> = (0..n).map(|i| (i % 97) as f64 * 0.25).collect();
    let vb: Vec<f64> = (0..n).map(|i| -((i % 89) as f64) * 0.5).collect();
    let a = d.model("a.safetensors", Dtype::F32, &[("w", &va)]);
    let b = d.model("b.safetensors", Dtype::F32, &[("w", &vb)]);
    let ups = [
        update(&a, UpdateMeta::new("a", 1)),
        update(&b, UpdateMeta::new("b", 3)),
    ];
    // 1 MiB budget → blocks of ~16k elements.
    let (_, m) = run(&d, &ups, None, "memory_budget_mb = 1").unwrap();
    let expected: Vec<f64> = va
        .iter()
        .zip(&vb)
        .map(|(x, y)| 0.25 * x + 0.75 * y)
        .collect();
    assert_close(&m["w"].values, &expected, 1e-4);
}

#[test]
fn bucketing_averages_groups_before_the_median() {
    let d = Dir::new();
    let ups: Vec<_> = [1.0, 2.0, 3.0, 100.0]
        .iter()
        .enumerate()
        .map(|(i, v)| {
            update(
                &d.model(&format!("u{i}.safetensors"), Dtype::F32, &[("w", &[*v])]),
                UpdateMeta::new(format!("u{i}"), 1),
            )
        })
        .collect();
    let (_, m) = run(&d, &ups, None, "[[stages]]\nkind = \"median\"").unwrap();
    assert_close(&m["w"].values, &[2.5], 1e-6);
    // Two buckets of two: the median of two bucket means is their mean, the
    // overall mean, whichever way the round's shuffle grouped them.
    let (o, m) = run(&d, &ups, None, "[[stages]]\nkind = \"median\"\nbucket = 2").unwrap();
    assert_close(&m["w"].values, &[26.5], 1e-5);
    assert_eq!(o.measurements.stages["median"]["buckets"], 2);
}
