//! The invariants of issue #6, checked after every round (`check_round`)
//! and at the end of the job (`finish`); a violation is an `Err` naming it.

use super::*;

impl<B: Backend> Sim<B> {
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn check_round(
        &self,
        round: u32,
        job_id: &str,
        kinds: &BTreeMap<String, Kind>,
        trained: &BTreeMap<String, Trained>,
        tokens: &[String],
        sm: &RoundResult,
        early_deadline: bool,
    ) -> Result<(), String> {
        let row = infra("get_round", self.ledger.get_round(job_id, round).await)?
            .ok_or("round row missing")?;
        ensure!(
            row.status == RoundStatus::Closed,
            "round {round} is {:?}, not CLOSED",
            row.status
        );
        let stored = row.result.clone().ok_or("CLOSED without a result")?;
        ensure!(
            &stored == sm,
            "round {round}: the state machine got {sm:?} but the ledger holds {stored:?}"
        );

        // Aggregated exactly once.
        let closes = self.faults.lock().closes.get(&round).copied().unwrap_or(0);
        ensure!(closes == 1, "round {round} was closed {closes} times");
        let mut delivered = 0;
        for t in tokens {
            for call in self.callback.calls_for(t) {
                match call {
                    CallbackCall::Succeed {
                        delivered: true,
                        output,
                        ..
                    } => {
                        delivered += 1;
                        let hand_over: HandOver = serde_json::from_value(output).map_err(|e| {
                            format!("round {round}: the callback is no hand-over: {e}")
                        })?;
                        ensure!(
                            hand_over.closed_by == ClosedBy::Stream
                                && stored.closed_by == ClosedBy::Stream,
                            "round {round}: handed over ({hand_over:?}) but closed by {}",
                            stored.closed_by
                        );
                    }
                    CallbackCall::Fail {
                        delivered: true,
                        error,
                        cause,
                        ..
                    } => return Err(format!("round {round}: failure callback {error}: {cause}")),
                    _ => {}
                }
            }
        }
        ensure!(
            delivered <= 1,
            "round {round}: {delivered} delivered callbacks"
        );
        let next_key = keys::global_model(job_id, round + 1);
        let writes = self
            .faults
            .lock()
            .global_writes
            .get(&next_key)
            .cloned()
            .unwrap_or_default();
        ensure!(!writes.is_empty(), "round {round}: no global model written");
        ensure!(
            writes.iter().all(|w| w == &writes[0]),
            "round {round}: the global model was written with different contents: {writes:?}"
        );
        let now = infra("head", self.store.head(&next_key).await)?.ok_or("no next global")?;
        ensure!(
            now.sha256 == writes[0],
            "round {round}: the stored global is none of the writes"
        );
        ensure!(
            stored.global_model_key == next_key,
            "round {round}: result names {}",
            stored.global_model_key
        );

        // Every accepted update counted once; every client accounted for.
        let accepted: BTreeSet<&String> = stored.accepted.iter().collect();
        ensure!(
            accepted.len() == stored.accepted.len(),
            "round {round}: accepted twice: {:?}",
            stored.accepted
        );
        ensure!(
            stored.metrics.get("clients_accepted") == Some(&(accepted.len() as f64)),
            "round {round}: clients_accepted metric {:?}",
            stored.metrics.get("clients_accepted")
        );
        for (c, kind) in kinds {
            let t = &trained[c];
            let rejection = row.rejections.get(c);
            let is_accepted = accepted.contains(c);
            ensure!(
                is_accepted != rejection.is_some(),
                "round {round}: `{c}` ({kind:?}) accepted: {is_accepted}, rejection: {rejection:?} \
                 (must be exactly one)"
            );
            if kind.good() {
                let on_time = *kind != Kind::Late && !early_deadline;
                if on_time {
                    ensure!(
                        is_accepted,
                        "round {round}: on-time `{c}` not accepted: {rejection:?}"
                    );
                } else if let Some(r) = rejection {
                    ensure!(
                        r.starts_with("late:"),
                        "round {round}: `{c}` ({kind:?}): {r}"
                    );
                }
                if is_accepted {
                    ensure!(
                        t.counted_while_open,
                        "round {round}: `{c}` accepted though never counted while OPEN"
                    );
                }
            } else {
                let r = rejection.ok_or_else(|| {
                    format!("round {round}: bad update of `{c}` ({kind:?}) was accepted")
                })?;
                ensure!(
                    r.contains(kind.rule()) || r.starts_with("late:"),
                    "round {round}: `{c}` ({kind:?}) rejected for `{r}`, want the rule `{}`",
                    kind.rule()
                );
                if let Some(at_close) = stored.rejected.get(c) {
                    ensure!(
                        at_close.contains(kind.rule()) || at_close.starts_with("late:"),
                        "round {round}: `{c}` ({kind:?}) in the result: `{at_close}`"
                    );
                }
            }
        }

        // A reason recorded by the time the round closed is never replaced
        // (a replay after the close must not turn `job_round: …` into `late: …`).
        for (c, at_close) in &stored.rejected {
            ensure!(
                row.rejections.get(c) == Some(at_close),
                "round {round}: `{c}` was rejected with `{at_close}` at the close, the row now says {:?}",
                row.rejections.get(c)
            );
        }

        // The new global model is the weighted mean of the accepted updates.
        let got = self.read_global(round + 1).await?;
        let total: f64 = stored
            .accepted
            .iter()
            .map(|c| trained[c].num_examples as f64)
            .sum();
        ensure!(total > 0.0, "round {round}: nothing accepted");
        for (i, g) in got.iter().enumerate() {
            let want: f64 = stored
                .accepted
                .iter()
                .map(|c| f64::from(trained[c].values[i]) * trained[c].num_examples as f64)
                .sum::<f64>()
                / total;
            ensure!(
                (f64::from(*g) - want).abs() <= 1e-5 * want.abs().max(1.0),
                "round {round}: global[{i}] = {g}, the weighted mean of {:?} is {want}",
                stored.accepted
            );
        }
        ensure!(
            got.len() == WIDTH,
            "round {round}: global has {} values",
            got.len()
        );

        let announced = self
            .bus
            .published()
            .iter()
            .filter(|n| matches!(n, Notification::GlobalModelReady(g) if g.job_id == job_id && g.round == round))
            .count();
        ensure!(
            announced == tokens.len(),
            "round {round}: announced {announced} times for {} StartRounds",
            tokens.len()
        );
        Ok(())
    }

    /// Finalize (twice: a retry is a no-op) and the end-of-job invariants.
    pub(super) async fn finish(&mut self, last: &RoundResult) -> Result<(), String> {
        let job_id = self.job.job_id.clone();
        let rounds = infra("list_rounds", self.ledger.list_rounds(&job_id).await)?;
        ensure!(
            rounds.len() == self.job.rounds as usize
                && rounds.iter().all(|r| r.status == RoundStatus::Closed),
            "the job did not run all its rounds to CLOSED: {:?}",
            rounds
                .iter()
                .map(|r| (r.round, r.status))
                .collect::<Vec<_>>()
        );
        let a = self.rng.random_range(0..self.engines.len());
        let out = infra(
            "Finalize",
            self.engines[a].finalize(&job_id, last.round, last).await,
        )?;
        let b = self.rng.random_range(0..self.engines.len());
        let again = infra(
            "Finalize retry",
            self.engines[b].finalize(&job_id, last.round, last).await,
        )?;
        ensure!(
            out == again,
            "a retried Finalize answered {again} after {out}"
        );
        // The registry may be shared (the emulators): this job's entries only.
        let artifacts: Vec<_> = infra("artifacts", self.ledger.list_artifacts(None).await)?
            .into_iter()
            .filter(|a| a.job_id == job_id)
            .collect();
        let want = format!("{job_id}:{}", self.job.rounds);
        ensure!(
            artifacts.len() == 1 && artifacts[0].artifact_id == want,
            "artifacts: {artifacts:?}"
        );
        ensure!(
            artifacts[0].model_key == keys::global_model(&job_id, self.job.rounds + 1),
            "the artifact is {}",
            artifacts[0].model_key
        );
        let complete = self
            .bus
            .published()
            .iter()
            .filter(|n| matches!(n, Notification::TrainingComplete(_)))
            .count();
        ensure!(complete >= 1, "no training_complete published");
        Ok(())
    }
}
