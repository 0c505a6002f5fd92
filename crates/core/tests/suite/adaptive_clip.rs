//! Adaptive clipping across rounds: C is carried from one round's
//! `state_out` to the next round's `state_in` and moves toward the target
//! quantile of the update norms; state files are checked like the
//! optimizers'.

use std::path::{Path, PathBuf};

use fedstep_core::{UpdateMeta, UpdateSource};
use fedstep_test_support::aggregate::{run, run_with_state, update, Dir};
use safetensors::Dtype;

/// A zero global model and ten updates of norms 1, 2, …, 10.
fn ten_norms(d: &Dir) -> (PathBuf, Vec<UpdateSource>) {
    let g = d.model("g.safetensors", Dtype::F64, &[("w", &[0.0, 0.0])]);
    let ups = (1..=10)
        .map(|i| {
            let p = d.model(
                &format!("u{i}.safetensors"),
                Dtype::F64,
                &[("w", &[i as f64, 0.0])],
            );
            update(&p, UpdateMeta::new(format!("u{i}"), 1))
        })
        .collect();
    (g, ups)
}

/// Runs `rounds` rounds, each reading the previous round's state; returns
/// each round's (C used, next C).
fn rounds(d: &Dir, g: &Path, ups: &[UpdateSource], cfg: &str, rounds: u64) -> Vec<(f64, f64)> {
    let mut seen = Vec::new();
    let mut state_in: Option<PathBuf> = None;
    for r in 1..=rounds {
        let state_out = d.path(&format!("state-{r}.safetensors"));
        let (o, _) = run_with_state(
            d,
            ups,
            Some(g),
            cfg,
            state_in.as_deref(),
            Some(&state_out),
            r,
        )
        .unwrap();
        let m = &o.measurements.stages["adaptive_clip"];
        seen.push((
            m["norm"].as_f64().unwrap(),
            m["next_norm"].as_f64().unwrap(),
        ));
        state_in = Some(state_out);
    }
    seen
}

#[test]
fn the_norm_converges_to_the_median_of_the_update_norms() {
    let d = Dir::new();
    let (g, ups) = ten_norms(&d);
    // From below and from above: with norms 1..10 and γ = 0.5, b̄ = 0.5
    // (no change) exactly for C in [5, 6).
    for initial in [1.0, 40.0] {
        let cfg = format!("[[stages]]\nkind = \"adaptive_clip\"\ninitial_norm = {initial}");
        let seen = rounds(&d, &g, &ups, &cfg, 60);
        assert_eq!(seen[0].0, initial, "the first round uses initial_norm");
        for w in seen.windows(2) {
            assert_eq!(w[1].0, w[0].1, "each round uses the C the last one stored");
        }
        let last = seen.last().unwrap().0;
        assert!((5.0..6.0).contains(&last), "from {initial}: C = {last}");
    }
}

#[test]
fn a_quantile_other_than_the_median_is_followed() {
    let d = Dir::new();
    let (g, ups) = ten_norms(&d);
    let cfg = "[[stages]]\nkind = \"adaptive_clip\"\ninitial_norm = 5.0\ntarget_quantile = 0.9\nlearning_rate = 0.5";
    let last = rounds(&d, &g, &ups, cfg, 60).last().unwrap().0;
    // b̄ = 0.9 for C in [9, 10).
    assert!((9.0..10.0).contains(&last), "C = {last}");
}

#[test]
fn clipping_and_measurements_follow_the_round_norm() {
    let d = Dir::new();
    let (g, ups) = ten_norms(&d);
    let cfg = "[[stages]]\nkind = \"adaptive_clip\"\ninitial_norm = 4.0\n\
               [[stages]]\nkind = \"dp_noise\"\nnoise_multiplier = 0.0";
    let state = d.path("state.safetensors");
    let (o, m) = run_with_state(&d, &ups, Some(&g), cfg, None, Some(&state), 1).unwrap();
    let stage = &o.measurements.stages["adaptive_clip"];
    assert_eq!(stage["norm"], 4.0);
    assert_eq!(stage["unclipped_fraction"], 0.4);
    assert_eq!(stage["clipped_count"], 6);
    // C ← 4 · exp(−0.2 · (0.4 − 0.5))
    assert_eq!(stage["next_norm"], 4.0 * 0.02f64.exp());
    // dp_noise counts it as the clip and calibrates to this round's C.
    assert_eq!(o.measurements.stages["dp_noise"]["clip_norm"], 4.0);
    // Mean of min(i, 4) over i = 1..10: (1 + 2 + 3 + 4·7) / 10.
    assert!((m["w"].values[0] - 3.4).abs() < 1e-12);
    let clipped = o
        .measurements
        .clients
        .iter()
        .filter(|c| c.scale.is_some_and(|s| s < 1.0));
    assert_eq!(clipped.count(), 6);
}

#[test]
fn state_files_are_checked_like_the_optimizers() {
    let d = Dir::new();
    let (g, ups) = ten_norms(&d);
    let cfg = "[[stages]]\nkind = \"adaptive_clip\"\ninitial_norm = 2.0";
    // Stateful: a state target is required.
    let err = run(&d, &ups, Some(&g), cfg).unwrap_err();
    assert!(
        err.to_string()
            .contains("needs a path to write its state to"),
        "{err}"
    );
    // A state file of another pipeline (an optimizer's) is refused, naming
    // what is missing.
    let optimizer_state = d.path("fedavgm.safetensors");
    run_with_state(
        &d,
        &ups,
        Some(&g),
        "[[stages]]\nkind = \"fedavgm\"",
        None,
        Some(&optimizer_state),
        1,
    )
    .unwrap();
    let out = d.path("out-state.safetensors");
    let err = run_with_state(
        &d,
        &ups,
        Some(&g),
        cfg,
        Some(&optimizer_state),
        Some(&out),
        2,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("fedstep.adaptive_clip.norm"),
        "{err}"
    );
    // Not a model at all.
    let junk = d.bytes("junk.safetensors", b"not a model");
    assert!(run_with_state(&d, &ups, Some(&g), cfg, Some(&junk), Some(&out), 2).is_err());
}

#[test]
fn keeps_state_next_to_a_server_optimizer() {
    let d = Dir::new();
    let (g, ups) = ten_norms(&d);
    let cfg = "[[stages]]\nkind = \"adaptive_clip\"\ninitial_norm = 2.0\n\
               [[stages]]\nkind = \"fedavgm\"\nlearning_rate = 1.0\nmomentum = 0.5";
    let s1 = d.path("s1.safetensors");
    let (o1, _) = run_with_state(&d, &ups, Some(&g), cfg, None, Some(&s1), 1).unwrap();
    let s2 = d.path("s2.safetensors");
    let (o2, _) = run_with_state(&d, &ups, Some(&g), cfg, Some(&s1), Some(&s2), 2).unwrap();
    assert_eq!(o2.measurements.stages["fedavgm"]["step"], 2);
    assert_eq!(
        o2.measurements.stages["adaptive_clip"]["norm"],
        o1.measurements.stages["adaptive_clip"]["next_norm"]
    );
    // Either stage alone reading the combined file finds what it needs.
    let s3 = d.path("s3.safetensors");
    run_with_state(
        &d,
        &ups,
        Some(&g),
        "[[stages]]\nkind = \"fedavgm\"\nmomentum = 0.5",
        Some(&s2),
        Some(&s3),
        3,
    )
    .unwrap();
}
