//! Retrying transient port errors with exponential backoff and full jitter
//! (AWS's recommended scheme: many clients retrying after a shared outage
//! spread out instead of hammering the service in lockstep).

use std::future::Future;
use std::time::Duration;

use fedstep_cloud::CloudError;
use rand::Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    /// Upper bound of the first wait.
    pub first: Duration,
    /// Cap of any single wait.
    pub max: Duration,
    /// Tries in total (1 = no retry).
    pub attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            first: Duration::from_millis(200),
            max: Duration::from_secs(20),
            attempts: 8,
        }
    }
}

impl Backoff {
    /// The wait before retry number `n` (0-based): uniform in
    /// `[0, min(max, first * 2^n)]`.
    pub fn delay(&self, n: u32) -> Duration {
        let ceiling = self
            .first
            .saturating_mul(2u32.saturating_pow(n.min(30)))
            .min(self.max);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}

/// Runs `op` until it succeeds, fails with a non-transient error, or the
/// attempts are used up (the last error is returned).
pub async fn retry<T, F, Fut>(what: &str, backoff: &Backoff, mut op: F) -> Result<T, CloudError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CloudError>>,
{
    let mut n = 0;
    loop {
        match op().await {
            Err(e) if e.is_transient() && n + 1 < backoff.attempts => {
                let wait = backoff.delay(n);
                tracing::warn!(
                    "{what}: {e}; retry {} of {} in {wait:?}",
                    n + 1,
                    backoff.attempts - 1
                );
                tokio::time::sleep(wait).await;
                n += 1;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn fast() -> Backoff {
        Backoff {
            first: Duration::from_millis(1),
            max: Duration::from_millis(2),
            attempts: 4,
        }
    }

    #[tokio::test]
    async fn transient_errors_are_retried_then_given_up() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = retry("op", &fast(), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(CloudError::Transient("throttled".into()))
        })
        .await;
        assert!(r.unwrap_err().is_transient());
        assert_eq!(calls.load(Ordering::SeqCst), 4);

        let calls = AtomicU32::new(0);
        let r = retry("op", &fast(), || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(CloudError::Transient("timeout".into()))
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(r.unwrap(), 7);
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = retry("op", &fast(), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(CloudError::Invalid("bad".into()))
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn delays_grow_and_are_capped() {
        let b = Backoff {
            first: Duration::from_millis(100),
            max: Duration::from_secs(1),
            attempts: 10,
        };
        for n in 0..40 {
            assert!(b.delay(n) <= Duration::from_secs(1));
        }
        assert!(b.delay(0) <= Duration::from_millis(100));
    }
}
