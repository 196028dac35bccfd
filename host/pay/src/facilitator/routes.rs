//! The facilitator's HTTP routes. Handlers parse, call [`Facilitator`], and map the answer: a judged
//! payment (valid or not) is 200 with the x402 body, as the official HTTP facilitator clients expect (the
//! Python one raises on any other status); a body that is not a facilitator request is 400, an oversized
//! one 413, an internal failure 500, each still with the x402 body and its reason.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;

use super::Facilitator;
use crate::x402::{ErrorReason, FacilitatorRequest, SettleResponse, VerifyResponse};

/// The largest request body read. A verify request is about 2 KiB; 64 KiB leaves room for extensions
/// and bounds what a hostile client can make the facilitator parse.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// `POST /verify`, `POST /settle`, `GET /supported`.
pub fn router(facilitator: Arc<Facilitator>) -> Router {
    Router::new()
        .route("/verify", post(verify))
        .route("/settle", post(settle))
        .route("/supported", get(supported))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(facilitator)
}

/// A body that could not be read, or read but not parsed: the status and the refusal.
fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<FacilitatorRequest, (StatusCode, ErrorReason, String)> {
    let body = body.map_err(|rejection| (rejection.status(), ErrorReason::InvalidPayload, rejection.body_text()))?;
    FacilitatorRequest::from_json(&body).map_err(|e| (StatusCode::BAD_REQUEST, e.reason(), e.to_string()))
}

fn status_of(reason: Option<&ErrorReason>) -> StatusCode {
    match reason {
        Some(ErrorReason::UnexpectedVerifyError | ErrorReason::UnexpectedSettleError) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::OK,
    }
}

async fn verify(State(facilitator): State<Arc<Facilitator>>, body: Result<Bytes, BytesRejection>) -> Response {
    match parse_body(body) {
        Ok(request) => {
            let response = facilitator.verify(&request).await;
            (status_of(response.invalid_reason.as_ref()), Json(response)).into_response()
        }
        Err((status, reason, message)) => (status, Json(VerifyResponse::invalid(reason, message, None))).into_response(),
    }
}

async fn settle(State(facilitator): State<Arc<Facilitator>>, body: Result<Bytes, BytesRejection>) -> Response {
    match parse_body(body) {
        Ok(request) => {
            let response = facilitator.settle(&request).await;
            (status_of(response.error_reason.as_ref()), Json(response)).into_response()
        }
        Err((status, reason, message)) => {
            (status, Json(SettleResponse::failed(reason, message, facilitator.network(), None))).into_response()
        }
    }
}

async fn supported(State(facilitator): State<Arc<Facilitator>>) -> Json<crate::x402::SupportedResponse> {
    Json(facilitator.supported())
}
