//! The stream-record path: bytes → the Lambda's own stream-record decoder
//! (`crates/lambda/src/stream_record.rs`: a DynamoDB stream record, its
//! NEW_IMAGE → `UpdateRecord`) → `RoundEngine::on_update` against an OPEN
//! round in the in-memory ledger. No I/O: the round expects three clients
//! and a single row can never complete it, so the engine only validates and
//! counts. Must never panic; any outcome is fine, but a `Recorded` row must
//! really be a well-formed row of an expected client.
//!
//! The decoder's source file is compiled here directly: depending on
//! fedstep-lambda would build the AWS SDK and the Lambda runtime under the
//! sanitizer for one function. Seeds that are real stream records:
//! fuzz/seeds/update_record/ (tracked; scripts/fuzz.sh adds it to the corpus).
#![no_main]

use std::sync::OnceLock;

#[allow(dead_code)]
#[path = "../../crates/lambda/src/stream_record.rs"]
mod stream_record;

use fedstep_cloud::local::{FsStore, LocalBus, ManualClock, MemLedger, RecordingCallback};
use fedstep_cloud::ports::Ledger;
use fedstep_cloud::records::{RoundRecord, RoundStatus, UpdateRecord};
use fedstep_cloud::{keys, EngineConfig, JobSpec, RoundEngine, UpdateOutcome};
use libfuzzer_sys::fuzz_target;

const JOB: &str = r#"
job_id = "fz"
rounds = 3
clients = ["a", "b", "c"]
min_clients = 2
round_timeout_seconds = 600
"#;

struct Fixed {
    rt: tokio::runtime::Runtime,
    job: JobSpec,
    store: FsStore,
    dir: std::path::PathBuf,
}

fn fixed() -> &'static Fixed {
    static F: OnceLock<Fixed> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fedstep-fuzz-rows-{}", std::process::id()));
        Fixed {
            rt: tokio::runtime::Builder::new_current_thread().build().unwrap(),
            job: JobSpec::from_toml(JOB).unwrap(),
            store: FsStore::new(dir.join("bucket")).unwrap(),
            dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let item = stream_record::decode(&raw);
    let update = match item.update {
        Ok(update) => update,
        Err(why) => {
            assert!(!why.is_empty());
            return;
        }
    };
    // What a decoded row re-encodes to must decode to the same row.
    let again: UpdateRecord = serde_json::from_str(&serde_json::to_string(&update).unwrap()).unwrap();
    assert_eq!(format!("{again:?}"), format!("{update:?}"));

    let f = fixed();
    let ledger = MemLedger::new();
    let clock = ManualClock::new(1_800_000_000);
    let engine = RoundEngine::new(
        f.store.clone(),
        ledger.clone(),
        LocalBus::new(std::sync::Arc::new(clock.clone())),
        RecordingCallback::new(),
        clock,
        EngineConfig {
            workdir: f.dir.join("work"),
            owner: "fuzz".into(),
            lease_seconds: 60,
        },
    );
    f.rt.block_on(async {
        ledger.put_job(&f.job).await.unwrap();
        for round in [1u32, 2] {
            ledger.put_round_raw(RoundRecord {
                job_id: "fz".into(),
                round,
                status: if round == 1 { RoundStatus::Open } else { RoundStatus::Closed },
                task_token: Some("t".into()),
                expected_clients: f.job.clients.clone(),
                min_clients: 2,
                deadline: 1_800_000_600,
                received: Default::default(),
                rejections: Default::default(),
                lease_owner: None,
                lease_expires_at: None,
                global_model_key: keys::global_model("fz", round),
                global_checksum: "0".repeat(64),
                result: None,
                failure: None,
            });
        }
        let outcome = engine.on_update(&update).await.unwrap();
        if let UpdateOutcome::Recorded { received, expected } = outcome {
            assert_eq!((received, expected), (1, 3));
            assert_eq!(update.job_id, "fz");
            assert_eq!(update.round, 1);
            assert!(f.job.clients.contains(&update.client_id));
            assert_eq!(
                update.model_key,
                keys::update("fz", 1, &update.client_id)
            );
        }
    });
});
