//! Async jobs (issue #17): which version a finished update is submitted to.
//!
//! The client trains from the version its message announced and submits to
//! the newest version announced by the time it finishes, naming the one it
//! trained from as `base_round`; the server rebases a stale update onto the
//! version it is counted into and discounts it by its staleness. Messages
//! for the versions in between are superseded (deleted: the client will
//! train from the newest next); the newest is made visible again at once,
//! so the worker's next receive takes it.
//!
//! A client has one row per version. When it already has one in the newest
//! version (an earlier, staler update of its own went there), it holds this
//! update (the message it trained from stays invisible under its heartbeat)
//! until a newer version is announced, or drops it if the job ends first.

use fedstep_cloud::ports::{ClientQueue, Ledger, ObjectStore, QueueMessage};
use fedstep_cloud::records::{GlobalModelReady, JobFailed, Notification, TrainingComplete};

use crate::error::ClientError;
use crate::message::decode;
use crate::retry::retry;
use crate::trainer::Trainer;
use crate::worker::Worker;

/// Where a finished update goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// Submit it as our row of this version.
    Version(u32),
    /// The job ended before a version without our row was announced.
    JobEnded,
}

/// Seconds another job's message (or one this client cannot read) stays
/// invisible while the scan below holds this job's: it is someone else's
/// business, handled by the worker's loop once we are done.
const OTHER_MESSAGE_DELAY_SECONDS: u32 = 5;

impl<Q, S, L, T> Worker<Q, S, L, T>
where
    Q: ClientQueue + 'static,
    S: ObjectStore,
    L: Ledger,
    T: Trainer,
{
    /// Whether a newer version than `m`'s is announced on the queue already
    /// (then `m` is skipped: the worker trains from the newest). Older
    /// announcements of the job are deleted; the rest of what the look
    /// took off the queue is made visible again.
    pub(crate) async fn superseded(&self, m: &GlobalModelReady) -> Result<bool, ClientError> {
        let b = &self.opts.backoff;
        let messages = retry("receive", b, || self.queue.receive(10, 0)).await?;
        let mut newer = false;
        for q in messages {
            let delay = match decode(&q.body) {
                Ok(Notification::GlobalModelReady(g)) if g.job_id == m.job_id => {
                    if g.round <= m.round {
                        // Older than (or a duplicate of) the one in hand.
                        self.queue.delete(&q.receipt).await?;
                        continue;
                    }
                    newer = true;
                    0
                }
                Ok(Notification::TrainingComplete(t)) if t.job_id == m.job_id => 0,
                Ok(Notification::JobFailed(f)) if f.job_id == m.job_id => 0,
                _ => OTHER_MESSAGE_DELAY_SECONDS,
            };
            self.queue.extend_visibility(&q.receipt, delay).await?;
        }
        Ok(newer)
    }

    /// The version to submit an update trained from `m` to (see the
    /// module docs).
    pub(crate) async fn destination(
        &self,
        m: &GlobalModelReady,
    ) -> Result<Destination, ClientError> {
        let me = self.opts.client_id.as_str();
        let b = &self.opts.backoff;
        let mut newest = m.round;
        // The message announcing `newest`, when newer than `m`.
        let mut announced: Option<QueueMessage> = None;
        let mut wait = 0;
        loop {
            let messages = retry("receive", b, || self.queue.receive(10, wait)).await?;
            for q in messages {
                match decode(&q.body) {
                    Ok(Notification::GlobalModelReady(g)) if g.job_id == m.job_id => {
                        if g.round > newest {
                            if let Some(older) = announced.replace(q) {
                                self.queue.delete(&older.receipt).await?;
                            }
                            newest = g.round;
                        } else {
                            // Superseded: a newer version is known.
                            self.queue.delete(&q.receipt).await?;
                        }
                    }
                    // The job ended, completed or failed: no version to
                    // submit to will come.
                    Ok(Notification::TrainingComplete(TrainingComplete { job_id, .. }))
                    | Ok(Notification::JobFailed(JobFailed { job_id, .. }))
                        if job_id == m.job_id =>
                    {
                        self.queue.extend_visibility(&q.receipt, 0).await?;
                        if let Some(a) = announced.take() {
                            self.queue.delete(&a.receipt).await?;
                        }
                        return Ok(Destination::JobEnded);
                    }
                    _ => {
                        self.queue
                            .extend_visibility(&q.receipt, OTHER_MESSAGE_DELAY_SECONDS)
                            .await?
                    }
                }
            }
            let ours = retry("get_update", b, || {
                self.ledger.get_update(me, &m.job_id, newest)
            })
            .await?;
            if ours.is_none() {
                if let Some(a) = announced.take() {
                    // Trained from next, by the worker.
                    self.queue.extend_visibility(&a.receipt, 0).await?;
                }
                return Ok(Destination::Version(newest));
            }
            // We have a row in `newest` already: its message is done with,
            // and this update waits for a newer version.
            if let Some(a) = announced.take() {
                self.queue.delete(&a.receipt).await?;
            }
            tracing::info!(
                "{me}: {} version {}: our row is in already; holding the update trained from \
                 version {} until a newer version is announced",
                m.job_id,
                newest,
                m.round
            );
            wait = self.opts.wait_seconds.max(1);
        }
    }
}
