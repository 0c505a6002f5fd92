//! The driver: a whole federation in one process on the cloud path's own
//! round engine and aggregation, over the local adapters.
//!
//! Per round it does what Step Functions, SNS/SQS and the DynamoDB stream
//! do in the cloud: `start_round` (with a fake task token) publishes
//! `global_model_ready` to every client's queue; the clients run in
//! parallel (training on blocking threads) and each writes its `updates`
//! row; the driver reads each new row back from the ledger and hands it to
//! `on_update`, the last of which hands the round over; then `close_round`
//! aggregates, as the state machine's CloseRound task does. The result's
//! `continue` drives the loop; `finalize` ends the job.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use fedstep_cloud::job::JobSpec;
use fedstep_cloud::keys;
use fedstep_cloud::local::{FsStore, LocalBus, MemLedger, RecordingCallback};
use fedstep_cloud::ports::{Ledger, ObjectStore, SystemClock};
use fedstep_cloud::records::{ClosedBy, RoundResult};
use fedstep_cloud::{EngineConfig, RoundEngine, UpdateOutcome};
use fedstep_trainer::{evaluate, init_model};

use super::args::{Algorithm, AsyncSim, Settings};
use super::asynchronous;
use super::baselines;
use super::client::{ClientRound, SimClient};
use super::data::{self, SimData};
use super::measurements::{self, aggregation_summary, client_reports};
use super::personal;
use super::plot::{self, Series};
use super::progress::RoundBar;
use super::report::{
    AsyncReport, DatasetReport, Files, Final, Report, RoundReport, CLIENT_REPORTING,
};
use super::secure;
use super::table;
use crate::job_report::{self, Curve, TimeCurve, TimeCurves};

/// The simulated job's id (keys live under `store/jobs/simulate/`).
pub const JOB_ID: &str = "simulate";

type Engine = RoundEngine<FsStore, MemLedger, LocalBus, RecordingCallback, SystemClock>;

pub async fn run(mut settings: Settings) -> Result<()> {
    let started = Instant::now();
    let out = settings.out.clone();
    prepare_run_dir(&out)?;
    let data = Arc::new(data::load(&mut settings)?);
    println!("{}", table::clients(&data));
    let cfg = settings.train_config();
    let n = data.clients.len();

    // The adapters: a filesystem model registry under the run directory,
    // the in-memory ledger, an in-process topic with one queue per client.
    let store = FsStore::new(out.join("store"))?;
    let ledger = MemLedger::new();
    let bus = LocalBus::new(Arc::new(SystemClock));
    let callback = RecordingCallback::new();
    let ids: Vec<String> = data.clients.iter().map(|c| c.id.clone()).collect();
    let jobs = [JOB_ID.to_string()];
    let queues: Vec<_> = ids
        .iter()
        .map(|id| bus.subscribe(id, Some(&jobs)))
        .collect();
    let engine: Arc<Engine> = Arc::new(RoundEngine::new(
        store.clone(),
        ledger.clone(),
        bus.clone(),
        callback.clone(),
        SystemClock,
        EngineConfig {
            read_ahead_bytes: fedstep_cloud::DEFAULT_READ_AHEAD_BYTES,
            owner: "fedstep-simulate".into(),
            lease_seconds: 600,
        },
    ));

    // Round 1's global model is the initial model (what `fedstep job start` uploads).
    let init = init_model(data.test.dim(), cfg.hidden, data.test.classes(), cfg.seed)?;
    let init_path = out.join("init.safetensors");
    std::fs::write(&init_path, &init)?;
    store
        .put_file(&keys::global_model(JOB_ID, 1), &init_path)
        .await?;
    let job = JobSpec {
        job_id: JOB_ID.into(),
        rounds: settings.rounds,
        clients: ids.clone(),
        min_clients: n as u32,
        round_timeout_seconds: 3600,
        initial_model: Some(init_path.display().to_string()),
        stop: None,
        aggregation: settings.aggregation.clone(),
        round_config: settings.round_config(),
        sharding: Default::default(),
        mode: Default::default(),
        asynchronous: None,
        secure_aggregation: None,
    }
    .check()
    .map_err(|e| anyhow::anyhow!("simulated job: {e}"))?;
    ledger.put_job(&job).await?;

    // The baselines need no engine: train them beside the federation, with
    // plain SGD whatever the federation's algorithm (FedProx's pull toward
    // the round's start would only slow a lone trainer down).
    let plain_cfg = fedstep_trainer::TrainConfig {
        proximal_mu: 0.0,
        ..cfg.clone()
    };
    let baselines = {
        let (init, data, cfg, rounds) = (
            init.clone(),
            Arc::clone(&data),
            plain_cfg.clone(),
            settings.rounds,
        );
        tokio::task::spawn_blocking(move || {
            baselines::run(
                &init,
                &data.clients[0].train,
                &data.train,
                &data.test,
                &cfg,
                rounds,
            )
        })
    };

    // FedSelect's yardstick: each client trained alone, beside the federation.
    let local_only = settings.personalization.is_some().then(|| {
        let (init, data, cfg, rounds) = (
            init.clone(),
            Arc::clone(&data),
            plain_cfg.clone(),
            settings.rounds,
        );
        tokio::task::spawn_blocking(move || personal::local_only(&init, &data, &cfg, rounds))
    });

    let clients: Vec<Arc<SimClient>> = data
        .clients
        .iter()
        .enumerate()
        .map(|(k, share)| {
            Arc::new(SimClient {
                index: k,
                share: share.clone(),
                cfg: cfg.clone(),
                byzantine_scale: settings.byzantine_scale,
                personal: settings.personalization.as_ref().map(|p| p.ramp.clone()),
                workdir: out.join("clients").join(&share.id),
                algorithm: settings.algorithm,
            })
        })
        .collect();

    let bar = RoundBar::new(settings.rounds);
    bar.println(&table::header());
    let mut rounds: Vec<RoundReport> = Vec::new();
    let mut last: Option<RoundResult> = None;
    for round in 1..=settings.rounds {
        let t = Instant::now();
        bar.message(format!("round {round}: training {n} clients"));
        engine
            .start_round(&job, round, &format!("simulate-task-token-{round}"))
            .await
            .with_context(|| format!("start_round {round}"))?;
        let tasks: Vec<_> = clients
            .iter()
            .zip(&queues)
            .map(|(c, q)| {
                let (c, q, store, ledger) =
                    (Arc::clone(c), q.clone(), store.clone(), ledger.clone());
                tokio::spawn(async move { c.take_part(&q, &store, &ledger, JOB_ID, round).await })
            })
            .collect();

        // The stream: each new `updates` row, as stored, to on_update (in
        // client order, so a run is reproducible bit for bit).
        let mut closed_by = ClosedBy::Deadline;
        let mut client_rounds: Vec<ClientRound> = Vec::with_capacity(n);
        for task in tasks {
            let cr = task.await.context("client task")??;
            let row = ledger
                .get_update(&cr.record.client_id, JOB_ID, round)
                .await?
                .with_context(|| {
                    format!("{}'s row is missing from the ledger", cr.record.client_id)
                })?;
            match engine.on_update(&row).await? {
                UpdateOutcome::HandedOver { .. } => closed_by = ClosedBy::Stream,
                // A rejected row is in the round's rejections, and so in
                // the measurements stored with the round's output.
                UpdateOutcome::Rejected(_)
                | UpdateOutcome::Recorded { .. }
                | UpdateOutcome::Late(_) => {}
            }
            client_rounds.push(cr);
        }
        // CloseRound, as the state machine runs it: after the hand-over,
        // or (not everyone counted: a row was rejected) at the deadline.
        let result = engine
            .close_round(JOB_ID, round, closed_by)
            .await
            .with_context(|| format!("close_round {round}"))?;

        bar.message(format!("round {round}: evaluating"));
        let eval =
            evaluate_global(&store, &result.global_model_key, &out.join("engine"), &data).await?;
        let measured = measurements::stored(&store, JOB_ID, round, &out.join("engine")).await?;
        let report = RoundReport {
            round,
            accuracy: eval.accuracy,
            loss: eval.loss,
            accepted: result.accepted.clone(),
            rejected: result.rejected.clone(),
            clients: client_reports(&client_rounds, &data, &measured),
            aggregation: aggregation_summary(&settings.pipeline, &result),
            // The engine's commit updated c (SCAFFOLD) and measured it.
            scaffold: measured
                .scaffold
                .as_ref()
                .map(serde_json::to_value)
                .transpose()?,
            single_agent_accuracy: f64::NAN,
            centralized_accuracy: f64::NAN,
            seconds: t.elapsed().as_secs_f64(),
        };
        bar.println(&table::row(&report));
        bar.inc();
        rounds.push(report);
        let go_on = result.continue_training;
        last = Some(result);
        if !go_on {
            break;
        }
    }
    bar.finish();
    let last = last.context("no round ran")?;
    let finalize = engine
        .finalize(JOB_ID, last.round, &last)
        .await
        .context("finalize")?;

    let baselines = baselines.await.context("baseline task")??;
    for r in &mut rounds {
        let i = r.round as usize - 1;
        r.single_agent_accuracy = baselines.single_agent[i].accuracy;
        r.centralized_accuracy = baselines.centralized[i].accuracy;
    }
    let fed = rounds.last().context("no round ran")?;
    let rounds_run = fed.round;
    // The baselines get the same epoch budget as the rounds actually run.
    let single = baselines.single_agent[rounds_run as usize - 1].accuracy;
    let central = baselines.centralized[rounds_run as usize - 1].accuracy;
    let final_ = Final {
        algorithm: settings.algorithm.name(),
        mu: (settings.algorithm == Algorithm::Fedprox).then_some(settings.mu),
        federated_accuracy: fed.accuracy,
        federated_loss: fed.loss,
        single_agent_accuracy: single,
        centralized_accuracy: central,
        federated_vs_centralized: fed.accuracy / central,
        single_agent_vs_centralized: single / central,
        rounds_run,
        seconds: started.elapsed().as_secs_f64(),
    };

    let secure_aggregation = match settings.secure_aggregation.clone() {
        Some(sim) => {
            let (init, data, cfg) = (init.clone(), Arc::clone(&data), cfg.clone());
            let plain = final_.federated_accuracy;
            println!("\nsecure aggregation: {rounds_run} rounds of SecAgg+ in process");
            let r = tokio::task::spawn_blocking(move || {
                secure::run(&sim, &init, &data, &cfg, rounds_run, plain)
            })
            .await
            .context("secure aggregation task")??;
            println!(
                "secure aggregation (SecAgg+, k = {}, t = {}): final accuracy {:.4}, plain {:.4} \
                 ({:+.2} points)",
                r.neighbours,
                r.threshold,
                r.final_accuracy,
                r.plain_final_accuracy,
                r.points_vs_plain
            );
            Some(r)
        }
        None => None,
    };

    let personalization = match local_only {
        Some(task) => {
            let curves = task.await.context("local-only task")??;
            let scratch = out.join("engine");
            std::fs::create_dir_all(&scratch)?;
            let global_path = scratch.join("final-global.safetensors");
            store.get_file(&last.global_model_key, &global_path).await?;
            let r = personal::evaluate_clients(
                &global_path,
                &clients,
                &data,
                &curves,
                rounds_run,
                &scratch,
            )?;
            println!("\n{}", personal::table(&r));
            Some(r)
        }
        None => None,
    };

    let secure_curve: Option<Vec<f64>> = secure_aggregation
        .as_ref()
        .map(|r| r.rounds.iter().map(|r| r.accuracy).collect());
    let plot_path = out.join("accuracy.svg");
    let fed_curve: Vec<f64> = rounds.iter().map(|r| r.accuracy).collect();
    let single_curve: Vec<f64> = baselines.single_agent.iter().map(|p| p.accuracy).collect();
    let central_curve: Vec<f64> = baselines.centralized.iter().map(|p| p.accuracy).collect();
    let aggregation_name = aggregation_name(&settings);
    plot::accuracy_svg(
        &plot_path,
        &format!("{} — {n} clients, {aggregation_name}", data.name),
        &[
            Series {
                label: "federated",
                values: &fed_curve,
                color: plot::FEDERATED,
                dashed: false,
            },
            Series {
                label: "single agent (agent-1)",
                values: &single_curve,
                color: plot::SINGLE,
                dashed: false,
            },
            Series {
                label: "centralized",
                values: &central_curve,
                color: plot::CENTRAL,
                dashed: true,
            },
        ]
        .into_iter()
        .chain(secure_curve.as_deref().map(|values| Series {
            label: "federated, SecAgg+",
            values,
            color: plot::SECURE,
            dashed: true,
        }))
        .collect::<Vec<_>>(),
    )?;

    let asynchronous = match settings.asynchronous.clone() {
        Some(sim) => Some(run_async(&settings, &sim, &data, &init, &out, &rounds).await?),
        None => None,
    };

    let against_time = asynchronous.as_ref().map(|a| TimeCurves {
        title: format!(
            "{} — {n} clients, {aggregation_name}: sync vs async (K = {})",
            data.name, a.buffer_size
        ),
        seconds: a.simulated_seconds,
        curves: vec![
            TimeCurve {
                label: "sync".into(),
                points: a.sync.clone(),
            },
            TimeCurve {
                label: "async".into(),
                points: a.versions.iter().map(|v| (v.time, v.accuracy)).collect(),
            },
        ],
    });

    let report_path = out.join("report.json");
    let summary = table::summary(&final_, n, &aggregation_name);
    let report = Report {
        aggregation: settings.aggregation.clone(),
        config: settings,
        client_reporting: CLIENT_REPORTING,
        dataset: DatasetReport {
            name: data.name.clone(),
            train_examples: data.train.len(),
            test_examples: data.test.len(),
            features: data.test.dim(),
            classes: data.test.classes(),
            clients: data.clients.iter().map(|c| c.summary()).collect(),
        },
        rounds,
        final_,
        personalization,
        finalize,
        asynchronous,
        secure_aggregation,
        files: Files {
            report: report_path.clone(),
            plot: plot_path.clone(),
            store: out.join("store"),
            final_model_key: last.global_model_key.clone(),
        },
    };
    report.write(&report_path)?;

    // The page `fedstep job report` writes for a deployed job, from the
    // same ledger rows and stored measurements, with the baselines added.
    let mut page = job_report::collect(
        &store,
        &ledger,
        JOB_ID,
        Some("SIMULATED".into()),
        &out.join("engine"),
    )
    .await
    .context("collecting the job report")?;
    let rounds_run = rounds_run as usize;
    page.baselines = vec![
        Curve {
            label: "federated".into(),
            values: fed_curve,
        },
        Curve {
            label: "single agent (agent-1)".into(),
            values: single_curve.into_iter().take(rounds_run).collect(),
        },
        Curve {
            label: "centralized".into(),
            values: central_curve.into_iter().take(rounds_run).collect(),
        },
    ];
    if let Some(values) = secure_curve {
        page.baselines.push(Curve {
            label: "federated, SecAgg+".into(),
            values,
        });
    }
    page.against_time = against_time;
    let page = job_report::write(&page, &out, "job-report.json")?;

    println!("\n{summary}");
    println!("report: {}", report_path.display());
    println!("plot:   {}", plot_path.display());
    println!("page:   {}", page.html.display());
    println!(
        "models: {}",
        out.join("store").join(&last.global_model_key).display()
    );
    Ok(())
}

/// A fresh run directory: an old store would mix two runs' models.
fn prepare_run_dir(out: &Path) -> Result<()> {
    let store = out.join("store");
    if store.exists() {
        bail!(
            "{} already holds a simulation's model store; pass another --out or remove it",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    Ok(())
}

/// Downloads the new global model through the store and scores it on the
/// global test split.
pub(super) async fn evaluate_global(
    store: &FsStore,
    key: &str,
    scratch: &Path,
    data: &SimData,
) -> Result<fedstep_trainer::Eval> {
    std::fs::create_dir_all(scratch)?;
    let path: PathBuf = scratch.join("evaluate.safetensors");
    store.get_file(key, &path).await?;
    let bytes = std::fs::read(&path)?;
    std::fs::remove_file(&path).ok();
    Ok(evaluate(&bytes, &data.test)?)
}

/// "FedAvg" or the --aggregation file's name, after the local algorithm
/// when it is not plain FedAvg ("FedProx μ=0.1", "SCAFFOLD + fedadam").
pub fn aggregation_name(settings: &Settings) -> String {
    let file = settings
        .aggregation_file
        .as_ref()
        .and_then(|p| p.file_stem())
        .map(|s| s.to_string_lossy().into_owned());
    let algorithm = match settings.algorithm {
        Algorithm::Fedavg => None,
        Algorithm::Fedprox => Some(format!("FedProx μ={}", settings.mu)),
        Algorithm::Scaffold => Some("SCAFFOLD".to_string()),
    };
    match (algorithm, file) {
        (None, None) => "FedAvg".into(),
        (None, Some(f)) => f,
        (Some(a), None) => a,
        (Some(a), Some(f)) => format!("{a} + {f}"),
    }
}

/// --mode async: the same federation as an async job on a simulated clock,
/// given the simulated time the sync rounds took; the comparison, and
/// `async.svg` (accuracy against simulated time, both runs).
async fn run_async(
    settings: &Settings,
    sim: &AsyncSim,
    data: &Arc<SimData>,
    init: &[u8],
    out: &Path,
    rounds: &[RoundReport],
) -> Result<AsyncReport> {
    // Every sync round waits for its slowest client.
    let round_seconds = sim.client_speeds.iter().copied().fold(0.0, f64::max);
    let sync: Vec<(f64, f64)> = rounds
        .iter()
        .map(|r| (f64::from(r.round) * round_seconds, r.accuracy))
        .collect();
    let budget = sync.last().map_or(0.0, |p| p.0);
    let dir = out.join("async");
    std::fs::create_dir_all(&dir)?;
    println!(
        "\nasync: buffer {} of {} clients, speeds {:?}, {budget} simulated seconds",
        sim.buffer_size,
        data.clients.len(),
        sim.client_speeds
    );
    let run = asynchronous::Federation {
        settings,
        sim,
        data,
        init,
        dir: &dir,
        budget,
    }
    .run()
    .await
    .context("the async run")?;
    let curve: Vec<(f64, f64)> = run.versions.iter().map(|v| (v.time, v.accuracy)).collect();
    let sync_final = sync.last().map_or(f64::NAN, |p| p.1);
    let async_final = curve.last().map_or(f64::NAN, |p| p.1);
    let target = sim.target_accuracy.unwrap_or(0.95 * sync_final);
    let sync_time = asynchronous::time_to(&sync, target);
    let async_time = asynchronous::time_to(&curve, target);
    // Drawn with the report page (job_report's charts), as `async.svg`.
    let plot_path = out.join("async.svg");
    let fmt = |t: Option<f64>| t.map_or("never".to_string(), |t| format!("{t:.0} s"));
    println!(
        "async: {} versions; target accuracy {target:.4}: sync reaches it at {}, async at {}; \
         final accuracy sync {sync_final:.4}, async {async_final:.4}",
        run.versions.len(),
        fmt(sync_time),
        fmt(async_time)
    );
    Ok(AsyncReport {
        target_accuracy: target,
        sync_time_to_target: sync_time,
        async_time_to_target: async_time,
        time_to_target_ratio: sync_time.zip(async_time).map(|(s, a)| a / s),
        sync_final_accuracy: sync_final,
        async_final_accuracy: async_final,
        simulated_seconds: budget,
        buffer_size: sim.buffer_size,
        client_speeds: sim.client_speeds.clone(),
        staleness_exponent: sim.staleness_exponent,
        max_staleness: sim.max_staleness,
        updates_submitted: run.updates_submitted,
        rejected_at_stream: run.rejected_at_stream,
        sync,
        versions: run.versions,
        plot: plot_path,
    })
}
