//! Driving a schedule: the whole job, which client does what in a round
//! (drawn from the seeded RNG), and one round from StartRound to its close.

use super::*;

impl<B: Backend> Sim<B> {
    /// The whole job; `Ok` when every invariant held.
    pub async fn run(&mut self) -> Result<(), String> {
        self.queues = self
            .backend
            .subscribe(&self.job.clients, &self.job.job_id)
            .await?;
        let init: Vec<f32> = (0..WIDTH)
            .map(|_| self.rng.random_range(-1.0..1.0f32))
            .collect();
        let f = self.write_model("init", &init);
        infra(
            "uploading the initial model",
            self.store
                .put_file(&keys::global_model(&self.job.job_id, 1), &f)
                .await,
        )?;
        let mut last = None;
        for round in 1..=self.job.rounds {
            let result = self.run_round(round).await?;
            self.tally.rounds += 1;
            let go_on = result.continue_training;
            last = Some(result);
            ensure!(
                go_on == (round < self.job.rounds),
                "round {round}: continue = {go_on} with {} rounds in the job",
                self.job.rounds
            );
            if !go_on {
                break;
            }
        }
        let last = last.ok_or("no round ran")?;
        self.finish(&last).await?;
        let fired = self.faults.lock().fired.clone();
        for ((p, m), n) in fired {
            *self.tally.fired.entry(format!("{p:?}/{m:?}")).or_default() += n;
        }
        Ok(())
    }

    pub(super) fn plan_kinds(&mut self) -> BTreeMap<String, Kind> {
        let mut budget = self.job.clients.len() - self.job.min_clients as usize;
        let mut kinds = BTreeMap::new();
        let mut clients = self.job.clients.clone();
        // Who gets the odd kinds is random too.
        for i in (1..clients.len()).rev() {
            let j = self.rng.random_range(0..=i);
            clients.swap(i, j);
        }
        for c in clients {
            let kind = if budget > 0 && self.rng.random_bool(0.45) {
                budget -= 1;
                ODD[self.rng.random_range(0..ODD.len())]
            } else {
                GOOD[self.rng.random_range(0..GOOD.len())]
            };
            kinds.insert(c, kind);
        }
        kinds
    }

    pub(super) async fn run_round(&mut self, round: u32) -> Result<RoundResult, String> {
        let job_id = self.job.job_id.clone();
        let kinds = self.plan_kinds();
        self.note(format!("round {round}: clients {kinds:?}"));
        let global = self.read_global(round).await?;
        let mut trained: BTreeMap<String, Trained> = kinds
            .keys()
            .map(|c| {
                let n = self.rng.random_range(1..=1000u64);
                (
                    c.clone(),
                    Trained {
                        values: global
                            .iter()
                            .map(|g| g + self.rng.random_range(-1.0..1.0f32))
                            .collect(),
                        num_examples: n,
                        ..Trained::default()
                    },
                )
            })
            .collect();

        // StartRound (maybe retried with a new token before anything happened).
        let mut token = format!("t{round}");
        let e = self.rng.random_range(0..self.engines.len());
        let row = infra(
            "StartRound",
            self.engines[e].start_round(&self.job, round, &token).await,
        )?;
        let deadline = row.deadline;
        let mut tokens = vec![token.clone()];
        if self.rng.random_bool(0.2) {
            token = format!("t{round}-retry");
            tokens.push(token.clone());
            let e = self.rng.random_range(0..self.engines.len());
            let again = infra(
                "StartRound retry",
                self.engines[e].start_round(&self.job, round, &token).await,
            )?;
            ensure!(
                again.task_token.as_deref() == Some(token.as_str()) && again.deadline == deadline,
                "round {round}: a retried StartRound must replace the token and keep the deadline: {again:?}"
            );
            self.tally.start_retries += 1;
        }

        // Faults for this round.
        let n_faults = self.rng.random_range(0..=2);
        for _ in 0..n_faults {
            let point = POINTS[self.rng.random_range(0..POINTS.len())];
            let mode = if point == Point::DeadlineBeforeCallback || self.rng.random_bool(0.5) {
                Mode::Error
            } else {
                Mode::Crash
            };
            self.faults.arm(point, mode);
            self.note(format!("armed {point:?}/{mode:?}"));
        }
        let early_deadline = self.rng.random_bool(0.15);

        // Clients and the stream, interleaved at random, until every
        // on-time client is done and every record delivered.
        let mut pending: Vec<Pending> = Vec::new();
        loop {
            let busy: Vec<String> = kinds
                .iter()
                .filter(|(c, k)| **k != Kind::Late && !trained[*c].done)
                .map(|(c, _)| c.clone())
                .collect();
            if busy.is_empty() && pending.is_empty() {
                break;
            }
            if early_deadline {
                // What the ledger counted, not which deliveries began while
                // OPEN: an attempt that failed before its ADD counted nothing.
                let row = infra("get_round", self.ledger.get_round(&job_id, round).await)?
                    .ok_or("the round vanished")?;
                let usable = row
                    .received
                    .iter()
                    .filter(|c| kinds[*c].good() && !row.rejections.contains_key(*c))
                    .count();
                if usable >= self.job.min_clients as usize && self.rng.random_bool(0.3) {
                    self.note("the deadline comes early".into());
                    break;
                }
            }
            self.client_or_stream_step(round, &kinds, &busy, &mut trained, &mut pending)
                .await?;
        }

        // What the state machine does next: CloseRound after the hand-over,
        // or after the StartRound task timed out.
        let delivered = self.callback.succeeded(&token);
        let sm_result: RoundResult = if let [output] = delivered.as_slice() {
            let hand_over: HandOver = serde_json::from_value(output.clone())
                .map_err(|e| format!("round {round}: hand-over: {e}"))?;
            ensure!(
                hand_over.closed_by == ClosedBy::Stream
                    && hand_over.round == round
                    && hand_over.job_id == job_id,
                "round {round}: the hand-over is {hand_over:?}"
            );
            self.close(round, ClosedBy::Stream).await?
        } else {
            ensure!(
                delivered.is_empty(),
                "round {round}: {} delivered callbacks",
                delivered.len()
            );
            self.deadline_close(round, deadline, &token).await?
        };

        // After the round: stragglers finish and their records arrive.
        loop {
            let busy: Vec<String> = kinds
                .keys()
                .filter(|c| !trained[*c].done)
                .cloned()
                .collect();
            if busy.is_empty() && pending.is_empty() {
                break;
            }
            self.client_or_stream_step(round, &kinds, &busy, &mut trained, &mut pending)
                .await?;
        }
        self.faults.disarm_all();
        self.faults.revive_all();

        self.check_round(
            round,
            &job_id,
            &kinds,
            &trained,
            &tokens,
            &sm_result,
            early_deadline,
        )
        .await?;
        Ok(sm_result)
    }

    /// One step of the round: a busy client acts, or the stream delivers a
    /// pending record (half and half while both are possible).
    async fn client_or_stream_step(
        &mut self,
        round: u32,
        kinds: &BTreeMap<String, Kind>,
        busy: &[String],
        trained: &mut BTreeMap<String, Trained>,
        pending: &mut Vec<Pending>,
    ) -> Result<(), String> {
        if !busy.is_empty() && (pending.is_empty() || self.rng.random_bool(0.5)) {
            let c = busy[self.rng.random_range(0..busy.len())].clone();
            self.client_step(round, &c, kinds[&c], trained, pending)
                .await
        } else {
            let i = self.rng.random_range(0..pending.len());
            self.deliver(round, kinds, trained, pending, i).await
        }
    }
}
