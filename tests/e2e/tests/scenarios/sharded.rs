//! Issue #14: a round aggregated as four shards by two workers. The job
//! cuts the model every 8 MiB (`[sharding] shard_mib = 8`), so a 32 MiB
//! model makes four shards; two workers serve the Map's AggregateShard
//! tasks side by side, each shard uploading its own parts of the next
//! global model. The committed model must be the clients' weighted mean,
//! recomputed here independently from the objects in S3, and neither
//! worker may write to local disk.

use std::time::{Duration, Instant};

use fedstep_cloud::keys;
use fedstep_cloud::ports::{Ledger, ObjectStore, PutUpdate};
use fedstep_cloud::records::{RoundStatus, UpdateRecord, SCHEMA};
use fedstep_e2e::{execution, fedavg, launch, Binaries, Deployment, Process};
use serde_json::Value;

const CLIENTS: [&str; 3] = ["site-a", "site-b", "site-c"];
/// 32 MiB of f32: four shards of 8 MiB (two stripes of 2^20 elements each).
const PARAMS: usize = 8 << 20;

fn model(path: &std::path::Path, seed: u32) {
    let bytes: Vec<u8> = (0..PARAMS as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) % 4096) as f32 / 1024.0 - 2.0)
        .flat_map(f32::to_le_bytes)
        .collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![PARAMS], &bytes)
        .unwrap();
    std::fs::write(path, safetensors::serialize([("w", view)], None).unwrap()).unwrap();
}

/// The shard tasks a worker ran for `job_id`, from its log.
fn shard_tasks(worker: &Process, job_id: &str) -> usize {
    worker
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v["message"] == "task" && v["action"] == "aggregate_shard" && v["job_id"] == job_id
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_aggregate_four_shards_into_the_weighted_mean() {
    let _one_at_a_time = crate::one_at_a_time().await;
    let bins = Binaries::find();
    let Some(d) = Deployment::create("s", &CLIENTS).await else {
        return;
    };
    let mut w1 = launch::worker(&d, &bins, "worker-s1");
    let mut w2 = launch::worker(&d, &bins, "worker-s2");
    let logs = |a: &Process, b: &Process| launch::logs(&[a, b]);

    let job_id = fedstep_e2e::unique("sharded");
    model(&d.path("init.safetensors"), 0);
    let job = d.path("job.toml");
    std::fs::write(
        &job,
        format!(
            "job_id = \"{job_id}\"\ninitial_model = \"init.safetensors\"\nrounds = 1\n\
             clients = [\"site-a\", \"site-b\", \"site-c\"]\nmin_clients = 3\nround_timeout_seconds = 120\n\
             [aggregation]\nweighting = \"examples\"\n[sharding]\nshard_mib = 8\nconcurrency = 4\n"
        ),
    )
    .unwrap();
    launch::fedstep(
        &d,
        &bins,
        &["job", "start", "--config", job.to_str().unwrap()],
    );

    // The clients, played by hand: upload, then the row.
    let (ledger, store) = (d.ledger(), d.store());
    let deadline = Instant::now() + Duration::from_secs(60);
    while ledger.get_round(&job_id, 1).await.unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "round 1 never opened\n{}",
            logs(&w1, &w2)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (i, c) in CLIENTS.iter().enumerate() {
        let local = d.path(&format!("{c}.safetensors"));
        model(&local, i as u32 + 1);
        let key = keys::update(&job_id, 1, c);
        let up = store.put_file(&key, &local).await.unwrap();
        let row = UpdateRecord {
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
            trained_at: "2026-11-30T00:00:00Z".into(),
            schema: Some(SCHEMA),
            variate_delta_checksum: None,
            base_round: None,
        };
        assert_eq!(ledger.put_update(&row).await.unwrap(), PutUpdate::Created);
    }

    let arn = d.execution_arn(&job_id);
    let done =
        execution::wait_until_done(&d.sfn, &arn, Duration::from_secs(240), || logs(&w1, &w2)).await;
    execution::assert_succeeded(&done, || logs(&w1, &w2));
    let output: Value = serde_json::from_str(done.output().unwrap_or("{}")).unwrap();
    assert_eq!(
        output["plan"]["shards"],
        serde_json::json!([0, 1, 2, 3]),
        "{output}"
    );
    assert_eq!(
        output["result"]["accepted"].as_array().map(Vec::len),
        Some(3)
    );

    // The committed model is the weighted mean of what the clients sent.
    let (global, weighted) = d.round_inputs(&job_id, 1, &CLIENTS).await;
    let deviation = fedavg::max_deviation(&global, &weighted);
    assert!(deviation <= 2e-6, "deviation {deviation:e}");
    let round = ledger.get_round(&job_id, 1).await.unwrap().unwrap();
    assert_eq!(round.status, RoundStatus::Closed);

    // Four shard tasks, shared by the two workers; one plan, one commit.
    let events = execution::events_by_state(&d.sfn, &arn).await;
    eprintln!("history by state: {events:?}");
    assert_eq!(
        execution::count(&events, "AggregateShardTask", "ActivitySucceeded"),
        4,
        "{events:?}"
    );
    for state in ["PlanRound", "CommitRound"] {
        assert_eq!(
            execution::count(&events, state, "ActivitySucceeded"),
            1,
            "{state}: {events:?}"
        );
    }
    let per_worker = [shard_tasks(&w1, &job_id), shard_tasks(&w2, &job_id)];
    eprintln!("shard tasks per worker: {per_worker:?}");
    assert_eq!(per_worker.iter().sum::<usize>(), 4, "{per_worker:?}");
    for w in [&mut w1, &mut w2] {
        let status = w.terminate(Duration::from_secs(30)).await;
        assert!(
            status.success(),
            "{} exit {status}\n{}",
            w.name,
            w.log_tail(30)
        );
    }
    launch::assert_worker_wrote_nothing(&d, "worker-s1");
    launch::assert_worker_wrote_nothing(&d, "worker-s2");
}
