//! The AWS adapters against the emulators (or AWS), in one test binary: the
//! SDK's generic code is compiled and linked once instead of once per file
//! (a cold CI build spent 30 to 95 s of CPU on each of the three binaries
//! this replaces). Setup: see common/mod.rs.

#[path = "../common/mod.rs"]
mod common;
#[path = "../../../cloud/tests/harness/mod.rs"]
mod harness;

mod emulators;
mod fault_schedules_emulators;
mod s3_streaming;
mod store_checksums;

use tokio::sync::{Mutex, MutexGuard};

static DEPLOYMENT_TOPIC: Mutex<()> = Mutex::const_new(());

/// Held by the tests that publish on, or read from, the deployment's shared
/// topic and client queue: the fault schedules publish dozens of
/// notifications there, and the SNS test must find its own message in that
/// queue within 30 s (they ran one after another as separate binaries).
pub async fn deployment_topic() -> MutexGuard<'static, ()> {
    DEPLOYMENT_TOPIC.lock().await
}
