//! In-process adapters of the ports: what `fedstep simulate` and the fault
//! harness run on. Each is a cheap `Clone` handle over shared state, so
//! several engines (racing aggregators) can share one store and one ledger.

mod fs_objects;
mod fs_parts;
mod fs_store;
mod local_bus;
mod manual_clock;
mod mem_ledger;
mod recording_callback;

pub use fs_store::FsStore;
pub use local_bus::{LocalBus, LocalQueue};
pub use manual_clock::ManualClock;
pub use mem_ledger::MemLedger;
pub use recording_callback::{CallbackCall, RecordingCallback};
