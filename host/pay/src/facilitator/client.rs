//! An HTTP client for any x402 facilitator's three routes (this crate's or another's), for the
//! orchestrator and tests. reqwest, which the chain client already builds, over the workspace's rustls.

use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::x402::{FacilitatorRequest, SettleResponse, SupportedResponse, VerifyResponse};

/// `/verify` and `/supported` answer from reads; `/settle` waits for a receipt (up to the chain client's
/// 120 s), so it gets longer.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(30);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(150);

#[derive(Debug, thiserror::Error)]
pub enum FacilitatorClientError {
    #[error("facilitator URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("building the HTTP client: {0}")]
    Client(String),
    #[error("facilitator {route}: {message}")]
    Http { route: &'static str, message: String },
    /// Neither the answer the route promises nor an x402 error body.
    #[error("facilitator {route} answered {status}: {body}")]
    Unexpected { route: &'static str, status: u16, body: String },
}

/// A facilitator at a base URL (`http://host:port`, routes appended).
#[derive(Clone, Debug)]
pub struct FacilitatorClient {
    base: String,
    http: reqwest::Client,
}

impl FacilitatorClient {
    pub fn new(base_url: &str) -> Result<Self, FacilitatorClientError> {
        let url = reqwest::Url::parse(base_url).map_err(|e| FacilitatorClientError::InvalidUrl { url: base_url.into(), reason: e.to_string() })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(FacilitatorClientError::InvalidUrl { url: base_url.into(), reason: "only http and https".into() });
        }
        // reqwest is built without a TLS provider of its own (see computepool-chain's client).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder().build().map_err(|e| FacilitatorClientError::Client(e.to_string()))?;
        Ok(Self { base: base_url.trim_end_matches('/').to_string(), http })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The facilitator's verdict. A refused payment is `Ok` with `isValid: false`; `Err` is only for a
    /// facilitator that could not be reached or did not answer in x402.
    pub async fn verify(&self, request: &FacilitatorRequest) -> Result<VerifyResponse, FacilitatorClientError> {
        self.post("/verify", request, VERIFY_TIMEOUT).await
    }

    /// The settlement. A refused or failed one is `Ok` with `success: false`.
    pub async fn settle(&self, request: &FacilitatorRequest) -> Result<SettleResponse, FacilitatorClientError> {
        self.post("/settle", request, SETTLE_TIMEOUT).await
    }

    pub async fn supported(&self) -> Result<SupportedResponse, FacilitatorClientError> {
        let route = "/supported";
        let response = self
            .http
            .get(format!("{}{route}", self.base))
            .timeout(VERIFY_TIMEOUT)
            .send()
            .await
            .map_err(|e| FacilitatorClientError::Http { route, message: e.to_string() })?;
        read(route, response).await
    }

    async fn post<T: DeserializeOwned>(&self, route: &'static str, request: &FacilitatorRequest, timeout: Duration) -> Result<T, FacilitatorClientError> {
        let response = self
            .http
            .post(format!("{}{route}", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(request.to_json())
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| FacilitatorClientError::Http { route, message: e.to_string() })?;
        read(route, response).await
    }
}

/// The x402 body, whatever the status: facilitators put their reason in 4xx and 5xx bodies too.
async fn read<T: DeserializeOwned>(route: &'static str, response: reqwest::Response) -> Result<T, FacilitatorClientError> {
    let status = response.status().as_u16();
    let body = response.bytes().await.map_err(|e| FacilitatorClientError::Http { route, message: e.to_string() })?;
    serde_json::from_slice(&body).map_err(|_| {
        let text = String::from_utf8_lossy(&body);
        let excerpt: String = text.chars().take(300).collect();
        FacilitatorClientError::Unexpected { route, status, body: excerpt }
    })
}
