//! Issue #6, the operator's view of hostile input: `fedstep aggregate` and
//! `fedstep model inspect` exit non-zero when nothing usable is left, and
//! their stderr names the file and the rule; a bad update among good ones
//! is reported while the aggregation still succeeds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::Dtype;

fn fedstep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedstep"))
        .args(args)
        .output()
        .unwrap()
}

fn model(dir: &Path, name: &str, values: &[f32]) -> PathBuf {
    let p = dir.join(name);
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    fedstep_core::writer::write_model(
        &p,
        &[("w".into(), Dtype::F32, vec![values.len()], bytes)],
        &BTreeMap::new(),
    )
    .unwrap();
    p
}

fn manifest(dir: &Path, entries: &[(&Path, serde_json::Value)]) -> PathBuf {
    let updates: Vec<_> = entries
        .iter()
        .map(|(p, n)| serde_json::json!({"path": p, "num_examples": n}))
        .collect();
    let p = dir.join("ROUND.json");
    std::fs::write(&p, serde_json::json!({ "updates": updates }).to_string()).unwrap();
    p
}

fn aggregate(manifest: &Path, out: &Path) -> Output {
    fedstep(&[
        "aggregate",
        "--manifest",
        manifest.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

#[track_caller]
fn fails_naming(o: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "should fail; stderr:\n{stderr}");
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr should name `{n}`:\n{stderr}");
    }
}

#[test]
fn aggregate_with_only_a_truncated_update_fails_naming_file_and_rule() {
    let d = tempfile::tempdir().unwrap();
    let good = model(d.path(), "good.safetensors", &[1.0, 2.0, 3.0]);
    let bytes = std::fs::read(&good).unwrap();
    let cut = d.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 5]).unwrap();
    let out = d.path().join("out.safetensors");

    let m = manifest(d.path(), &[(&cut, 10.into())]);
    fails_naming(
        &aggregate(&m, &out),
        &["cut.safetensors", "truncated", "no usable update"],
    );
    assert!(!out.exists(), "nothing is written");

    // Beside a good update: reported, and the aggregation goes on.
    let m = manifest(d.path(), &[(&good, 10.into()), (&cut, 10.into())]);
    let o = aggregate(&m, &out);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("cut.safetensors") && stderr.contains("truncated"),
        "{stderr}"
    );
    assert!(out.is_file());
}

#[test]
fn aggregate_with_a_bad_manifest_fails_naming_it() {
    let d = tempfile::tempdir().unwrap();
    // The manifests below name it: only the manifest itself is wrong.
    model(d.path(), "good.safetensors", &[1.0]);
    let out = d.path().join("out.safetensors");
    let m = d.path().join("ROUND.json");
    for (text, rule) in [
        ("{\"updates\": [", "EOF"),
        ("{\"updates\": []}", "empty"),
        (
            "{\"updates\": [{\"path\": \"good.safetensors\", \"num_exmples\": 1}]}",
            "num_exmples",
        ),
        (
            "{\"updates\": [{\"path\": \"good.safetensors\", \"num_examples\": 1, \"client_id\": \"x\"}, \
              {\"path\": \"good.safetensors\", \"num_examples\": 1, \"client_id\": \"x\"}]}",
            "appears twice",
        ),
    ] {
        std::fs::write(&m, text).unwrap();
        fails_naming(&aggregate(&m, &out), &["ROUND.json", rule]);
    }
    // A manifest that is not there.
    let missing = d.path().join("NOPE.json");
    fails_naming(&aggregate(&missing, &out), &["NOPE.json"]);
}

#[test]
fn aggregate_with_every_update_bad_fails_naming_each() {
    let d = tempfile::tempdir().unwrap();
    let nan = model(d.path(), "nan.safetensors", &[1.0, f32::NAN]);
    let zero = model(d.path(), "zero.safetensors", &[1.0, 2.0]);
    let mut bomb = (500u64 << 20).to_le_bytes().to_vec();
    bomb.extend_from_slice(b"{}");
    let bomb_path = d.path().join("bomb.safetensors");
    std::fs::write(&bomb_path, bomb).unwrap();
    let out = d.path().join("out.safetensors");
    let m = manifest(
        d.path(),
        &[(&nan, 5.into()), (&zero, 0.into()), (&bomb_path, 5.into())],
    );
    fails_naming(
        &aggregate(&m, &out),
        &[
            "no usable update",
            "num_examples is 0",
            "bomb.safetensors",
            "header bomb",
        ],
    );
    assert!(!out.exists());
}

#[test]
fn model_inspect_refuses_bombs_and_garbage_naming_file_and_rule() {
    let d = tempfile::tempdir().unwrap();
    let mut bomb = (300u64 << 20).to_le_bytes().to_vec();
    bomb.extend_from_slice(b"{\"w\":");
    let bomb_path = d.path().join("bomb.safetensors");
    std::fs::write(&bomb_path, bomb).unwrap();
    let garbage = d.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"\x05\0\0\0\0\0\0\0hello, world").unwrap();
    let tiny = d.path().join("tiny.safetensors");
    std::fs::write(&tiny, b"abc").unwrap();
    for (file, rule) in [
        (&bomb_path, "header bomb"),
        (&garbage, "invalid header"),
        (&tiny, "shorter than the 8-byte"),
    ] {
        let o = fedstep(&["model", "inspect", file.to_str().unwrap()]);
        fails_naming(&o, &[file.file_name().unwrap().to_str().unwrap(), rule]);
        assert!(
            o.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    // And the good file works, so the failures above are about the files.
    let good = model(d.path(), "good.safetensors", &[1.0]);
    assert!(fedstep(&["model", "inspect", good.to_str().unwrap()])
        .status
        .success());
}

/// `fedstep job start` with AWS pointed at a closed port: a job file that
/// contradicts itself must be refused before any call (an AWS call would
/// fail differently, naming the endpoint or a connection).
fn job_start(dir: &Path, job_toml: &str) -> Output {
    let model = model(dir, "init.safetensors", &[1.0, 2.0]);
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "{job_toml}\ninitial_model = \"{}\"\n",
            model.file_name().unwrap().to_str().unwrap()
        ),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_fedstep"))
        .args(["job", "start", "--config", job.to_str().unwrap()])
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env(
            "FEDSTEP_STATE_MACHINE_ARN",
            "arn:aws:states:us-east-1:000000000000:stateMachine:none",
        )
        .env("FEDSTEP_BUCKET", "none")
        .output()
        .unwrap()
}

#[test]
fn job_start_refuses_contradictory_jobs_before_any_aws_call() {
    let ok = "job_id = \"j1\"\nrounds = 3\nclients = [\"a\", \"b\"]\nmin_clients = 2\nround_timeout_seconds = 60";
    for (what, job, rule) in [
        (
            "min_clients > clients",
            ok.replace("min_clients = 2", "min_clients = 3"),
            "min_clients = 3 exceeds the 2 clients listed",
        ),
        (
            "zero rounds",
            ok.replace("rounds = 3", "rounds = 0"),
            "rounds must be at least 1",
        ),
        (
            "zero min_clients",
            ok.replace("min_clients = 2", "min_clients = 0"),
            "min_clients must be at least 1",
        ),
        (
            "no clients",
            ok.replace("clients = [\"a\", \"b\"]", "clients = []"),
            "clients is empty",
        ),
        (
            "a client twice",
            ok.replace("[\"a\", \"b\"]", "[\"a\", \"a\"]"),
            "client `a` is listed twice",
        ),
        (
            "zero timeout",
            ok.replace("round_timeout_seconds = 60", "round_timeout_seconds = 0"),
            "round_timeout_seconds must be between 1 and one year",
        ),
        (
            "negative rounds",
            ok.replace("rounds = 3", "rounds = -1"),
            "rounds",
        ),
    ] {
        let d = tempfile::tempdir().unwrap();
        let o = job_start(d.path(), &job);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{what}: accepted; stderr:\n{stderr}");
        assert_eq!(o.status.code(), Some(1), "{what}: {stderr}");
        assert!(
            stderr.contains(rule),
            "{what}: stderr should name `{rule}`:\n{stderr}"
        );
        assert!(
            stderr.contains("job.toml"),
            "{what}: stderr should name the file:\n{stderr}"
        );
        // The temp dir's random name may hold any of these by chance.
        let message = stderr.replace(&d.path().display().to_string(), "<dir>");
        for aws in ["127.0.0.1:9", "dispatch", "connect", "StartExecution", "S3"] {
            assert!(
                !message.contains(aws),
                "{what}: failed at an AWS call (`{aws}`), not at the check:\n{stderr}"
            );
        }
    }

    // The control: the same job without the contradiction gets past the
    // checks and fails at the (unreachable) AWS endpoint instead.
    let d = tempfile::tempdir().unwrap();
    let o = job_start(d.path(), ok);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(
        !stderr.contains("must be") && !stderr.contains("exceeds"),
        "the control job was refused by a check:\n{stderr}"
    );
}
