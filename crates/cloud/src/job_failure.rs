//! Why a job's execution failed, as the workflow hands it to the
//! ReportFailure task: the `{"Error", "Cause"}` object a Catch puts in the
//! state (statemachine/README.md, "ReportFailure"). Parsed once here and
//! bounded: the text reaches every client in a `job_failed` message and
//! the open round's row, and a cause may quote client values.

use std::fmt;

use serde_json::Value;

use crate::bounded;

/// The caught error's name and cause, bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFailure {
    error: String,
    cause: String,
}

/// The error name when the caught object has none (a hand-written test
/// input, or a Catch configured without the error): still reported.
const UNNAMED: &str = "Unknown";

impl JobFailure {
    /// `error` is an error name (`QuorumNotMet`, `AggregatorError`, …),
    /// `cause` the human text.
    pub fn new(error: &str, cause: &str) -> JobFailure {
        let error = if error.is_empty() { UNNAMED } else { error };
        JobFailure {
            error: bounded::quote(error),
            // Half a round failure: a cause and the round's prefix and
            // error name fit in one stored failure text.
            cause: bounded::bound(cause, bounded::FAILURE_BYTES / 2),
        }
    }

    /// From the Catch's object. The cause of a Lambda function error is
    /// the runtime's JSON (`{"errorType", "errorMessage", …}`): its
    /// message is what a person reads, so that is what is kept. Anything
    /// missing or of another type is reported as absent, never refused:
    /// the job has failed either way and the clients must hear of it.
    pub fn from_caught(caught: &Value) -> JobFailure {
        let text = |key: &str| caught.get(key).and_then(Value::as_str).unwrap_or("");
        let cause = text("Cause");
        let message = serde_json::from_str::<Value>(cause).ok().and_then(|v| {
            v.get("errorMessage")
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
        JobFailure::new(text("Error"), message.as_deref().unwrap_or(cause))
    }

    pub fn error(&self) -> &str {
        &self.error
    }

    pub fn cause(&self) -> &str {
        &self.cause
    }
}

impl fmt::Display for JobFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.cause.is_empty() {
            f.write_str(&self.error)
        } else {
            write!(f, "{}: {}", self.error, self.cause)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_lambda_function_errors_cause_gives_its_message() {
        let caught = json!({
            "Error": "AggregatorError",
            "Cause": json!({"errorType": "AggregatorError", "errorMessage": "AccessDenied on PutObject"}).to_string(),
        });
        let f = JobFailure::from_caught(&caught);
        assert_eq!(f.error(), "AggregatorError");
        assert_eq!(f.cause(), "AccessDenied on PutObject");
        assert_eq!(f.to_string(), "AggregatorError: AccessDenied on PutObject");
    }

    #[test]
    fn a_plain_cause_is_kept_and_anything_missing_is_reported_as_absent() {
        let f = JobFailure::from_caught(
            &json!({"Error": "QuorumNotMet", "Cause": "quorum not met: 1 of 3"}),
        );
        assert_eq!(f.to_string(), "QuorumNotMet: quorum not met: 1 of 3");
        let f = JobFailure::from_caught(&json!({"Cause": 7}));
        assert_eq!((f.error(), f.cause()), ("Unknown", ""));
        assert_eq!(f.to_string(), "Unknown");
        let f = JobFailure::from_caught(&json!("not an object"));
        assert_eq!(f.error(), "Unknown");
    }

    #[test]
    fn long_or_control_text_is_bounded() {
        let f = JobFailure::new(&"E".repeat(1000), &format!("a\nb{}", "x".repeat(100_000)));
        assert!(f.error().len() <= bounded::QUOTE_BYTES);
        assert!(f.cause().len() <= bounded::FAILURE_BYTES / 2);
        assert!(!f.cause().contains('\n'));
    }
}
