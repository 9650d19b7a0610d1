//! Building answers: JSON and JSON errors (a client's mistake is a 4xx with `{"error": ...}`,
//! never a 5xx), a value's answer with its validators, and `304 Not Modified`.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::json;

use crate::cache::{Entry, Source};

pub type Body = Full<Bytes>;

pub fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    response(status, "application/json", Bytes::from(body))
}

pub fn error(status: StatusCode, message: String) -> Response<Body> {
    json(status, &json!({ "error": message }))
}

/// 503 with `Retry-After: 1`: a limit is reached for now (readers, live feeds), not broken.
pub fn busy(message: String) -> Response<Body> {
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, message);
    response
        .headers_mut()
        .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

pub fn malformed_key(problem: &str) -> Response<Body> {
    error(StatusCode::BAD_REQUEST, format!("malformed key: {problem}"))
}

pub fn method_not_allowed(allowed: &'static str) -> Response<Body> {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("only {allowed} is allowed here"),
    );
    response
        .headers_mut()
        .insert(hyper::header::ALLOW, HeaderValue::from_static(allowed));
    response
}

/// The `X-Cache` header's value for where an answer came from.
pub fn cache_header(source: Source) -> &'static str {
    match source {
        Source::Hit => "hit",
        Source::Miss => "miss",
        Source::Bypass(_) => "bypass",
    }
}

/// A value's answer: the JSON with `X-Cache`, an `ETag` (a hash of the body), `Age` (seconds
/// since it was computed) and `Cache-Control: max-age` (the rest of its TTL; `no-cache` for an
/// answer that bypassed the cache, with `X-Cachetail-Bypass` saying why). A family query that
/// found no row is a 404.
pub fn value(key: &str, entry: &Arc<Entry>, source: Source) -> Response<Body> {
    let mut response = match entry.body_bytes() {
        Some(body) => response(StatusCode::OK, "application/json", body),
        None => error(
            StatusCode::NOT_FOUND,
            format!("the key {key:?} has no value: its family's query returned no row"),
        ),
    };
    let headers = response.headers_mut();
    headers.insert("x-cache", HeaderValue::from_static(cache_header(source)));
    if let Source::Bypass(reason) = source {
        headers.insert("x-cachetail-bypass", HeaderValue::from_static(reason));
        if reason == "paused" {
            headers.insert("x-cachetail-paused", HeaderValue::from_static("1"));
        }
    }
    if let Some(body) = &entry.body {
        let control = match source {
            Source::Bypass(_) => "no-cache".to_owned(),
            _ => format!("max-age={}", entry.max_age().as_secs()),
        };
        for (name, value) in [
            (hyper::header::ETAG, etag(body)),
            (hyper::header::AGE, entry.age().as_secs().to_string()),
            (hyper::header::CACHE_CONTROL, control),
        ] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
    }
    response
}

/// A strong validator: a hash of the body, quoted.
pub fn etag(body: &[u8]) -> String {
    format!("\"{:016x}\"", crate::fnv1a(body))
}

/// `If-None-Match` naming the answer's `ETag` (or `*`): `304 Not Modified`, headers only.
pub fn not_modified_if_matching(
    request: &hyper::HeaderMap,
    response: Response<Body>,
) -> Response<Body> {
    let Some(tag) = response.headers().get(hyper::header::ETAG) else {
        return response;
    };
    let tag = tag.as_bytes();
    let matches = request
        .get_all(hyper::header::IF_NONE_MATCH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|t| t.trim_ascii())
        .any(|t| t == b"*" || t == tag || t.strip_prefix(b"W/") == Some(tag));
    if response.status() != StatusCode::OK || !matches {
        return response;
    }
    let (mut parts, _) = response.into_parts();
    parts.status = StatusCode::NOT_MODIFIED;
    parts.headers.remove(CONTENT_TYPE);
    parts.headers.remove(hyper::header::CONTENT_LENGTH);
    Response::from_parts(parts, Full::new(Bytes::new()))
}
