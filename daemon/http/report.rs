//! The routes where the daemon reports on itself: `GET /v1/status`, `GET /metrics`, and
//! `POST /v1/verify?sample=N` (with an admin token set, verify needs it too).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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

/// Values one verify recomputes at most, whatever `sample` asks: a verify reads the database twice
/// per value (the head and the value), one value at a time.
pub const MAX_VERIFY_SAMPLE: usize = 10_000;

/// Recompute up to N cached values (default 1000, at most `MAX_VERIFY_SAMPLE`) and report the
/// stale ones. One verify runs at a time (429 meanwhile).
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
        Some(Ok(n)) if n > 0 => n.min(MAX_VERIFY_SAMPLE),
        Some(_) => {
            return reply::error(
                StatusCode::BAD_REQUEST,
                "`sample` must be a whole number above zero".to_owned(),
            );
        }
    };
    let Some(running) = http.sources.verify.start() else {
        let mut answer = reply::error(
            StatusCode::TOO_MANY_REQUESTS,
            "a verify is running already: retry when it is done".to_owned(),
        );
        answer.headers_mut().insert(
            hyper::header::RETRY_AFTER,
            hyper::header::HeaderValue::from_static("1"),
        );
        return answer;
    };
    let sources = Arc::new(http.sources.clone());
    let wait = config.fresh_timeout;
    // Set when this request goes away (a client gone, a timeout): the verify stops with it.
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_with_request = SetOnDrop(Arc::clone(&stop));
    let verified = tokio::task::spawn_blocking(move || {
        let _running = running;
        check::verify(&sources, sample, wait, &stop)
    });
    match verified.await {
        Ok(report) => reply::json(StatusCode::OK, &report),
        Err(e) => reply::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("verify failed: {e}"),
        ),
    }
}

/// Sets its flag when dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
