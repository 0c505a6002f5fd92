//! The end-to-end scenarios, one module each, in one test binary: the
//! harness, the AWS SDK and tokio are compiled and linked once instead of
//! once per scenario (a cold CI build spent about 30 s of CPU per scenario
//! binary). Each scenario still runs alone, as when cargo ran them one binary
//! after another: they drive real processes against the same emulators on a
//! small machine, and their timing checks assume nothing else is running.

mod adversarial;
mod asynchronous;
mod exactly_once;
mod external_trainer;
mod full_job;
mod missing_client;
mod personalization;
mod sharded;

use tokio::sync::{Mutex, MutexGuard};

static SCENARIO: Mutex<()> = Mutex::const_new(());

/// Held for the whole of a scenario: the next one starts when it is dropped
/// (also when the scenario panics: a tokio mutex is not poisoned).
pub async fn one_at_a_time() -> MutexGuard<'static, ()> {
    SCENARIO.lock().await
}
