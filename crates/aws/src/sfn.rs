//! `TaskCallback` on Step Functions.

use aws_sdk_sfn::error::{ProvideErrorMetadata, SdkError};
use fedstep_cloud::error::Result;
use fedstep_cloud::ports::{Callback, TaskCallback};
use fedstep_cloud::CloudError;
use serde_json::Value;

use crate::config::AwsConfig;
use crate::error::sdk_error;

/// Step Functions limits: error ≤ 256 characters, cause ≤ 32 768.
const MAX_ERROR: usize = 256;
const MAX_CAUSE: usize = 32_768;

#[derive(Debug, Clone)]
pub struct SfnCallback {
    client: aws_sdk_sfn::Client,
}

impl SfnCallback {
    pub fn new(client: aws_sdk_sfn::Client) -> SfnCallback {
        SfnCallback { client }
    }

    pub fn from_config(cfg: &AwsConfig) -> SfnCallback {
        SfnCallback::new(cfg.sfn())
    }
}

/// The task is gone (timed out, already answered, or never existed): the
/// workflow moved on, and the deadline path owns the round. Not an error.
fn moved_on<E, R>(err: &SdkError<E, R>) -> Option<String>
where
    E: ProvideErrorMetadata,
{
    let SdkError::ServiceError(service) = err else {
        return None;
    };
    match service.err().code() {
        Some(code @ ("TaskTimedOut" | "InvalidToken" | "TaskDoesNotExist")) => {
            Some(format!("{code}: {}", service.err().message().unwrap_or("")))
        }
        _ => None,
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl TaskCallback for SfnCallback {
    async fn succeed(&self, token: &str, output: &Value) -> Result<Callback> {
        let output = serde_json::to_string(output)
            .map_err(|e| CloudError::Other(format!("encoding task output: {e}")))?;
        match self
            .client
            .send_task_success()
            .task_token(token)
            .output(output)
            .send()
            .await
        {
            Ok(_) => Ok(Callback::Delivered),
            Err(e) => match moved_on(&e) {
                Some(why) => Ok(Callback::WorkflowMovedOn(why)),
                None => Err(sdk_error("Step Functions SendTaskSuccess", e)),
            },
        }
    }

    async fn fail(&self, token: &str, error: &str, cause: &str) -> Result<Callback> {
        match self
            .client
            .send_task_failure()
            .task_token(token)
            .error(truncate(error, MAX_ERROR))
            .cause(truncate(cause, MAX_CAUSE))
            .send()
            .await
        {
            Ok(_) => Ok(Callback::Delivered),
            Err(e) => match moved_on(&e) {
                Some(why) => Ok(Callback::WorkflowMovedOn(why)),
                None => Err(sdk_error("Step Functions SendTaskFailure", e)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn truncates_on_char_boundaries() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("aé", 2), "a");
    }
}
