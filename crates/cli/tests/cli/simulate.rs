//! `fedstep simulate` end to end: a short run on the bundled digits through
//! the round engine and local adapters; report.json has the documented
//! shape and the federation learns.

use std::process::Command;

use serde_json::Value;

fn fedstep() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fedstep"))
}

#[test]
fn simulate_writes_a_report_and_learns() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let output = fedstep()
        .args(["simulate", "--rounds", "3", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("report.json"), "{stdout}");
    assert!(out.join("accuracy.svg").is_file());
    let svg = std::fs::read_to_string(out.join("accuracy.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("federated"), "{svg}");

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    for (i, r) in rounds.iter().enumerate() {
        assert_eq!(r["round"], i as u64 + 1);
        let acc = r["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
        assert!(r["loss"].as_f64().unwrap().is_finite());
        assert_eq!(r["accepted"].as_array().unwrap().len(), 3, "{r}");
        assert!(r["rejected"].as_object().unwrap().is_empty(), "{r}");
        let clients = r["clients"].as_array().unwrap();
        assert_eq!(clients.len(), 3);
        for c in clients {
            assert!(c["num_examples"].as_u64().unwrap() > 0, "{c}");
            assert!(c["metrics"]["loss"].as_f64().is_some(), "{c}");
            assert!(c["metrics"]["accuracy"].as_f64().is_some(), "{c}");
            assert_eq!(c["status"], "accepted", "{c}");
        }
    }
    let first = rounds[0]["accuracy"].as_f64().unwrap();
    let last = rounds[2]["accuracy"].as_f64().unwrap();
    assert!(last > first, "accuracy went from {first} to {last}");

    let f = &report["final"];
    for key in [
        "federated_accuracy",
        "single_agent_accuracy",
        "centralized_accuracy",
    ] {
        let v = f[key]
            .as_f64()
            .unwrap_or_else(|| panic!("final.{key}: {f}"));
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
    }
    assert_eq!(f["federated_accuracy"], rounds[2]["accuracy"]);
    assert_eq!(report["config"]["rounds"], 3);
    assert_eq!(report["dataset"]["clients"].as_array().unwrap().len(), 3);

    // A second run into the same directory is refused, not mixed in.
    let again = fedstep()
        .args(["simulate", "--rounds", "1", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!again.status.success());
}

#[test]
fn bad_flags_fail_with_a_clear_message() {
    for (flags, want) in [
        (&["--classes", "1,2,3;4,x"][..], "`x` in group 2"),
        (
            &["--clients", "4", "--classes", "1;2;3"][..],
            "--clients 4 but --classes gives 3 groups",
        ),
        (
            &["--def-prob", "2"][..],
            "--def-prob must be a probability in [0, 1]",
        ),
        (
            &["--classes", "1,2;12"][..],
            "class 12 of client 2 does not exist",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let output = fedstep()
            .arg("simulate")
            .args(flags)
            .arg("--out")
            .arg(dir.path().join("run"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{flags:?}");
        assert!(stderr.contains(want), "{flags:?}: {stderr}");
    }
}

#[test]
fn fedselect_reports_global_personalized_and_local_accuracy_per_client() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let output = fedstep()
        .args([
            "simulate",
            "--rounds",
            "3",
            "--personalization",
            "fedselect",
            "--personal-fraction",
            "0.2",
            "--personal-ramp",
            "2",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("personalized"), "{stdout}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let p = &report["personalization"];
    let clients = p["clients"].as_array().unwrap_or_else(|| panic!("{p}"));
    assert_eq!(clients.len(), 3);
    for key in ["global_accuracy", "personalized_accuracy", "local_accuracy"] {
        let mean = p[key].as_f64().unwrap_or_else(|| panic!("{key}: {p}"));
        assert!((0.0..=1.0).contains(&mean), "{key} = {mean}");
        let per: Vec<f64> = clients.iter().map(|c| c[key].as_f64().unwrap()).collect();
        assert!(
            (per.iter().sum::<f64>() / 3.0 - mean).abs() < 1e-9,
            "{key}: {per:?} vs {mean}"
        );
        assert!(
            per.iter().all(|a| (0.0..=1.0).contains(a)),
            "{key}: {per:?}"
        );
    }
    // Personalized and local-only models know their own classes after three
    // rounds (the global one need not: see the FedSelect notes in
    // scripts/simulate-targets.sh).
    for key in ["personalized_accuracy", "local_accuracy"] {
        let mean = p[key].as_f64().unwrap();
        assert!(mean > 0.5, "{key} = {mean}: {p}");
    }
    for c in clients {
        assert!(c["test_examples"].as_u64().unwrap() > 0, "{c}");
    }
    assert_eq!(report["aggregation"]["personalization"], "fedselect");
    // Every update was accepted (the masks passed the server's checks),
    // and the personal share followed the ramp: 0.1 in round 1, 0.2 after.
    let rounds = report["rounds"].as_array().unwrap();
    for (r, want) in rounds.iter().zip([0.1, 0.2, 0.2]) {
        assert_eq!(r["accepted"].as_array().unwrap().len(), 3, "{r}");
        for c in r["clients"].as_array().unwrap() {
            let got = c["metrics"]["personal_fraction"].as_f64().unwrap();
            // floor() per tensor keeps it at or a little under the target.
            assert!(got <= want && got > want - 0.01, "{got} vs {want}: {c}");
        }
    }
    // Personal files stay with the clients: none went into the store.
    let stored: Vec<_> = walk(&out.join("store"));
    assert!(!stored.is_empty());
    assert!(
        stored
            .iter()
            .all(|p| !p.to_string_lossy().contains("personal")),
        "{stored:?}"
    );
    for c in ["agent-1", "agent-2", "agent-3"] {
        assert!(out
            .join("clients")
            .join(c)
            .join("personal.safetensors")
            .is_file());
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Reads every F32 tensor of a safetensors file as f64 values by name.
fn tensors(path: &std::path::Path) -> std::collections::BTreeMap<String, Vec<f64>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let v = view
                .data()
                .chunks_exact(4)
                .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect();
            (name, v)
        })
        .collect()
}

/// SCAFFOLD end to end in one process: report.json names the algorithm,
/// each round records the server variate's update, and round 3's server
/// variate is recomputed here from round 2's and the Δc_i the clients
/// uploaded (c⁺ = c + (|S|/N)·mean Δc_i, all three clients taking part).
#[test]
fn simulate_scaffold_updates_the_server_variate_from_the_uploaded_deltas() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let output = fedstep()
        .args([
            "simulate",
            "--algorithm",
            "scaffold",
            "--rounds",
            "2",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["final"]["algorithm"], "scaffold");
    assert_eq!(report["config"]["algorithm"], "scaffold");
    for r in report["rounds"].as_array().unwrap() {
        let s = &r["scaffold"];
        assert_eq!(s["used"].as_array().unwrap().len(), 3, "{s}");
        assert_eq!(s["participation"], 1.0, "{s}");
        assert!(s["step_norm"].as_f64().unwrap() > 0.0, "{s}");
    }

    let round = out.join("store/jobs/simulate/rounds");
    let c2 = tensors(&round.join("2/scaffold_variate.safetensors"));
    let c3 = tensors(&round.join("3/scaffold_variate.safetensors"));
    let deltas: Vec<_> = ["agent-1", "agent-2", "agent-3"]
        .iter()
        .map(|id| tensors(&round.join(format!("2/updates/{id}.scaffold_delta.safetensors"))))
        .collect();
    assert_eq!(c2.len(), 4);
    let mut largest = 0f64;
    for (name, c) in &c2 {
        for (k, v) in c.iter().enumerate() {
            let mean = deltas.iter().map(|d| d[name][k]).sum::<f64>() / 3.0;
            let want = v + (3.0 / 3.0) * mean;
            let got = c3[name][k];
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{name}[{k}]: {got} vs {want}"
            );
            largest = largest.max(got.abs());
        }
    }
    assert!(largest > 0.0, "the server variate never moved");
    // Each client kept its own variate, private, in its work directory.
    for id in ["agent-1", "agent-2", "agent-3"] {
        assert!(out
            .join(format!("clients/{id}/scaffold_variate.safetensors"))
            .is_file());
    }

    // FedProx: the report names it and its μ.
    let prox = dir.path().join("prox");
    let output = fedstep()
        .args([
            "simulate",
            "--algorithm",
            "fedprox",
            "--mu",
            "0.5",
            "--rounds",
            "1",
            "--out",
        ])
        .arg(&prox)
        .output()
        .unwrap();
    assert!(output.status.success());
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(prox.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["final"]["algorithm"], "fedprox");
    assert_eq!(report["final"]["mu"], 0.5);
}

/// --mode async (issue #17) end to end in one process: the async run's
/// versions sit on the simulated clock inside the sync run's time, the
/// slow client's updates arrive stale, and one version with a stale update
/// is recomputed here from the stored files: g_{r+1} = g_r + Σ wᵢ·s(τᵢ)·
/// (xᵢ − g_{r−τᵢ}), with the weights the round's measurements recorded and
/// s(τ) = 1/(1+τ)^0.5.
#[test]
fn simulate_async_rebases_stale_updates_on_a_simulated_clock() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let output = fedstep()
        .args([
            "simulate",
            "--mode",
            "async",
            "--rounds",
            "3",
            "--client-speeds",
            "1,1,4",
            "--buffer-size",
            "2",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let a = &report["async"];
    assert_eq!(a["simulated_seconds"], 12.0, "{a}");
    let sync: Vec<f64> = a["sync"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_f64().unwrap())
        .collect();
    assert_eq!(sync, [4.0, 8.0, 12.0]);
    for key in [
        "sync_time_to_target",
        "async_time_to_target",
        "sync_final_accuracy",
        "async_final_accuracy",
    ] {
        assert!(a.get(key).is_some(), "{key} missing: {a}");
    }
    assert!(out.join("async.svg").is_file());
    // The same chart is on the report page, inline, with both runs.
    let page = std::fs::read_to_string(out.join("report.html")).unwrap();
    let at = page
        .find("sync vs async (K = 2)")
        .expect("the report page shows accuracy against simulated time");
    let figure = &page[at..];
    let figure = &figure[..figure.find("</svg>").expect("an inline SVG")];
    for label in [">\nsync\n<", ">\nasync\n<"] {
        assert!(
            figure.contains(label),
            "{label} missing from the time chart"
        );
    }
    let versions = a["versions"].as_array().unwrap();
    // Two fast clients make a version about every simulated second.
    assert!(versions.len() >= 10, "{}", versions.len());
    let mut last = 0.0;
    for v in versions {
        let t = v["time"].as_f64().unwrap();
        assert!(t >= last && t <= 12.0, "{v}");
        last = t;
    }
    let target = a["target_accuracy"].as_f64().unwrap();
    let first = versions
        .iter()
        .find(|v| v["accuracy"].as_f64().unwrap() >= target)
        .map(|v| v["time"].as_f64().unwrap());
    assert_eq!(a["async_time_to_target"].as_f64(), first);

    // A version made with the slow client's stale update, recomputed.
    let stale = versions
        .iter()
        .find(|v| v["staleness"]["agent-3"].as_u64().is_some_and(|t| t > 0))
        .expect("the slow client's update arrives stale");
    let made = stale["version"].as_u64().unwrap();
    let round = made - 1;
    let rounds = out.join("async/store/jobs/simulate-async/rounds");
    let measured: Value = serde_json::from_str(
        &std::fs::read_to_string(rounds.join(format!("{made}/measurements.json"))).unwrap(),
    )
    .unwrap();
    let g = tensors(&rounds.join(format!("{round}/global.safetensors")));
    let next = tensors(&rounds.join(format!("{made}/global.safetensors")));
    let mut want = g.clone();
    for c in measured["measurements"]["clients"].as_array().unwrap() {
        let id = c["client_id"].as_str().unwrap();
        let w = c["weight"].as_f64().unwrap();
        let tau = stale["staleness"][id].as_u64().unwrap();
        let s = (1.0 + tau as f64).powf(-0.5);
        let x = tensors(&rounds.join(format!("{round}/updates/{id}.safetensors")));
        let base = tensors(&rounds.join(format!("{}/global.safetensors", round - tau)));
        for (name, values) in want.iter_mut() {
            for (k, v) in values.iter_mut().enumerate() {
                *v += w * s * (x[name][k] - base[name][k]);
            }
        }
    }
    let mut largest = 0f64;
    for (name, values) in &want {
        for (k, v) in values.iter().enumerate() {
            let got = next[name][k];
            assert!(
                (got - v).abs() <= 1e-5 * v.abs().max(1.0),
                "{name}[{k}]: {got} vs {v}"
            );
            largest = largest.max((got - g[name][k]).abs());
        }
    }
    assert!(largest > 0.0, "the version did not move");

    // The flags of --mode async are refused without it.
    let output = fedstep()
        .args(["simulate", "--client-speeds", "1,1,4"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--mode async"));
}

/// --secure-aggregation (issue #18): the SecAgg+ run beside the plain one
/// learns as the plain run does (the same trainer, data and seeds; only
/// the mean is computed under masks), and a clip range that cuts the
/// updates shows in both the clipped fraction and the accuracy.
#[test]
fn simulate_secure_aggregation_reports_the_secagg_run_beside_the_plain_one() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| -> Value {
        let out = dir.path().join(name);
        let output = fedstep()
            .args(["simulate", "--rounds", "4", "--secure-aggregation"])
            .args(extra)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "stderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let svg = std::fs::read_to_string(out.join("accuracy.svg")).unwrap();
        assert!(svg.contains("SecAgg+"), "the secure curve is drawn");
        let report: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap())
                .unwrap();
        let s = report["secure_aggregation"].clone();
        assert_eq!(
            s["plain_final_accuracy"], report["final"]["federated_accuracy"],
            "{s}"
        );
        assert_eq!(s["rounds"].as_array().unwrap().len(), 4, "{s}");
        s
    };
    let s = run("default", &[]);
    assert_eq!(
        (s["neighbours"].as_u64(), s["threshold"].as_u64()),
        (Some(2), Some(2))
    );
    let (secure, plain) = (
        s["final_accuracy"].as_f64().unwrap(),
        s["plain_final_accuracy"].as_f64().unwrap(),
    );
    assert!((secure - plain).abs() <= 0.005, "{s}");
    assert!(secure > 0.5, "the secure run learns: {s}");
    for r in s["rounds"].as_array().unwrap() {
        assert_eq!(r["clipped_fraction"], 0.0, "{r}");
    }

    let cut = run("cut", &["--secagg-clip", "0.01"]);
    let clipped = cut["rounds"][0]["clipped_fraction"].as_f64().unwrap();
    assert!(clipped > 0.01, "{cut}");
    assert!(
        cut["final_accuracy"].as_f64().unwrap() < plain - 0.02,
        "{cut}"
    );
}
