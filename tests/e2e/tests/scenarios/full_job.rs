//! Issue #3, scenario (a) and the latency figure (e): three built-in
//! clients, three rounds, everything as real processes: the emulator worker,
//! three `fedstep-client run` (exit_on_complete), `fedstep job start` with
//! examples/job.toml. The execution succeeds; each round's next global model
//! is the example-weighted mean of the three uploads, recomputed here from
//! the files and rows; the ledger shows CLOSED rounds; the clients exit 0
//! on training_complete.

use std::time::{Duration, Instant};

use fedstep_cloud::keys;
use fedstep_cloud::ports::{Ledger, ObjectStore};
use fedstep_cloud::records::ClosedBy;
use fedstep_e2e::{execution, fedavg, launch, log_times, Binaries, Deployment};

const CLIENTS: [&str; 3] = ["site-a", "site-b", "site-c"];
/// Relative tolerance of the FedAvg check. The aggregator accumulates in
/// f32 (unit roundoff 6e-8): three products and two additions of O(1)
/// values stay within a few ulps, ~5e-7 relative; 2e-6 leaves headroom yet
/// is far below what a wrong weighting produces (checked below).
const TOLERANCE: f64 = 2e-6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_three_rounds_succeed_with_the_weighted_mean() {
    let _one_at_a_time = crate::one_at_a_time().await;
    let bins = Binaries::find();
    let Some(d) = Deployment::create("a", &CLIENTS).await else {
        return;
    };
    let mut worker = launch::worker(&d, &bins, "worker-a");
    let mut clients = launch::digits_clients(&d, &bins, &CLIENTS, |_| None);

    let job_id = fedstep_e2e::unique("digits");
    let job = launch::example_job_file(&d, &bins, &job_id);
    let t0 = Instant::now();
    let started = launch::fedstep(&d, &bins, &["job", "start", "--config", &job]);
    assert!(
        started.contains(&format!("started job {job_id}")),
        "{started}"
    );

    let arn = d.execution_arn(&job_id);
    let logs = || {
        let mut all = vec![&worker];
        all.extend(clients.iter());
        launch::logs(&all)
    };
    let done = execution::wait_until_done(&d.sfn, &arn, Duration::from_secs(300), logs).await;
    eprintln!("3 rounds: {:?} in {:.1?}", done.status(), t0.elapsed());
    execution::assert_succeeded(&done, logs);

    // exit_on_complete: every client leaves with status 0 on training_complete.
    for c in clients.iter_mut() {
        c.expect_exit_zero(Duration::from_secs(60)).await;
        assert!(
            c.log_text()
                .contains(&format!("job {job_id} is complete; exiting")),
            "{}",
            c.log_tail(30)
        );
    }

    // The aggregator streamed from and to S3: it wrote no local file.
    launch::assert_worker_wrote_nothing(&d, "worker-a");

    // The ledger: three CLOSED rounds, every client accepted in each.
    let rows = d
        .closed_rounds(&job_id, 3, &CLIENTS, ClosedBy::Stream)
        .await;
    let ledger = d.ledger();

    // CloudWatch metrics: one EMF line per closed round on the worker's
    // stdout, its counts the ledger's.
    let emf: Vec<serde_json::Value> = worker
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("_aws").is_some() && v["JobId"] == job_id.as_str())
        .collect();
    assert_eq!(emf.len(), 3, "one EMF line per round: {emf:?}");
    for (line, row) in emf.iter().zip(&rows) {
        let result = row.result.as_ref().expect("a result");
        assert_eq!(line["Round"], row.round);
        assert_eq!(line["ClientsAccepted"], result.accepted.len());
        assert_eq!(line["ClientsRejected"], result.rejected.len());
        assert!(line["BytesRead"].as_u64().is_some_and(|b| b > 0), "{line}");
        assert_eq!(line["_aws"]["CloudWatchMetrics"][0]["Namespace"], "Fedstep");
    }

    // Each next global model = Σ num_examples·update / Σ num_examples.
    let store = d.store();
    let read = |key: String| {
        let path = d.path(&key.replace('/', "_"));
        let store = &store;
        async move {
            let info = store
                .get_file(&key, &path)
                .await
                .unwrap_or_else(|e| panic!("{key}: {e}"));
            (std::fs::read(&path).unwrap(), info.sha256)
        }
    };
    // The report page of this job: every figure below is also checked
    // against the report's report.json.
    let report_dir = d.path("report");
    let wrote = launch::fedstep(
        &d,
        &bins,
        &[
            "job",
            "report",
            &job_id,
            "--out",
            report_dir.to_str().unwrap(),
        ],
    );
    assert!(wrote.contains("report.html"), "{wrote}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report_dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["execution"], "SUCCEEDED");
    assert_eq!(report["rounds"].as_array().unwrap().len(), 3);
    for (view, row) in report["rounds"].as_array().unwrap().iter().zip(&rows) {
        let result = row.result.as_ref().unwrap();
        assert_eq!(view["status"], "CLOSED");
        for (k, v) in &result.metrics {
            let shown = view["metrics"][k].as_f64().unwrap_or(f64::NAN);
            assert!(same(shown, *v), "round {}: {k}: {shown} vs {v}", row.round);
        }
    }
    let html = std::fs::read_to_string(report_dir.join("report.html")).unwrap();
    assert!(html.matches("<figure>").count() >= 4, "charts in the page");
    // To look at it (docs/report-screenshot.png was taken from one).
    if let Some(keep) = std::env::var_os("FEDSTEP_E2E_KEEP_REPORT") {
        let keep = std::path::PathBuf::from(keep);
        std::fs::create_dir_all(&keep).unwrap();
        for entry in std::fs::read_dir(&report_dir).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), keep.join(entry.file_name())).unwrap();
        }
    }
    for round in 1..=3u32 {
        let key = keys::global_model(&job_id, round + 1);
        let (global, sha) = read(key.clone()).await;
        // Uploaded in parts as it was produced: its SHA-256 (what the next
        // round announces to the clients) is the object tag the stream set.
        let head = store
            .head(&key)
            .await
            .unwrap()
            .expect("the next global model");
        assert_eq!(
            head.sha256, sha,
            "round {round}: the stored SHA-256 of `{key}`"
        );
        let mut weighted = Vec::new();
        let mut weights = Vec::new();
        for c in CLIENTS {
            let row = ledger
                .get_update(c, &job_id, round)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("no updates row for {c} round {round}"));
            let (bytes, sha) = read(row.model_key.clone()).await;
            assert_eq!(
                sha, row.checksum,
                "{c} round {round}: the row's checksum is the object's"
            );
            let n = row
                .num_examples
                .as_f64()
                .unwrap_or_else(|| panic!("{c}: num_examples {:?}", row.num_examples));
            // The report's view of this client: the row's own figures,
            // and a weight proportional to its examples.
            let view = report["rounds"][round as usize - 1]["clients"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["client_id"] == c)
                .unwrap_or_else(|| panic!("report: no {c} in round {round}"))
                .clone();
            assert_eq!(view["participation"], "accepted", "{view}");
            assert_eq!(view["num_examples"].as_f64(), Some(n), "{view}");
            assert_eq!(view["trained_at"], row.trained_at.as_str(), "{view}");
            for (k, v) in &row.metrics {
                let shown = view["reported"][k].as_f64().unwrap_or(f64::NAN);
                assert!(same(shown, v.as_f64().unwrap()), "{c} {k}: {view}");
            }
            weighted.push((n, bytes));
            weights.push((n, view["weight"].as_f64().expect("a weight")));
        }
        let total: f64 = weights.iter().map(|(n, _)| n).sum();
        for (n, w) in &weights {
            assert!(
                (w - n / total).abs() < 1e-9,
                "round {round}: weight {w} for {n} of {total}"
            );
        }
        let deviation = fedavg::max_deviation(&global, &weighted);
        let uniform: Vec<(f64, Vec<u8>)> = weighted.iter().map(|(_, b)| (1.0, b.clone())).collect();
        let if_uniform = fedavg::max_deviation(&global, &uniform);
        let counts: Vec<f64> = weighted.iter().map(|(n, _)| *n).collect();
        eprintln!(
            "round {round}: num_examples {counts:?}; max relative deviation from the weighted mean {deviation:.2e} \
             (from the unweighted mean {if_uniform:.2e})"
        );
        assert!(
            deviation <= TOLERANCE,
            "round {round}: global model deviates by {deviation:e}"
        );
        assert!(
            if_uniform > 100.0 * TOLERANCE,
            "round {round}: the check cannot tell the weighting apart ({if_uniform:e})"
        );
    }

    // Every StartRound was handed over exactly once by the stream path,
    // and every round aggregated by one plan and one commit, never by the
    // deadline.
    let events = execution::events_by_state(&d.sfn, &arn).await;
    assert_eq!(
        execution::count(&events, "StartRound", "ActivitySucceeded"),
        3,
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
            3,
            "{state}: {events:?}"
        );
    }
    assert_eq!(
        execution::count(&events, "DeadlinePassed", "PassStateEntered"),
        0,
        "{events:?}"
    );

    // The operator's view agrees.
    let status = launch::fedstep(&d, &bins, &["job", "status", &job_id, "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["execution"]["status"], "SUCCEEDED", "{status}");

    // (e) Latency: the last updates row of round r → every client has round
    // r+1's announcement. Row time: the last client's "update submitted" log
    // line (written just after its PutItem and DeleteMessage, so the figure
    // errs low by one DeleteMessage); receipt: each client's "announced" line.
    let texts: Vec<String> = clients.iter().map(|c| c.log_text()).collect();
    let at = |text: &String, what: String| {
        log_times::first_line_time(text, &what).unwrap_or_else(|| panic!("no log line `{what}`"))
    };
    for round in 1..=2u32 {
        let last_row = texts
            .iter()
            .map(|t| at(t, format!("{job_id} round {round}: update submitted")))
            .max()
            .unwrap();
        let all_received = texts
            .iter()
            .map(|t| {
                at(
                    t,
                    format!("{job_id} round {}: global model announced", round + 1),
                )
            })
            .max()
            .unwrap();
        let latency = log_times::seconds_between(last_row, all_received);
        eprintln!("LATENCY round {round} -> {}: last updates row to every client holding the next round's message: {latency:.3} s", round + 1);
        assert!(
            (0.0..60.0).contains(&latency),
            "latency {latency} s is not plausible"
        );
    }
    let last_row = texts
        .iter()
        .map(|t| at(t, format!("{job_id} round 3: update submitted")))
        .max()
        .unwrap();
    let all_done = texts
        .iter()
        .map(|t| at(t, format!("job {job_id} is complete")))
        .max()
        .unwrap();
    eprintln!(
        "LATENCY round 3 -> training_complete at every client: {:.3} s",
        log_times::seconds_between(last_row, all_done)
    );

    let status = worker.terminate(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "worker exit {status}\n{}",
        worker.log_tail(30)
    );
}

/// Equal up to serde_json's float parsing, which (without its
/// `float_roundtrip` feature) may miss the nearest double by one ulp.
fn same(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
}
