//! Keeps a message invisible while the client works on it. Without this a
//! round that trains longer than the visibility timeout would be delivered
//! again and trained twice (harmless, thanks to the conditional row, but
//! wasteful). Ticks are best effort: a failed extension is logged and the
//! next tick tries again; if all fail, redelivery is the safe outcome.

use std::sync::Arc;
use std::time::Duration;

use fedstep_cloud::ports::ClientQueue;
use tokio::task::JoinHandle;

/// Stops the heartbeat when dropped (including when the round is abandoned).
pub struct Heartbeat {
    task: JoinHandle<()>,
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every `every`, extends `receipt`'s visibility to `seconds` from now.
pub fn start<Q: ClientQueue + 'static>(
    queue: Arc<Q>,
    receipt: String,
    seconds: u32,
    every: Duration,
) -> Heartbeat {
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; the message is fresh
        loop {
            tick.tick().await;
            match queue.extend_visibility(&receipt, seconds).await {
                Ok(()) => tracing::debug!("message visibility extended by {seconds} s"),
                Err(e) => tracing::warn!("could not extend message visibility: {e}"),
            }
        }
    });
    Heartbeat { task }
}
