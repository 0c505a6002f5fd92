//! Async jobs in the round engine (issue #17): a version is a round whose
//! hand-over comes at K usable updates, and a row trained from an older
//! version is rebased onto the newest with its staleness discount:
//! x' = g_r + s(τ)·(x − g_b), then the pipeline's weighted mean.

use fedstep_cloud::ports::{Clock, Ledger};
use fedstep_cloud::records::ClosedBy;
use fedstep_cloud::{Job, JobSpec, UpdateOutcome};
use fedstep_test_support::federation::*;

pub(super) const JOB: &str = "buffered";

/// Three clients, K = 2, s(τ) = 1/(1+τ), at most one version stale.
fn async_job() -> fedstep_cloud::Job {
    JobSpec::from_toml(&format!(
        "job_id = \"{JOB}\"\nrounds = 5\nclients = [\"a\", \"b\", \"c\"]\nmin_clients = 1\n\
         round_timeout_seconds = 600\nmode = \"async\"\n[aggregation]\nweighting = \"examples\"\n\
         [async]\nbuffer_size = 2\nstaleness_exponent = 1.0\nmax_staleness = 1\n"
    ))
    .unwrap()
}

fn close(got: &[f32], want: &[f32]) -> bool {
    got.len() == want.len() && got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6)
}

#[tokio::test]
async fn versions_are_made_from_the_first_k_updates_with_stale_ones_rebased() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = async_job();
    fed.upload_initial(&job, &[0.0, 0.0]).await;

    // Version 1: a and b are in, c is still training. K = 2 hands over.
    engine.start_round(&job, 1, "t1").await.unwrap();
    let a = fed.submit(&job, 1, "a", &[1.0, 1.0], 10, &[]).await;
    let b = fed.submit(&job, 1, "b", &[3.0, 5.0], 10, &[]).await;
    assert!(matches!(
        engine.on_update(&a).await.unwrap(),
        UpdateOutcome::Recorded { usable: 1, .. }
    ));
    assert!(matches!(
        engine.on_update(&b).await.unwrap(),
        UpdateOutcome::HandedOver { usable: 2, .. }
    ));
    let v1 = engine.close_round(JOB, 1, ClosedBy::Stream).await.unwrap();
    assert_eq!(v1.accepted, ["a", "b"]);
    assert!(v1.continue_training);
    let g2 = fed.global(&job, 2).await;
    assert!(close(&g2, &[2.0, 3.0]), "{g2:?}");

    // Version 2: c's update trained from version 1 arrives (τ = 1, s = 1/2)
    // beside a's fresh one.
    engine.start_round(&job, 2, "t2").await.unwrap();
    let c = fed
        .submit_from(&job, 2, Some(1), "c", &[5.0, -1.0], 10, &[])
        .await;
    let a2 = fed
        .submit_from(&job, 2, Some(2), "a", &[2.5, 3.5], 10, &[])
        .await;
    engine.on_update(&c).await.unwrap();
    assert!(matches!(
        engine.on_update(&a2).await.unwrap(),
        UpdateOutcome::HandedOver { usable: 2, .. }
    ));
    engine.close_round(JOB, 2, ClosedBy::Stream).await.unwrap();
    // c' = g2 + ½·(c − g1) = [2, 3] + ½·[5, −1] = [4.5, 2.5]; the mean
    // with a's [2.5, 3.5] (equal examples) is [3.5, 3].
    let g3 = fed.global(&job, 3).await;
    assert!(close(&g3, &[3.5, 3.0]), "{g3:?}");

    // Version 3: a row two versions stale is rejected with that reason,
    // and does not take a place in the buffer.
    engine.start_round(&job, 3, "t3").await.unwrap();
    let stale = fed
        .submit_from(&job, 3, Some(1), "b", &[9.0, 9.0], 10, &[])
        .await;
    let UpdateOutcome::Rejected(reason) = engine.on_update(&stale).await.unwrap() else {
        panic!("a row past max_staleness must be rejected")
    };
    assert!(reason.starts_with("stale:"), "{reason}");
    let round = fed.ledger.get_round(JOB, 3).await.unwrap().unwrap();
    assert!(round.rejections["b"].starts_with("stale:"));
    // A version from the future is no version the client trained from.
    let future = fed
        .submit_from(&job, 3, Some(4), "c", &[0.0, 0.0], 10, &[])
        .await;
    let UpdateOutcome::Rejected(reason) = engine.on_update(&future).await.unwrap() else {
        panic!("a base_round after the round must be rejected")
    };
    assert!(reason.starts_with("base_round:"), "{reason}");
}

#[tokio::test]
async fn a_server_learning_rate_moves_the_global_model_part_of_the_way() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = JobSpec::from_toml(&format!(
        "job_id = \"{JOB}\"\nrounds = 5\nclients = [\"a\", \"b\", \"c\"]\nmin_clients = 1\n\
         round_timeout_seconds = 600\nmode = \"async\"\n[aggregation]\nweighting = \"examples\"\n\
         [async]\nbuffer_size = 2\nserver_learning_rate = 0.5\n"
    ))
    .unwrap();
    fed.upload_initial(&job, &[2.0, 0.0]).await;
    engine.start_round(&job, 1, "t1").await.unwrap();
    for (client, weights) in [("a", [4.0, 2.0]), ("b", [6.0, 6.0])] {
        let row = fed.submit(&job, 1, client, &weights, 10, &[]).await;
        engine.on_update(&row).await.unwrap();
    }
    engine.close_round(JOB, 1, ClosedBy::Stream).await.unwrap();
    // The buffer's mean is [5, 4]; η = ½ moves [2, 0] half way there.
    let g2 = fed.global(&job, 2).await;
    assert!(close(&g2, &[3.5, 2.0]), "{g2:?}");
}

#[tokio::test]
async fn a_sync_round_refuses_an_update_trained_from_another_round() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = job("sync", 3, &["a", "b"], 1);
    fed.upload_initial(&job, &[0.0]).await;
    engine.start_round(&job, 1, "t1").await.unwrap();
    let row = fed.submit_from(&job, 1, Some(2), "a", &[1.0], 1, &[]).await;
    let UpdateOutcome::Rejected(reason) = engine.on_update(&row).await.unwrap() else {
        panic!("a sync round takes only rows trained from it")
    };
    assert!(reason.contains("synchronous"), "{reason}");
}

/// A row that reaches its version after the version was claimed is carried
/// into the next version that opens, once, by its StartRound.
#[tokio::test]
async fn a_late_row_is_carried_into_the_next_version_not_lost() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = async_job();
    fed.upload_initial(&job, &[0.0, 0.0]).await;

    engine.start_round(&job, 1, "t1").await.unwrap();
    for (client, x) in [("a", [1.0, 1.0]), ("b", [3.0, 3.0])] {
        let row = fed.submit(&job, 1, client, &x, 10, &[]).await;
        engine.on_update(&row).await.unwrap();
    }
    engine.close_round(JOB, 1, ClosedBy::Stream).await.unwrap();
    // c trained from version 1 too, and its row arrives after the close.
    let late = fed.submit(&job, 1, "c", &[6.0, 6.0], 10, &[]).await;
    let UpdateOutcome::Late(reason) = engine.on_update(&late).await.unwrap() else {
        panic!("a row for a closed version is late")
    };
    assert!(reason.contains("waiting to be carried"), "{reason}");
    assert!(fed.ledger.get_update("c", JOB, 2).await.unwrap().is_none());

    // Version 2 opens: c's row comes along, still naming version 1.
    engine.start_round(&job, 2, "t2").await.unwrap();
    let carried = fed.ledger.get_update("c", JOB, 2).await.unwrap().unwrap();
    assert_eq!(carried.base_round, Some(1));
    assert_eq!(carried.model_key, late.model_key);
    assert_eq!(carried.checksum, late.checksum);
    let v1 = fed.ledger.get_round(JOB, 1).await.unwrap().unwrap();
    assert!(
        v1.rejections["c"].ends_with("carried into version 2"),
        "{:?}",
        v1.rejections
    );
    engine.on_update(&carried).await.unwrap();
    let a2 = fed
        .submit_from(&job, 2, Some(2), "a", &[2.0, 2.0], 10, &[])
        .await;
    assert!(matches!(
        engine.on_update(&a2).await.unwrap(),
        UpdateOutcome::HandedOver { usable: 2, .. }
    ));
    let v2 = engine.close_round(JOB, 2, ClosedBy::Stream).await.unwrap();
    assert_eq!(v2.accepted, ["a", "c"]);
    // g2 = [2, 2]; c' = g2 + ½(c − g1) = [5, 5]; mean with a's [2, 2].
    let g3 = fed.global(&job, 3).await;
    assert!(close(&g3, &[3.5, 3.5]), "{g3:?}");

    // b's row for version 2 is recorded late after version 3 opened: the
    // next StartRound carries it; nothing is carried twice.
    engine.start_round(&job, 3, "t3").await.unwrap();
    let late_b = fed
        .submit_from(&job, 2, Some(2), "b", &[4.0, 4.0], 10, &[])
        .await;
    assert!(matches!(
        engine.on_update(&late_b).await.unwrap(),
        UpdateOutcome::Late(_)
    ));
    assert!(fed.ledger.get_update("b", JOB, 3).await.unwrap().is_none());
    let c3 = fed
        .submit_from(&job, 3, Some(3), "c", &[1.0, 1.0], 10, &[])
        .await;
    let a3 = fed
        .submit_from(&job, 3, Some(3), "a", &[1.0, 1.0], 10, &[])
        .await;
    for row in [&c3, &a3] {
        engine.on_update(row).await.unwrap();
    }
    engine.close_round(JOB, 3, ClosedBy::Stream).await.unwrap();
    engine.start_round(&job, 4, "t4").await.unwrap();
    let carried_b = fed.ledger.get_update("b", JOB, 4).await.unwrap().unwrap();
    assert_eq!(
        (carried_b.base_round, carried_b.checksum.as_str()),
        (Some(2), late_b.checksum.as_str())
    );
    assert!(fed.ledger.get_update("c", JOB, 4).await.unwrap().is_none());
    // Its staleness counts from the version it was trained from: 4 − 2 = 2
    // is past max_staleness 1, so it is rejected as stale there, with that
    // reason, not lost.
    let UpdateOutcome::Rejected(reason) = engine.on_update(&carried_b).await.unwrap() else {
        panic!("a carried row past max_staleness is rejected")
    };
    assert!(reason.starts_with("stale:"), "{reason}");
}

/// `[async] max_updates` and `max_seconds` end the job at the first
/// version that reaches them (`continue` false); `rounds` still caps it.
#[tokio::test]
async fn an_async_job_stops_on_its_update_count_or_its_time() {
    for (limit, want_versions) in [("max_updates = 3", 2), ("max_seconds = 100", 2)] {
        let fed = Fed::new();
        let engine = fed.engine("agg");
        let job = JobSpec::from_toml(&format!(
            "job_id = \"{JOB}\"\nrounds = 5\nclients = [\"a\", \"b\", \"c\"]\nmin_clients = 1\n\
             round_timeout_seconds = 600\nmode = \"async\"\n[async]\nbuffer_size = 2\n{limit}\n"
        ))
        .unwrap();
        fed.upload_initial(&job, &[0.0]).await;
        let mut versions = 0;
        for round in 1..=5 {
            engine
                .start_round(&job, round, &format!("t{round}"))
                .await
                .unwrap();
            for client in ["a", "b"] {
                let row = fed.submit(&job, round, client, &[1.0], 1, &[]).await;
                engine.on_update(&row).await.unwrap();
            }
            // Each version takes a minute.
            fed.clock.advance(60);
            let result = engine
                .close_round(JOB, round, ClosedBy::Stream)
                .await
                .unwrap();
            versions += 1;
            if !result.continue_training {
                break;
            }
        }
        assert_eq!(versions, want_versions, "{limit}");
    }
    let err = JobSpec::from_toml(&format!(
        "job_id = \"{JOB}\"\nrounds = 5\nclients = [\"a\"]\nmin_clients = 1\n\
         round_timeout_seconds = 600\nmode = \"async\"\n[async]\nmax_updates = 0\n"
    ))
    .unwrap_err();
    assert!(err.contains("max_updates must be at least 1"), "{err}");
}

/// No version follows the job's last one: rows still waiting to be
/// carried when the job ends are rejected for good by Finalize, and a row
/// late for the last version after its commit is told so at once. None is
/// left waiting, none is carried into a version that never opens.
/// A two-version async job (a, b, c, d; K = 2) whose version 1 is closed
/// and whose version 2 is being aggregated by another engine (a lease of
/// 10 s) with c's rows for versions 2 and 1 recorded after version 2's
/// StartRound looked: both wait to be carried.
pub(super) async fn c_waiting_while_version_two_aggregates(fed: &Fed, engine: &Engine) -> Job {
    let job = JobSpec::from_toml(&format!(
        "job_id = \"{JOB}\"\nrounds = 2\nclients = [\"a\", \"b\", \"c\", \"d\"]\nmin_clients = 1\n\
         round_timeout_seconds = 600\nmode = \"async\"\n[async]\nbuffer_size = 2\nmax_staleness = 1\n"
    ))
    .unwrap();
    fed.upload_initial(&job, &[0.0]).await;
    engine.start_round(&job, 1, "t1").await.unwrap();
    for client in ["a", "b"] {
        let row = fed.submit(&job, 1, client, &[1.0], 1, &[]).await;
        engine.on_update(&row).await.unwrap();
    }
    engine.close_round(JOB, 1, ClosedBy::Stream).await.unwrap();
    engine.start_round(&job, 2, "t2").await.unwrap();
    for client in ["a", "b"] {
        let row = fed
            .submit_from(&job, 2, Some(2), client, &[2.0], 1, &[])
            .await;
        engine.on_update(&row).await.unwrap();
    }
    let now = fed.clock.now();
    fed.ledger
        .claim_round(JOB, 2, "elsewhere", now, 10)
        .await
        .unwrap()
        .expect("version 2 is open");
    for (round, base) in [(2, 2), (1, 1)] {
        let row = fed
            .submit_from(&job, round, Some(base), "c", &[3.0], 1, &[])
            .await;
        let UpdateOutcome::Late(reason) = engine.on_update(&row).await.unwrap() else {
            panic!("c's row for version {round} is late")
        };
        assert!(reason.contains("waiting to be carried"), "{reason}");
    }
    job
}

#[tokio::test]
async fn late_rows_of_the_last_version_are_settled_when_the_job_ends() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    // While version 2 is being aggregated: c's row for it, and c's row for
    // version 1, recorded after version 2's StartRound looked. Both wait.
    let job = c_waiting_while_version_two_aggregates(&fed, &engine).await;
    // That aggregator's lease runs out; the close takes the version over.
    fed.clock.advance(60);
    let last = engine.close_round(JOB, 2, ClosedBy::Stream).await.unwrap();
    assert!(!last.continue_training, "rounds = 2 ends the job");

    // After the commit, d's late row is told at once that the job ended.
    let d = fed.submit_from(&job, 2, Some(2), "d", &[4.0], 1, &[]).await;
    let UpdateOutcome::Late(reason) = engine.on_update(&d).await.unwrap() else {
        panic!("d's row for the closed last version is late")
    };
    assert!(reason.contains("the job ended with version 2"), "{reason}");

    // Finalize settles c's two rows; a retried Finalize changes nothing.
    for _ in 0..2 {
        engine.finalize(JOB, 2, &last).await.unwrap();
        for version in [1, 2] {
            let row = fed.ledger.get_round(JOB, version).await.unwrap().unwrap();
            let reason = &row.rejections["c"];
            assert!(
                reason.starts_with("late:")
                    && reason
                        .ends_with("the job ended with version 2, so no later version took it"),
                "version {version}: {reason}"
            );
        }
    }
    for client in ["c", "d"] {
        assert!(fed
            .ledger
            .get_update(client, JOB, 3)
            .await
            .unwrap()
            .is_none());
    }
}

/// A late row that no StartRound still to run would carry gets its final
/// reason when it is recorded: one for a version so far back that every
/// later version looks past it, and one that reaches the ledger after the
/// job's Finalize. A late row that a later StartRound will carry still
/// waits, and is carried.
#[tokio::test]
async fn late_rows_no_version_will_carry_are_settled_when_they_arrive() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    // max_staleness 1: a version carries late rows from 2 versions back.
    let job = JobSpec::from_toml(&format!(
        "job_id = \"{JOB}\"\nrounds = 4\nclients = [\"a\", \"b\", \"c\"]\nmin_clients = 1\n\
         round_timeout_seconds = 600\nmode = \"async\"\n[async]\nbuffer_size = 2\nmax_staleness = 1\n"
    ))
    .unwrap();
    fed.upload_initial(&job, &[0.0]).await;
    let make_version = |round: u32| {
        let (fed, engine, job) = (&fed, &engine, &job);
        async move {
            engine
                .start_round(job, round, &format!("t{round}"))
                .await
                .unwrap();
            for client in ["a", "b"] {
                let row = fed
                    .submit_from(job, round, Some(round), client, &[1.0], 1, &[])
                    .await;
                engine.on_update(&row).await.unwrap();
            }
            engine
                .close_round(JOB, round, ClosedBy::Stream)
                .await
                .unwrap()
        }
    };
    for round in 1..=2 {
        make_version(round).await;
    }
    engine.start_round(&job, 3, "t3").await.unwrap();

    // Version 3 is open: StartRound of 3 looked back to version 1 before
    // c's row for it arrived, and StartRound of 4 looks back to 2 only.
    let c1 = fed.submit_from(&job, 1, Some(1), "c", &[3.0], 1, &[]).await;
    let UpdateOutcome::Late(reason) = engine.on_update(&c1).await.unwrap() else {
        panic!("c's row for version 1 is late")
    };
    assert!(
        reason.contains("version 3 had already opened") && !reason.contains("waiting"),
        "{reason}"
    );
    let stored = fed.ledger.get_round(JOB, 1).await.unwrap().unwrap();
    assert_eq!(stored.rejections["c"], reason);
    // Version 2 is within reach of StartRound 4: that row waits.
    let c2 = fed.submit_from(&job, 2, Some(2), "c", &[3.0], 1, &[]).await;
    let UpdateOutcome::Late(reason) = engine.on_update(&c2).await.unwrap() else {
        panic!("c's row for version 2 is late")
    };
    assert!(reason.contains("waiting to be carried"), "{reason}");

    for client in ["a", "b"] {
        let row = fed
            .submit_from(&job, 3, Some(3), client, &[1.0], 1, &[])
            .await;
        engine.on_update(&row).await.unwrap();
    }
    engine.close_round(JOB, 3, ClosedBy::Stream).await.unwrap();
    let last = make_version(4).await;
    assert!(!last.continue_training, "rounds = 4 ends the job");
    // StartRound 4 carried version 2's row and not version 1's.
    let carried = fed.ledger.get_update("c", JOB, 4).await.unwrap().unwrap();
    assert_eq!(carried.base_round, Some(2));
    let v2 = fed.ledger.get_round(JOB, 2).await.unwrap().unwrap();
    assert!(v2.rejections["c"].contains("carried into version 4"));
    engine.finalize(JOB, 4, &last).await.unwrap();

    // After Finalize, a row late for version 3 (which nothing reads again)
    // is told at once that the job ended.
    let c3 = fed.submit_from(&job, 3, Some(3), "c", &[3.0], 1, &[]).await;
    let UpdateOutcome::Late(reason) = engine.on_update(&c3).await.unwrap() else {
        panic!("c's row for version 3 is late")
    };
    assert!(
        reason.ends_with("the job ended with version 4, so no later version took it"),
        "{reason}"
    );
    let v3 = fed.ledger.get_round(JOB, 3).await.unwrap().unwrap();
    assert_eq!(v3.rejections["c"], reason);
}
