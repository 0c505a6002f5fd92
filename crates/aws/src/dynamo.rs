//! `Ledger` on DynamoDB: the `rounds` table (PK `job_id` S, SK `round` N;
//! the job header is round 0, artifacts are items of their own) and the
//! `updates` table (PK `client_id` S, SK `job_round` S). Every state change
//! is a conditional write, so concurrent aggregators and retries are safe.

use std::collections::{BTreeSet, HashMap};

use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};
use fedstep_cloud::error::Result;
use fedstep_cloud::keys;
use fedstep_cloud::ports::{AddReceived, Ledger, OpenRound, PutSecureRow, PutUpdate};
use fedstep_cloud::records::{
    Artifact, ClosedSecurePhase, RoundRecord, RoundResult, RoundStatus, SecureAwaiting,
    SecurePhase, SecureRow, UpdateRecord,
};
use fedstep_cloud::{CloudError, Job, RoundFailure};

use crate::config::{required, AwsConfig};
use crate::error::sdk_error;

type Item = HashMap<String, AttributeValue>;

/// The sparse GSI of the rounds table listing artifacts by type, newest
/// first (infra and scripts/local_deploy.py create it under this name).
pub const ARTIFACTS_INDEX: &str = "artifacts_by_type";

/// `item_kind` marks the non-round items of the rounds table.
const KIND: &str = "item_kind";
const KIND_JOB: &str = "job";
const KIND_ARTIFACT: &str = "artifact";

#[derive(Debug, Clone)]
pub struct DynamoLedger {
    client: aws_sdk_dynamodb::Client,
    rounds_table: String,
    updates_table: String,
    artifacts_index: String,
}

impl DynamoLedger {
    pub fn new(
        client: aws_sdk_dynamodb::Client,
        rounds_table: impl Into<String>,
        updates_table: impl Into<String>,
    ) -> DynamoLedger {
        DynamoLedger {
            client,
            rounds_table: rounds_table.into(),
            updates_table: updates_table.into(),
            artifacts_index: ARTIFACTS_INDEX.to_string(),
        }
    }

    /// `FEDSTEP_ROUNDS_TABLE` and `FEDSTEP_UPDATES_TABLE`.
    pub fn from_config(cfg: &AwsConfig) -> Result<DynamoLedger> {
        let s = &cfg.settings;
        Ok(DynamoLedger::new(
            cfg.dynamodb(),
            required(&s.rounds_table, "FEDSTEP_ROUNDS_TABLE")?,
            required(&s.updates_table, "FEDSTEP_UPDATES_TABLE")?,
        ))
    }

    fn round_key(job_id: &str, round: u32) -> Item {
        HashMap::from([
            ("job_id".to_string(), s(job_id)),
            ("round".to_string(), n(round)),
        ])
    }

    fn update_key(client_id: &str, job_id: &str, round: u32) -> Item {
        HashMap::from([
            ("client_id".to_string(), s(client_id)),
            ("job_round".to_string(), s(&keys::job_round(job_id, round))),
        ])
    }

    async fn get_item(&self, table: &str, key: Item) -> Result<Option<Item>> {
        let out = self
            .client
            .get_item()
            .table_name(table)
            .set_key(Some(key))
            // Conditional flows read their own writes.
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error(&format!("DynamoDB GetItem {table}"), e))?;
        Ok(out.item)
    }

    async fn get_round_item(&self, job_id: &str, round: u32) -> Result<Option<RoundRecord>> {
        let item = self
            .get_item(&self.rounds_table, Self::round_key(job_id, round))
            .await?;
        item.map(round_from_item).transpose()
    }

    /// `SET rejections.#c = :r` needs the map to exist; rows written by
    /// `open_round` always have it, this covers rows that do not.
    async fn create_rejections_map(
        &self,
        job_id: &str,
        round: u32,
        client: &str,
        reason: &str,
    ) -> Result<bool> {
        let map = AttributeValue::M(HashMap::from([(client.to_string(), s(reason))]));
        let res = self
            .client
            .update_item()
            .table_name(&self.rounds_table)
            .set_key(Some(Self::round_key(job_id, round)))
            .update_expression("SET rejections = :m")
            .condition_expression("attribute_exists(job_id) AND attribute_not_exists(rejections)")
            .expression_attribute_values(":m", map)
            .send()
            .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) => match sdk_error("DynamoDB UpdateItem (rejections)", e) {
                CloudError::ConditionFailed(_) => Ok(false),
                other => Err(other),
            },
        }
    }
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_string())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn encode<T: serde::Serialize>(what: &str, value: &T) -> Result<Item> {
    serde_dynamo::to_item(value).map_err(|e| CloudError::Other(format!("encoding {what}: {e}")))
}

fn encode_value<T: serde::Serialize>(what: &str, value: &T) -> Result<AttributeValue> {
    serde_dynamo::to_attribute_value(value)
        .map_err(|e| CloudError::Other(format!("encoding {what}: {e}")))
}

/// A stored row that does not decode is bad data, not a transient fault.
fn decode<T: serde::de::DeserializeOwned>(what: &str, item: Item) -> Result<T> {
    serde_dynamo::from_item(item).map_err(|e| CloudError::Invalid(format!("{what} row: {e}")))
}

/// `received` is a DynamoDB string set (so `ADD` makes replays harmless);
/// serde_dynamo would write a `BTreeSet` as a list, and an empty set is not
/// storable at all, so it is converted by hand both ways.
fn round_to_item(round: &RoundRecord) -> Result<Item> {
    let mut item = encode("round", round)?;
    item.remove("received");
    if !round.received.is_empty() {
        item.insert(
            "received".into(),
            AttributeValue::Ss(round.received.iter().cloned().collect()),
        );
    }
    Ok(item)
}

/// A string-set attribute that `ADD` grows (a string set) or that the
/// round was written with (a list, serde's encoding of a set).
fn string_set(item: &mut Item, name: &str) -> Result<BTreeSet<String>> {
    match item.remove(name) {
        None | Some(AttributeValue::Null(_)) => Ok(BTreeSet::new()),
        Some(AttributeValue::Ss(set)) => Ok(set.into_iter().collect()),
        Some(AttributeValue::L(list)) => list
            .into_iter()
            .map(|v| match v {
                AttributeValue::S(c) => Ok(c),
                other => Err(CloudError::Invalid(format!(
                    "round row: {name} holds {other:?}"
                ))),
            })
            .collect(),
        Some(other) => Err(CloudError::Invalid(format!(
            "round row: {name} is {other:?}, not a string set"
        ))),
    }
}

fn round_from_item(mut item: Item) -> Result<RoundRecord> {
    let received = string_set(&mut item, "received")?;
    let secure_received = string_set(&mut item, "secure_received")?;
    let mut round: RoundRecord = decode("round", item)?;
    round.received = received;
    round.secure_received = secure_received;
    if let Some(result) = &mut round.result {
        for (client, reason) in result.rejected.iter_mut() {
            if let (true, Some(stored)) = (reason.is_empty(), round.rejections.get(client)) {
                reason.clone_from(stored);
            }
        }
    }
    Ok(round)
}

/// The result as the round item stores it: rejected clients without their
/// reasons, which the item already holds in `rejections` (every rejection
/// is recorded there before the round closes). A thousand clients' reasons
/// stored twice would not fit in one item (fedstep_cloud::capacity);
/// [`round_from_item`] puts them back.
fn stored_result(result: &RoundResult) -> RoundResult {
    let mut stored = result.clone();
    for reason in stored.rejected.values_mut() {
        reason.clear();
    }
    stored
}

fn status(v: &str) -> AttributeValue {
    s(v)
}

impl Ledger for DynamoLedger {
    async fn put_job(&self, job: &Job) -> Result<()> {
        let json = serde_json::to_string(job).map_err(|e| CloudError::Other(e.to_string()))?;
        let mut item = Self::round_key(&job.job_id, 0);
        item.insert(KIND.into(), s(KIND_JOB));
        item.insert("job".into(), s(&json));
        let res = self
            .client
            .put_item()
            .table_name(&self.rounds_table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(job_id)")
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) => {
                match sdk_error(&format!("DynamoDB PutItem {} (job)", self.rounds_table), e) {
                    CloudError::ConditionFailed(_) => match self.get_job(&job.job_id).await? {
                        Some(existing) if &existing == job => Ok(()),
                        Some(_) => Err(CloudError::ConditionFailed(format!(
                            "job `{}` already exists with a different spec",
                            job.job_id
                        ))),
                        None => Err(CloudError::ConditionFailed(format!(
                            "job `{}`: round 0 exists but is not a job header",
                            job.job_id
                        ))),
                    },
                    other => Err(other),
                }
            }
        }
    }

    async fn get_job(&self, job_id: &str) -> Result<Option<Job>> {
        let Some(item) = self
            .get_item(&self.rounds_table, Self::round_key(job_id, 0))
            .await?
        else {
            return Ok(None);
        };
        match item.get("job") {
            Some(AttributeValue::S(json)) => serde_json::from_str(json)
                .map(Some)
                .map_err(|e| CloudError::Invalid(format!("job `{job_id}` header: {e}"))),
            _ => Ok(None),
        }
    }

    async fn open_round(&self, round: &RoundRecord) -> Result<OpenRound> {
        let item = round_to_item(round)?;
        let table = &self.rounds_table;
        let res = self
            .client
            .put_item()
            .table_name(table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(job_id)")
            .send()
            .await;
        match res {
            Ok(_) => return Ok(OpenRound::Created),
            Err(e) => match sdk_error(&format!("DynamoDB PutItem {table} (round)"), e) {
                CloudError::ConditionFailed(_) => {}
                other => return Err(other),
            },
        }
        // The row exists: a retried StartRound carries a new task token,
        // which must replace the stored one while the round is still OPEN.
        let mut update = self
            .client
            .update_item()
            .table_name(table)
            .set_key(Some(Self::round_key(&round.job_id, round.round)))
            .condition_expression("#s = :open")
            .expression_attribute_names("#s", "status")
            .expression_attribute_values(":open", status("OPEN"));
        update = match &round.task_token {
            Some(token) => update
                .update_expression("SET task_token = :t")
                .expression_attribute_values(":t", s(token)),
            None => update.update_expression("REMOVE task_token"),
        };
        match update.send().await {
            Ok(_) => Ok(OpenRound::TokenReplaced),
            Err(e) => match sdk_error(&format!("DynamoDB UpdateItem {table} (token)"), e) {
                CloudError::ConditionFailed(_) => {
                    match self.get_round_item(&round.job_id, round.round).await? {
                        Some(existing) => Ok(OpenRound::AlreadyPast(Box::new(existing))),
                        None => Err(CloudError::Transient(format!(
                            "round {}/{} vanished while opening it",
                            round.job_id, round.round
                        ))),
                    }
                }
                other => Err(other),
            },
        }
    }

    async fn get_round(&self, job_id: &str, round: u32) -> Result<Option<RoundRecord>> {
        if round == 0 {
            // Round 0 is the job header, never a round.
            return Ok(None);
        }
        self.get_round_item(job_id, round).await
    }

    async fn list_rounds(&self, job_id: &str) -> Result<Vec<RoundRecord>> {
        let mut rounds = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.rounds_table)
                .key_condition_expression("job_id = :j AND #r > :zero")
                .expression_attribute_names("#r", "round")
                .expression_attribute_values(":j", s(job_id))
                .expression_attribute_values(":zero", n(0))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error(&format!("DynamoDB Query {}", self.rounds_table), e))?;
            for item in out.items.unwrap_or_default() {
                rounds.push(round_from_item(item)?);
            }
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        Ok(rounds)
    }

    async fn add_received(&self, job_id: &str, round: u32, client: &str) -> Result<AddReceived> {
        let res = self
            .client
            .update_item()
            .table_name(&self.rounds_table)
            .set_key(Some(Self::round_key(job_id, round)))
            .update_expression("ADD #rc :c")
            .condition_expression("attribute_exists(job_id) AND #st = :open")
            .expression_attribute_names("#rc", "received")
            .expression_attribute_names("#st", "status")
            .expression_attribute_values(":c", AttributeValue::Ss(vec![client.to_string()]))
            .expression_attribute_values(":open", status("OPEN"))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match res {
            Ok(out) => Ok(AddReceived::Counted(Box::new(round_from_item(
                out.attributes.unwrap_or_default(),
            )?))),
            Err(e) => match sdk_error(
                &format!("DynamoDB UpdateItem {} (received)", self.rounds_table),
                e,
            ) {
                // Absent, or past OPEN: a consistent read says which. A
                // round never returns to OPEN, so the row read is past it.
                CloudError::ConditionFailed(_) => match self.get_round(job_id, round).await? {
                    Some(row) if row.status != RoundStatus::Open => {
                        Ok(AddReceived::PastOpen(Box::new(row)))
                    }
                    Some(_) => Err(CloudError::Other(format!(
                        "round {job_id}/{round}: the ADD's condition failed, yet the round reads OPEN"
                    ))),
                    None => Err(CloudError::NotFound(format!("round {job_id}/{round}"))),
                },
                other => Err(other),
            },
        }
    }

    async fn record_rejection(
        &self,
        job_id: &str,
        round: u32,
        client: &str,
        reason: &str,
    ) -> Result<()> {
        for _ in 0..2 {
            let res = self
                .client
                .update_item()
                .table_name(&self.rounds_table)
                .set_key(Some(Self::round_key(job_id, round)))
                .update_expression("SET rejections.#c = :r")
                .condition_expression("attribute_exists(job_id)")
                .expression_attribute_names("#c", client)
                .expression_attribute_values(":r", s(reason))
                .send()
                .await;
            match res {
                Ok(_) => return Ok(()),
                Err(e) => {
                    let invalid_path = crate::error::code(&e) == Some("ValidationException");
                    match sdk_error("DynamoDB UpdateItem (rejection)", e) {
                        CloudError::ConditionFailed(_) => {
                            return Err(CloudError::NotFound(format!("round {job_id}/{round}")))
                        }
                        // No `rejections` map yet (a row not written by
                        // open_round): create it, or retry if someone else did.
                        _ if invalid_path => {
                            if self
                                .create_rejections_map(job_id, round, client, reason)
                                .await?
                            {
                                return Ok(());
                            }
                        }
                        other => return Err(other),
                    }
                }
            }
        }
        Err(CloudError::Other(format!(
            "round {job_id}/{round}: could not record the rejection of {client}"
        )))
    }

    async fn claim_round(
        &self,
        job_id: &str,
        round: u32,
        owner: &str,
        now: i64,
        lease_seconds: i64,
    ) -> Result<Option<RoundRecord>> {
        let res = self
            .client
            .update_item()
            .table_name(&self.rounds_table)
            .set_key(Some(Self::round_key(job_id, round)))
            .update_expression("SET #s = :agg, lease_owner = :me, lease_expires_at = :exp")
            .condition_expression("#s = :open OR (#s = :agg AND lease_expires_at < :now)")
            .expression_attribute_names("#s", "status")
            .expression_attribute_values(":open", status("OPEN"))
            .expression_attribute_values(":agg", status("AGGREGATING"))
            .expression_attribute_values(":me", s(owner))
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":exp", n(now.saturating_add(lease_seconds)))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match res {
            Ok(out) => round_from_item(out.attributes.unwrap_or_default()).map(Some),
            Err(e) => match sdk_error(
                &format!("DynamoDB UpdateItem {} (claim)", self.rounds_table),
                e,
            ) {
                CloudError::ConditionFailed(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn renew_lease(
        &self,
        job_id: &str,
        round: u32,
        owner: &str,
        now: i64,
        lease_seconds: i64,
    ) -> Result<bool> {
        let res = self
            .client
            .update_item()
            .table_name(&self.rounds_table)
            .set_key(Some(Self::round_key(job_id, round)))
            .update_expression("SET lease_expires_at = :exp")
            .condition_expression("lease_owner = :me AND #s = :agg")
            .expression_attribute_names("#s", "status")
            .expression_attribute_values(":agg", status("AGGREGATING"))
            .expression_attribute_values(":me", s(owner))
            .expression_attribute_values(":exp", n(now.saturating_add(lease_seconds)))
            .send()
            .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) => match sdk_error(
                &format!("DynamoDB UpdateItem {} (renew)", self.rounds_table),
                e,
            ) {
                CloudError::ConditionFailed(_) => Ok(false),
                other => Err(other),
            },
        }
    }

    async fn close_round(
        &self,
        job_id: &str,
        round: u32,
        owner: &str,
        result: &RoundResult,
    ) -> Result<bool> {
        let res = self
            .client
            .update_item()
            .table_name(&self.rounds_table)
            .set_key(Some(Self::round_key(job_id, round)))
            .update_expression("SET #s = :closed, #res = :result")
            .condition_expression("lease_owner = :me AND #s = :agg")
            .expression_attribute_names("#s", "status")
            .expression_attribute_names("#res", "result")
            .expression_attribute_values(":closed", status("CLOSED"))
            .expression_attribute_values(":agg", status("AGGREGATING"))
            .expression_attribute_values(":me", s(owner))
            .expression_attribute_values(
                ":result",
                encode_value("round result", &stored_result(result))?,
            )
            .send()
            .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) => match sdk_error(
                &format!("DynamoDB UpdateItem {} (close)", self.rounds_table),
                e,
            ) {
                CloudError::ConditionFailed(_) => Ok(false),
                other => Err(other),
            },
        }
    }

    async fn fail_round(&self, job_id: &str, round: u32, failure: &RoundFailure) -> Result<()> {
        let res = self
            .client
            .update_item()
            .table_name(&self.rounds_table)
            .set_key(Some(Self::round_key(job_id, round)))
            .update_expression("SET #s = :failed, failure = :why")
            .condition_expression("attribute_exists(job_id) AND #s <> :closed")
            .expression_attribute_names("#s", "status")
            .expression_attribute_values(":failed", status("FAILED"))
            .expression_attribute_values(":closed", status("CLOSED"))
            .expression_attribute_values(":why", s(&failure.to_string()))
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) => match sdk_error(
                &format!("DynamoDB UpdateItem {} (fail)", self.rounds_table),
                e,
            ) {
                // A CLOSED round stays closed: its result stands, nothing
                // to do. A missing round is reported.
                CloudError::ConditionFailed(_) => match self.get_round_item(job_id, round).await? {
                    Some(_) => Ok(()),
                    None => Err(CloudError::NotFound(format!("round {job_id}/{round}"))),
                },
                other => Err(other),
            },
        }
    }

    async fn put_update(&self, update: &UpdateRecord) -> Result<PutUpdate> {
        let item = encode("update", update)?;
        let table = &self.updates_table;
        let res = self
            .client
            .put_item()
            .table_name(table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(client_id)")
            .send()
            .await;
        match res {
            Ok(_) => Ok(PutUpdate::Created),
            Err(e) => match sdk_error(&format!("DynamoDB PutItem {table}"), e) {
                CloudError::ConditionFailed(msg) => {
                    match self
                        .get_update(&update.client_id, &update.job_id, update.round)
                        .await?
                    {
                        Some(existing) if existing.checksum == update.checksum => {
                            Ok(PutUpdate::AlreadyThere)
                        }
                        Some(existing) => Ok(PutUpdate::Conflict(Box::new(existing))),
                        None => Err(CloudError::ConditionFailed(msg)),
                    }
                }
                other => Err(other),
            },
        }
    }

    async fn get_update(
        &self,
        client_id: &str,
        job_id: &str,
        round: u32,
    ) -> Result<Option<UpdateRecord>> {
        let item = self
            .get_item(
                &self.updates_table,
                Self::update_key(client_id, job_id, round),
            )
            .await?;
        item.map(|i| decode("update", i)).transpose()
    }

    async fn put_secure_row(&self, row: &SecureRow) -> Result<PutSecureRow> {
        let item = encode("secure row", row)?;
        let table = &self.updates_table;
        let res = self
            .client
            .put_item()
            .table_name(table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(client_id)")
            .send()
            .await;
        match res {
            Ok(_) => Ok(PutSecureRow::Created),
            Err(e) => match sdk_error(&format!("DynamoDB PutItem {table}"), e) {
                CloudError::ConditionFailed(msg) => {
                    match self
                        .get_secure_row(&row.client_id, &row.job_id, row.round, row.phase)
                        .await?
                    {
                        Some(existing) if existing.message == row.message => {
                            Ok(PutSecureRow::AlreadyThere)
                        }
                        Some(_) => Ok(PutSecureRow::Conflict),
                        None => Err(CloudError::ConditionFailed(msg)),
                    }
                }
                other => Err(other),
            },
        }
    }

    async fn get_secure_row(
        &self,
        client_id: &str,
        job_id: &str,
        round: u32,
        phase: SecurePhase,
    ) -> Result<Option<SecureRow>> {
        let key = HashMap::from([
            ("client_id".to_string(), s(client_id)),
            (
                "job_round".to_string(),
                s(&keys::secure_job_round(job_id, round, phase)),
            ),
        ]);
        let item = self.get_item(&self.updates_table, key).await?;
        item.map(|i| decode("secure row", i)).transpose()
    }

    async fn close_secure_phase(
        &self,
        job_id: &str,
        round: u32,
        closed: &ClosedSecurePhase,
    ) -> Result<RoundRecord> {
        // The list's length is the number of phases closed: appending only
        // at the expected length makes the first close of a phase the one.
        let closed_before = if closed.phase.index() == 0 {
            "attribute_not_exists(#sc)"
        } else {
            "size(#sc) = :n"
        };
        let mut update = self
            .client
            .update_item()
            .table_name(&self.rounds_table)
            .set_key(Some(Self::round_key(job_id, round)))
            .update_expression("SET #sc = list_append(if_not_exists(#sc, :empty), :closed)")
            .condition_expression(format!(
                "attribute_exists(job_id) AND #st = :open AND {closed_before}"
            ))
            .expression_attribute_names("#sc", "secure_closed")
            .expression_attribute_names("#st", "status")
            .expression_attribute_values(":open", status("OPEN"))
            .expression_attribute_values(":empty", AttributeValue::L(Vec::new()))
            .expression_attribute_values(
                ":closed",
                AttributeValue::L(vec![encode_value("secure phase", closed)?]),
            )
            .return_values(ReturnValue::AllNew);
        if closed.phase.index() > 0 {
            update = update.expression_attribute_values(":n", n(closed.phase.index()));
        }
        match update.send().await {
            Ok(out) => round_from_item(out.attributes.unwrap_or_default()),
            Err(e) => match sdk_error(
                &format!("DynamoDB UpdateItem {} (secure_closed)", self.rounds_table),
                e,
            ) {
                // Closed before, or no longer OPEN: the row as it is says which.
                CloudError::ConditionFailed(_) => self
                    .get_round_item(job_id, round)
                    .await?
                    .ok_or_else(|| CloudError::NotFound(format!("round {job_id}/{round}"))),
                other => Err(other),
            },
        }
    }

    async fn add_secure_received(
        &self,
        job_id: &str,
        round: u32,
        phase: SecurePhase,
        client: &str,
    ) -> Result<AddReceived> {
        let res = self
            .client
            .update_item()
            .table_name(&self.rounds_table)
            .set_key(Some(Self::round_key(job_id, round)))
            .update_expression("ADD #sr :c")
            .condition_expression("attribute_exists(job_id) AND #st = :open")
            .expression_attribute_names("#sr", "secure_received")
            .expression_attribute_names("#st", "status")
            .expression_attribute_values(
                ":c",
                AttributeValue::Ss(vec![phase.received_entry(client)]),
            )
            .expression_attribute_values(":open", status("OPEN"))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match res {
            Ok(out) => Ok(AddReceived::Counted(Box::new(round_from_item(
                out.attributes.unwrap_or_default(),
            )?))),
            Err(e) => match sdk_error(
                &format!("DynamoDB UpdateItem {} (secure_received)", self.rounds_table),
                e,
            ) {
                // Absent, or past OPEN (a round never returns to OPEN).
                CloudError::ConditionFailed(_) => match self.get_round_item(job_id, round).await? {
                    Some(row) if row.status != RoundStatus::Open => {
                        Ok(AddReceived::PastOpen(Box::new(row)))
                    }
                    Some(_) => Err(CloudError::Other(format!(
                        "round {job_id}/{round}: the ADD's condition failed, yet the round reads OPEN"
                    ))),
                    None => Err(CloudError::NotFound(format!("round {job_id}/{round}"))),
                },
                other => Err(other),
            },
        }
    }

    async fn await_secure_phase(
        &self,
        job_id: &str,
        round: u32,
        awaiting: &SecureAwaiting,
        task_token: &str,
    ) -> Result<RoundRecord> {
        let closed_before = if awaiting.phase.index() == 0 {
            "attribute_not_exists(#sc)"
        } else {
            "size(#sc) = :n"
        };
        let mut update = self
            .client
            .update_item()
            .table_name(&self.rounds_table)
            .set_key(Some(Self::round_key(job_id, round)))
            .update_expression("SET task_token = :t, #sa = :a")
            .condition_expression(format!(
                "attribute_exists(job_id) AND #st = :open AND {closed_before}"
            ))
            .expression_attribute_names("#sc", "secure_closed")
            .expression_attribute_names("#sa", "secure_awaiting")
            .expression_attribute_names("#st", "status")
            .expression_attribute_values(":open", status("OPEN"))
            .expression_attribute_values(":t", s(task_token))
            .expression_attribute_values(":a", encode_value("secure phase", awaiting)?)
            .return_values(ReturnValue::AllNew);
        if awaiting.phase.index() > 0 {
            update = update.expression_attribute_values(":n", n(awaiting.phase.index()));
        }
        match update.send().await {
            Ok(out) => round_from_item(out.attributes.unwrap_or_default()),
            Err(e) => match sdk_error(
                &format!(
                    "DynamoDB UpdateItem {} (secure_awaiting)",
                    self.rounds_table
                ),
                e,
            ) {
                CloudError::ConditionFailed(_) => self
                    .get_round_item(job_id, round)
                    .await?
                    .ok_or_else(|| CloudError::NotFound(format!("round {job_id}/{round}"))),
                other => Err(other),
            },
        }
    }

    async fn put_artifact(&self, artifact: &Artifact) -> Result<()> {
        // Its own partition (`artifact#<id>`; ids cannot contain '#', so it
        // never meets a job) keeps artifacts out of every job's rounds.
        let mut item = Self::round_key(
            &format!("artifact#{}", artifact.artifact_id),
            artifact.round,
        );
        item.insert(KIND.into(), s(KIND_ARTIFACT));
        item.insert("artifact".into(), encode_value("artifact", artifact)?);
        item.insert("artifact_created_at".into(), s(&artifact.created_at));
        // GSI key attributes cannot be empty strings: an untyped artifact is
        // listed only without a type filter.
        if !artifact.llm_type.is_empty() {
            item.insert("artifact_llm_type".into(), s(&artifact.llm_type));
        }
        let res = self
            .client
            .put_item()
            .table_name(&self.rounds_table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(job_id)")
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) => match sdk_error(
                &format!("DynamoDB PutItem {} (artifact)", self.rounds_table),
                e,
            ) {
                // Registered already (a retried Finalize): the first stands.
                CloudError::ConditionFailed(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn list_artifacts(&self, llm_type: Option<&str>) -> Result<Vec<Artifact>> {
        let mut items = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let (page, next) = match llm_type {
                Some(t) => {
                    let out = self
                        .client
                        .query()
                        .table_name(&self.rounds_table)
                        .index_name(&self.artifacts_index)
                        .key_condition_expression("artifact_llm_type = :t")
                        .expression_attribute_values(":t", s(t))
                        .scan_index_forward(false)
                        .set_exclusive_start_key(start.take())
                        .send()
                        .await
                        .map_err(|e| {
                            sdk_error(&format!("DynamoDB Query {}", self.artifacts_index), e)
                        })?;
                    (out.items.unwrap_or_default(), out.last_evaluated_key)
                }
                None => {
                    let out = self
                        .client
                        .scan()
                        .table_name(&self.rounds_table)
                        .filter_expression("#k = :a")
                        .expression_attribute_names("#k", KIND)
                        .expression_attribute_values(":a", s(KIND_ARTIFACT))
                        .set_exclusive_start_key(start.take())
                        .send()
                        .await
                        .map_err(|e| {
                            sdk_error(&format!("DynamoDB Scan {}", self.rounds_table), e)
                        })?;
                    (out.items.unwrap_or_default(), out.last_evaluated_key)
                }
            };
            items.extend(page);
            match next {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        let mut artifacts = items
            .into_iter()
            .map(|mut item| match item.remove("artifact") {
                Some(AttributeValue::M(m)) => decode("artifact", m),
                _ => Err(CloudError::Invalid(
                    "artifact item without `artifact`".into(),
                )),
            })
            .collect::<Result<Vec<Artifact>>>()?;
        // Newest first (RFC 3339 UTC sorts as text); the id breaks ties so
        // the order is stable.
        artifacts.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| b.artifact_id.cmp(&a.artifact_id))
        });
        Ok(artifacts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedstep_cloud::records::ClosedBy;

    fn record() -> RoundRecord {
        RoundRecord {
            job_id: "j".into(),
            round: 1,
            status: RoundStatus::Open,
            task_token: Some("tok".into()),
            expected_clients: vec!["a".into(), "b".into()],
            min_clients: 1,
            deadline: 100,
            received: BTreeSet::new(),
            rejections: Default::default(),
            lease_owner: None,
            lease_expires_at: None,
            global_model_key: "k".into(),
            global_checksum: "c".into(),
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
    fn received_is_a_string_set() {
        let mut r = record();
        let item = round_to_item(&r).unwrap();
        assert!(
            !item.contains_key("received"),
            "empty sets are not storable"
        );
        assert_eq!(item["status"], s("OPEN"));
        assert!(matches!(item["rejections"], AttributeValue::M(_)));
        assert_eq!(round_from_item(item).unwrap(), r);

        r.received = ["b".to_string(), "a".to_string()].into();
        let item = round_to_item(&r).unwrap();
        match &item["received"] {
            AttributeValue::Ss(v) => assert_eq!(v, &vec!["a".to_string(), "b".to_string()]),
            other => panic!("{other:?}"),
        }
        assert_eq!(round_from_item(item).unwrap(), r);
    }

    /// An item's size as DynamoDB counts it: attribute names plus values;
    /// strings by their UTF-8 bytes, numbers by their digits (an upper
    /// bound), 3 bytes per map or list plus 1 per element.
    fn item_bytes(item: &Item) -> usize {
        fn value(v: &AttributeValue) -> usize {
            match v {
                AttributeValue::S(s) | AttributeValue::N(s) => s.len(),
                AttributeValue::Ss(v) | AttributeValue::Ns(v) => v.iter().map(String::len).sum(),
                AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
                AttributeValue::L(l) => 3 + l.iter().map(|e| value(e) + 1).sum::<usize>(),
                AttributeValue::M(m) => {
                    3 + m.iter().map(|(k, e)| k.len() + value(e) + 1).sum::<usize>()
                }
                other => panic!("not expected in a round item: {other:?}"),
            }
        }
        item.iter().map(|(k, v)| k.len() + value(v)).sum()
    }

    /// Issue #20: a round of the most clients a job may list, every id of
    /// the longest length, every client received and rejected with a
    /// reason cut to the round's share: the closed item fits in 400 KB.
    #[test]
    fn a_closed_round_of_a_thousand_rejected_clients_fits_in_one_item() {
        use fedstep_cloud::capacity;
        let n = capacity::MAX_CLIENTS;
        let ids: Vec<String> = (0..n).map(|i| format!("{i:0>64}")).collect();
        let reason = capacity::stored_reason(&"r".repeat(5000), n);
        let mut r = record();
        r.status = RoundStatus::Closed;
        r.task_token = Some("t".repeat(2048));
        r.expected_clients = ids.clone();
        r.received = ids.iter().cloned().collect();
        r.rejections = ids.iter().map(|c| (c.clone(), reason.clone())).collect();
        let result = RoundResult {
            job_id: "j".repeat(64),
            round: 1,
            global_model_key: "k".repeat(200),
            metrics: (0..32).map(|i| (format!("{i:0>64}"), 1.0 / 3.0)).collect(),
            continue_training: true,
            closed_by: ClosedBy::Stream,
            accepted: vec![],
            rejected: r.rejections.clone(),
        };
        r.result = Some(stored_result(&result));
        let item = round_to_item(&r).unwrap();
        let bytes = item_bytes(&item);
        assert!(bytes <= capacity::ITEM_BYTES, "{bytes} bytes");
        // Stored once, read back whole.
        let back = round_from_item(item).unwrap();
        assert_eq!(back.result.unwrap(), result);
        // The task result carries the reasons: within the state's limit.
        let json = serde_json::to_string(&result).unwrap().len();
        assert!(json <= capacity::worst_result_json_bytes(&ids), "{json}");
    }
}
