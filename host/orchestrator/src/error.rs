//! The orchestrator's errors, each with the HTTP status and the OpenAI-shaped body a client gets:
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Why a request to the orchestrator failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not valid JSON.
    #[error("the request body is not valid JSON: {0}")]
    MalformedJson(String),
    /// A field is missing, has the wrong type, or a value is out of range.
    #[error("{message}")]
    InvalidParameter { param: Option<String>, message: String },
    /// No pool serves this model.
    #[error("the model `{0}` does not exist: GET /v1/models lists the models served here")]
    ModelNotFound(String),
    /// No pool has this id.
    #[error("no pool has the id `{0}`")]
    PoolNotFound(String),
    /// A pool with this id or model exists already.
    #[error("{0}")]
    Conflict(String),
    /// The body is larger than the server takes.
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// The prompt (plus max_tokens) does not fit the model's context window.
    #[error("{message}")]
    ContextLengthExceeded { param: &'static str, message: String },
    /// The pool cannot take requests now (a shard is down, or the entry is unreachable).
    #[error("the pool for `{model}` is unavailable: {reason}")]
    Unavailable { model: String, reason: String },
    /// Something broke inside the orchestrator or a shard.
    #[error("internal error: {0}")]
    Internal(String),
    /// The route does not exist.
    #[error("no route for {0}")]
    NoRoute(String),
    /// The operator token is missing or wrong (write routes: pools, worker registration).
    #[error("{0}")]
    Unauthorized(String),
    /// The pool is paid and this request's payment is missing, refused or short: an x402 402 (the
    /// requirements in `PAYMENT-REQUIRED`, x402 v1's body).
    #[error("{}", .0.challenge.error())]
    PaymentRequired(Box<super::payments::Challenge402>),
    /// A payment rail (plugin, facilitator, chain) could not be reached; the request was not served.
    #[error("payments are unavailable: {0}")]
    PaymentUnavailable(String),
    /// No registered worker has this peer id (it should register again).
    #[error("no worker with peer id `{0}` is registered: register it with POST /workers")]
    WorkerNotFound(String),
}

impl ApiError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidParameter { param: Some(param.into()), message: message.into() }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedJson(_) | Self::InvalidParameter { .. } | Self::ContextLengthExceeded { .. } => {
                StatusCode::BAD_REQUEST
            }
            Self::ModelNotFound(_) | Self::PoolNotFound(_) | Self::NoRoute(_) | Self::WorkerNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable { .. } | Self::PaymentUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::PaymentRequired(_) => StatusCode::PAYMENT_REQUIRED,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type`, `param` and `code` for this error.
    fn parts(&self) -> (&'static str, Option<&str>, Option<&'static str>) {
        match self {
            Self::MalformedJson(_) => ("invalid_request_error", None, Some("invalid_json")),
            Self::InvalidParameter { param, .. } => ("invalid_request_error", param.as_deref(), Some("invalid_value")),
            Self::ModelNotFound(_) => ("invalid_request_error", Some("model"), Some("model_not_found")),
            Self::PoolNotFound(_) => ("invalid_request_error", None, Some("not_found")),
            Self::NoRoute(_) => ("invalid_request_error", None, Some("unknown_url")),
            Self::WorkerNotFound(_) => ("invalid_request_error", None, Some("worker_not_found")),
            Self::Unauthorized(_) => ("invalid_request_error", None, Some("invalid_api_key")),
            Self::Conflict(_) => ("invalid_request_error", None, Some("conflict")),
            Self::BodyTooLarge { .. } => ("invalid_request_error", None, Some("request_too_large")),
            Self::ContextLengthExceeded { param, .. } => ("invalid_request_error", Some(param), Some("context_length_exceeded")),
            Self::Unavailable { .. } => ("service_unavailable", None, Some("pool_unavailable")),
            Self::PaymentRequired(_) => ("payment_required", None, Some("payment_required")),
            Self::PaymentUnavailable(_) => ("service_unavailable", None, Some("payment_unavailable")),
            Self::Internal(_) => ("server_error", None, Some("internal_error")),
        }
    }

    /// The `{"error": {...}}` body (also sent as an SSE event when a stream fails midway).
    pub fn body(&self) -> serde_json::Value {
        let (kind, param, code) = self.parts();
        json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let Self::PaymentRequired(challenge) = self {
            // x402: v2 clients read the header, v1 clients the body.
            let mut response = (status, axum::Json(challenge.challenge.body())).into_response();
            let headers = response.headers_mut();
            if let Ok(value) = axum::http::HeaderValue::from_str(&challenge.challenge.header()) {
                headers.insert(super::payments::PAYMENT_REQUIRED, value);
            }
            for (name, value) in challenge.extra_headers {
                headers.insert(name, value);
            }
            return response;
        }
        if status.is_server_error() {
            tracing::warn!(%status, "{self}");
        } else {
            tracing::debug!(%status, "{self}");
        }
        (status, axum::Json(self.body())).into_response()
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Internal(format!("database: {e}"))
    }
}
