//! The round's aggregation as the workflow runs it: PlanRound, a
//! statistics Map and DecideRound when a stage needs norms, the shard Map,
//! CommitRound, each task on its own (here: shards run out of order, each
//! by a different engine, as the Map's Lambdas would). The outputs equal,
//! bit for bit, what one shard in one process makes; a client whose
//! object does not hash to its row is rejected by the shard that hashes
//! it and the round is planned again without it.

use fedstep_cloud::engine::{CommitOutcome, PlanOutcome};
use fedstep_cloud::keys;
use fedstep_cloud::ports::{Clock, Ledger, ObjectStore};
use fedstep_cloud::records::{ClosedBy, RoundStatus};
use fedstep_cloud::{Job, JobSpec};
use fedstep_test_support::federation::*;

/// 8M f32 parameters: 32 MiB a model, four shards of 8 MiB at
/// `shard_mib = 8`.
const PARAMS: usize = 8 << 20;

fn sharded_job(job_id: &str, shard_mib: u64, stages: &str) -> Job {
    JobSpec::from_toml(&format!(
        r#"
job_id = "{job_id}"
rounds = 2
clients = ["a", "b", "c"]
min_clients = 2
round_timeout_seconds = 600
[aggregation]
weighting = "examples"
{stages}
[sharding]
shard_mib = {shard_mib}
concurrency = 2
"#
    ))
    .unwrap()
}

fn values(seed: u32) -> Vec<f32> {
    (0..PARAMS)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f32 / 250.0 - 2.0
        })
        .collect()
}

/// Opens round 1 with a, b, c in and returns the hand-over's engine.
async fn open_full_round(fed: &Fed, job: &Job, swap_b: bool) {
    let engine = fed.engine("stream");
    fed.upload_initial(job, &values(0)).await;
    engine.start_round(job, 1, "t1").await.unwrap();
    for (i, client) in ["a", "b", "c"].iter().enumerate() {
        let row = fed
            .submit(
                job,
                1,
                client,
                &values(i as u32 + 1),
                10 * (i as u64 + 1),
                &[],
            )
            .await;
        if swap_b && *client == "b" {
            let other = fed.model_file("b-swapped", &values(99));
            fed.store.put_file(&row.model_key, &other).await.unwrap();
        }
        engine.on_update(&row).await.unwrap();
    }
}

async fn bytes_at(fed: &Fed, key: &str) -> Vec<u8> {
    let path = fed.dir.path().join(key.replace('/', "_"));
    fed.store.get_file(key, &path).await.unwrap();
    std::fs::read(path).unwrap()
}

/// Round 1 through the tasks, every task by its own engine, the shards in
/// reverse order; returns the plan's shard count and whether it planned
/// a statistics pass.
async fn through_the_tasks(fed: &Fed, job: &Job) -> (usize, bool) {
    let PlanOutcome::Planned {
        attempt,
        shards,
        statistics,
        concurrency,
    } = fed
        .engine("plan")
        .plan_round(&job.job_id, 1, ClosedBy::Stream)
        .await
        .unwrap()
    else {
        panic!("an open round is planned");
    };
    assert_eq!(concurrency, 2);
    if statistics {
        for &s in shards.iter().rev() {
            fed.engine(&format!("stats-{s}"))
                .shard_statistics(&job.job_id, 1, &attempt, s)
                .await
                .unwrap();
        }
        fed.engine("decide")
            .decide_round(&job.job_id, 1, &attempt)
            .await
            .unwrap();
    }
    for &s in shards.iter().rev() {
        let done = fed
            .engine(&format!("shard-{s}"))
            .aggregate_shard(&job.job_id, 1, &attempt, s)
            .await
            .unwrap();
        assert!(!done.superseded);
    }
    // Nothing is visible before the commit.
    assert!(fed
        .store
        .head(&keys::global_model(&job.job_id, 2))
        .await
        .unwrap()
        .is_none());
    let committed = fed
        .engine("commit")
        .commit_round(&job.job_id, 1, &attempt)
        .await
        .unwrap();
    let CommitOutcome::Closed(result) = committed else {
        panic!("no client was rejected: {committed:?}");
    };
    assert_eq!(result.accepted, ["a", "b", "c"]);
    // A retried commit returns the stored result.
    assert_eq!(
        fed.engine("commit-again")
            .commit_round(&job.job_id, 1, &attempt)
            .await
            .unwrap(),
        CommitOutcome::Closed(result)
    );
    (shards.len(), statistics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_tasks_in_any_order_make_the_one_shard_outputs_bit_for_bit() {
    for (name, stages, stateful) in [
        ("plain", "", false),
        (
            "clip-adam",
            "[[aggregation.stages]]\nkind = \"clip\"\nmax_norm = 500.0\n[[aggregation.stages]]\nkind = \"fedadam\"\nlearning_rate = 0.1",
            true,
        ),
    ] {
        let sharded = Fed::new();
        let job = sharded_job(name, 8, stages);
        open_full_round(&sharded, &job, false).await;
        let (shards, statistics) = through_the_tasks(&sharded, &job).await;
        assert_eq!(shards, 4, "{name}");
        assert_eq!(statistics, stateful, "{name}: clip needs norms");

        let whole = Fed::new();
        let job1 = sharded_job(name, 1024, stages);
        open_full_round(&whole, &job1, false).await;
        let result = whole
            .engine("one")
            .close_round(name, 1, ClosedBy::Stream)
            .await
            .unwrap();
        assert_eq!(result.accepted, ["a", "b", "c"]);

        let mut keys_to_compare = vec![keys::global_model(name, 2)];
        if stateful {
            keys_to_compare.push(keys::server_state(name, 2));
        }
        for key in keys_to_compare {
            let (a, b) = (bytes_at(&sharded, &key).await, bytes_at(&whole, &key).await);
            assert!(a.len() > PARAMS * 4, "{key}");
            assert!(a == b, "{name}: {key} differs between 4 shards and 1");
        }
        // Clients verify the model against the round's checksum: the
        // committed model's hash is where HEAD finds it.
        let head = sharded
            .store
            .head(&keys::global_model(name, 2))
            .await
            .unwrap()
            .unwrap();
        let start = sharded.engine("next").start_round(&job, 2, "t2").await.unwrap();
        assert_eq!(start.global_checksum, head.sha256);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_finds_a_mismatched_hash_sends_the_round_back_to_the_plan() {
    let fed = Fed::new();
    let job = sharded_job("swap", 8, "");
    open_full_round(&fed, &job, true).await;
    let PlanOutcome::Planned {
        attempt, shards, ..
    } = fed
        .engine("plan")
        .plan_round("swap", 1, ClosedBy::Stream)
        .await
        .unwrap()
    else {
        panic!("planned");
    };
    for &s in &shards {
        fed.engine("shard")
            .aggregate_shard("swap", 1, &attempt, s)
            .await
            .unwrap();
    }
    let CommitOutcome::Replan { replan, rejected } = fed
        .engine("commit")
        .commit_round("swap", 1, &attempt)
        .await
        .unwrap()
    else {
        panic!("b's object does not hash to its row");
    };
    assert!(replan);
    assert!(rejected["b"].starts_with("checksum:"), "{rejected:?}");
    // The rejection is recorded and the lease given up: a new plan starts
    // at once, without b, and the round closes with a and c.
    let row = fed.ledger.get_round("swap", 1).await.unwrap().unwrap();
    assert!(row.rejections.contains_key("b"));
    let result = fed
        .engine("again")
        .close_round("swap", 1, ClosedBy::Stream)
        .await
        .unwrap();
    assert_eq!(result.accepted, ["a", "c"]);
    assert!(result.rejected["b"].starts_with("checksum:"));
    // The first attempt's tasks, run late, change nothing.
    let late = fed
        .engine("late")
        .aggregate_shard("swap", 1, &attempt, 0)
        .await
        .unwrap();
    assert!(late.superseded);
    let row = fed.ledger.get_round("swap", 1).await.unwrap().unwrap();
    assert_eq!(row.status, RoundStatus::Closed);
}

/// A Map longer than one lease: each shard task renews the attempt's lease
/// as it starts, so the round cannot be claimed by another plan while the
/// attempt makes progress, and the commit closes it. Once the attempt
/// stops renewing, the lease runs out and a new plan may take over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_tasks_renew_the_lease_so_a_long_map_is_not_taken_over() {
    let fed = Fed::new();
    let job = sharded_job("long", 8, "");
    open_full_round(&fed, &job, false).await;
    let PlanOutcome::Planned {
        attempt, shards, ..
    } = fed
        .engine("plan")
        .plan_round("long", 1, ClosedBy::Stream)
        .await
        .unwrap()
    else {
        panic!("planned");
    };
    // One wave of the Map after another, each most of a lease long: three
    // leases pass in all.
    for &s in &shards[..3] {
        fed.clock.advance(LEASE - 5);
        let done = fed
            .engine("shard")
            .aggregate_shard("long", 1, &attempt, s)
            .await
            .unwrap();
        assert!(!done.superseded, "shard {s}");
        let now = fed.clock.now();
        assert!(
            fed.ledger
                .claim_round("long", 1, "rival", now, LEASE)
                .await
                .unwrap()
                .is_none(),
            "the round was claimable after shard {s}"
        );
    }
    // The attempt stalls for more than a lease: the round is free again.
    fed.clock.advance(LEASE + 1);
    let now = fed.clock.now();
    let rival = fed
        .ledger
        .claim_round("long", 1, "rival", now, LEASE)
        .await
        .unwrap();
    assert!(rival.is_some(), "an expired lease can be taken over");
    // The stalled attempt's last shard finds it lost the round.
    let late = fed
        .engine("shard")
        .aggregate_shard("long", 1, &attempt, shards[3])
        .await
        .unwrap();
    assert!(late.superseded);
}
