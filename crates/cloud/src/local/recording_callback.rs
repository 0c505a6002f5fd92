//! `TaskCallback` that records every call, for tests and the simulator.
//!
//! Like Step Functions, a token answers once: after a delivered call (or
//! after `expire`), further calls on it return `WorkflowMovedOn` — and are
//! still recorded, so tests can count attempts as well as deliveries.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;

use crate::error::Result;
use crate::ports::{Callback, TaskCallback};

#[derive(Debug, Clone, PartialEq)]
pub enum CallbackCall {
    Succeed {
        token: String,
        output: Value,
        delivered: bool,
    },
    Fail {
        token: String,
        error: String,
        cause: String,
        delivered: bool,
    },
}

impl CallbackCall {
    pub fn token(&self) -> &str {
        match self {
            CallbackCall::Succeed { token, .. } | CallbackCall::Fail { token, .. } => token,
        }
    }
    pub fn delivered(&self) -> bool {
        match self {
            CallbackCall::Succeed { delivered, .. } | CallbackCall::Fail { delivered, .. } => {
                *delivered
            }
        }
    }
}

#[derive(Default)]
struct State {
    calls: Vec<CallbackCall>,
    /// Tokens that no longer accept a callback (answered or timed out).
    closed: BTreeSet<String>,
}

#[derive(Clone, Default)]
pub struct RecordingCallback {
    state: Arc<Mutex<State>>,
}

impl RecordingCallback {
    pub fn new() -> Self {
        RecordingCallback::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks a token as timed out: callbacks on it now return WorkflowMovedOn.
    pub fn expire(&self, token: &str) {
        self.lock().closed.insert(token.to_string());
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<CallbackCall> {
        self.lock().calls.clone()
    }

    pub fn calls_for(&self, token: &str) -> Vec<CallbackCall> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.token() == token)
            .cloned()
            .collect()
    }

    /// Outputs of the delivered `succeed` calls on `token`.
    pub fn succeeded(&self, token: &str) -> Vec<Value> {
        self.calls_for(token)
            .into_iter()
            .filter_map(|c| match c {
                CallbackCall::Succeed {
                    output,
                    delivered: true,
                    ..
                } => Some(output),
                _ => None,
            })
            .collect()
    }

    fn answer(&self, call: impl FnOnce(bool) -> CallbackCall, token: &str) -> Callback {
        let mut s = self.lock();
        let delivered = s.closed.insert(token.to_string());
        s.calls.push(call(delivered));
        if delivered {
            Callback::Delivered
        } else {
            Callback::WorkflowMovedOn(format!("task token `{token}` is no longer waiting"))
        }
    }
}

impl TaskCallback for RecordingCallback {
    async fn succeed(&self, token: &str, output: &Value) -> Result<Callback> {
        Ok(self.answer(
            |delivered| CallbackCall::Succeed {
                token: token.to_string(),
                output: output.clone(),
                delivered,
            },
            token,
        ))
    }

    async fn fail(&self, token: &str, error: &str, cause: &str) -> Result<Callback> {
        Ok(self.answer(
            |delivered| CallbackCall::Fail {
                token: token.to_string(),
                error: error.to_string(),
                cause: cause.to_string(),
                delivered,
            },
            token,
        ))
    }
}
