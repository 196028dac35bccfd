//! `GET /transitions`: a pool's page of the transition log, with every attempt, for operators and
//! `computepool keeper status`. The orchestrator mounts `router` (behind its own auth if it wants one).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use crate::log::{Page, TransitionLog};

#[derive(Debug, Deserialize)]
pub struct TransitionsQuery {
    pub pool: String,
    /// Page size, 1 to 200 (default 50).
    pub limit: Option<u32>,
    /// The `next_before` of the previous page.
    pub before: Option<i64>,
}

pub fn router(log: Arc<TransitionLog>) -> Router {
    Router::new().route("/transitions", get(get_transitions)).with_state(log)
}

pub async fn get_transitions(State(log): State<Arc<TransitionLog>>, Query(q): Query<TransitionsQuery>) -> Response {
    let limit = q.limit.unwrap_or(50);
    if !(1..=Page::MAX_LIMIT).contains(&limit) {
        let message = format!("limit must be 1 to {}", Page::MAX_LIMIT);
        return (StatusCode::BAD_REQUEST, axum::Json(serde_json::json!({"error": {"code": "invalid_limit", "message": message}})))
            .into_response();
    }
    let page = Page { limit, before: q.before };
    match tokio::task::spawn_blocking(move || log.transitions(&q.pool, page)).await {
        Ok(Ok(page)) => axum::Json(page).into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "reading the transition log");
            (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(serde_json::json!({"error": {"code": "internal", "message": e.to_string()}})))
                .into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transition::{Transition, TransitionKind};

    #[test]
    fn pages_a_pools_transitions_as_json_and_refuses_bad_limits() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(TransitionLog::open(&dir.path().join("keeper.db")).unwrap());
        for i in 0..3 {
            log.write(&Transition {
                kind: TransitionKind::StreamStop,
                idempotency_key: format!("k{i}"),
                pool_id: "p".into(),
                payload: serde_json::json!({}),
            })
            .unwrap();
        }
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let addr = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, router(log)).await.unwrap() });
            addr
        });
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let get = |q: &str| {
            let mut r = agent.get(&format!("http://{addr}/transitions?{q}")).call().unwrap();
            (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
        };
        let (status, body) = get("pool=p&limit=2");
        assert_eq!(status, 200);
        let page: serde_json::Value = serde_json::from_str(&body).unwrap();
        let keys: Vec<_> = page["transitions"].as_array().unwrap().iter().map(|t| t["idempotency_key"].clone()).collect();
        assert_eq!(keys, ["k2", "k1"]);
        assert_eq!(page["transitions"][0]["state"], "written");
        let (_, body) = get(&format!("pool=p&limit=2&before={}", page["next_before"]));
        let page: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(page["transitions"][0]["idempotency_key"], "k0");
        assert!(page["next_before"].is_null());
        assert_eq!(get("pool=p&limit=0").0, 400);
        assert_eq!(get("pool=p&limit=201").0, 400);
        assert_eq!(get("limit=2").0, 400, "pool is required");
    }
}
