//! What the harness runs over: the store, ledger, notifier and client
//! queues of one schedule. The in-process run uses the local adapters
//! ([`Local`]); crates/aws/tests/on_emulators/fault_schedules_emulators.rs supplies the
//! AWS adapters on the emulators. The Step Functions callback and the clock
//! stay the harness's own in both (the recording callback can expire a
//! token; the manual clock moves leases and deadlines without waiting).

#![allow(async_fn_in_trait)] // the harness awaits them in place, never spawns

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use fedstep_cloud::error::Result as CloudResult;
use fedstep_cloud::local::{FsStore, LocalBus, LocalQueue, ManualClock, MemLedger};
use fedstep_cloud::ports::{ClientQueue, Ledger, Notifier, StreamingStore};
use fedstep_cloud::records::Notification;

use super::faults::RawPut;

/// SQS visibility timeout of the local client queues (manual-clock seconds).
pub const VISIBILITY: i64 = 30;

pub trait Backend {
    type Store: StreamingStore + Clone + 'static;
    type Ledger: Ledger + Clone + 'static;
    type Notifier: Notifier + Clone + 'static;
    type Queue: ClientQueue + Clone + 'static;

    /// The job id of schedule `seed`: unique on a shared deployment.
    fn job_id(&self, seed: u64) -> String;
    fn store(&self) -> Self::Store;
    fn ledger(&self) -> Self::Ledger;
    fn notifier(&self) -> Self::Notifier;
    /// Unconditional round writes, for the `NoConditions` mutant (local only).
    fn raw_put(&self) -> Option<RawPut>;
    /// One queue per client that receives `job_id`'s notifications.
    async fn subscribe(
        &mut self,
        clients: &[String],
        job_id: &str,
    ) -> Result<BTreeMap<String, Self::Queue>, String>;
    /// How long a receive waits for a message that may still be on its way.
    fn receive_wait_seconds(&self) -> u32;
    /// The visibility timeout of a crashed client's in-flight message
    /// (`receipt`, when the harness knows it) passes: it can be received again.
    async fn lapse_visibility(
        &self,
        queue: &Self::Queue,
        receipt: Option<&str>,
    ) -> Result<(), String>;
    /// Removes what `subscribe` made (after the schedule, pass or fail).
    async fn teardown(&mut self) -> Result<(), String>;
}

/// Records every notification the engines published successfully, so the
/// invariants can count announcements whatever carried them.
#[derive(Clone)]
pub struct Recorded<N> {
    pub inner: N,
    pub published: Arc<Mutex<Vec<Notification>>>,
}

impl<N> Recorded<N> {
    pub fn new(inner: N) -> Recorded<N> {
        Recorded {
            inner,
            published: Arc::default(),
        }
    }

    pub fn published(&self) -> Vec<Notification> {
        self.published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl<N: Notifier> Notifier for Recorded<N> {
    async fn publish(&self, message: &Notification) -> CloudResult<()> {
        self.inner.publish(message).await?;
        self.published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(message.clone());
        Ok(())
    }
}

/// The local adapters: a filesystem bucket, the in-memory ledger and the
/// in-process bus, whose visibility timeouts run on the manual clock.
pub struct Local {
    store: FsStore,
    ledger: MemLedger,
    bus: LocalBus,
    clock: ManualClock,
}

impl Local {
    pub fn new(clock: &ManualClock, dir: &Path) -> Local {
        Local {
            store: FsStore::new(dir.join("bucket")).expect("store"),
            ledger: MemLedger::new(),
            bus: LocalBus::with_visibility(Arc::new(clock.clone()), VISIBILITY),
            clock: clock.clone(),
        }
    }
}

impl Backend for Local {
    type Store = FsStore;
    type Ledger = MemLedger;
    type Notifier = LocalBus;
    type Queue = LocalQueue;

    fn job_id(&self, seed: u64) -> String {
        format!("fault-{seed}")
    }
    fn store(&self) -> FsStore {
        self.store.clone()
    }
    fn ledger(&self) -> MemLedger {
        self.ledger.clone()
    }
    fn notifier(&self) -> LocalBus {
        self.bus.clone()
    }
    fn raw_put(&self) -> Option<RawPut> {
        let ledger = self.ledger.clone();
        Some(Arc::new(move |row| ledger.put_round_raw(row)))
    }
    async fn subscribe(
        &mut self,
        clients: &[String],
        job_id: &str,
    ) -> Result<BTreeMap<String, LocalQueue>, String> {
        let jobs = [job_id.to_string()];
        Ok(clients
            .iter()
            .map(|c| (c.clone(), self.bus.subscribe(c, Some(&jobs))))
            .collect())
    }
    fn receive_wait_seconds(&self) -> u32 {
        0
    }
    async fn lapse_visibility(&self, _: &LocalQueue, _: Option<&str>) -> Result<(), String> {
        self.clock.advance(VISIBILITY + 1);
        Ok(())
    }
    async fn teardown(&mut self) -> Result<(), String> {
        Ok(())
    }
}
