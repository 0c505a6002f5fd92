//! SDK errors → `CloudError`, so the engine can tell "lost a conditional
//! write" and "try again" from everything else without knowing about AWS.

use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use fedstep_cloud::CloudError;

/// Error codes that mean "the service is busy or broken right now".
const TRANSIENT_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "RequestThrottledException",
    "SlowDown",
    "InternalServerError",
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "TransactionInProgressException",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// Maps any SDK error. `op` names the call for the message
/// (e.g. "DynamoDB UpdateItem fedstep-rounds").
pub fn sdk_error<E, R>(op: &str, err: SdkError<E, R>) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + HasStatus,
{
    match &err {
        // Never reached the service or got no complete answer: retryable.
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            CloudError::Transient(format!("{op}: {}", DisplayErrorContext(&err)))
        }
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("");
            let status = service.raw().status_code();
            let msg = service.err().message().unwrap_or("");
            if code == "ConditionalCheckFailedException" {
                CloudError::ConditionFailed(format!("{op}: {msg}"))
            } else if TRANSIENT_CODES.contains(&code) || status >= 500 || status == 429 {
                CloudError::Transient(format!("{op}: {code} (HTTP {status}) {msg}"))
            } else {
                CloudError::Other(format!("{op}: {code} (HTTP {status}) {msg}"))
            }
        }
        _ => CloudError::Other(format!("{op}: {}", DisplayErrorContext(&err))),
    }
}

/// The error code of a service error (`None` for transport errors).
pub(crate) fn code<E, R>(err: &SdkError<E, R>) -> Option<&str>
where
    E: ProvideErrorMetadata,
{
    match err {
        SdkError::ServiceError(service) => service.err().code(),
        _ => None,
    }
}

/// The HTTP status of a raw response (abstracts over the SDK's response type).
pub trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_sdk_dynamodb::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}
