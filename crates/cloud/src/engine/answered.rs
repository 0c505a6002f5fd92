//! The task tokens this engine has had an answer on (its callback was
//! delivered, or refused because the workflow had moved on), so that a
//! replayed row does not hand the round over again from the engine that
//! just did. Only an economy: Step Functions accepts one answer per token
//! whatever we send (see hand_over.rs), so forgetting an entry costs one
//! refused call, never a second delivery.
//!
//! In memory and per engine: a Lambda execution environment keeps its
//! engine across invocations, and a stream shard's records mostly go to
//! the environment that handled the previous batch.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

/// Recent rounds are what replays concern; older entries are dropped.
const CAPACITY: usize = 64;

#[derive(Default)]
pub(super) struct Answered {
    /// (job_id, round, token), oldest first.
    recent: Mutex<VecDeque<(String, u32, String)>>,
}

impl Answered {
    fn lock(&self) -> MutexGuard<'_, VecDeque<(String, u32, String)>> {
        // Entries are inserted whole: a poisoned lock holds a valid queue.
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn contains(&self, job_id: &str, round: u32, token: &str) -> bool {
        self.lock()
            .iter()
            .any(|(j, r, t)| j == job_id && *r == round && t == token)
    }

    pub(super) fn insert(&self, job_id: &str, round: u32, token: &str) {
        if self.contains(job_id, round, token) {
            return;
        }
        let mut recent = self.lock();
        if recent.len() == CAPACITY {
            recent.pop_front();
        }
        recent.push_back((job_id.to_string(), round, token.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_recent_tokens_only() {
        let a = Answered::default();
        a.insert("j", 1, "t1");
        a.insert("j", 1, "t1");
        assert!(a.contains("j", 1, "t1"));
        assert!(!a.contains("j", 1, "t2"));
        assert!(!a.contains("j", 2, "t1"));
        for r in 2..=CAPACITY as u32 {
            a.insert("j", r, "t");
        }
        assert!(a.contains("j", 1, "t1"), "exactly full");
        a.insert("k", 1, "t");
        assert!(!a.contains("j", 1, "t1"), "the oldest is dropped");
        assert_eq!(a.lock().len(), CAPACITY);
    }
}
