//! The client loop: receive one message at a time, decide what it is, act,
//! and delete it only when acting is finished (or can never succeed).
//!
//! | message                                | action                          | deleted? |
//! |----------------------------------------|---------------------------------|----------|
//! | malformed / oversized                  | log the reason                  | yes      |
//! | newer schema                           | log (an upgrade can use it)     | no       |
//! | for a job we are not in                | log                             | yes      |
//! | `global_model_ready`, deadline passed  | log                             | yes      |
//! | `global_model_ready`                   | [`take_part`](crate::round)     | on success, already-done, conflict |
//! | `training_complete` for our job        | FedSelect: write the personalized final model; exit if `exit_on_complete` | yes (kept on a failed write) |
//!
//! A failed attempt leaves the message on the queue and pushes its next
//! delivery back with a growing delay, so a broken trainer does not spin.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fedstep_cloud::ports::{ClientQueue, Clock, Ledger, ObjectStore, QueueMessage, SystemClock};
use fedstep_cloud::records::{Notification, TrainingComplete};
use fedstep_core::Limits;
use tokio::sync::watch;

use crate::config::ClientConfig;
use crate::error::ClientError;
use crate::heartbeat;
use crate::message::{self, Rejection};
use crate::retry::{retry, Backoff};
use crate::round::RoundOutcome;
use crate::trainer::Trainer;

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub client_id: String,
    /// `None`: every job on our queue.
    pub jobs: Option<Vec<String>>,
    pub visibility_timeout_seconds: u32,
    /// How often the visibility is extended while working.
    pub heartbeat_every: Duration,
    pub wait_seconds: u32,
    pub exit_on_complete: bool,
    pub workdir: PathBuf,
    pub limits: Limits,
    pub backoff: Backoff,
    /// After a failed attempt the message reappears after this many seconds,
    /// doubled per delivery, capped at 15 minutes.
    pub failure_retry_seconds: u32,
    /// FedSelect: keep part of every tensor local (None: share everything).
    pub personalization: Option<crate::personalize::Personalizer>,
}

impl WorkerOptions {
    pub fn from_config(c: &ClientConfig) -> WorkerOptions {
        WorkerOptions {
            client_id: c.client_id.clone(),
            jobs: c.jobs.clone(),
            visibility_timeout_seconds: c.visibility_timeout_seconds,
            heartbeat_every: Duration::from_secs(
                u64::from(c.visibility_timeout_seconds / 3).max(1),
            ),
            wait_seconds: c.wait_seconds,
            exit_on_complete: c.exit_on_complete,
            workdir: c.workdir.clone(),
            limits: Limits::default(),
            backoff: Backoff::default(),
            failure_retry_seconds: 30,
            personalization: c.personalization.as_ref().map(|p| {
                crate::personalize::Personalizer::new(p, &c.workdir)
                    .expect("checked when the config was loaded")
            }),
        }
    }

    fn takes_part_in(&self, job_id: &str) -> bool {
        self.jobs
            .as_ref()
            .is_none_or(|jobs| jobs.iter().any(|j| j == job_id))
    }
}

/// What became of one message (also logged).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Submitted {
        job_id: String,
        /// The round (async: version) the row went to.
        round: u32,
        /// The round the model trained from (async: may be older).
        trained_from: u32,
        checksum: String,
    },
    /// Async: a newer version is announced already; this one is skipped.
    Superseded {
        job_id: String,
        round: u32,
    },
    /// Async: the job ended before a version to submit the update trained
    /// from `round` to was announced; the update is dropped.
    JobEndedFirst {
        job_id: String,
        round: u32,
    },
    AlreadyDone {
        job_id: String,
        round: u32,
    },
    /// Malformed: deleted.
    Rejected {
        reason: String,
    },
    /// Newer schema: left on the queue.
    Deferred {
        reason: String,
    },
    NotOurJob {
        job_id: String,
    },
    DeadlinePassed {
        job_id: String,
        round: u32,
    },
    Conflict {
        job_id: String,
        round: u32,
        existing_checksum: String,
    },
    JobComplete {
        job_id: String,
        /// FedSelect: the final global model with our personal values.
        personalized: Option<PathBuf>,
    },
    /// The job's execution failed (`job_failed`): no round will follow.
    JobFailed {
        job_id: String,
        round: u32,
        /// The error's name and cause, as the workflow reported them.
        reason: String,
    },
    /// Left on the queue for a later attempt.
    Failed {
        reason: String,
        retry_in_seconds: u32,
    },
}

impl Outcome {
    /// Whether the message was (to be) deleted.
    pub fn deletes(&self) -> bool {
        !matches!(self, Outcome::Deferred { .. } | Outcome::Failed { .. })
    }
}

/// Why [`Worker::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// Asked to stop (signal); the message in hand, if any, was left for
    /// redelivery.
    Shutdown,
    /// `training_complete` for this job arrived and `exit_on_complete` is set.
    JobComplete(String),
    /// `job_failed` for this job arrived and `exit_on_complete` is set:
    /// the job, and why it failed.
    JobFailed { job_id: String, reason: String },
}

pub struct Worker<Q, S, L, T> {
    pub(crate) opts: WorkerOptions,
    pub(crate) queue: Arc<Q>,
    pub(crate) store: Arc<S>,
    pub(crate) ledger: Arc<L>,
    pub(crate) trainer: Arc<T>,
    pub(crate) clock: Arc<dyn Clock>,
}

impl<Q, S, L, T> Worker<Q, S, L, T>
where
    Q: ClientQueue + 'static,
    S: ObjectStore,
    L: Ledger,
    T: Trainer,
{
    pub fn new(
        opts: WorkerOptions,
        queue: Arc<Q>,
        store: Arc<S>,
        ledger: Arc<L>,
        trainer: Arc<T>,
    ) -> Self {
        Worker {
            opts,
            queue,
            store,
            ledger,
            trainer,
            clock: Arc::new(SystemClock),
        }
    }

    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn options(&self) -> &WorkerOptions {
        &self.opts
    }

    /// Runs until `shutdown` becomes true (or its sender is dropped), or the
    /// job completes with `exit_on_complete`. Returns an error only for a
    /// queue that cannot be read at all (not a passing outage).
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) -> Result<RunEnd, ClientError> {
        let mut failures = 0u32;
        loop {
            if *shutdown.borrow_and_update() {
                return Ok(RunEnd::Shutdown);
            }
            let received = tokio::select! {
                r = self.queue.receive(1, self.opts.wait_seconds) => r,
                _ = shutdown.changed() => return Ok(RunEnd::Shutdown),
            };
            let messages = match received {
                Ok(m) => {
                    failures = 0;
                    m
                }
                Err(e) if e.is_transient() => {
                    let wait = self.opts.backoff.delay(failures.min(16));
                    tracing::warn!("receiving from the queue: {e}; retrying in {wait:?}");
                    failures = failures.saturating_add(1);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue,
                        _ = shutdown.changed() => return Ok(RunEnd::Shutdown),
                    }
                }
                Err(e) => return Err(e.into()),
            };
            for m in messages {
                let outcome = tokio::select! {
                    o = self.handle(&m) => o,
                    _ = shutdown.changed() => {
                        self.abandon(&m).await;
                        return Ok(RunEnd::Shutdown);
                    }
                };
                if self.opts.exit_on_complete {
                    match outcome {
                        Outcome::JobComplete { job_id, .. } => {
                            return Ok(RunEnd::JobComplete(job_id))
                        }
                        Outcome::JobFailed { job_id, reason, .. } => {
                            return Ok(RunEnd::JobFailed { job_id, reason })
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// One receive (long poll) and the handling of what arrived.
    pub async fn poll_once(&self) -> Result<Vec<Outcome>, ClientError> {
        let b = &self.opts.backoff;
        let messages = retry("receive", b, || {
            self.queue.receive(1, self.opts.wait_seconds)
        })
        .await?;
        let mut out = Vec::with_capacity(messages.len());
        for m in &messages {
            out.push(self.handle(m).await);
        }
        Ok(out)
    }

    /// Decides what `m` is, acts on it, deletes it when appropriate, and
    /// logs the outcome. Never panics on the message's content.
    pub async fn handle(&self, m: &QueueMessage) -> Outcome {
        let outcome = self.act(m).await;
        if outcome.deletes() {
            self.delete(m).await;
        } else if let Outcome::Failed {
            retry_in_seconds, ..
        } = &outcome
        {
            // Best effort: if this fails the normal visibility timeout applies.
            if let Err(e) = self
                .queue
                .extend_visibility(&m.receipt, *retry_in_seconds)
                .await
            {
                tracing::warn!("could not postpone the failed message: {e}");
            }
        }
        log(&outcome, &self.opts.client_id, &m.message_id);
        outcome
    }

    async fn act(&self, m: &QueueMessage) -> Outcome {
        let note = match message::decode(&m.body) {
            Ok(n) => n,
            Err(Rejection::Malformed(reason)) => return Outcome::Rejected { reason },
            Err(Rejection::NewerSchema(s)) => {
                return Outcome::Deferred {
                    reason: format!("message schema {s} is newer than this client understands; upgrade fedstep-client"),
                }
            }
        };
        if !self.opts.takes_part_in(note.job_id()) {
            return Outcome::NotOurJob {
                job_id: note.job_id().to_string(),
            };
        }
        let g = match note {
            Notification::TrainingComplete(t) => {
                let personalized = match &self.opts.personalization {
                    Some(p) if p.has_personal(&t.job_id) => {
                        match self.write_personalized(p, &t).await {
                            Ok(path) => Some(path),
                            // Kept on the queue: the personalized model is
                            // this client's result, not to be lost to a
                            // passing outage.
                            Err(e) => {
                                return Outcome::Failed {
                                    reason: format!(
                                        "{}: writing the personalized final model: {e}",
                                        t.job_id
                                    ),
                                    retry_in_seconds: self.failure_delay(m.receive_count),
                                }
                            }
                        }
                    }
                    _ => None,
                };
                return Outcome::JobComplete {
                    job_id: t.job_id,
                    personalized,
                };
            }
            Notification::JobFailed(f) => {
                let reason = if f.cause.is_empty() {
                    f.error
                } else {
                    format!("{}: {}", f.error, f.cause)
                };
                return Outcome::JobFailed {
                    job_id: f.job_id,
                    round: f.round,
                    reason,
                };
            }
            Notification::GlobalModelReady(g) => g,
        };
        let (job_id, round) = (g.job_id.clone(), g.round);
        // Logged on receipt (not only when done): operators and the e2e
        // latency figure need to see when the announcement arrived.
        tracing::info!(
            "{}: {job_id} round {round}: global model announced",
            self.opts.client_id
        );
        if self.clock.now() > g.deadline {
            return Outcome::DeadlinePassed { job_id, round };
        }
        // Async: train from the newest version only (version.rs).
        if g.asynchronous {
            match self.superseded(&g).await {
                Ok(true) => return Outcome::Superseded { job_id, round },
                Ok(false) => {}
                Err(e) => {
                    return Outcome::Failed {
                        reason: format!("{job_id} version {round}: {e}"),
                        retry_in_seconds: self.failure_delay(m.receive_count),
                    }
                }
            }
        }
        let _heartbeat = heartbeat::start(
            Arc::clone(&self.queue),
            m.receipt.clone(),
            self.opts.visibility_timeout_seconds,
            self.opts.heartbeat_every,
        );
        match self.take_part(&g).await {
            Ok(RoundOutcome::Submitted {
                checksum,
                round: submitted_to,
                ..
            }) => Outcome::Submitted {
                job_id,
                round: submitted_to,
                trained_from: round,
                checksum,
            },
            Ok(RoundOutcome::JobEnded) => Outcome::JobEndedFirst { job_id, round },
            Ok(RoundOutcome::AlreadyDone | RoundOutcome::AlreadyThere) => {
                Outcome::AlreadyDone { job_id, round }
            }
            Ok(RoundOutcome::Conflict { existing_checksum }) => Outcome::Conflict {
                job_id,
                round,
                existing_checksum,
            },
            Err(e) => Outcome::Failed {
                reason: format!("{job_id} round {round}: {e}"),
                retry_in_seconds: self.failure_delay(m.receive_count),
            },
        }
    }

    /// Downloads the job's final model and merges our personal values in.
    /// `training_complete` carries no checksum; the merge checks the file
    /// is a model with our tensors.
    async fn write_personalized(
        &self,
        p: &crate::personalize::Personalizer,
        t: &TrainingComplete,
    ) -> Result<PathBuf, ClientError> {
        let workdir = &self.opts.workdir;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-final-", t.job_id))
            .tempdir_in(workdir)
            .map_err(ClientError::io(workdir))?;
        let last = dir.path().join("final.safetensors");
        retry("download the final model", &self.opts.backoff, || {
            self.store.get_file(&t.final_model_key, &last)
        })
        .await?;
        p.finish(&t.job_id, &last, &self.opts.limits)
    }

    fn failure_delay(&self, receive_count: u32) -> u32 {
        let doublings = receive_count.saturating_sub(1).min(10);
        self.opts
            .failure_retry_seconds
            .saturating_mul(1 << doublings)
            .min(900)
    }

    async fn delete(&self, m: &QueueMessage) {
        let b = &self.opts.backoff;
        if let Err(e) = retry("delete message", b, || self.queue.delete(&m.receipt)).await {
            // Harmless: on redelivery the row is found and the round skipped.
            tracing::warn!(
                "could not delete the message (it will be redelivered and skipped): {e}"
            );
        }
    }

    /// Shutdown mid-message: make it visible again at once so a restarted
    /// client (or another consumer) picks it up without waiting.
    async fn abandon(&self, m: &QueueMessage) {
        tracing::info!("shutting down: the current message is left for redelivery");
        if let Err(e) = self.queue.extend_visibility(&m.receipt, 0).await {
            tracing::warn!(
                "could not release the message (it reappears after its visibility timeout): {e}"
            );
        }
    }
}

/// `id` (the queue's message id) is named wherever the message stays on
/// the queue or is dropped for a reason an operator should look into.
fn log(o: &Outcome, me: &str, id: &str) {
    match o {
        Outcome::Submitted { job_id, round, trained_from, checksum } if trained_from != round => {
            tracing::info!(
                "{me}: {job_id} version {round}: update trained from version {trained_from} submitted (sha256 {checksum})"
            )
        }
        Outcome::Submitted { job_id, round, checksum, .. } => {
            tracing::info!("{me}: {job_id} round {round}: update submitted (sha256 {checksum})")
        }
        Outcome::Superseded { job_id, round } => tracing::info!(
            "{me}: {job_id} version {round}: a newer version is announced; skipped"
        ),
        Outcome::JobEndedFirst { job_id, round } => tracing::info!(
            "{me}: {job_id}: the job ended before a newer version than our last row's was announced; \
             the update trained from version {round} is dropped"
        ),
        Outcome::AlreadyDone { job_id, round } => {
            tracing::info!("{me}: {job_id} round {round}: already submitted; message dropped")
        }
        Outcome::Rejected { reason } => tracing::warn!("{me}: malformed message {id} deleted: {reason}"),
        Outcome::Deferred { reason } => tracing::error!("{me}: message {id} left on the queue: {reason}"),
        Outcome::NotOurJob { job_id } => {
            tracing::info!("{me}: message for job {job_id}, which this client does not take part in; deleted")
        }
        Outcome::DeadlinePassed { job_id, round } => {
            tracing::warn!("{me}: {job_id} round {round}: deadline passed before we started; skipped")
        }
        Outcome::Conflict { job_id, round, existing_checksum } => tracing::error!(
            "{me}: {job_id} round {round}: CONFLICT: a different update (sha256 {existing_checksum}) \
             is already recorded for this client; it stays and ours (message {id}) is dropped. \
             Is another process consuming this client's queue?"
        ),
        Outcome::JobComplete { job_id, personalized: None } => {
            tracing::info!("{me}: job {job_id} is complete")
        }
        Outcome::JobComplete { job_id, personalized: Some(path) } => tracing::info!(
            "{me}: job {job_id} is complete; personalized model: {}",
            path.display()
        ),
        Outcome::JobFailed { job_id, round, reason } => {
            tracing::error!("{me}: job {job_id} failed in round {round}: {reason}")
        }
        Outcome::Failed { reason, retry_in_seconds } => {
            tracing::error!("{me}: {reason}; message {id} will be retried in {retry_in_seconds} s")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::{log, Outcome};

    /// The formatted log lines, captured.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }

    #[test]
    fn messages_dropped_or_kept_for_a_reason_are_named_by_id() {
        let capture = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(capture.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for o in [
                Outcome::Rejected {
                    reason: "not JSON".into(),
                },
                Outcome::Deferred {
                    reason: "schema 9".into(),
                },
                Outcome::Failed {
                    reason: "download".into(),
                    retry_in_seconds: 30,
                },
            ] {
                log(&o, "site-a", "5fea7756-0ea4-451a-a703-a558b933e274");
            }
        });
        let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        for line in lines {
            assert!(
                line.contains("message 5fea7756-0ea4-451a-a703-a558b933e274"),
                "{line}"
            );
        }
    }
}
