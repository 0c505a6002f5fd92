//! A secure round's four phases through the engine (issue #18): clients
//! write their phase rows to the ledger and their masked inputs to the
//! store; the engine closes each phase from what the ledger took and leaves
//! the next phase's messages in the store. The round row is opened by hand:
//! StartRound still refuses secure jobs until the workflow runs the phases.

use std::collections::BTreeMap;

use fedstep_cloud::engine::read_secure_document;
use fedstep_cloud::engine::SecurePhaseOutcome;
use fedstep_cloud::keys;
use fedstep_cloud::local::FsStore;
use fedstep_cloud::ports::{Clock, Ledger, ObjectStore, OpenRound, PutSecureRow};
use fedstep_cloud::records::{
    RoundRecord, RoundStatus, SecureAwaiting, SecurePhase, SecureRow, SCHEMA,
};
use fedstep_cloud::secure_replay::{self, Participants};
use fedstep_cloud::UpdateOutcome;
use fedstep_cloud::{Job, JobSpec, RoundFailure};
use fedstep_core::bytes::Input;
use fedstep_core::Limits;
use fedstep_secagg::masked_file::{self, MaskedFile};
use fedstep_secagg::masked_sum::mean_over_range;
use fedstep_secagg::messages::{ForwardedShares, Roster, UnmaskRequest};
use fedstep_secagg::{Client, MaskedClient, RecoveredMasks, RoundParams, SharedClient};
use fedstep_test_support::federation::{Engine, Fed};
use rand_core::OsRng;

const CLIENTS: [&str; 5] = ["a", "b", "c", "d", "e"];
const LEN: usize = 6;

fn secure_job(job_id: &str) -> Job {
    JobSpec::from_toml(&format!(
        "job_id = \"{job_id}\"\nrounds = 1\nclients = {CLIENTS:?}\nmin_clients = 3\n\
         round_timeout_seconds = 600\n[secure_aggregation]\nmin_survivors = 3\n"
    ))
    .unwrap()
}

/// The federation, its engine, and round 1 open as StartRound would open
/// it once it runs secure rounds.
async fn open_round(job_id: &str) -> (Fed, Engine, Job, RoundParams) {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = secure_job(job_id);
    fed.ledger.put_job(&job).await.unwrap();
    fed.upload_initial(&job, &[0.0; LEN]).await;
    let key = keys::global_model(job_id, 1);
    let global = fed.store.head(&key).await.unwrap().unwrap();
    let row = RoundRecord {
        job_id: job_id.into(),
        round: 1,
        status: RoundStatus::Open,
        task_token: Some("t1".into()),
        expected_clients: CLIENTS.map(String::from).to_vec(),
        min_clients: 3,
        deadline: fed.clock.now() + 600,
        received: Default::default(),
        rejections: Default::default(),
        lease_owner: None,
        lease_expires_at: None,
        global_model_key: key,
        global_checksum: global.sha256,
        global_store_checksum: global.store_checksum,
        result: None,
        failure: None,
        buffer: None,
        secure_closed: Vec::new(),
        secure_received: Default::default(),
        secure_awaiting: Some(SecureAwaiting {
            phase: SecurePhase::AdvertiseKeys,
            clients: CLIENTS.map(String::from).to_vec(),
        }),
    };
    assert_eq!(
        fed.ledger.open_round(&row).await.unwrap(),
        OpenRound::Created
    );
    let settings = job.secure_aggregation().unwrap();
    let params = secure_replay::round_params(job_id, 1, settings, LEN as u64);
    (fed, engine, job, params)
}

async fn write_row(fed: &Fed, job: &Job, client: &str, phase: SecurePhase, message: String) {
    let row = secure_row(job, client, phase, message);
    assert_eq!(
        fed.ledger.put_secure_row(&row).await.unwrap(),
        PutSecureRow::Created
    );
}

fn secure_row(job: &Job, client: &str, phase: SecurePhase, message: String) -> SecureRow {
    SecureRow {
        client_id: client.into(),
        job_round: keys::secure_job_round(&job.job_id, 1, phase),
        job_id: job.job_id.clone(),
        round: 1,
        phase,
        message,
        schema: Some(SCHEMA),
    }
}

async fn document<T: serde::de::DeserializeOwned + Send + 'static>(fed: &Fed, key: &str) -> T {
    read_secure_document(&fed.store, key)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("nothing at {key}"))
}

/// Client `name`'s update delta and weight.
fn input(name: &str) -> (Vec<f32>, u64) {
    let k = CLIENTS.iter().position(|c| *c == name).unwrap() as f32;
    let values = (0..LEN)
        .map(|j| (k - 2.0) * 0.1 + j as f32 * 0.05)
        .collect();
    (values, 10 * (k as u64 + 1))
}

struct Clients {
    participants: Participants,
    params: RoundParams,
}

impl Clients {
    fn new(params: &RoundParams) -> Clients {
        Clients {
            participants: Participants::new(&CLIENTS.map(String::from)),
            params: params.clone(),
        }
    }

    fn client(&self, name: &str) -> Client {
        let id = self.participants.id(name).unwrap();
        Client::new(id, self.params.clone(), &mut OsRng)
    }
}

async fn close(engine: &Engine, job: &Job, phase: SecurePhase) -> SecurePhaseOutcome {
    engine
        .close_secure_phase(&job.job_id, 1, phase)
        .await
        .unwrap()
}

fn opened(phase: SecurePhase, survivors: &[&str]) -> SecurePhaseOutcome {
    SecurePhaseOutcome::Opened {
        phase,
        survivors: survivors.iter().map(|s| s.to_string()).collect(),
    }
}

/// Phases 1 and 2 for `names`; returns their phase-3 states.
async fn advertise_and_share(
    fed: &Fed,
    engine: &Engine,
    job: &Job,
    clients: &Clients,
    names: &[&str],
) -> BTreeMap<String, SharedClient> {
    let started: BTreeMap<&str, Client> = names.iter().map(|n| (*n, clients.client(n))).collect();
    for (name, client) in &started {
        let message = serde_json::to_string(&client.advertise()).unwrap();
        write_row(fed, job, name, SecurePhase::AdvertiseKeys, message).await;
    }
    assert_eq!(
        close(engine, job, SecurePhase::AdvertiseKeys).await,
        opened(SecurePhase::ShareKeys, names)
    );
    let roster: Roster = document(fed, &keys::secure_roster(&job.job_id, 1)).await;
    let mut shared = BTreeMap::new();
    for (name, client) in started {
        let (state, message) = client.share_keys(&roster, &mut OsRng).unwrap();
        let message = serde_json::to_string(&message).unwrap();
        write_row(fed, job, name, SecurePhase::ShareKeys, message).await;
        shared.insert(name.to_string(), state);
    }
    assert_eq!(
        close(engine, job, SecurePhase::ShareKeys).await,
        opened(SecurePhase::MaskedInput, names)
    );
    shared
}

/// Phase 3 for every client in `shared`: the masked vector to the store,
/// then the row.
async fn mask(
    fed: &Fed,
    job: &Job,
    params: &RoundParams,
    shared: BTreeMap<String, SharedClient>,
) -> BTreeMap<String, MaskedClient> {
    let mut masked = BTreeMap::new();
    for (name, state) in shared {
        let inbox = keys::secure_inbox(&job.job_id, 1, SecurePhase::MaskedInput, &name);
        let forwarded: ForwardedShares = document(fed, &inbox).await;
        let (values, weight) = input(&name);
        let (holder, message, vector) = state.mask_input(&forwarded, &values, weight).unwrap();
        let bytes = masked_file::encode(&vector, params.quantization.ring()).unwrap();
        upload(fed, &keys::masked_input(&job.job_id, 1, &name), &bytes).await;
        let message = serde_json::to_string(&message).unwrap();
        write_row(fed, job, &name, SecurePhase::MaskedInput, message).await;
        masked.insert(name, holder);
    }
    masked
}

async fn upload(fed: &Fed, key: &str, bytes: &[u8]) {
    let path = fed.dir.path().join("files").join(key.replace('/', "_"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    fed.store.put_file(key, &path).await.unwrap();
}

/// Phase 4 for `answering`.
async fn unmask(fed: &Fed, job: &Job, masked: &BTreeMap<String, MaskedClient>, answering: &[&str]) {
    for name in answering {
        let inbox = keys::secure_inbox(&job.job_id, 1, SecurePhase::Unmask, name);
        let request: UnmaskRequest = document(fed, &inbox).await;
        let answer = masked[*name].unmask(&request).unwrap();
        let message = serde_json::to_string(&answer).unwrap();
        write_row(fed, job, name, SecurePhase::Unmask, message).await;
    }
}

/// The weighted mean of the summed clients' inputs, from their masked
/// files and the recovered masks alone (as the aggregation's tasks will).
async fn unmasked_mean(fed: &Fed, store: &FsStore, job: &Job, params: &RoundParams) -> Vec<f32> {
    let masks: RecoveredMasks = document(fed, &keys::recovered_masks(&job.job_id, 1)).await;
    let participants = Participants::new(&CLIENTS.map(String::from));
    let mut files = BTreeMap::new();
    for &id in &masks.summed_clients {
        let name = participants.name(id).unwrap();
        let path = fed.dir.path().join(format!("fetched-{name}"));
        store
            .get_file(&keys::masked_input(&job.job_id, 1, name), &path)
            .await
            .unwrap();
        let file = MaskedFile::open(
            Input::file(path),
            params.quantization.ring(),
            params.vector_len,
            &Limits::default(),
        )
        .unwrap();
        files.insert(id, file);
    }
    let mut mean = vec![0.0; LEN];
    mean_over_range(&files, &masks, 0..LEN as u64, |start, block| {
        mean[start as usize..start as usize + block.len()].copy_from_slice(block);
        Ok(())
    })
    .unwrap();
    mean
}

fn plain_mean(names: &[&str]) -> Vec<f64> {
    let total: u64 = names.iter().map(|n| input(n).1).sum();
    (0..LEN)
        .map(|j| {
            names
                .iter()
                .map(|n| {
                    let (x, w) = input(n);
                    f64::from(x[j]) * w as f64
                })
                .sum::<f64>()
                / total as f64
        })
        .collect()
}

#[tokio::test]
async fn four_phases_close_and_a_client_silent_in_the_last_stays_in_the_sum() {
    let (fed, engine, job, params) = open_round("secure").await;
    let clients = Clients::new(&params);
    let shared = advertise_and_share(&fed, &engine, &job, &clients, &CLIENTS).await;
    let masked = mask(&fed, &job, &params, shared).await;
    assert_eq!(
        close(&engine, &job, SecurePhase::MaskedInput).await,
        opened(SecurePhase::Unmask, &CLIENTS)
    );
    // e drops after sending its masked input: its neighbours' shares
    // still rebuild its self-mask (5 clients: t = 3 of 4 neighbours).
    unmask(&fed, &job, &masked, &["a", "b", "c", "d"]).await;
    assert_eq!(
        close(&engine, &job, SecurePhase::Unmask).await,
        SecurePhaseOutcome::Unmasked {
            summed: CLIENTS.map(String::from).to_vec()
        }
    );
    let mean = unmasked_mean(&fed, &fed.store, &job, &params).await;
    let want = plain_mean(&CLIENTS);
    let bound = params.quantization.error_bound() + 1e-6;
    for (j, (got, want)) in mean.iter().zip(&want).enumerate() {
        assert!(
            (f64::from(*got) - want).abs() <= bound,
            "{j}: {got} vs {want}"
        );
    }
    let row = fed.ledger.get_round("secure", 1).await.unwrap().unwrap();
    assert_eq!(row.status, RoundStatus::Open, "the aggregation closes it");
    assert_eq!(row.secure_closed.len(), 4);
    assert!(row.rejections.is_empty(), "{:?}", row.rejections);
}

#[tokio::test]
async fn a_row_written_after_its_phase_closed_is_never_read_and_a_retry_republishes_the_same() {
    let (fed, engine, job, params) = open_round("late").await;
    let clients = Clients::new(&params);
    let started: Vec<(&str, Client)> = CLIENTS.iter().map(|n| (*n, clients.client(n))).collect();
    for (name, client) in &started[..4] {
        let message = serde_json::to_string(&client.advertise()).unwrap();
        write_row(&fed, &job, name, SecurePhase::AdvertiseKeys, message).await;
    }
    let first = close(&engine, &job, SecurePhase::AdvertiseKeys).await;
    assert_eq!(first, opened(SecurePhase::ShareKeys, &["a", "b", "c", "d"]));
    let roster_key = keys::secure_roster("late", 1);
    let roster: Roster = document(&fed, &roster_key).await;

    // e's keys arrive after phase 1 closed: a retried close (the same
    // step run again) takes nothing new and publishes the same roster.
    let (name, late) = &started[4];
    let message = serde_json::to_string(&late.advertise()).unwrap();
    write_row(&fed, &job, name, SecurePhase::AdvertiseKeys, message).await;
    assert_eq!(
        close(&engine, &job, SecurePhase::AdvertiseKeys).await,
        first
    );
    let again: Roster = document(&fed, &roster_key).await;
    assert_eq!(again, roster);
    let row = fed.ledger.get_round("late", 1).await.unwrap().unwrap();
    assert_eq!(row.secure_closed.len(), 1);
    assert_eq!(row.secure_closed[0].taken, ["a", "b", "c", "d"]);

    // A phase cannot close before the one open.
    let err = engine
        .close_secure_phase("late", 1, SecurePhase::Unmask)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("phase unmask cannot close while share_keys is open"),
        "{err}"
    );
}

#[tokio::test]
async fn a_malformed_message_excludes_its_sender_and_too_few_survivors_fail_the_round() {
    let (fed, engine, job, params) = open_round("hostile").await;
    let clients = Clients::new(&params);
    let mut started = BTreeMap::new();
    for name in ["a", "b", "c", "d"] {
        let client = clients.client(name);
        let message = serde_json::to_string(&client.advertise()).unwrap();
        write_row(&fed, &job, name, SecurePhase::AdvertiseKeys, message).await;
        started.insert(name, client);
    }
    write_row(
        &fed,
        &job,
        "e",
        SecurePhase::AdvertiseKeys,
        "{\"not\": \"keys\"}".into(),
    )
    .await;
    assert_eq!(
        close(&engine, &job, SecurePhase::AdvertiseKeys).await,
        opened(SecurePhase::ShareKeys, &["a", "b", "c", "d"])
    );
    let row = fed.ledger.get_round("hostile", 1).await.unwrap().unwrap();
    let reason = &row.rejections["e"];
    assert!(
        reason.starts_with("secure aggregation, phase advertise_keys: "),
        "{reason}"
    );
    assert_eq!(row.status, RoundStatus::Open);

    // Only a and b share keys: 2 survivors, 3 needed.
    let roster: Roster = document(&fed, &keys::secure_roster("hostile", 1)).await;
    for name in ["a", "b"] {
        let client = started.remove(name).unwrap();
        let (_, message) = client.share_keys(&roster, &mut OsRng).unwrap();
        let message = serde_json::to_string(&message).unwrap();
        write_row(&fed, &job, name, SecurePhase::ShareKeys, message).await;
    }
    let outcome = close(&engine, &job, SecurePhase::ShareKeys).await;
    let SecurePhaseOutcome::Failed(RoundFailure::SecureAggregation { detail }) = &outcome else {
        panic!("{outcome:?}");
    };
    assert!(detail.contains("phase share_keys"), "{detail}");
    assert!(detail.contains("2 clients survived, 3 needed"), "{detail}");
    let row = fed.ledger.get_round("hostile", 1).await.unwrap().unwrap();
    assert_eq!(row.status, RoundStatus::Failed);
    assert!(row
        .failure
        .unwrap()
        .to_string()
        .starts_with("secure aggregation failed: phase share_keys"));
    // Run again, the step reports the stored failure.
    assert_eq!(close(&engine, &job, SecurePhase::ShareKeys).await, outcome);
}

#[tokio::test]
async fn a_masked_input_that_does_not_fit_the_round_leaves_its_client_out_of_the_sum() {
    let (fed, engine, job, params) = open_round("misfit").await;
    let clients = Clients::new(&params);
    let shared = advertise_and_share(&fed, &engine, &job, &clients, &CLIENTS).await;
    let mut masked = mask(&fed, &job, &params, shared).await;
    // c replaces its masked input with one element short before phase 3
    // closes: the aggregator refuses it, and the protocol treats c as
    // dropped (its pairwise masks come back from its neighbours' shares).
    let short = masked_file::encode(&[1; LEN - 1], params.quantization.ring()).unwrap();
    upload(&fed, &keys::masked_input("misfit", 1, "c"), &short).await;
    assert_eq!(
        close(&engine, &job, SecurePhase::MaskedInput).await,
        opened(SecurePhase::Unmask, &["a", "b", "d", "e"])
    );
    masked.remove("c");
    unmask(&fed, &job, &masked, &["a", "b", "d", "e"]).await;
    let summed = ["a", "b", "d", "e"];
    assert_eq!(
        close(&engine, &job, SecurePhase::Unmask).await,
        SecurePhaseOutcome::Unmasked {
            summed: summed.map(String::from).to_vec()
        }
    );
    let mean = unmasked_mean(&fed, &fed.store, &job, &params).await;
    let want = plain_mean(&summed);
    let bound = params.quantization.error_bound() + 1e-6;
    for (j, (got, want)) in mean.iter().zip(&want).enumerate() {
        assert!(
            (f64::from(*got) - want).abs() <= bound,
            "{j}: {got} vs {want}"
        );
    }
    let row = fed.ledger.get_round("misfit", 1).await.unwrap().unwrap();
    let reason = &row.rejections["c"];
    assert!(
        reason.starts_with("secure aggregation, phase masked_input: masked input:"),
        "{reason}"
    );
}

/// The stream path: each phase's rows are counted as they arrive, and the
/// row that completes a phase answers the task token that phase's step
/// registered (StartRound's for the first), so the workflow closes it at
/// once. Rows that cannot count are refused or late, never counted into
/// another phase.
#[tokio::test]
async fn the_row_that_completes_a_phase_hands_it_over() {
    let (fed, engine, job, params) = open_round("stream").await;
    let clients = Clients::new(&params);
    let started: Vec<(&str, Client)> = CLIENTS.iter().map(|n| (*n, clients.client(n))).collect();
    let advertise = |client: &Client| serde_json::to_string(&client.advertise()).unwrap();

    // Not a client of the round, and a phase that is not open: refused,
    // nothing written into the round.
    let stranger = secure_row(&job, "zed", SecurePhase::AdvertiseKeys, "{}".into());
    assert!(matches!(
        engine.on_secure_row(&stranger).await.unwrap(),
        UpdateOutcome::Rejected(r) if r.starts_with("client:")
    ));
    let early = secure_row(&job, "a", SecurePhase::ShareKeys, "{}".into());
    assert!(matches!(
        engine.on_secure_row(&early).await.unwrap(),
        UpdateOutcome::Rejected(r) if r.starts_with("phase: share_keys is not open yet")
    ));

    for (k, (name, client)) in started.iter().enumerate() {
        let row = secure_row(&job, name, SecurePhase::AdvertiseKeys, advertise(client));
        fed.ledger.put_secure_row(&row).await.unwrap();
        let outcome = engine.on_secure_row(&row).await.unwrap();
        if k + 1 < CLIENTS.len() {
            assert_eq!(
                outcome,
                UpdateOutcome::Recorded {
                    usable: k + 1,
                    expected: 5
                }
            );
            assert!(fed.callback.succeeded("t1").is_empty());
        } else {
            assert_eq!(
                outcome,
                UpdateOutcome::HandedOver {
                    usable: 5,
                    expected: 5
                }
            );
        }
        // A replay counts nothing twice.
        assert!(!matches!(
            engine.on_secure_row(&row).await.unwrap(),
            UpdateOutcome::Rejected(_) | UpdateOutcome::Late(_)
        ));
    }
    assert_eq!(fed.callback.succeeded("t1").len(), 1);

    // The SecurePhase step closes advertise_keys and waits on its own token.
    let outcome = engine
        .advance_secure_phase("stream", 1, SecurePhase::AdvertiseKeys, "t2")
        .await
        .unwrap();
    assert_eq!(outcome, opened(SecurePhase::ShareKeys, &CLIENTS));
    let late = secure_row(
        &job,
        "a",
        SecurePhase::AdvertiseKeys,
        advertise(&started[0].1),
    );
    assert!(matches!(
        engine.on_secure_row(&late).await.unwrap(),
        UpdateOutcome::Late(r) if r.starts_with("late: phase advertise_keys has closed")
    ));

    // A row that breaks a rule is recorded as refused and still counts as
    // in, so the phase does not wait for a better one; its close refuses it.
    let roster: Roster = document(&fed, &keys::secure_roster("stream", 1)).await;
    for (name, client) in started {
        let (_, message) = client.share_keys(&roster, &mut OsRng).unwrap();
        let mut row = secure_row(
            &job,
            name,
            SecurePhase::ShareKeys,
            serde_json::to_string(&message).unwrap(),
        );
        if name == "c" {
            row.job_round = "stream#000001".into();
        }
        fed.ledger.put_secure_row(&row).await.unwrap();
        let outcome = engine.on_secure_row(&row).await.unwrap();
        match name {
            "c" => assert!(
                matches!(&outcome, UpdateOutcome::Rejected(r) if r.contains("job_round")),
                "{outcome:?}"
            ),
            "e" => assert_eq!(
                outcome,
                UpdateOutcome::HandedOver {
                    usable: 5,
                    expected: 5
                }
            ),
            _ => assert!(
                matches!(outcome, UpdateOutcome::Recorded { .. }),
                "{outcome:?}"
            ),
        }
    }
    assert_eq!(fed.callback.succeeded("t2").len(), 1);
    let outcome = engine
        .advance_secure_phase("stream", 1, SecurePhase::ShareKeys, "t3")
        .await
        .unwrap();
    assert_eq!(
        outcome,
        opened(SecurePhase::MaskedInput, &["a", "b", "d", "e"])
    );
    let row = fed.ledger.get_round("stream", 1).await.unwrap().unwrap();
    assert!(
        row.rejections["c"].starts_with("secure aggregation, phase share_keys: job_round"),
        "{:?}",
        row.rejections
    );
    assert_eq!(
        row.secure_awaiting,
        Some(SecureAwaiting {
            phase: SecurePhase::MaskedInput,
            clients: ["a", "b", "d", "e"].map(String::from).to_vec(),
        })
    );
    assert_eq!(row.task_token.as_deref(), Some("t3"));
    // The last phase is PlanRound's to close.
    assert!(engine
        .advance_secure_phase("stream", 1, SecurePhase::Unmask, "t4")
        .await
        .is_err());
}
