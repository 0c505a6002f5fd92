//! Issue #3, scenario (c): every stream record delivered more than once and
//! two handlers racing to hand the round over, still exactly one hand-over
//! and exactly one aggregation. Two workers run on one deployment, each
//! reading the whole updates stream (so each record reaches two handlers at
//! about the same time) and both serving the aggregation's tasks; each client's row is
//! written twice (the second write is a no-op); after the job, a third
//! worker replays the stream from its start. Counted: versions of the next
//! global model in S3, StartRound, PlanRound and CommitRound answers in the execution
//! history, HandedOver outcomes in the worker logs.

use std::time::{Duration, Instant};

use fedstep_cloud::keys;
use fedstep_cloud::ports::{Ledger, ObjectStore, PutUpdate};
use fedstep_cloud::records::{ClosedBy, RoundStatus, UpdateRecord, SCHEMA};
use fedstep_e2e::{execution, launch, Binaries, Deployment, Process};
use serde_json::Value;

const CLIENTS: [&str; 3] = ["site-a", "site-b", "site-c"];

fn model(path: &std::path::Path, values: [f32; 4]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &bytes).unwrap();
    std::fs::write(path, safetensors::serialize([("w", view)], None).unwrap()).unwrap();
}

/// The worker log's "update processed" lines for `job_id`: their outcomes.
fn outcomes(worker: &Process, job_id: &str) -> Vec<String> {
    worker
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "update processed" && v["job_id"] == job_id)
        .map(|v| v["outcome"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_racing_handlers_aggregate_and_call_back_once() {
    let _one_at_a_time = crate::one_at_a_time().await;
    let bins = Binaries::find();
    let Some(d) = Deployment::create("c", &CLIENTS).await else {
        return;
    };
    let mut w1 = launch::worker(&d, &bins, "worker-c1");
    let mut w2 = launch::worker(&d, &bins, "worker-c2");

    let job_id = fedstep_e2e::unique("once");
    let init = d.path("init.safetensors");
    model(&init, [0.0, 1.0, 2.0, 3.0]);
    let job = d.path("job.toml");
    std::fs::write(
        &job,
        format!(
            "job_id = \"{job_id}\"\ninitial_model = \"init.safetensors\"\nrounds = 1\n\
             clients = [\"site-a\", \"site-b\", \"site-c\"]\nmin_clients = 3\nround_timeout_seconds = 90\n\
             [aggregation]\nweighting = \"examples\"\n"
        ),
    )
    .unwrap();
    launch::fedstep(
        &d,
        &bins,
        &["job", "start", "--config", job.to_str().unwrap()],
    );
    let logs = |a: &Process, b: &Process| launch::logs(&[a, b]);

    // The clients, played by hand so all three rows land within milliseconds.
    let ledger = d.ledger();
    let store = d.store();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ledger.get_round(&job_id, 1).await.unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "round 1 never opened\n{}",
            logs(&w1, &w2)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut rows = Vec::new();
    for (i, c) in CLIENTS.iter().enumerate() {
        let local = d.path(&format!("{c}.safetensors"));
        let base = i as f32;
        model(&local, [base, base + 1.0, base + 2.0, base + 3.0]);
        let key = keys::update(&job_id, 1, c);
        let up = store.put_file(&key, &local).await.unwrap();
        rows.push(UpdateRecord {
            client_id: c.to_string(),
            job_round: keys::job_round(&job_id, 1),
            job_id: job_id.clone(),
            round: 1,
            model_key: key,
            checksum: up.sha256,
            store_checksum: up.store_checksum,
            num_examples: (10 * (i + 1)).into(),
            llm_type: None,
            metrics: [("loss".to_string(), Value::from(0.5))].into(),
            bytes: up.bytes,
            trained_at: "2026-11-22T00:00:00Z".into(),
            schema: Some(SCHEMA),
            variate_delta_checksum: None,
            base_round: None,
        });
    }
    for row in &rows {
        assert_eq!(ledger.put_update(row).await.unwrap(), PutUpdate::Created);
    }
    for row in &rows {
        // A client retrying after a lost reply: the same row again.
        assert_eq!(
            ledger.put_update(row).await.unwrap(),
            PutUpdate::AlreadyThere
        );
    }

    let arn = d.execution_arn(&job_id);
    let done =
        execution::wait_until_done(&d.sfn, &arn, Duration::from_secs(120), || logs(&w1, &w2)).await;
    execution::assert_succeeded(&done, || logs(&w1, &w2));

    // Replay: a fresh worker reads the whole stream again after the close.
    let mut w3 = launch::worker(&d, &bins, "worker-c3");
    let deadline = Instant::now() + Duration::from_secs(60);
    while outcomes(&w3, &job_id).len() < CLIENTS.len() {
        assert!(
            Instant::now() < deadline,
            "the replaying worker never saw the rows\n{}",
            w3.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Both racing workers have seen every record (each reads the stream itself).
    let deadline = Instant::now() + Duration::from_secs(30);
    while outcomes(&w1, &job_id).len() < CLIENTS.len()
        || outcomes(&w2, &job_id).len() < CLIENTS.len()
    {
        assert!(
            Instant::now() < deadline,
            "a worker did not handle every record\n{}",
            logs(&w1, &w2)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for w in [&mut w1, &mut w2, &mut w3] {
        let status = w.terminate(Duration::from_secs(30)).await;
        assert!(
            status.success(),
            "{} exit {status}\n{}",
            w.name,
            w.log_tail(30)
        );
    }

    let all: Vec<(String, Vec<String>)> = [&w1, &w2, &w3]
        .iter()
        .map(|w| (w.name.clone(), outcomes(w, &job_id)))
        .collect();
    for (name, seen) in &all {
        eprintln!("{name}: {} records: {seen:?}", seen.len());
    }
    // Both racing workers may see the round complete, a worker that reads
    // the stream late on every one of its records (a counted row replayed
    // while the round is still OPEN hands it over again); Step Functions
    // takes the first answer (one StartRound success in the history below).
    let handed_over: usize = all
        .iter()
        .map(|(_, seen)| seen.iter().filter(|o| o.starts_with("HandedOver")).count())
        .sum();
    assert!(handed_over >= 1, "hand-overs across the workers: {all:?}");
    assert!(
        all[2].1.iter().all(|o| o.starts_with("Late")),
        "the replay after the close must change nothing: {:?}",
        all[2].1
    );

    // One write of round 2's global model (the bucket is versioned).
    let key = keys::global_model(&job_id, 2);
    let versions =
        d.s3.list_object_versions()
            .bucket(d.bucket())
            .prefix(&key)
            .send()
            .await
            .unwrap();
    let writes = versions
        .versions()
        .iter()
        .filter(|v| v.key() == Some(key.as_str()))
        .count();
    assert_eq!(writes, 1, "versions of {key}: {:?}", versions.versions());

    // One hand-over: StartRound answered once, never timed out or failed;
    // then one plan and one commit.
    let events = execution::events_by_state(&d.sfn, &arn).await;
    eprintln!("history by state: {events:?}");
    assert_eq!(
        execution::count(&events, "StartRound", "ActivitySucceeded"),
        1,
        "{events:?}"
    );
    assert_eq!(
        execution::count(&events, "StartRound", "ActivityFailed"),
        0,
        "{events:?}"
    );
    assert_eq!(
        execution::count(&events, "StartRound", "ActivityTimedOut"),
        0,
        "{events:?}"
    );
    for state in ["PlanRound", "CommitRound"] {
        assert_eq!(
            execution::count(&events, state, "ActivitySucceeded"),
            1,
            "{state}: {events:?}"
        );
    }

    let round = ledger.get_round(&job_id, 1).await.unwrap().unwrap();
    assert_eq!(round.status, RoundStatus::Closed);
    assert_eq!(round.result.unwrap().closed_by, ClosedBy::Stream);
}
