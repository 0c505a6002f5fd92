//! FedSelect end to end over files: the client split, the masked mean in
//! the streaming engine (hand-worked numbers, mixed plain/masked inputs,
//! with clipping, across many blocks), the merge, and every rejection.

use fedstep_core::float::encode_all_f64;
use fedstep_core::measurements::ClientStatus;
use fedstep_core::model::load_dense;
use fedstep_core::personalization::{merge_personal, read_masked, split_update, PersonalFractions};
use fedstep_core::{AggregateError, Limits, UpdateMeta};
use fedstep_test_support::aggregate::*;
use fedstep_test_support::assert_close;
use safetensors::Dtype;

const FEDSELECT: &str = "personalization = \"fedselect\"\n";

type Raw = (String, Dtype, Vec<usize>, Vec<u8>);

fn f32s(name: &str, v: &[f64]) -> Raw {
    (
        name.to_string(),
        Dtype::F32,
        vec![v.len()],
        encode_all_f64(Dtype::F32, v),
    )
}

fn mask(name: &str, m: &[u8]) -> Raw {
    (
        format!("__fedselect_shared__/{name}"),
        Dtype::U8,
        vec![m.len()],
        m.to_vec(),
    )
}

fn step(v: i64) -> Raw {
    ("step".into(), Dtype::I64, vec![1], v.to_le_bytes().to_vec())
}

fn quality(id: &str, n: u64, loss: f64) -> UpdateMeta {
    UpdateMeta::new(id, n)
        .with_type("SpikingEvoTextLM")
        .with_metric("perplexity", loss.exp())
        .with_metric("loss", loss)
}

#[test]
fn masked_mean_over_three_clients_with_quality_weights() {
    let d = Dir::new();
    let g = d.raw(
        "g.safetensors",
        vec![f32s("w", &[0.0, 1.0, 2.0, 3.0]), step(7)],
    );
    // Personal elements carry the global value.
    let a = d.raw(
        "a.safetensors",
        vec![
            f32s("w", &[1.0, 1.0, 4.0, 3.0]),
            mask("w", &[1, 0, 1, 0]),
            step(1),
        ],
    );
    let b = d.raw(
        "b.safetensors",
        vec![
            f32s("w", &[3.0, 5.0, 2.0, 3.0]),
            mask("w", &[1, 1, 0, 0]),
            step(2),
        ],
    );
    let c = d.raw(
        "c.safetensors",
        vec![
            f32s("w", &[5.0, 9.0, 2.0, 3.0]),
            mask("w", &[1, 1, 0, 0]),
            step(3),
        ],
    );
    // Quality 1/(1+loss): a 100 × 0.5 = 50, b 30 × 1, c 20 × 1 → 0.5, 0.3, 0.2.
    let ups = [
        update(&a, quality("a", 100, 1.0)),
        update(&b, quality("b", 30, 0.0)),
        update(&c, quality("c", 20, 0.0)),
    ];
    let cfg = format!("{FEDSELECT}weighting = \"quality\"\nllm_type = \"auto\"");
    let (o, m) = run(&d, &ups, Some(&g), &cfg).unwrap();
    // element 0, all share:   0.5·1 + 0.3·3 + 0.2·5              = 2.4
    // element 1, b and c:     1 + (0.3·(5−1) + 0.2·(9−1)) / 0.5  = 6.6
    // element 2, a alone:     2 + 0.5·(4−2) / 0.5                = 4
    // element 3, nobody:      the global value                    = 3
    assert_close(&m["w"].values, &[2.4, 6.6, 4.0, 3.0], 1e-6);
    assert_eq!(m["step"].raw, 7i64.to_le_bytes().to_vec());
    let w: Vec<f64> = o
        .measurements
        .clients
        .iter()
        .map(|c| c.weight.unwrap())
        .collect();
    assert_close(&w, &[0.5, 0.3, 0.2], 1e-12);
    let fs = &o.measurements.stages["fedselect"];
    assert_eq!(fs["float_elements"], 4);
    assert_eq!(fs["shared_by_nobody"], 1);
    for id in ["a", "b", "c"] {
        assert_eq!(fs["shared_fraction"][id], 0.5, "{fs}");
    }
    assert_eq!(
        o.measurements.passes, 1,
        "the masked mean reads every input once"
    );
}

#[test]
fn a_plain_client_shares_every_element() {
    let d = Dir::new();
    let g = d.raw("g.safetensors", vec![f32s("w", &[0.0, 0.0])]);
    let a = d.raw(
        "a.safetensors",
        vec![f32s("w", &[2.0, 0.0]), mask("w", &[1, 0])],
    );
    let b = d.raw("b.safetensors", vec![f32s("w", &[4.0, 6.0])]);
    let ups = [
        update(&a, UpdateMeta::new("a", 40)),
        update(&b, UpdateMeta::new("b", 60)),
    ];
    let (o, m) = run(&d, &ups, Some(&g), FEDSELECT).unwrap();
    // element 0: 0.4·2 + 0.6·4 = 3.2; element 1: b alone = 6.
    assert_close(&m["w"].values, &[3.2, 6.0], 1e-6);
    assert_eq!(o.measurements.accepted, 2);
    assert_eq!(
        o.measurements.stages["fedselect"]["shared_fraction"]["b"],
        1.0
    );
}

#[test]
fn without_masks_it_is_plain_fedavg() {
    let d = Dir::new();
    let vals = |k: f64| -> Vec<f64> { (0..37).map(|j| (j as f64 * 0.37 + k).sin()).collect() };
    let g = d.raw("g.safetensors", vec![f32s("w", &vals(0.0)), step(1)]);
    let ups: Vec<_> = (1..=3)
        .map(|k| {
            let p = d.raw(
                &format!("u{k}.safetensors"),
                vec![f32s("w", &vals(k as f64)), step(k)],
            );
            update(&p, UpdateMeta::new(format!("c{k}"), 10 * k as u64))
        })
        .collect();
    let (_, plain) = run(&d, &ups, Some(&g), "").unwrap();
    let (_, masked) = run(&d, &ups, Some(&g), FEDSELECT).unwrap();
    assert_close(&masked["w"].values, &plain["w"].values, 1e-6);
}

#[test]
fn clipping_measures_only_what_is_shared() {
    let d = Dir::new();
    let g = d.raw("g.safetensors", vec![f32s("w", &[0.0, 0.0, 0.0])]);
    // a's update is (3, 0, 4): norm 5, clipped to 1 (scale 0.2). Its
    // personal element holds the global value, so it adds nothing.
    let a = d.raw(
        "a.safetensors",
        vec![f32s("w", &[3.0, 0.0, 4.0]), mask("w", &[1, 0, 1])],
    );
    let b = d.raw("b.safetensors", vec![f32s("w", &[0.0, 1.0, 0.0])]);
    let ups = [
        update(&a, UpdateMeta::new("a", 1)),
        update(&b, UpdateMeta::new("b", 1)),
    ];
    let cfg =
        format!("{FEDSELECT}weighting = \"uniform\"\n[[stages]]\nkind = \"clip\"\nmax_norm = 1.0");
    let (o, m) = run(&d, &ups, Some(&g), &cfg).unwrap();
    // 0: 0.5·0.2·3 / 1 = 0.3; 1: b alone 0.5·1 / 0.5 = 1; 2: 0.5·0.2·4 = 0.4
    assert_close(&m["w"].values, &[0.3, 1.0, 0.4], 1e-6);
    assert_close(
        &[o.measurements.clients[0].update_norm.unwrap()],
        &[5.0],
        1e-6,
    );
    assert_close(&[o.measurements.clients[0].scale.unwrap()], &[0.2], 1e-9);
}

#[test]
fn masks_stay_aligned_across_many_blocks() {
    let d = Dir::new();
    let n = 70_001;
    let gv: Vec<f64> = (0..n).map(|j| (j % 13) as f64 * 0.25).collect();
    let mut ups = Vec::new();
    let mut expect_num = vec![0.0; n];
    let mut expect_den = vec![0.0; n];
    let weights = [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0];
    for (k, &wk) in weights.iter().enumerate() {
        let m: Vec<u8> = (0..n)
            .map(|j| u8::from((j * (2 * k + 3)) % 13 < 7))
            .collect();
        let x: Vec<f64> = (0..n)
            .map(|j| {
                if m[j] == 1 {
                    gv[j] + (j % 5) as f64 + k as f64
                } else {
                    gv[j]
                }
            })
            .collect();
        for j in 0..n {
            if m[j] == 1 {
                expect_num[j] += wk * (x[j] - gv[j]);
                expect_den[j] += wk;
            }
        }
        let p = d.raw(
            &format!("u{k}.safetensors"),
            vec![f32s("w", &x), mask("w", &m)],
        );
        ups.push(update(&p, UpdateMeta::new(format!("c{k}"), k as u64 + 1)));
    }
    let g = d.raw("g.safetensors", vec![f32s("w", &gv)]);
    // 1 MB over 4 buffers of F32 plus accumulators: ~16K elements a block.
    let cfg = format!("{FEDSELECT}memory_budget_mb = 1");
    let (o, m) = run(&d, &ups, Some(&g), &cfg).unwrap();
    let want: Vec<f64> = (0..n)
        .map(|j| {
            if expect_den[j] > 0.0 {
                gv[j] + expect_num[j] / expect_den[j]
            } else {
                gv[j]
            }
        })
        .collect();
    assert_close(&m["w"].values, &want, 1e-4);
    let nobody = expect_den.iter().filter(|&&v| v == 0.0).count();
    assert!(
        nobody > 0,
        "the pattern should leave some elements unshared"
    );
    assert_eq!(
        o.measurements.stages["fedselect"]["shared_by_nobody"],
        nobody
    );
}

#[test]
fn every_bad_mask_rejects_its_client_with_the_tensor_and_the_rule() {
    let cases: Vec<(Vec<Raw>, &str)> = vec![
        (
            vec![f32s("w", &[1.0, 1.0]), mask("v", &[1, 1])],
            "stray mask `__fedselect_shared__/v`",
        ),
        (
            vec![
                f32s("w", &[1.0, 1.0]),
                (
                    "__fedselect_shared__/w".into(),
                    Dtype::F32,
                    vec![2],
                    encode_all_f64(Dtype::F32, &[1.0, 1.0]),
                ),
            ],
            "has dtype F32: masks are U8",
        ),
        (
            vec![f32s("w", &[1.0, 1.0]), mask("w", &[1, 1, 1])],
            "shape [3], its tensor `w` has [2]",
        ),
        (
            vec![f32s("w", &[1.0, 1.0]), step(1), mask("step", &[1])],
            "only float tensors",
        ),
        (
            vec![f32s("w", &[1.0, 1.0]), mask("w", &[1, 2])],
            "`__fedselect_shared__/w` holds 2 at element 1",
        ),
        (
            vec![f32s("w", &[1.0, 5.0]), mask("w", &[1, 0])],
            "`w` element 1 is personal (mask 0) but holds 5",
        ),
    ];
    for (tensors, want) in cases {
        let d = Dir::new();
        let with_step = tensors.iter().any(|t| t.0 == "step");
        let mut gt = vec![f32s("w", &[0.0, 0.0])];
        let mut good = vec![f32s("w", &[2.0, 2.0])];
        if with_step {
            gt.push(step(0));
            good.push(step(0));
        }
        let g = d.raw("g.safetensors", gt);
        let ok = d.raw("ok.safetensors", good);
        let bad = d.raw("bad.safetensors", tensors);
        let ups = [
            update(&ok, UpdateMeta::new("ok", 1)),
            update(&bad, UpdateMeta::new("bad", 1)),
        ];
        let (o, m) = run(&d, &ups, Some(&g), FEDSELECT).unwrap();
        let rec = &o.measurements.clients[1];
        assert_eq!(rec.status, ClientStatus::Rejected, "{want}");
        let reason = rec.reason.as_deref().unwrap();
        assert!(
            reason.contains(want) && reason.contains("bad.safetensors"),
            "{want}: {reason}"
        );
        assert_close(&m["w"].values, &[2.0, 2.0], 1e-6);
    }
}

#[test]
fn masks_are_refused_without_fedselect_and_fedselect_needs_a_global() {
    let d = Dir::new();
    let g = d.raw("g.safetensors", vec![f32s("w", &[0.0])]);
    let a = d.raw("a.safetensors", vec![f32s("w", &[1.0]), mask("w", &[1])]);
    let b = d.raw("b.safetensors", vec![f32s("w", &[3.0])]);
    let ups = [
        update(&a, UpdateMeta::new("a", 1)),
        update(&b, UpdateMeta::new("b", 1)),
    ];
    let (o, m) = run(&d, &ups, Some(&g), "").unwrap();
    let reason = o.measurements.clients[0].reason.as_deref().unwrap();
    assert!(
        reason.contains("`__fedselect_shared__/w` is not in the reference"),
        "{reason}"
    );
    assert_close(&m["w"].values, &[3.0], 1e-6);
    match run(&d, &ups, None, FEDSELECT) {
        Err(AggregateError::Config(e)) => {
            assert!(e.contains("fedselect") && e.contains("global"), "{e}")
        }
        other => panic!("expected a config error, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn split_then_merge_keeps_personal_values_and_takes_the_rest_from_the_global() {
    let d = Dir::new();
    let lim = Limits::default();
    let g1 = d.raw(
        "g1.safetensors",
        vec![f32s("w", &[0.0; 5]), f32s("b", &[1.0]), step(1)],
    );
    let local = d.raw(
        "local.safetensors",
        vec![
            f32s("w", &[0.1, -3.0, 0.5, 2.0, -0.2]),
            f32s("b", &[5.0]),
            step(2),
        ],
    );
    let (up, keep) = (d.path("up.safetensors"), d.path("keep.safetensors"));
    let s = split_update(&g1, &local, &uniform(0.4), None, &up, &keep, &lim).unwrap();
    // w: floor(0.4 × 5) = 2 personal, the largest |Δ|: elements 1 and 3;
    // b: floor(0.4 × 1) = 0.
    assert_eq!((s.float_elements, s.personal_elements), (6, 2));
    let u = read_masked(&up, &lim).unwrap();
    assert_eq!(u.masks["w"], vec![1, 0, 1, 0, 1]);
    assert_eq!(u.masks["b"], vec![1]);
    assert_close(&u.tensors["w"].values, &[0.1, 0.0, 0.5, 0.0, -0.2], 1e-7);
    assert_close(&u.tensors["b"].values, &[5.0], 0.0);
    let k = read_masked(&keep, &lim).unwrap();
    assert_close(&k.tensors["w"].values, &[0.0, -3.0, 0.0, 2.0, 0.0], 1e-7);

    // The upload is what the server accepts.
    let (_, agg) = run(
        &d,
        &[update(&up, UpdateMeta::new("me", 3))],
        Some(&g1),
        FEDSELECT,
    )
    .unwrap();
    assert_close(&agg["w"].values, &[0.1, 0.0, 0.5, 0.0, -0.2], 1e-7);

    // Next round: the new global, the personal values put back.
    let g2 = d.raw(
        "g2.safetensors",
        vec![f32s("w", &[1.0; 5]), f32s("b", &[2.0]), step(9)],
    );
    let merged = d.path("merged.safetensors");
    let ms = merge_personal(&g2, &keep, &merged, &lim).unwrap();
    assert_eq!(ms.personal_elements, 2);
    let mm = load_dense(&merged, &lim).unwrap();
    assert_close(&mm["w"].values, &[1.0, -3.0, 1.0, 2.0, 1.0], 1e-7);
    assert_close(&mm["b"].values, &[2.0], 0.0);
    assert_eq!(mm["step"].raw, 9i64.to_le_bytes().to_vec());
    assert_eq!(mm.len(), 3, "a merged model carries no masks");

    // The personal set only grows: with 0.6 (3 of 5), elements 1 and 3
    // stay and the largest remaining |local − global| joins: element 0
    // (|0.1 − 1| = 0.9 against 0.5 and 0).
    let local2 = d.raw(
        "local2.safetensors",
        vec![
            f32s("w", &[0.1, -3.0, 0.5, 2.0, 1.0]),
            f32s("b", &[2.0]),
            step(2),
        ],
    );
    let (up2, keep2) = (d.path("up2.safetensors"), d.path("keep2.safetensors"));
    split_update(&g2, &local2, &uniform(0.6), Some(&keep), &up2, &keep2, &lim).unwrap();
    assert_eq!(
        read_masked(&up2, &lim).unwrap().masks["w"],
        vec![0, 0, 1, 0, 1]
    );
}

#[test]
fn each_tensor_splits_at_its_own_fraction() {
    let d = Dir::new();
    let lim = Limits::default();
    let g = d.raw(
        "g.safetensors",
        vec![f32s("w", &[0.0; 4]), f32s("b", &[0.0; 4]), step(1)],
    );
    let local = d.raw(
        "local.safetensors",
        vec![
            f32s("w", &[4.0, 3.0, 2.0, 1.0]),
            f32s("b", &[1.0, -4.0, 3.0, 2.0]),
            step(2),
        ],
    );
    // w shares everything; b keeps floor(0.5 × 4) = 2 personal: the
    // largest |Δ| (elements 1 and 2).
    let f = PersonalFractions::new(0.0, [("b".to_string(), 0.5)].into()).unwrap();
    let (up, keep) = (d.path("up.safetensors"), d.path("keep.safetensors"));
    let s = split_update(&g, &local, &f, None, &up, &keep, &lim).unwrap();
    assert_eq!((s.float_elements, s.personal_elements), (8, 2));
    let u = read_masked(&up, &lim).unwrap();
    assert_eq!(u.masks["w"], vec![1, 1, 1, 1]);
    assert_eq!(u.masks["b"], vec![1, 0, 0, 1]);
    assert_close(&u.tensors["b"].values, &[1.0, 0.0, 0.0, 2.0], 0.0);
    // An override on a tensor that is not a float tensor names it too.
    let on_int = PersonalFractions::new(0.0, [("step".to_string(), 0.5)].into()).unwrap();
    let err = split_update(&g, &local, &on_int, None, &up, &keep, &lim)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`step`") && err.contains("float tensors: b, w"),
        "{err}"
    );
}

#[test]
fn split_and_merge_refuse_mismatched_files_by_name() {
    let d = Dir::new();
    let lim = Limits::default();
    let g = d.raw("g.safetensors", vec![f32s("w", &[0.0; 3])]);
    let other = d.raw("other.safetensors", vec![f32s("w", &[0.0; 4])]);
    let (up, keep) = (d.path("up.safetensors"), d.path("keep.safetensors"));
    let err = split_update(&g, &other, &uniform(0.2), None, &up, &keep, &lim)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("other.safetensors") && err.contains("`w`"),
        "{err}"
    );
    let typo = PersonalFractions::new(0.2, [("w2".to_string(), 0.5)].into()).unwrap();
    let err = split_update(&g, &g, &typo, None, &up, &keep, &lim)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("g.safetensors") && err.contains("`w2`") && err.contains("float tensors: w"),
        "{err}"
    );
    let bad = d.raw(
        "bad.safetensors",
        vec![f32s("w", &[0.0; 3]), mask("w", &[1, 0, 9])],
    );
    let err = merge_personal(&g, &bad, &d.path("m.safetensors"), &lim)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.safetensors") && err.contains("holds 9"),
        "{err}"
    );
}

fn uniform(fraction: f64) -> PersonalFractions {
    PersonalFractions::uniform(fraction).unwrap()
}
