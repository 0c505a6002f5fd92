//! An in-process SNS topic with one SQS-like queue per client.
//!
//! `publish` fans each `global_model_ready` out to every subscribed queue
//! (optionally only the jobs a client takes part in); bodies are the raw
//! JSON of the notification, as with SNS raw message delivery. Queues have
//! SQS's at-least-once shape: a received message is invisible for the
//! visibility timeout and comes back (receive_count + 1, a new receipt)
//! unless deleted with its current receipt. Visibility is measured on the
//! injected clock so tests can force redelivery; long polls wait in real
//! time. Every notification (including `training_complete`, which goes to
//! its own topic on AWS and not to client queues) is kept in `published()`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::error::{CloudError, Result};
use crate::ports::{ClientQueue, Clock, Notifier, QueueMessage};
use crate::records::Notification;

/// SQS's default visibility timeout.
pub const DEFAULT_VISIBILITY_SECONDS: i64 = 30;

struct Message {
    id: u64,
    body: String,
    receive_count: u32,
    visible_at: i64,
    receipt: Option<String>,
}

struct QueueState {
    job_filter: Option<Vec<String>>,
    messages: Vec<Message>,
}

#[derive(Default)]
struct BusState {
    queues: BTreeMap<String, QueueState>,
    published: Vec<Notification>,
    next_id: u64,
}

struct Shared {
    state: Mutex<BusState>,
    /// Per-queue wake-ups for long polls.
    notify: Mutex<BTreeMap<String, Arc<Notify>>>,
    clock: Arc<dyn Clock>,
    visibility_seconds: i64,
}

#[derive(Clone)]
pub struct LocalBus {
    shared: Arc<Shared>,
}

impl LocalBus {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        LocalBus::with_visibility(clock, DEFAULT_VISIBILITY_SECONDS)
    }

    pub fn with_visibility(clock: Arc<dyn Clock>, visibility_seconds: i64) -> Self {
        LocalBus {
            shared: Arc::new(Shared {
                state: Mutex::new(BusState::default()),
                notify: Mutex::new(BTreeMap::new()),
                clock,
                visibility_seconds,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BusState> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The queue of `client` (created on first use). With `jobs`, only
    /// notifications of those jobs reach it. Subscribing again replaces the
    /// filter and keeps the messages.
    pub fn subscribe(&self, client: &str, jobs: Option<&[String]>) -> LocalQueue {
        let mut s = self.lock();
        let q = s
            .queues
            .entry(client.to_string())
            .or_insert_with(|| QueueState {
                job_filter: None,
                messages: Vec::new(),
            });
        q.job_filter = jobs.map(<[String]>::to_vec);
        LocalQueue {
            bus: self.clone(),
            client: client.to_string(),
        }
    }

    /// Every notification published so far, in order.
    pub fn published(&self) -> Vec<Notification> {
        self.lock().published.clone()
    }

    fn notifier_of(&self, client: &str) -> Arc<Notify> {
        self.shared
            .notify
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(client.to_string())
            .or_default()
            .clone()
    }
}

impl Notifier for LocalBus {
    async fn publish(&self, message: &Notification) -> Result<()> {
        let body = serde_json::to_string(message)
            .map_err(|e| CloudError::Other(format!("serializing a notification: {e}")))?;
        let now = self.shared.clock.now();
        let mut woken = Vec::new();
        {
            let mut s = self.lock();
            s.published.push(message.clone());
            if let Notification::GlobalModelReady(_) = message {
                let mut next_id = s.next_id;
                for (client, q) in s.queues.iter_mut() {
                    let wanted = q
                        .job_filter
                        .as_ref()
                        .is_none_or(|jobs| jobs.iter().any(|j| j == message.job_id()));
                    if wanted {
                        next_id += 1;
                        q.messages.push(Message {
                            id: next_id,
                            body: body.clone(),
                            receive_count: 0,
                            visible_at: now,
                            receipt: None,
                        });
                        woken.push(client.clone());
                    }
                }
                s.next_id = next_id;
            }
        }
        for c in woken {
            self.notifier_of(&c).notify_waiters();
        }
        Ok(())
    }
}

/// One client's queue on a `LocalBus`.
#[derive(Clone)]
pub struct LocalQueue {
    bus: LocalBus,
    client: String,
}

impl LocalQueue {
    /// Messages in the queue, visible or in flight.
    pub fn len(&self) -> usize {
        self.with_queue(|q| q.messages.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn with_queue<T>(&self, f: impl FnOnce(&mut QueueState) -> T) -> Result<T> {
        let mut s = self.bus.lock();
        let q = s
            .queues
            .get_mut(&self.client)
            .ok_or_else(|| CloudError::NotFound(format!("queue of client `{}`", self.client)))?;
        Ok(f(q))
    }

    /// Takes up to `max` visible messages and hides them for the
    /// visibility timeout.
    fn take_visible(&self, max: u32) -> Result<Vec<QueueMessage>> {
        let now = self.bus.shared.clock.now();
        let hide = self.bus.shared.visibility_seconds;
        self.with_queue(|q| {
            let mut out = Vec::new();
            for m in q.messages.iter_mut().filter(|m| m.visible_at <= now) {
                if out.len() >= max as usize {
                    break;
                }
                m.receive_count += 1;
                m.visible_at = now.saturating_add(hide);
                let receipt = format!("{}-{}-{}", self.client, m.id, m.receive_count);
                m.receipt = Some(receipt.clone());
                out.push(QueueMessage {
                    message_id: format!("{}-{}", self.client, m.id),
                    body: m.body.clone(),
                    receipt,
                    receive_count: m.receive_count,
                });
            }
            out
        })
    }
}

/// The message a receipt names: `Ok(Some(i))` if it is the current
/// receipt, `Ok(None)` if no message is left from that delivery's message
/// (already deleted), Err if the message was received again since (stale).
fn find_receipt(q: &QueueState, receipt: &str) -> Result<Option<usize>> {
    if let Some(i) = q
        .messages
        .iter()
        .position(|m| m.receipt.as_deref() == Some(receipt))
    {
        return Ok(Some(i));
    }
    let id = receipt
        .rsplit('-')
        .nth(1)
        .and_then(|s| s.parse::<u64>().ok());
    match id.and_then(|id| q.messages.iter().find(|m| m.id == id)) {
        Some(_) => Err(CloudError::ConditionFailed(format!(
            "receipt `{receipt}` is stale: the message was received again since"
        ))),
        None => Ok(None),
    }
}

impl ClientQueue for LocalQueue {
    async fn receive(&self, max: u32, wait_seconds: u32) -> Result<Vec<QueueMessage>> {
        let max = max.clamp(1, 10);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(u64::from(wait_seconds));
        let notify = self.bus.notifier_of(&self.client);
        loop {
            let got = self.take_visible(max)?;
            let now = tokio::time::Instant::now();
            if !got.is_empty() || now >= deadline {
                return Ok(got);
            }
            // Short naps as well as wake-ups: a message can also become
            // visible because the (possibly manual) clock moved.
            let nap = (deadline - now).min(Duration::from_millis(50));
            let _ = tokio::time::timeout(nap, notify.notified()).await;
        }
    }

    async fn delete(&self, receipt: &str) -> Result<()> {
        self.with_queue(|q| {
            if let Some(i) = find_receipt(q, receipt)? {
                q.messages.remove(i);
            }
            Ok(())
        })?
    }

    async fn extend_visibility(&self, receipt: &str, seconds: u32) -> Result<()> {
        let now = self.bus.shared.clock.now();
        self.with_queue(|q| match find_receipt(q, receipt)? {
            Some(i) => {
                q.messages[i].visible_at = now.saturating_add(i64::from(seconds));
                Ok(())
            }
            None => Err(CloudError::NotFound(format!(
                "receipt `{receipt}`: the message is gone"
            ))),
        })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::ManualClock;
    use crate::records::{GlobalModelReady, SCHEMA};

    fn ready(job: &str) -> Notification {
        Notification::GlobalModelReady(GlobalModelReady {
            schema: SCHEMA,
            job_id: job.into(),
            round: 1,
            model_key: "k".into(),
            checksum: "c".into(),
            deadline: 0,
            round_config: Default::default(),
            server_variate: None,
            asynchronous: false,
        })
    }

    #[tokio::test]
    async fn fans_out_filters_and_redelivers_until_deleted() {
        let clock = ManualClock::new(1000);
        let bus = LocalBus::with_visibility(Arc::new(clock.clone()), 10);
        let a = bus.subscribe("a", None);
        let b = bus.subscribe("b", Some(&["other".to_string()]));
        bus.publish(&ready("j")).await.unwrap();
        assert_eq!((a.len(), b.len()), (1, 0));

        let m = a.receive(10, 0).await.unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].receive_count, 1);
        let body: Notification = serde_json::from_str(&m[0].body).unwrap();
        assert_eq!(body.job_id(), "j");
        assert!(a.receive(10, 0).await.unwrap().is_empty(), "invisible");

        a.extend_visibility(&m[0].receipt, 20).await.unwrap();
        clock.advance(15);
        assert!(a.receive(10, 0).await.unwrap().is_empty(), "extended");
        clock.advance(10);
        let again = a.receive(10, 0).await.unwrap();
        assert_eq!(again[0].receive_count, 2);
        assert!(a.delete(&m[0].receipt).await.is_err(), "stale receipt");
        a.delete(&again[0].receipt).await.unwrap();
        a.delete(&again[0].receipt).await.unwrap();
        assert!(a.is_empty());
        assert_eq!(bus.published().len(), 1);
    }

    #[tokio::test]
    async fn long_poll_wakes_on_publish() {
        let clock = ManualClock::new(0);
        let bus = LocalBus::new(Arc::new(clock));
        let q = bus.subscribe("a", None);
        let (got, ()) = tokio::join!(q.receive(1, 5), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            bus.publish(&ready("j")).await.unwrap();
        });
        assert_eq!(got.unwrap().len(), 1);
    }
}
