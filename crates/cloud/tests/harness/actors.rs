//! The actors of a round, each a step the schedule interleaves: a client
//! taking its next message, the stream delivering a record, and the
//! deadline path of Step Functions (token expiry, CloseRound).

use super::*;

impl<B: Backend> Sim<B> {
    /// One client step: take the next message; train and submit, or drop
    /// a stale/duplicate message.
    pub(super) async fn client_step(
        &mut self,
        round: u32,
        client: &str,
        kind: Kind,
        trained: &mut BTreeMap<String, Trained>,
        pending: &mut Vec<Pending>,
    ) -> Result<(), String> {
        let queue = self.queues[client].clone();
        let wait = self.backend.receive_wait_seconds();
        let mut got = infra("receive", queue.receive(1, wait).await)?;
        if got.is_empty() {
            // Its last message is in flight after a crash: the visibility
            // timeout passes.
            let receipt = self.in_flight.get(client).cloned();
            self.backend
                .lapse_visibility(&queue, receipt.as_deref())
                .await?;
            got = infra("receive", queue.receive(1, wait).await)?;
        }
        if !got.is_empty() {
            self.in_flight.remove(client);
        }
        let Some(m) = got.into_iter().next() else {
            return Err(format!(
                "round {round}: `{client}` has work to do but no message in its queue"
            ));
        };
        let note: Notification = serde_json::from_str(&m.body)
            .map_err(|e| format!("a message does not decode: {e}: {}", m.body))?;
        let ready = match note {
            Notification::GlobalModelReady(g)
                if g.job_id == self.job.job_id && g.round == round && !trained[client].done =>
            {
                g
            }
            other => {
                // Old round, duplicate (retried StartRound), or done: drop it.
                self.note(format!("{client}: drops {other:?}"));
                infra("delete", queue.delete(&m.receipt).await)?;
                return Ok(());
            }
        };
        ensure!(
            ready.schema == SCHEMA
                && ready.model_key == keys::global_model(&self.job.job_id, round),
            "round {round}: message {ready:?}"
        );
        let gpath = self
            .files
            .join(format!("{client}-{round}-global.safetensors"));
        let info = infra(
            "download global",
            self.store.get_file(&ready.model_key, &gpath).await,
        )?;
        ensure!(
            info.sha256 == ready.checksum,
            "round {round}: the global model's checksum {} is not the announced {}",
            info.sha256,
            ready.checksum
        );
        let t = trained.get_mut(client).expect("planned");
        let attempt = t.attempts;
        t.attempts += 1;
        let mut values = t.values.clone();
        match kind {
            Kind::BadNaN => values[1] = f32::NAN,
            Kind::BadShape => values.push(1.0),
            _ => {}
        }
        let crash_before = kind == Kind::CrashBeforeRow && attempt == 0;
        let key = keys::update(&self.job.job_id, round, client);
        let file = self.write_model(&format!("{client}-{round}-{attempt}"), &values);
        if crash_before {
            if self.rng.random_bool(0.5) {
                infra("upload", self.store.put_file(&key, &file).await)?;
            }
            self.tally.client_crashes += 1;
            self.in_flight.insert(client.to_string(), m.receipt.clone());
            self.note(format!("{client}: crashes mid-training"));
            return Ok(());
        }
        let info = infra("upload", self.store.put_file(&key, &file).await)?;
        let num_examples = match kind {
            Kind::BadExamples => [
                Value::from(0),
                Value::from(-5),
                Value::from("many"),
                Value::from(1_000_000_000_000u64),
            ][self.rng.random_range(0..4)]
            .clone(),
            _ => Value::from(t.num_examples),
        };
        let row = UpdateRecord {
            client_id: client.to_string(),
            job_round: if kind == Kind::BadRow {
                keys::job_round(&self.job.job_id, round + 7)
            } else {
                keys::job_round(&self.job.job_id, round)
            },
            job_id: self.job.job_id.clone(),
            round,
            model_key: key,
            // A bad row names another upload: both its SHA-256 and (where
            // the store keeps one) its store checksum are someone else's.
            checksum: if kind == Kind::BadChecksum {
                "ab".repeat(32)
            } else {
                info.sha256
            },
            store_checksum: match kind {
                Kind::BadChecksum => info.store_checksum.map(|_| format!("{}=", "A".repeat(43))),
                _ => info.store_checksum,
            },
            num_examples,
            llm_type: None,
            metrics: BTreeMap::from([("loss".to_string(), Value::from(0.5))]),
            bytes: info.bytes,
            trained_at: "2027-01-15T08:00:00Z".into(),
            schema: Some(SCHEMA),
            variate_delta_checksum: None,
            base_round: None,
        };
        let put = infra("put_update", self.ledger.put_update(&row).await)?;
        match (&put, attempt) {
            (PutUpdate::Created, _) => {
                let copies = 1 + self.rng.random_range(0..=2);
                self.tally.duplicate_deliveries += copies as usize - 1;
                pending.push(Pending {
                    record: row.clone(),
                    copies,
                    ok_once: false,
                    failed_once: false,
                });
            }
            (PutUpdate::AlreadyThere, a) if a > 0 => {}
            (other, _) => {
                return Err(format!(
                    "round {round}: `{client}` attempt {attempt}: put_update gave {other:?}"
                ));
            }
        }
        if kind == Kind::CrashAfterRow && attempt == 0 {
            self.tally.client_crashes += 1;
            self.in_flight.insert(client.to_string(), m.receipt.clone());
            self.note(format!("{client}: crashes after writing its row"));
            return Ok(());
        }
        if kind == Kind::UploadTwice {
            let again = infra("put_update", self.ledger.put_update(&row).await)?;
            ensure!(
                again == PutUpdate::AlreadyThere,
                "round {round}: `{client}` writing its row twice got {again:?}"
            );
        }
        infra("delete", queue.delete(&m.receipt).await)?;
        t.done = true;
        self.note(format!("{client}: submitted ({put:?})"));
        Ok(())
    }

    /// One stream delivery of `pending[i]`, to one engine or to two racing.
    pub(super) async fn deliver(
        &mut self,
        round: u32,
        kinds: &BTreeMap<String, Kind>,
        trained: &mut BTreeMap<String, Trained>,
        pending: &mut Vec<Pending>,
        i: usize,
    ) -> Result<(), String> {
        let record = pending[i].record.clone();
        let client = record.client_id.clone();
        let kind = kinds[&client];
        let before = infra(
            "get_round",
            self.ledger.get_round(&record.job_id, round).await,
        )?
        .ok_or("the round vanished")?;
        let delivered_before = before
            .task_token
            .as_ref()
            .map_or(0, |t| self.callback.succeeded(t).len());
        let a = self.rng.random_range(0..self.engines.len());
        let race = self.rng.random_bool(0.2);
        let outcomes = if race {
            let b = (a + 1 + self.rng.random_range(0..self.engines.len() - 1)) % self.engines.len();
            self.tally.races += 1;
            let (x, y) = tokio::join!(
                self.engines[a].on_update(&record),
                self.engines[b].on_update(&record)
            );
            vec![x, y]
        } else {
            vec![self.engines[a].on_update(&record).await]
        };
        self.tally.deliveries += 1;
        // A crashed invocation is gone; the next delivery is a new one.
        self.faults.revive_all();
        let delivered_after = before
            .task_token
            .as_ref()
            .map_or(0, |t| self.callback.succeeded(t).len());
        if pending[i].failed_once && delivered_after > delivered_before {
            self.note(format!(
                "deliver {client}: a replay handed the round over (the first hand-over was lost)"
            ));
            self.tally.resent_callbacks += 1;
        }
        let mut failed = false;
        for o in &outcomes {
            self.note(format!("deliver {client} (race: {race}) → {o:?}"));
            match o {
                Err(_) => failed = true,
                Ok(UpdateOutcome::Rejected(r)) => {
                    ensure!(
                        !kind.good() || r.starts_with("late:"),
                        "round {round}: good update of `{client}` rejected: {r}"
                    );
                    ensure!(
                        !r.contains("failed:"),
                        "round {round}: the round failed: {r}"
                    );
                    self.tally.rejected += 1;
                }
                Ok(UpdateOutcome::Late(r)) => {
                    ensure!(
                        r.starts_with("late:") || r.starts_with("replay:"),
                        "round {round}: `{client}`: late outcome without the rule: {r}"
                    );
                    if r.starts_with("late:") {
                        self.tally.late_records += 1;
                    }
                }
                Ok(UpdateOutcome::Recorded { .. }) | Ok(UpdateOutcome::HandedOver { .. }) => {}
            }
        }
        if before.status == RoundStatus::Open {
            // Counted or not, this attempt began while the round was OPEN
            // (a failed attempt may still have counted it).
            trained
                .get_mut(&client)
                .expect("planned")
                .counted_while_open = true;
        }
        if failed {
            pending[i].failed_once = true;
            self.tally.failed_deliveries += 1;
            // Lambda retries the batch item later; sometimes after the
            // crashed aggregator's lease ran out.
            if self.rng.random_bool(0.7) {
                self.clock.advance(LEASE + 1);
            }
            return Ok(());
        }
        pending[i].ok_once = true;
        pending[i].copies -= 1;
        if pending[i].copies == 0 {
            pending.remove(i);
        }
        Ok(())
    }

    /// The StartRound task timed out: its token expires and CloseRound
    /// runs for the deadline.
    pub(super) async fn deadline_close(
        &mut self,
        round: u32,
        deadline: i64,
        token: &str,
    ) -> Result<RoundResult, String> {
        self.tally.deadline_closes += 1;
        self.clock.set(self.clock.now().max(deadline + 1));
        self.callback.expire(token);
        self.close(round, ClosedBy::Deadline).await
    }

    /// CloseRound, retried on errors as the state machine's Retry does,
    /// sometimes on two engines at once.
    pub(super) async fn close(
        &mut self,
        round: u32,
        closed_by: ClosedBy,
    ) -> Result<RoundResult, String> {
        let job_id = self.job.job_id.clone();
        for attempt in 0..6 {
            let a = self.rng.random_range(0..self.engines.len());
            let race = self.rng.random_bool(0.3);
            // Time moves while CloseRound waits on another engine's lease.
            let done = AtomicBool::new(false);
            let ticker = async {
                for _ in 0..200 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if done.load(Ordering::SeqCst) {
                        break;
                    }
                    self.clock.advance(LEASE + 1);
                }
            };
            let results = if race {
                self.tally.close_races += 1;
                let b = (a + 1) % self.engines.len();
                let closes = async {
                    let (x, y) = tokio::join!(
                        self.engines[a].close_round(&job_id, round, closed_by),
                        self.engines[b].close_round(&job_id, round, closed_by)
                    );
                    done.store(true, Ordering::SeqCst);
                    vec![x, y]
                };
                tokio::join!(closes, ticker).0
            } else {
                let close = async {
                    let x = self.engines[a].close_round(&job_id, round, closed_by).await;
                    done.store(true, Ordering::SeqCst);
                    vec![x]
                };
                tokio::join!(close, ticker).0
            };
            self.faults.revive_all();
            let mut ok: Option<RoundResult> = None;
            let mut failed = false;
            for r in results {
                self.note(format!("CloseRound attempt {attempt} → {r:?}"));
                match r {
                    Ok(res) => {
                        if let Some(prev) = &ok {
                            ensure!(
                                prev == &res,
                                "round {round}: racing CloseRounds returned different results"
                            );
                        }
                        ok = Some(res);
                    }
                    Err(e) if e.is_transient() => failed = true,
                    Err(e) => return Err(format!("round {round}: CloseRound failed: {e}")),
                }
            }
            if let (Some(res), false) = (&ok, failed) {
                return Ok(res.clone());
            }
            if let Some(res) = ok {
                // One of the racers finished it: that is the task output.
                return Ok(res);
            }
            self.clock.advance(LEASE + 1);
        }
        Err(format!("round {round}: CloseRound never succeeded"))
    }
}
