//! The ledger and the store → a [`JobReport`]: the job header, every round
//! row, each expected client's `updates` row, and the measurements stored
//! beside each closed round's output model. Works over any ports: the AWS
//! adapters for `fedstep job report`, the local ones for `fedstep simulate`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use fedstep_cloud::ports::{Ledger, ObjectStore};
use fedstep_cloud::records::{RoundRecord, RoundStatus};
use fedstep_cloud::round_measurements::RoundMeasurements;
use fedstep_cloud::{keys, CloudError};

use super::{ClientView, JobReport, Participation, RoundView, Timings};

/// Reads job `job_id`; `scratch` holds the downloaded measurements.
pub async fn collect<S: ObjectStore, L: Ledger>(
    store: &S,
    ledger: &L,
    job_id: &str,
    execution: Option<String>,
    scratch: &Path,
) -> Result<JobReport> {
    let job = ledger
        .get_job(job_id)
        .await?
        .with_context(|| format!("no job `{job_id}` in the ledger"))?;
    let rows = ledger
        .list_rounds(job_id)
        .await
        .with_context(|| format!("listing the rounds of {job_id}"))?;
    std::fs::create_dir_all(scratch)?;
    let mut rounds = Vec::with_capacity(rows.len());
    for row in &rows {
        let measured = measurements(store, row, scratch).await?;
        let mut clients = Vec::with_capacity(row.expected_clients.len());
        for client in &row.expected_clients {
            let update = ledger.get_update(client, job_id, row.round).await?;
            let measured_client = measured.as_ref().and_then(|m| {
                m.measurements
                    .clients
                    .iter()
                    .find(|c| &c.client_id == client)
            });
            let (participation, reason) = participation(row, client);
            clients.push(ClientView {
                client_id: client.clone(),
                participation,
                reason,
                num_examples: update.as_ref().and_then(|u| u.num_examples.as_f64()),
                reported: update
                    .as_ref()
                    .map(|u| {
                        u.metrics
                            .iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                            .collect()
                    })
                    .unwrap_or_default(),
                weight: measured_client.and_then(|c| c.weight),
                trained_at: update.map(|u| u.trained_at),
            });
        }
        let last_update_at = clients.iter().filter_map(|c| c.trained_at.clone()).max();
        let result = row.result.as_ref();
        rounds.push(RoundView {
            round: row.round,
            status: format!("{:?}", row.status).to_uppercase(),
            closed_by: result.map(|r| r.closed_by),
            metrics: result.map(|r| r.metrics.clone()).unwrap_or_default(),
            continue_training: result.map(|r| r.continue_training),
            failure: row.failure.as_ref().map(|f| f.to_string()),
            clients,
            timings: Timings {
                opened_at: row.deadline.saturating_sub(
                    i64::try_from(job.spec().round_timeout_seconds).unwrap_or(i64::MAX),
                ),
                deadline: row.deadline,
                last_update_at,
                aggregation_seconds: measured.as_ref().map(|m| m.measurements.seconds),
                bytes_read: measured.as_ref().map(|m| m.measurements.bytes_read),
                bytes_written: measured.as_ref().map(|m| m.measurements.bytes_written),
            },
        });
    }
    Ok(JobReport {
        job_id: job_id.to_string(),
        job: serde_json::to_value(job.spec())?,
        execution,
        clients: job.spec().clients.clone(),
        rounds,
        baselines: Vec::new(),
        against_time: None,
    })
}

/// The measurements stored with a closed round's output; none before the
/// close, and none for a round closed by a version that did not store them
/// (its figures show as absent rather than failing the whole report).
async fn measurements<S: ObjectStore>(
    store: &S,
    row: &RoundRecord,
    scratch: &Path,
) -> Result<Option<RoundMeasurements>> {
    if row.status != RoundStatus::Closed {
        return Ok(None);
    }
    let key = keys::round_measurements(&row.job_id, row.round + 1);
    let path = scratch.join(format!("measurements-{}.json", row.round));
    match store.get_file(&key, &path).await {
        Ok(_) => {}
        Err(CloudError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading `{key}`")),
    }
    let text = std::fs::read(&path)?;
    let m = serde_json::from_slice(&text).with_context(|| format!("parsing `{key}`"))?;
    Ok(Some(m))
}

/// Accepted if the result lists it; otherwise its rejection (late if the
/// reason says so); otherwise received or silent.
fn participation(row: &RoundRecord, client: &str) -> (Participation, Option<String>) {
    if let Some(result) = &row.result {
        if result.accepted.iter().any(|c| c == client) {
            return (Participation::Accepted, None);
        }
    }
    if let Some(reason) = row.rejections.get(client) {
        let kind = if reason.starts_with("late:") {
            Participation::Late
        } else {
            Participation::Rejected
        };
        return (kind, Some(reason.clone()));
    }
    if row.received.contains(client) {
        return (Participation::Received, None);
    }
    (Participation::Silent, None)
}

/// Per client, per round: `value` of each round's view of that client.
pub(super) fn per_client<F: Fn(&ClientView) -> Option<f64>>(
    report: &JobReport,
    value: F,
) -> BTreeMap<String, Vec<(f64, f64)>> {
    let mut out: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in &report.rounds {
        for c in &r.clients {
            if let Some(v) = value(c).filter(|v| v.is_finite()) {
                out.entry(c.client_id.clone())
                    .or_default()
                    .push((f64::from(r.round), v));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedstep_cloud::records::{ClosedBy, RoundResult};

    fn row(status: RoundStatus) -> RoundRecord {
        RoundRecord {
            job_id: "j".into(),
            round: 1,
            status,
            task_token: None,
            expected_clients: ["a", "b", "c", "d", "e"].map(String::from).to_vec(),
            min_clients: 2,
            deadline: 1_800_000_600,
            received: ["a", "b", "c"].map(String::from).into(),
            rejections: [
                ("b", "checksum: the row says x"),
                ("d", "late: round 1 is Aggregating"),
            ]
            .map(|(c, r)| (c.to_string(), r.to_string()))
            .into(),
            lease_owner: None,
            lease_expires_at: None,
            global_model_key: "jobs/j/rounds/1/global.safetensors".into(),
            global_checksum: "ab".repeat(32),
            global_store_checksum: None,
            result: None,
            failure: None,
            buffer: None,
            secure_closed: Vec::new(),
            secure_received: Default::default(),
            secure_awaiting: None,
        }
    }

    #[test]
    fn each_client_gets_one_state_with_its_reason() {
        let open = row(RoundStatus::Open);
        let state = |r: &RoundRecord, c: &str| participation(r, c);
        assert_eq!(state(&open, "a"), (Participation::Received, None));
        assert_eq!(
            state(&open, "b"),
            (
                Participation::Rejected,
                Some("checksum: the row says x".into())
            )
        );
        assert_eq!(state(&open, "d").0, Participation::Late);
        assert_eq!(state(&open, "e"), (Participation::Silent, None));

        let mut closed = row(RoundStatus::Closed);
        closed.result = Some(RoundResult {
            job_id: "j".into(),
            round: 1,
            global_model_key: "jobs/j/rounds/2/global.safetensors".into(),
            metrics: Default::default(),
            continue_training: true,
            closed_by: ClosedBy::Deadline,
            accepted: vec!["a".into(), "c".into()],
            rejected: Default::default(),
        });
        assert_eq!(state(&closed, "a"), (Participation::Accepted, None));
        assert_eq!(state(&closed, "c"), (Participation::Accepted, None));
        assert_eq!(state(&closed, "b").0, Participation::Rejected);
        assert_eq!(state(&closed, "e").0, Participation::Silent);
    }

    #[tokio::test]
    async fn a_closed_round_without_stored_measurements_has_no_figures() {
        use fedstep_cloud::local::FsStore;
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path().join("bucket")).unwrap();
        let closed = row(RoundStatus::Closed);
        assert!(measurements(&store, &closed, dir.path())
            .await
            .unwrap()
            .is_none());
        // Stored, it is read.
        let stored = serde_json::json!({"job_id": "j", "round": 1, "measurements": {
            "weighting": "examples", "llm_type": "", "target_llm_type": null,
            "combiner": "mean", "accepted": 0, "rejected": 0, "excluded": 0,
            "clients": [], "stages": {}, "tensors": 1, "parameters": 4,
            "bytes_read": 16, "bytes_written": 16, "passes": 1, "seconds": 0.5}});
        let file = dir.path().join("m.json");
        std::fs::write(&file, stored.to_string()).unwrap();
        store
            .put_file(&keys::round_measurements("j", 2), &file)
            .await
            .unwrap();
        let read = measurements(&store, &closed, dir.path()).await.unwrap();
        assert_eq!(read.map(|m| m.measurements.bytes_read), Some(16));
    }
}
