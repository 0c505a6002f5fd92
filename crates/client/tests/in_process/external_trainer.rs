//! The external-trainer contract, end to end through the client loop:
//! `examples/external_trainer.py` (Python + numpy) trains on the digits and
//! its model and report pass the client's checks. Python is taken from
//! FEDSTEP_PYTHON (default `python3`); without numpy the test is skipped,
//! except under CI=true, where that is a failure.

use crate::common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use fedstep_client::external_trainer::ExternalTrainer;
use fedstep_client::{Outcome, TrainRequest, Trainer, Worker};
use fedstep_cloud::keys;
use fedstep_core::model;
use fedstep_core::Limits;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The interpreter to use, or `None` to skip.
fn python_with_numpy() -> Option<String> {
    let python = std::env::var("FEDSTEP_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Some(python);
    }
    let why =
        format!("`{python} -c 'import numpy'` failed; set FEDSTEP_PYTHON to a Python with numpy");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{why}");
    }
    eprintln!("skipping: {why}");
    None
}

#[tokio::test]
async fn the_python_example_trains_through_the_client_loop() {
    let Some(python) = python_with_numpy() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let (queue, store, ledger) = (MemQueue::new(), DirStore::new(&store_dir), MemLedger::new());
    let script = repo().join("examples/external_trainer.py");
    let trainer = ExternalTrainer::new(
        vec![
            python,
            script.display().to_string(),
            "--classes".into(),
            "1,2,3".into(),
            "--seed".into(),
            "1".into(),
        ],
        Some(Duration::from_secs(120)),
    );
    let worker = Worker::new(
        options(&dir.path().join("work")),
        queue.clone(),
        store.clone(),
        ledger.clone(),
        Arc::new(trainer),
    )
    .with_clock(Arc::new(FixedClock(NOW)));
    let global = global_model();
    // Ten local epochs: enough for a clear improvement, still under a second.
    let body = announce(&store, "j1", 1, &global);
    queue.send(body.replace("\"local_epochs\":1", "\"local_epochs\":10"));

    let out = worker.poll_once().await.unwrap();
    assert!(matches!(out[..], [Outcome::Submitted { .. }]), "{out:?}");
    let rows = ledger.rows();
    let row = &rows[0];
    // classes 1,2,3 fully (~540) plus 5% of the other ~1250.
    let n = row.num_examples.as_u64().unwrap();
    assert!((540..800).contains(&n), "{n}");
    assert!(row.metrics["accuracy"].as_f64().unwrap() > 0.6, "{row:?}");
    assert_eq!(row.llm_type, None);

    // The uploaded file is a proper safetensors model with the global
    // model's layout, and training moved the weights.
    let uploaded = store.get_bytes(&keys::update("j1", 1, "site-a")).unwrap();
    assert_ne!(uploaded, global);
    let limits = Limits::default();
    let a = model::header_from_bytes(&global, &limits).unwrap();
    let b = model::header_from_bytes(&uploaded, &limits).unwrap();
    model::check_compatible(&a, &b).unwrap();
    // The Rust trainer reads it with the same layout convention: on the
    // client's own digits the Python update is clearly better than the
    // global model it started from (a transposed or shuffled layout would
    // not be).
    let data = fedstep_trainer::bundled_digits().unwrap();
    let own: Vec<usize> = (0..data.len())
        .filter(|&i| matches!(data.labels()[i], 1..=3))
        .collect();
    let own = data.subset(&own).unwrap();
    let before = fedstep_trainer::evaluate(&global, &own).unwrap();
    let after = fedstep_trainer::evaluate(&uploaded, &own).unwrap();
    assert!(after.loss < before.loss, "{before:?} -> {after:?}");
    assert!(
        after.accuracy > 0.7 && after.accuracy > before.accuracy + 0.15,
        "{before:?} -> {after:?}"
    );
}

fn request(dir: &std::path::Path) -> TrainRequest {
    let global = dir.join("global.safetensors");
    std::fs::write(&global, global_model()).unwrap();
    TrainRequest {
        job_id: "j1".into(),
        round: 3,
        global_model: global,
        output_model: dir.join("out.safetensors"),
        metrics_out: dir.join("metrics.json"),
        round_config: serde_json::json!({"k": 1}).as_object().unwrap().clone(),
        scaffold: None,
    }
}

fn sh(script: &str) -> ExternalTrainer {
    ExternalTrainer::new(
        vec!["sh".into(), "-c".into(), script.into()],
        Some(Duration::from_secs(10)),
    )
}

#[tokio::test]
async fn the_contract_env_is_set_and_bad_output_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let ok = sh(r#"cp "$FEDSTEP_GLOBAL_MODEL" "$FEDSTEP_OUTPUT_MODEL" &&
        printf '{"num_examples": %s, "llm_type": "SpikingEvoTextLM", "metrics": {"round": %s}, "llm_type": null}' \
          "$(printf %s "$FEDSTEP_ROUND_CONFIG" | wc -c)" "$FEDSTEP_ROUND" > "$FEDSTEP_METRICS_OUT""#);
    // Duplicate keys are refused (strict JSON contract).
    let err = ok.train(request(dir.path())).await.unwrap_err();
    assert!(
        err.0.contains("metrics.json") && err.0.contains("duplicate"),
        "{err}"
    );

    let ok = sh(r#"cp "$FEDSTEP_GLOBAL_MODEL" "$FEDSTEP_OUTPUT_MODEL" &&
        printf '{"num_examples": %s, "metrics": {"round": %s}}' \
          "$(printf %s "$FEDSTEP_ROUND_CONFIG" | wc -c)" "$FEDSTEP_ROUND" > "$FEDSTEP_METRICS_OUT""#);
    let report = ok.train(request(dir.path())).await.unwrap();
    assert_eq!(report.num_examples, r#"{"k":1}"#.len() as u64);
    assert_eq!(report.metrics["round"], 3.0);

    for (script, want) in [
        ("exit 3", "failed: exit status: 3"),
        ("true", "wrote no model"),
        (
            r#"cp "$FEDSTEP_GLOBAL_MODEL" "$FEDSTEP_OUTPUT_MODEL""#,
            "metrics.json",
        ),
        (
            r#"cp "$FEDSTEP_GLOBAL_MODEL" "$FEDSTEP_OUTPUT_MODEL"; echo '{"num_examples": "many"}' > "$FEDSTEP_METRICS_OUT""#,
            "metrics.json",
        ),
        ("sleep 30", "did not finish"),
    ] {
        let t = if want == "did not finish" {
            ExternalTrainer::new(
                vec!["sh".into(), "-c".into(), script.into()],
                Some(Duration::from_millis(200)),
            )
        } else {
            sh(script)
        };
        let _ = std::fs::remove_file(dir.path().join("out.safetensors"));
        let _ = std::fs::remove_file(dir.path().join("metrics.json"));
        let err = t.train(request(dir.path())).await.unwrap_err();
        assert!(err.0.contains(want), "{script}: {err}");
    }
    let err = ExternalTrainer::new(vec!["/nonexistent/trainer".into()], None)
        .train(request(dir.path()))
        .await
        .unwrap_err();
    assert!(
        err.0.contains("cannot start `/nonexistent/trainer`"),
        "{err}"
    );
}
