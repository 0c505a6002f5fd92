//! Async jobs (issue #17) under seeded fault schedules: rows trained from
//! random older versions, delivered once or twice, some by two engines at
//! once; rows that arrive after their version was claimed (carried into the
//! next); StartRound retried; CloseRound run by two engines racing, or
//! taking over a claim whose holder died. After every version:
//!
//! - it is CLOSED, once, and its global model equals this file's own
//!   recomputation from the rows it accepted:
//!   g_{r+1} = g_r + Σ (nᵢ/Σn)·s(τᵢ)·(xᵢ − g_{r−τᵢ}), s(τ) = 1/(1+τ);
//!
//! and at the end, every update a client submitted was accepted in exactly
//! one version or carries a rejection reason (stale, late and not carried),
//! and none was accepted twice.
//!
//!   FEDSTEP_ASYNC_SCHEDULES=<n>   how many seeds (default 40)

use std::collections::{BTreeMap, BTreeSet};

use fedstep_cloud::ports::{Clock, Ledger};
use fedstep_cloud::records::{ClosedBy, RoundStatus, UpdateRecord};
use fedstep_cloud::{Job, JobSpec, UpdateOutcome};
use fedstep_test_support::federation::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const JOB: &str = "async-faults";
const CLIENTS: [&str; 4] = ["a", "b", "c", "d"];
const VERSIONS: u32 = 4;
const MAX_STALENESS: u32 = 2;

fn job(k: u32) -> Job {
    JobSpec::from_toml(&format!(
        "job_id = \"{JOB}\"\nrounds = {VERSIONS}\nclients = [\"a\", \"b\", \"c\", \"d\"]\n\
         min_clients = 1\nround_timeout_seconds = 600\nmode = \"async\"\n\
         [aggregation]\nweighting = \"examples\"\n[async]\nbuffer_size = {k}\n\
         staleness_exponent = 1.0\nmax_staleness = {MAX_STALENESS}\n"
    ))
    .unwrap()
}

/// What the schedule submitted: (client, checksum) → (version, base).
type Submitted = BTreeMap<(String, String), (u32, u32)>;

async fn deliver(fed: &Fed, rng: &mut ChaCha8Rng, row: &UpdateRecord) -> Result<(), String> {
    let (e1, e2) = (fed.engine("agg-1"), fed.engine("agg-2"));
    let outcome = if rng.random_bool(0.3) {
        // The same record to two engines at once.
        let (x, y) = tokio::join!(e1.on_update(row), e2.on_update(row));
        y.map_err(|e| e.to_string())?;
        x
    } else {
        e1.on_update(row).await
    };
    outcome.map_err(|e| e.to_string())?;
    if rng.random_bool(0.3) {
        // Redelivered: a replay, never counted twice.
        e2.on_update(row).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn close(fed: &Fed, rng: &mut ChaCha8Rng, round: u32, by: ClosedBy) -> Result<(), String> {
    let (e1, e2) = (fed.engine("agg-1"), fed.engine("agg-2"));
    match rng.random_range(0..3) {
        0 => {
            let (x, y) = tokio::join!(
                e1.close_round(JOB, round, by),
                e2.close_round(JOB, round, by)
            );
            let (x, y) = (x.map_err(|e| e.to_string())?, y.map_err(|e| e.to_string())?);
            if x != y {
                return Err(format!(
                    "version {round}: racing closes returned {x:?} and {y:?}"
                ));
            }
        }
        1 => {
            // An aggregator claimed and died; the retry takes over after the lease.
            fed.ledger
                .claim_round(JOB, round, "crashed", fed.clock.now(), LEASE)
                .await
                .map_err(|e| e.to_string())?;
            fed.clock.advance(LEASE + 1);
            e2.close_round(JOB, round, by)
                .await
                .map_err(|e| e.to_string())?;
        }
        _ => {
            e1.close_round(JOB, round, by)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// The version's global model, recomputed from the rows it accepted.
async fn check_version(fed: &Fed, job: &Job, round: u32) -> Result<Vec<String>, String> {
    let row = fed.ledger.get_round(JOB, round).await.unwrap().unwrap();
    if row.status != RoundStatus::Closed {
        return Err(format!("version {round} is {:?}", row.status));
    }
    let result = row.result.unwrap();
    let g = fed.global(job, round).await;
    let mut want = g.clone();
    let mut rows = Vec::new();
    for client in &result.accepted {
        let u = fed
            .ledger
            .get_update(client, JOB, round)
            .await
            .unwrap()
            .unwrap();
        rows.push(u);
    }
    let total: f64 = rows.iter().map(|u| u.num_examples.as_f64().unwrap()).sum();
    for u in &rows {
        let base = u.base_round.unwrap_or(round);
        let s = 1.0 / (1.0 + f64::from(round - base));
        let w = u.num_examples.as_f64().unwrap() / total;
        let x = fed.values(&u.model_key).await;
        let gb = fed.global(job, base).await;
        for (k, v) in want.iter_mut().enumerate() {
            *v += (w * s * (f64::from(x[k]) - f64::from(gb[k]))) as f32;
        }
    }
    let got = fed.global(job, round + 1).await;
    for (k, (a, b)) in got.iter().zip(&want).enumerate() {
        if (a - b).abs() > 1e-4 * b.abs().max(1.0) {
            return Err(format!(
                "version {round}: element {k} is {a}, recomputed {b} from {:?}",
                result.accepted
            ));
        }
    }
    Ok(rows.into_iter().map(|u| u.checksum).collect())
}

/// What a schedule exercised.
#[derive(Default)]
struct Tally {
    submitted: usize,
    late: usize,
    carried: usize,
}

async fn run(seed: u64) -> Result<Tally, String> {
    let mut tally = Tally::default();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let fed = Fed::new();
    let k = rng.random_range(1..=3);
    let job = job(k);
    fed.upload_initial(&job, &[0.0, 0.0]).await;
    let mut submitted: Submitted = BTreeMap::new();
    let mut accepted: BTreeMap<(String, String), u32> = BTreeMap::new();
    for round in 1..=VERSIONS {
        let e1 = fed.engine("agg-1");
        e1.start_round(&job, round, &format!("t{round}"))
            .await
            .map_err(|e| e.to_string())?;
        if rng.random_bool(0.3) {
            // StartRound retried: late rows must not be carried twice.
            e1.start_round(&job, round, &format!("t{round}-retry"))
                .await
                .map_err(|e| e.to_string())?;
        }
        // Rows carried in from the versions before, then new ones.
        let mut rows = Vec::new();
        for c in CLIENTS {
            if let Some(carried) = fed.ledger.get_update(c, JOB, round).await.unwrap() {
                tally.carried += 1;
                rows.push(carried);
                continue;
            }
            if rng.random_bool(0.2) && c != "a" {
                continue; // still training
            }
            // a submits fresh, so every version has a usable row.
            let tau = if c == "a" {
                0
            } else {
                rng.random_range(0..=MAX_STALENESS + 1)
            };
            let base = round.saturating_sub(tau).max(1);
            let x = [
                rng.random_range(-2.0f32..2.0),
                rng.random_range(-2.0f32..2.0),
            ];
            let n = rng.random_range(1..20u64);
            let row = fed
                .submit_from(&job, round, Some(base), c, &x, n, &[])
                .await;
            submitted.insert((c.to_string(), row.checksum.clone()), (round, base));
            rows.push(row);
        }
        // a first (so K can be reached), the rest shuffled; some arrive
        // after the version was claimed.
        for i in (2..rows.len()).rev() {
            let j = rng.random_range(1..=i);
            rows.swap(i, j);
        }
        let cut = rng.random_range(1..=rows.len());
        for row in &rows[..cut] {
            deliver(&fed, &mut rng, row).await?;
        }
        let token = format!("t{round}");
        let handed_over = fed
            .callback
            .calls()
            .iter()
            .any(|c| format!("{c:?}").contains(&token));
        let by = if handed_over {
            ClosedBy::Stream
        } else {
            fed.clock.advance(601);
            ClosedBy::Deadline
        };
        close(&fed, &mut rng, round, by).await?;
        for row in &rows[cut..] {
            let outcome = fed
                .engine("agg-1")
                .on_update(row)
                .await
                .map_err(|e| e.to_string())?;
            if !matches!(outcome, UpdateOutcome::Late(_) | UpdateOutcome::Rejected(_)) {
                return Err(format!("a row after the close was {outcome:?}"));
            }
            tally.late += 1;
        }
        for checksum in check_version(&fed, &job, round).await? {
            let client = fed
                .ledger
                .get_round(JOB, round)
                .await
                .unwrap()
                .unwrap()
                .result
                .unwrap()
                .accepted
                .into_iter()
                .find(|c| submitted.contains_key(&(c.clone(), checksum.clone())))
                .ok_or_else(|| format!("version {round} accepted an update nobody submitted"))?;
            if let Some(v) = accepted.insert((client.clone(), checksum), round) {
                return Err(format!(
                    "{client}'s update accepted in versions {v} and {round}"
                ));
            }
        }
    }
    // Every update accepted once, or rejected with a reason.
    for ((client, checksum), (round, _)) in &submitted {
        if accepted.contains_key(&(client.clone(), checksum.clone())) {
            continue;
        }
        let mut reasons = BTreeSet::new();
        for r in *round..=VERSIONS {
            let row = fed.ledger.get_round(JOB, r).await.unwrap().unwrap();
            if let Some(reason) = row.rejections.get(client) {
                reasons.insert(reason.clone());
            }
        }
        if reasons.is_empty() {
            return Err(format!(
                "{client}'s update of version {round} was neither accepted nor rejected"
            ));
        }
    }
    tally.submitted = submitted.len();
    Ok(tally)
}

#[test]
fn async_fault_schedules() {
    let n: u64 = std::env::var("FEDSTEP_ASYNC_SCHEDULES")
        .ok()
        .map_or(40, |v| {
            v.parse().expect("FEDSTEP_ASYNC_SCHEDULES is a number")
        });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut failed = Vec::new();
    let mut total = Tally::default();
    for seed in 1..=n {
        match rt.block_on(run(seed)) {
            Ok(t) => {
                total.submitted += t.submitted;
                total.late += t.late;
                total.carried += t.carried;
            }
            Err(why) => {
                eprintln!("async schedule seed {seed} FAILED: {why}");
                failed.push(seed);
            }
        }
    }
    println!(
        "async schedules: {n} run, {} updates submitted, {} delivered after their version closed, \
         {} carried into a later version, {} failed",
        total.submitted,
        total.late,
        total.carried,
        failed.len()
    );
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
}
