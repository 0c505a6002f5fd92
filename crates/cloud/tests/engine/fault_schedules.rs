//! Issue #6: the round protocol survives duplicated, reordered and racing
//! stream records, aggregators crashing after the claim / after writing the
//! global model / before the callback, callbacks after the deadline,
//! clients crashing mid-training or uploading twice, and late updates.
//!
//! Each schedule is one seeded run of `harness::Sim` (a 3–4 client, 2–3
//! round job); the invariants are checked after every round and at the end.
//!
//!   FEDSTEP_FAULT_SCHEDULES=<n>   how many schedules (default 150)
//!   FEDSTEP_FAULT_SEED=<n>        rerun exactly that one schedule
//!   FEDSTEP_FAULT_FIRST_SEED=<n>  start the seeds there (default 1)

use crate::harness::faults::Mutant;
use crate::harness::{run_schedule, Tally};

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn fault_schedules() {
    let seeds: Vec<u64> = match env_u64("FEDSTEP_FAULT_SEED") {
        Some(seed) => vec![seed],
        None => {
            let first = env_u64("FEDSTEP_FAULT_FIRST_SEED").unwrap_or(1);
            let n = env_u64("FEDSTEP_FAULT_SCHEDULES").unwrap_or(150);
            (first..first + n).collect()
        }
    };
    let rt = runtime();
    let mut total = Tally::default();
    let mut failed = Vec::new();
    for &seed in &seeds {
        match run_schedule(&rt, seed, Mutant::None) {
            Ok(t) => total.add(&t),
            Err(why) => {
                eprintln!("fault schedule seed {seed} FAILED: {why}");
                failed.push(seed);
            }
        }
    }
    println!(
        "coverage: {} rounds, {} deliveries ({} extra duplicates, {} races, {} failed and redelivered), \
         {} CloseRounds ({} racing), {} StartRound retries, {} client crashes, {} late records, {} rejections, {} hand-overs re-sent by a replay",
        total.rounds,
        total.deliveries,
        total.duplicate_deliveries,
        total.races,
        total.failed_deliveries,
        total.deadline_closes,
        total.close_races,
        total.start_retries,
        total.client_crashes,
        total.late_records,
        total.rejected,
        total.resent_callbacks
    );
    println!("faults fired: {:?}", total.fired);
    println!(
        "fault schedules: {} passed, {} failed",
        seeds.len() - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        panic!(
            "failing seeds: {failed:?}; rerun one with\n  FEDSTEP_FAULT_SEED={} cargo test --release -p fedstep-cloud --test engine fault_schedules -- --nocapture",
            failed[0]
        );
    }
    if seeds.len() >= 50 {
        // The schedules must really exercise what they claim to.
        for (what, n) in [
            ("races", total.races),
            ("racing CloseRounds", total.close_races),
            ("failed deliveries", total.failed_deliveries),
            ("client crashes", total.client_crashes),
            ("late records", total.late_records),
            ("hand-overs re-sent by a replay", total.resent_callbacks),
            ("rejections", total.rejected),
            ("deadline closes", total.deadline_closes),
            ("StartRound retries", total.start_retries),
        ] {
            assert!(n > 0, "no {what} in {} schedules", seeds.len());
        }
        for point in crate::harness::faults::POINTS {
            assert!(
                total
                    .fired
                    .keys()
                    .any(|k| k.starts_with(&format!("{point:?}/"))),
                "fault {point:?} never fired: {:?}",
                total.fired
            );
        }
    }
}

/// The harness is only worth something if a broken ledger fails it.
fn failures_with(mutant: Mutant, schedules: u64) -> Vec<String> {
    let rt = runtime();
    (1..=schedules)
        .filter_map(|seed| run_schedule(&rt, seed, mutant).err())
        .collect()
}

#[test]
fn the_harness_catches_a_ledger_that_drops_rejections() {
    let failures = failures_with(Mutant::DropsRejections, 30);
    // Either an invariant sees a rejected client missing from the round's
    // record, or the commit sees the ledger lose the rejection it wrote.
    assert!(
        failures
            .iter()
            .any(|f| f.contains("must be exactly one") || f.contains("did not keep the rejection")),
        "{failures:?}"
    );
}

/// Before the round's aggregation became tasks, two aggregators over a
/// ledger without conditional writes both closed the round, and the
/// harness caught it ("closed 2 times"). Now every task of an attempt
/// checks the attempt still holds the round's lease, and the commit reads
/// the row before it closes: the attempts steal the round from each other
/// until one finishes, and each round still closes once.
#[test]
fn a_ledger_without_conditional_writes_still_closes_each_round_once() {
    let failures = failures_with(Mutant::NoConditions, 10);
    assert!(failures.is_empty(), "{failures:?}");
}
