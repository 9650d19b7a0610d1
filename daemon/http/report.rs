//! The routes where the daemon reports on itself: `GET /v1/status`, `GET /metrics`, and
//! `POST /v1/verify?sample=N` (with an admin token set, verify needs it too).

use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::reply::{self, Body};
use super::{Http, admin};
use crate::ops::{metrics as prometheus, status as report, verify as check};

pub async fn status(http: &Http) -> Response<Body> {
    reply::json(StatusCode::OK, &report::full(&http.sources).await)
}

pub async fn metrics(http: &Http) -> Response<Body> {
    let backlog = report::read_backlog(&http.sources).await.ok();
    match prometheus::render(http.sources.clone(), backlog) {
        Ok(text) => reply::response(StatusCode::OK, prometheus::CONTENT_TYPE, Bytes::from(text)),
        Err(e) => reply::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Recompute up to N cached values (default 1000, at most 100000) and report the stale ones.
pub async fn verify(http: &Http, request: &Request<Incoming>) -> Response<Body> {
    let config = http.sources.registry.config();
    if config.admin_token.is_some()
        && let Err((status, message)) = admin::authorize(&config, request.headers())
    {
        return admin::refusal(status, message);
    }
    let sample = request
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("sample="))
        .map(str::parse::<usize>);
    let sample = match sample {
        None => 1000,
        Some(Ok(n)) if n > 0 => n.min(100_000),
        Some(_) => {
            return reply::error(
                StatusCode::BAD_REQUEST,
                "`sample` must be a whole number above zero".to_owned(),
            );
        }
    };
    let sources = Arc::new(http.sources.clone());
    let wait = config.fresh_timeout;
    match tokio::task::spawn_blocking(move || check::verify(&sources, sample, wait)).await {
        Ok(report) => reply::json(StatusCode::OK, &report),
        Err(e) => reply::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("verify failed: {e}"),
        ),
    }
}
