//! Golden tests: outputs computed independently with numpy
//! (`golden/make_golden.py`, checked in with its outputs) for every
//! weighting, combiner and server optimizer.

use std::path::PathBuf;

use fedstep_core::{UpdateMeta, UpdateSource};
use fedstep_test_support::aggregate::{run, run_with_state, update, Dir};
use fedstep_test_support::assert_close;
use serde_json::Value;

/// The golden directory, its expected.json, and its five updates.
fn golden() -> (PathBuf, Value, Vec<UpdateSource>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
    let g: Value = serde_json::from_str(&text).unwrap();
    let updates = g["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let meta: UpdateMeta = serde_json::from_value(c.clone()).unwrap();
            update(&dir.join(format!("{}.safetensors", meta.client_id)), meta)
        })
        .collect();
    (dir, g, updates)
}

#[test]
fn every_case_matches_numpy() {
    let (dir, g, updates) = golden();
    let cases = g["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 12, "every case is checked");
    for (name, case) in cases {
        let out = Dir::new();
        let global = dir.join("global.safetensors");
        let use_global = case["global"].as_bool().unwrap();
        // Server optimizers start from zero moments and need a state path.
        let state = out.path("state.safetensors");
        let (_, model) = run_with_state(
            &out,
            &updates,
            use_global.then_some(global.as_path()),
            case["config"].as_str().unwrap(),
            None,
            Some(&state),
            1,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        for (tensor, expected) in case["expected"].as_object().unwrap() {
            let expected: Vec<f64> = expected
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            eprintln!("{name}/{tensor}");
            assert_close(&model[tensor].values, &expected, 1e-9);
        }
    }
}

#[test]
fn krum_chooses_what_numpy_chose() {
    let (_, g, updates) = golden();
    let out = Dir::new();
    let (o, _) = run(
        &out,
        &updates,
        None,
        "[[stages]]\nkind = \"krum\"\nbyzantine = 1\nselect = 2",
    )
    .unwrap();
    let chosen: Vec<u64> = o.measurements.stages["krum"]["selected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let want: Vec<u64> = g["krum_chosen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(chosen, want);
}
