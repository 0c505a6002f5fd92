//! The emulator worker end to end, with a client played by hand: start an
//! execution of the deployed state machine, upload an update and write its
//! row as a client would, and watch the execution succeed. Then a round
//! nobody answers fails with QuorumNotMet. Setup: FEDSTEP_TEST_DEPLOY (see
//! crates/aws/tests/common/mod.rs; use a prefix of its own, since the
//! worker takes every activity task of the deployment).

#[path = "../../aws/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{str_at, unique};
use fedstep_aws::aws_sdk_sfn::types::ExecutionStatus;
use fedstep_cloud::ports::{Ledger, ObjectStore, PutUpdate};
use fedstep_cloud::records::{RoundStatus, UpdateRecord, SCHEMA};
use fedstep_cloud::{keys, Job, JobSpec};
use serde_json::Value;

/// The worker process; SIGTERM on drop so a failed test leaves none behind.
struct Worker {
    child: Child,
    log: std::path::PathBuf,
}

impl Worker {
    fn start(deploy: &str, log: &Path) -> Worker {
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fedstep-lambda"))
            .args(["local", "--deploy", deploy, "--worker-name", "smoke"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("start fedstep-lambda local");
        Worker {
            child,
            log: log.to_path_buf(),
        }
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(70);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn model(path: &Path, values: [f32; 4]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &bytes).unwrap();
    let data = safetensors::serialize([("w", view)], None).unwrap();
    std::fs::write(path, data).unwrap();
}

fn job(job_id: &str, timeout: u64) -> Job {
    JobSpec::from_toml(&format!(
        "job_id = \"{job_id}\"\nrounds = 1\nclients = [\"site-a\"]\nmin_clients = 1\nround_timeout_seconds = {timeout}\n[aggregation]\nweighting = \"examples\"\n"
    ))
    .unwrap()
}

async fn wait_for_execution(
    env: &common::TestEnv,
    arn: &str,
    worker: &Worker,
    secs: u64,
) -> fedstep_aws::aws_sdk_sfn::operation::describe_execution::DescribeExecutionOutput {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let d = env
            .sfn
            .describe_execution()
            .execution_arn(arn)
            .send()
            .await
            .unwrap();
        if d.status() != &ExecutionStatus::Running {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "execution still RUNNING after {secs} s; worker log:\n{}",
            worker.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn one_round_succeeds_and_an_unanswered_round_fails_with_quorum_not_met() {
    let Some(env) = common::env().await else {
        return;
    };
    let deploy_path = std::env::var("FEDSTEP_TEST_DEPLOY").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&deploy_path, &dir.path().join("worker.log"));
    let store = env.store();
    let ledger = env.ledger();
    let sm = str_at(&env.deploy, "/state_machine/arn").to_string();

    // What `fedstep job start` does: the initial model and the execution.
    let job_id = unique("smoke");
    let spec = job(&job_id, 120);
    let init = dir.path().join("init.safetensors");
    model(&init, [0.0, 1.0, 2.0, 3.0]);
    store
        .put_file(&keys::global_model(&job_id, 1), &init)
        .await
        .unwrap();
    let t0 = Instant::now();
    let exec = env
        .sfn
        .start_execution()
        .state_machine_arn(&sm)
        .name(&job_id)
        .input(serde_json::to_string(&spec).unwrap())
        .send()
        .await
        .unwrap();

    // The client: once the round is OPEN, download, "train", upload, write the row.
    let deadline = Instant::now() + Duration::from_secs(60);
    let opened = loop {
        if let Some(r) = ledger.get_round(&job_id, 1).await.unwrap() {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "round 1 never opened; worker log:\n{}",
            worker.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(opened.status, RoundStatus::Open);
    let global = dir.path().join("global.safetensors");
    let info = store
        .get_file(&opened.global_model_key, &global)
        .await
        .unwrap();
    assert_eq!(info.sha256, opened.global_checksum);
    let local = dir.path().join("local.safetensors");
    model(&local, [1.0, 2.0, 3.0, 4.0]);
    let key = keys::update(&job_id, 1, "site-a");
    let up = store.put_file(&key, &local).await.unwrap();
    let row = UpdateRecord {
        client_id: "site-a".into(),
        job_round: keys::job_round(&job_id, 1),
        job_id: job_id.clone(),
        round: 1,
        model_key: key,
        checksum: up.sha256.clone(),
        store_checksum: None,
        num_examples: 10.into(),
        llm_type: None,
        metrics: [("loss".to_string(), Value::from(0.5))].into(),
        bytes: up.bytes,
        trained_at: "2026-11-21T23:59:00Z".into(),
        schema: Some(SCHEMA),
        variate_delta_checksum: None,
        base_round: None,
    };
    assert_eq!(ledger.put_update(&row).await.unwrap(), PutUpdate::Created);

    let done = wait_for_execution(&env, exec.execution_arn(), &worker, 90).await;
    eprintln!(
        "one round, stream path: {:?} in {:?}",
        done.status(),
        t0.elapsed()
    );
    assert_eq!(
        done.status(),
        &ExecutionStatus::Succeeded,
        "output {:?} error {:?} cause {:?}; worker log:\n{}",
        done.output(),
        done.error(),
        done.cause(),
        worker.log_tail()
    );
    let output: Value = serde_json::from_str(done.output().unwrap_or("{}")).unwrap();
    // StartRound's output is the stream path's hand-over; CommitRound's the
    // result, after PlanRound and one shard.
    assert_eq!(output["handover"]["closed_by"], "stream", "{output}");
    assert_eq!(output["handover"]["usable"], 1, "{output}");
    assert_eq!(output["plan"]["shards"], serde_json::json!([0]), "{output}");
    assert_eq!(output["result"]["continue"], false);
    assert_eq!(output["result"]["closed_by"], "stream");
    assert_eq!(
        output["result"]["global_model_key"],
        keys::global_model(&job_id, 2)
    );
    assert!(output.get("final").is_some(), "{output}");
    let closed = ledger.get_round(&job_id, 1).await.unwrap().unwrap();
    assert_eq!(closed.status, RoundStatus::Closed);
    assert!(store
        .head(&keys::global_model(&job_id, 2))
        .await
        .unwrap()
        .is_some());

    // Nobody answers within 2 s: PlanRound fails the execution.
    let job_id = unique("quorum");
    let spec = job(&job_id, 2);
    store
        .put_file(&keys::global_model(&job_id, 1), &init)
        .await
        .unwrap();
    let t0 = Instant::now();
    let exec = env
        .sfn
        .start_execution()
        .state_machine_arn(&sm)
        .name(&job_id)
        .input(serde_json::to_string(&spec).unwrap())
        .send()
        .await
        .unwrap();
    let done = wait_for_execution(&env, exec.execution_arn(), &worker, 60).await;
    eprintln!(
        "unanswered round: {:?} {:?} in {:?}",
        done.status(),
        done.error(),
        t0.elapsed()
    );
    assert_eq!(
        done.status(),
        &ExecutionStatus::Failed,
        "worker log:\n{}",
        worker.log_tail()
    );
    assert_eq!(done.error(), Some("QuorumNotMet"));
    assert!(
        done.cause().unwrap_or_default().contains("quorum"),
        "{:?}",
        done.cause()
    );

    // SIGTERM: a clean, prompt exit.
    let t = Instant::now();
    let status = worker.terminate();
    eprintln!("worker stopped in {:?}: {status}", t.elapsed());
    assert!(
        status.success(),
        "worker exit {status}; log:\n{}",
        worker.log_tail()
    );
}
