//! The client loop over in-process fakes: the at-least-once guarantees of
//! docs/design.md §3 step 2 (no lost round, no double write, nothing poisonous
//! lingers).

use crate::common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use fedstep_client::builtin_trainer::BuiltinTrainer;
use fedstep_client::config::{BuiltinConfig, DatasetKind};
use fedstep_client::{Outcome, RunEnd, Worker};
use fedstep_cloud::keys;
use fedstep_cloud::records::UpdateRecord;

type W<T> = Worker<MemQueue, DirStore, MemLedger, T>;

struct Rig<T> {
    _dir: tempfile::TempDir,
    queue: Arc<MemQueue>,
    store: Arc<DirStore>,
    ledger: Arc<MemLedger>,
    trainer: Arc<T>,
    worker: W<T>,
}

fn rig<T: fedstep_client::Trainer>(trainer: T) -> Rig<T> {
    rig_with(trainer, |_| {})
}

fn rig_with<T: fedstep_client::Trainer>(
    trainer: T,
    tweak: impl FnOnce(&mut fedstep_client::WorkerOptions),
) -> Rig<T> {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let queue = MemQueue::new();
    let store = DirStore::new(&store_dir);
    let ledger = MemLedger::new();
    let trainer = Arc::new(trainer);
    let mut opts = options(&dir.path().join("work"));
    tweak(&mut opts);
    let worker = Worker::new(
        opts,
        queue.clone(),
        store.clone(),
        ledger.clone(),
        trainer.clone(),
    )
    .with_clock(Arc::new(FixedClock(NOW)));
    Rig {
        _dir: dir,
        queue,
        store,
        ledger,
        trainer,
        worker,
    }
}

async fn one<T: fedstep_client::Trainer>(r: &Rig<T>) -> Outcome {
    let mut out = r.worker.poll_once().await.unwrap();
    assert_eq!(out.len(), 1, "{out:?}");
    out.remove(0)
}

/// `Worker::run` until it ends by itself (within 20 s), never stopped.
async fn run_to_end<T: fedstep_client::Trainer>(r: &Rig<T>) -> RunEnd {
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::time::timeout(Duration::from_secs(20), r.worker.run(stopped))
        .await
        .unwrap()
        .unwrap()
}

fn only_row(r: &MemLedger) -> UpdateRecord {
    let rows = r.rows();
    assert_eq!(rows.len(), 1, "{rows:?}");
    rows.into_iter().next().unwrap()
}

#[tokio::test]
async fn builtin_trainer_submits_a_real_update() {
    let trainer = BuiltinTrainer::from_config(&BuiltinConfig {
        dataset: DatasetKind::Digits,
        digits_csv: None,
        mnist_images: None,
        mnist_labels: None,
        classes: Some(vec![1, 2, 3]),
        sel_prob: 1.0,
        def_prob: 0.05,
        seed: 1,
        local_epochs: 1,
        batch_size: 32,
        learning_rate: 0.1,
    })
    .unwrap();
    let examples = trainer.examples() as u64;
    let r = rig(trainer);
    let global = global_model();
    r.queue.send(announce(&r.store, "j1", 1, &global));

    let Outcome::Submitted { checksum, .. } = one(&r).await else {
        panic!("not submitted")
    };
    assert_eq!(r.queue.len(), 0, "deleted after the row was written");
    let key = keys::update("j1", 1, "site-a");
    let uploaded = r.store.get_bytes(&key).unwrap();
    assert_eq!(sha256_hex(&uploaded), checksum);
    assert_ne!(uploaded, global, "training changed the weights");
    let row = only_row(&r.ledger);
    assert_eq!(row.checksum, checksum);
    assert_eq!(row.model_key, key);
    assert_eq!(row.job_round, "j1#000001");
    assert_eq!(row.num_examples, serde_json::json!(examples));
    assert_eq!(row.bytes, uploaded.len() as u64);
    assert!(row.metrics["accuracy"].as_f64().unwrap() > 0.0);
    assert_eq!(row.trained_at, "2027-01-15T08:00:00Z");
}

#[tokio::test]
async fn a_crash_mid_training_means_redelivery_and_no_double_write() {
    let r = rig(CopyTrainer {
        delay: Duration::from_millis(300),
        ..Default::default()
    });
    r.queue.send(announce(&r.store, "j1", 1, &global_model()));

    // Stop the client while it trains: the message must stay.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let run = r.worker.run(stopped);
    let kill = async {
        r.trainer.started.notified().await;
        stop.send(true).unwrap();
    };
    let (end, ()) = tokio::join!(run, kill);
    assert_eq!(end.unwrap(), RunEnd::Shutdown);
    assert_eq!(r.queue.len(), 1, "not deleted");
    assert_eq!(
        r.queue.visible_now(),
        1,
        "released for immediate redelivery"
    );
    assert!(r.ledger.rows().is_empty());

    // The restarted client finishes the round.
    assert!(matches!(one(&r).await, Outcome::Submitted { .. }));
    let row = only_row(&r.ledger);

    // A crash after the row but before the delete: the redelivered message
    // is recognised as done, nothing is trained or written again.
    r.queue.send(announce(&r.store, "j1", 1, &global_model()));
    assert!(matches!(one(&r).await, Outcome::AlreadyDone { .. }));
    assert_eq!(r.trainer.calls.load(Ordering::SeqCst), 2);
    assert_eq!(r.ledger.put_calls.load(Ordering::SeqCst), 1);
    assert_eq!(r.store.puts.load(Ordering::SeqCst), 1);
    assert_eq!(only_row(&r.ledger), row);
    assert_eq!(r.queue.len(), 0);
}

#[tokio::test]
async fn a_retry_with_the_same_checksum_is_a_no_op() {
    let r = rig(CopyTrainer::default());
    let body = announce(&r.store, "j1", 1, &global_model());
    r.queue.send(body.clone());
    assert!(matches!(one(&r).await, Outcome::Submitted { .. }));
    let row = only_row(&r.ledger);
    // The row check races with another delivery: we train and put again.
    r.ledger.hide_rows.store(true, Ordering::SeqCst);
    r.queue.send(body);
    assert!(matches!(one(&r).await, Outcome::AlreadyDone { .. }));
    assert_eq!(r.ledger.put_calls.load(Ordering::SeqCst), 2);
    assert_eq!(only_row(&r.ledger), row);
    assert_eq!(r.queue.len(), 0);
}

#[tokio::test]
async fn a_conflicting_row_stays_and_the_message_is_deleted() {
    let r = rig(CopyTrainer::default());
    r.queue.send(announce(&r.store, "j1", 1, &global_model()));
    r.ledger.hide_rows.store(true, Ordering::SeqCst);
    let other = UpdateRecord {
        client_id: "site-a".into(),
        job_round: keys::job_round("j1", 1),
        job_id: "j1".into(),
        round: 1,
        model_key: keys::update("j1", 1, "site-a"),
        checksum: "f".repeat(64),
        store_checksum: None,
        num_examples: serde_json::json!(1),
        llm_type: None,
        metrics: Default::default(),
        bytes: 1,
        trained_at: "2027-01-01T00:00:00Z".into(),
        schema: Some(1),
        variate_delta_checksum: None,
        base_round: None,
    };
    r.ledger
        .rows
        .lock()
        .unwrap()
        .insert(("site-a".into(), other.job_round.clone()), other.clone());
    let out = one(&r).await;
    assert!(
        matches!(&out, Outcome::Conflict { existing_checksum, .. } if *existing_checksum == other.checksum),
        "{out:?}"
    );
    assert_eq!(only_row(&r.ledger), other);
    assert_eq!(r.queue.len(), 0);
}

#[tokio::test]
async fn malformed_and_oversized_messages_are_deleted_with_a_reason() {
    let r = rig(CopyTrainer::default());
    let good = announce(&r.store, "j1", 1, &global_model());
    let wrong_key = good.replace("jobs/j1/rounds/1/global", "jobs/j2/rounds/1/global");
    let oversized = format!("{{\"pad\": \"{}\"}}", "x".repeat(300 * 1024));
    for (body, want) in [
        ("hello".to_string(), "not JSON"),
        (oversized, "bytes"),
        (wrong_key, "model_key"),
        (good.replace("\"schema\":1", "\"schema\":0"), "schema 0"),
    ] {
        r.queue.send(body);
        match one(&r).await {
            Outcome::Rejected { reason } => assert!(reason.contains(want), "{reason}"),
            other => panic!("{want}: {other:?}"),
        }
        assert_eq!(r.queue.len(), 0, "{want}: deleted");
    }
    // A newer schema may become usable after an upgrade: it stays.
    r.queue.send(good.replace("\"schema\":1", "\"schema\":9"));
    assert!(matches!(one(&r).await, Outcome::Deferred { .. }));
    assert_eq!(r.queue.len(), 1);
    assert_eq!(r.trainer.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn visibility_is_extended_while_a_slow_trainer_runs() {
    let r = rig(CopyTrainer {
        delay: Duration::from_millis(400),
        ..Default::default()
    });
    r.queue.send(announce(&r.store, "j1", 1, &global_model()));
    assert!(matches!(one(&r).await, Outcome::Submitted { .. }));
    let ext = r.queue.extensions();
    assert!(ext.len() >= 4, "{ext:?}");
    assert!(ext.iter().all(|(_, s)| *s == 30), "{ext:?}");
    // After the delete the heartbeat is gone.
    let n = r.queue.extensions().len();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(r.queue.extensions().len(), n);
}

#[tokio::test]
async fn a_bad_checksum_or_output_fails_the_attempt_and_keeps_the_message() {
    let r = rig(CopyTrainer::default());
    let body = announce(&r.store, "j1", 1, &global_model());
    // Someone replaced the global model after it was announced.
    r.store.put_bytes(
        &keys::global_model("j1", 1),
        &fedstep_trainer::init_model(64, 16, 10, 8).unwrap(),
    );
    r.queue.send(body);
    match one(&r).await {
        Outcome::Failed {
            reason,
            retry_in_seconds,
        } => {
            assert!(reason.contains("does not match the announced"), "{reason}");
            assert_eq!(retry_in_seconds, 30);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.queue.len(), 1);
    assert_eq!(r.queue.extensions().last().unwrap().1, 30, "postponed");
    assert!(r.ledger.rows().is_empty());
    assert_eq!(r.trainer.calls.load(Ordering::SeqCst), 0);

    let r = rig(CopyTrainer {
        output_override: Some(fedstep_trainer::init_model(64, 8, 10, 0).unwrap()),
        ..Default::default()
    });
    r.queue.send(announce(&r.store, "j1", 1, &global_model()));
    match one(&r).await {
        Outcome::Failed { reason, .. } => {
            assert!(
                reason.contains("update.safetensors does not match the global model"),
                "{reason}"
            );
            assert!(
                reason.contains("has shape [8], the reference has [16]"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.store.puts.load(Ordering::SeqCst), 0, "nothing uploaded");
}

#[tokio::test]
async fn transient_ledger_errors_are_retried() {
    let r = rig(CopyTrainer::default());
    r.ledger.transient_puts.store(3, Ordering::SeqCst);
    r.queue.send(announce(&r.store, "j1", 1, &global_model()));
    assert!(matches!(one(&r).await, Outcome::Submitted { .. }));
    assert_eq!(r.ledger.put_calls.load(Ordering::SeqCst), 4);
    only_row(&r.ledger);
}

#[tokio::test]
async fn other_jobs_late_rounds_and_completion() {
    let r = rig_with(CopyTrainer::default(), |o| {
        o.jobs = Some(vec!["j1".into()]);
        o.exit_on_complete = true;
    });
    r.queue.send(announce(&r.store, "j2", 1, &global_model()));
    assert!(matches!(one(&r).await, Outcome::NotOurJob { .. }));
    let late = announce(&r.store, "j1", 1, &global_model())
        .replace(&format!("{}", NOW + 600), &format!("{}", NOW - 1));
    r.queue.send(late);
    assert!(matches!(one(&r).await, Outcome::DeadlinePassed { .. }));
    assert_eq!(r.queue.len(), 0);
    assert_eq!(r.trainer.calls.load(Ordering::SeqCst), 0);

    r.queue.send(announce(&r.store, "j1", 1, &global_model()));
    r.queue.send(
        serde_json::json!({"type": "training_complete", "schema": 1, "job_id": "j1",
            "final_round": 1, "final_model_key": "jobs/j1/rounds/2/global.safetensors",
            "artifact_id": "j1:1"})
        .to_string(),
    );
    let end = run_to_end(&r).await;
    assert_eq!(end, RunEnd::JobComplete("j1".into()));
    assert_eq!(r.queue.len(), 0);
    only_row(&r.ledger);
}

#[tokio::test]
async fn job_failed_ends_the_run_with_the_workflows_reason() {
    let r = rig_with(CopyTrainer::default(), |o| {
        o.jobs = Some(vec!["j1".into()]);
        o.exit_on_complete = true;
    });
    // Another job's failure is not ours; then ours, with a cause holding a
    // control character (the log line must not be forged through it).
    r.queue.send(
        serde_json::json!({"type": "job_failed", "schema": 1, "job_id": "j2", "round": 1,
            "error": "QuorumNotMet", "cause": "quorum not met"})
        .to_string(),
    );
    r.queue.send(
        serde_json::json!({"type": "job_failed", "schema": 1, "job_id": "j1", "round": 2,
            "error": "AggregatorError", "cause": "AccessDenied\non PutObject"})
        .to_string(),
    );
    let end = run_to_end(&r).await;
    assert_eq!(
        end,
        RunEnd::JobFailed {
            job_id: "j1".into(),
            reason: "AggregatorError: AccessDenied\\non PutObject".into(),
        }
    );
    assert_eq!(r.queue.len(), 0, "both messages deleted");
    assert_eq!(r.trainer.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_malformed_job_failed_is_deleted_and_the_worker_goes_on() {
    let r = rig(CopyTrainer::default());
    r.queue.send(
        serde_json::json!({"type": "job_failed", "schema": 1, "job_id": "../j1", "round": 1,
            "error": "E", "cause": ""})
        .to_string(),
    );
    assert!(matches!(one(&r).await, Outcome::Rejected { .. }));
    r.queue.send(
        serde_json::json!({"type": "job_failed", "schema": 1, "job_id": "j1", "round": 0,
            "error": "E", "cause": ""})
        .to_string(),
    );
    assert!(matches!(one(&r).await, Outcome::Rejected { .. }));
    assert_eq!(r.queue.len(), 0);
}
