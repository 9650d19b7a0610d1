//! Building answers: JSON and JSON errors (a client's mistake is a 4xx with `{"error": ...}`,
//! never a 5xx), a value's answer with its validators, and `304 Not Modified`.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::json;

use crate::cache::{Entry, Source};

pub type Body = Full<Bytes>;

/// The headers a value's answer carries beyond the standard ones (named once, not parsed per
/// answer).
const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const X_CACHETAIL_BYPASS: HeaderName = HeaderName::from_static("x-cachetail-bypass");
const X_CACHETAIL_PAUSED: HeaderName = HeaderName::from_static("x-cachetail-paused");

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

/// A value's answer: the JSON with `X-Cache`, an `ETag` (a hash of the body, computed when the
/// value was), `Age` (seconds since it was computed) and `Cache-Control: max-age` (the rest of
/// its TTL; `no-cache` for an answer that bypassed the cache, with `X-Cachetail-Bypass` saying
/// why). A family query that found no row is a 404. The entry is moved into the body (which
/// keeps it alive while sent), and the headers are written without formatting machinery.
pub fn value(key: &str, entry: Arc<Entry>, source: Source) -> Response<Body> {
    let validators = entry.body.is_some().then(|| {
        let control = match source {
            Source::Bypass(_) => HeaderValue::from_static("no-cache"),
            _ => max_age(entry.max_age().as_secs()),
        };
        (
            etag(entry.etag),
            HeaderValue::from(entry.age().as_secs()),
            control,
        )
    });
    let mut response = match entry.into_body_bytes() {
        Some(body) => response(StatusCode::OK, "application/json", body),
        None => error(
            StatusCode::NOT_FOUND,
            format!("the key {key:?} has no value: its family's query returned no row"),
        ),
    };
    let headers = response.headers_mut();
    headers.insert(X_CACHE, HeaderValue::from_static(cache_header(source)));
    if let Source::Bypass(reason) = source {
        headers.insert(X_CACHETAIL_BYPASS, HeaderValue::from_static(reason));
        if reason == "paused" {
            headers.insert(X_CACHETAIL_PAUSED, HeaderValue::from_static("1"));
        }
    }
    if let Some((etag, age, control)) = validators {
        headers.insert(hyper::header::ETAG, etag);
        headers.insert(hyper::header::AGE, age);
        headers.insert(hyper::header::CACHE_CONTROL, control);
    }
    response
}

/// A strong validator: a body's hash (`crate::fnv1a`), 16 hex digits, quoted.
pub fn etag(hash: u64) -> HeaderValue {
    let mut text = [b'"'; 18];
    for (i, digit) in text[1..17].iter_mut().enumerate() {
        *digit = b"0123456789abcdef"[(hash >> (60 - 4 * i)) as usize & 0xf];
    }
    // Quotes and hex digits: always a valid header value.
    HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("\"\""))
}

/// `Cache-Control: max-age=SECONDS`.
fn max_age(seconds_left: u64) -> HeaderValue {
    seconds(b"max-age=", seconds_left)
}

/// `prefix` and a count of seconds as a header value, formatted on the stack (one allocation:
/// the value's own).
fn seconds(prefix: &'static [u8], seconds: u64) -> HeaderValue {
    // A prefix of up to 8 bytes and at most 20 digits, written from the end.
    let mut text = [0u8; 28];
    let mut start = text.len();
    let mut rest = seconds;
    loop {
        start -= 1;
        text[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let prefix = &prefix[..prefix.len().min(start)];
    start -= prefix.len();
    text[start..start + prefix.len()].copy_from_slice(prefix);
    HeaderValue::from_bytes(&text[start..]).unwrap_or_else(|_| HeaderValue::from_static("0"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validators_are_written_as_before() {
        assert_eq!(etag(0x00d4_54dd_0ab3_c090), "\"00d454dd0ab3c090\"");
        assert_eq!(etag(u64::MAX), format!("\"{:016x}\"", u64::MAX).as_str());
        assert_eq!(max_age(599), "max-age=599");
        assert_eq!(max_age(0), "max-age=0");
        assert_eq!(max_age(u64::MAX), format!("max-age={}", u64::MAX).as_str());
        assert_eq!(seconds(b"", 0), "0");
        assert_eq!(seconds(b"", 86_400), "86400");
    }

    #[test]
    fn an_entry_stays_in_its_allocation() {
        // 88 bytes with the `Arc`'s two counts: glibc's 96-byte chunk, as before the ETag.
        assert!(
            std::mem::size_of::<Entry>() <= 72,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }
}
