//! Serve: the HTTP endpoint (hyper 1, HTTP/1.1 with keep-alive).
//!
//! `GET /v1/keys/{key}` answers from the cache, filling a miss with the key family's query
//! (concurrent misses of one key share one query). `GET /v1/status` and `GET /healthz` tell how
//! the daemon is doing. A client's mistake gets a 4xx with a JSON error, never a 5xx.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::TcpListener;

use crate::admin::Action;
use crate::cache::Entry;
use crate::config::Family;
use crate::fill;
use crate::state::Shared;
use crate::tail;
use crate::template::Params;

/// Keys longer than this are refused (400): no family needs them, and they cost memory.
pub const MAX_KEY_BYTES: usize = 1024;

/// A request's line and headers, at most: 431 past it.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How long open connections get to finish after shutdown is asked for.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

type Body = Full<Bytes>;

/// Accepts connections until `shutdown` resolves, then lets in-flight requests finish.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    // At most `max_connections` served at once: past it, new ones wait in the listen backlog.
    let connections = Arc::new(tokio::sync::Semaphore::new(
        shared.config().http.max_connections,
    ));
    let shutdown = async {
        shutdown.await;
        // Long-lived streams (`/v1/events`) end now, so draining need not wait for them.
        shared.stopping.send_replace(true);
    };
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let http = shared.config().http.clone();
                let header_timeout = http.header_timeout;
                let shared = Arc::clone(&shared);
                let service = service_fn(move |request| {
                    let shared = Arc::clone(&shared);
                    async move {
                        if head_bytes(&request) > MAX_HEAD_BYTES {
                            return Ok(error(
                                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                                format!("the request's head is over {MAX_HEAD_BYTES} bytes"),
                            )
                            .map(BodyExt::boxed));
                        }
                        // A request (its fill included) that takes too long gets a 503, and
                        // its connection is free again; the fill itself finishes on its own.
                        if request.uri().path() == "/v1/events" {
                            return Ok::<_, Infallible>(events(&shared, &request));
                        }
                        let answer =
                            tokio::time::timeout(http.request_timeout, handle(&shared, request))
                                .await
                                .unwrap_or_else(|_| {
                                    error(
                                        StatusCode::SERVICE_UNAVAILABLE,
                                        format!(
                                            "no answer within http.request_timeout ({:?})",
                                            http.request_timeout
                                        ),
                                    )
                                });
                        Ok::<_, Infallible>(answer.map(BodyExt::boxed))
                    }
                });
                // hyper refuses a head that fills its buffer before it ends (its own 431), but a
                // head that arrives in one large read can be parsed past it: `head_bytes` above
                // holds every request to the limit, whatever the reads were.
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .max_buf_size(MAX_HEAD_BYTES)
                    .serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    let _ = connection.await;
                    drop(permit);
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections were still open after {DRAIN_TIMEOUT:?}; closing them");
    }
}

/// The size of a request's head as a client writes it: the request line, a `Name: value` line
/// per header, the blank line.
fn head_bytes<B>(request: &Request<B>) -> usize {
    let uri = request.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + "://".len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    let line = request.method().as_str().len() + " ".len() + target + " HTTP/1.1\r\n".len();
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + ": ".len() + value.len() + "\r\n".len())
        .sum();
    line + headers + "\r\n".len()
}

/// `GET /v1/events`: the live feed, as Server-Sent Events.
fn events(
    shared: &Arc<Shared>,
    request: &Request<Incoming>,
) -> Response<BoxBody<Bytes, Infallible>> {
    if request.method() != Method::GET {
        return method_not_allowed("GET").map(BodyExt::boxed);
    }
    let mut response = Response::new(BodyExt::boxed(crate::events::subscribe(shared)));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    response
}

async fn handle(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path();
    let is_get = request.method() == Method::GET;
    if let Some(raw_key) = path.strip_prefix("/v1/keys/") {
        if request.method() == Method::DELETE {
            return match decode_key(raw_key) {
                Ok(key) => admin(shared, request.headers(), Action::Key(key)).await,
                Err(problem) => malformed_key(&problem),
            };
        }
        if !is_get {
            return method_not_allowed("GET, DELETE");
        }
        let fresh = wants_fresh(request.uri().query());
        // `Cache-Control: only-if-cached` (RFC 9111): answer from the cache or 504, never fill.
        // `Cache-Control: no-cache`: answer from the database, now (the cache is left alone).
        let directives: Vec<String> = request
            .headers()
            .get_all(hyper::header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|d| d.trim().to_ascii_lowercase())
            .collect();
        let only_if_cached = directives.iter().any(|d| d == "only-if-cached");
        let no_cache = directives.iter().any(|d| d == "no-cache");
        let response = if no_cache {
            get_uncached(shared, raw_key).await
        } else {
            get_key(shared, raw_key, fresh, only_if_cached).await
        };
        return not_modified_if_matching(request.headers(), response);
    }
    if path == "/v1/keys" {
        if request.method() != Method::POST {
            return method_not_allowed("POST");
        }
        return multi_get(shared, request).await;
    }
    match path {
        "/healthz" if is_get => response(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"ok\n"),
        ),
        "/v1/status" if is_get => status(shared).await,
        "/metrics" if is_get => metrics(shared).await,
        "/v1/verify" if request.method() == Method::POST => {
            // Verify only reads; with an admin token set, it needs the token too.
            let config = shared.config();
            if config.admin_token.is_some()
                && let Err((status, message)) = crate::admin::authorize(&config, request.headers())
            {
                return error(status, message);
            }
            verify(shared, request.uri().query()).await
        }
        "/v1/admin/invalidate" | "/v1/admin/flush" if request.method() == Method::POST => {
            let query = request.uri().query().unwrap_or("");
            let param = |name: &str| {
                query
                    .split('&')
                    .filter_map(|pair| pair.split_once('='))
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| decode_key(v))
            };
            let action = match (path, param("tag"), param("family")) {
                ("/v1/admin/invalidate", Some(Ok(tag)), _) => Action::Tag(tag),
                ("/v1/admin/flush", _, Some(Ok(family))) => Action::Family(family),
                ("/v1/admin/flush", _, None) => Action::All,
                (_, Some(Err(problem)), _) | (_, _, Some(Err(problem))) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("malformed parameter: {problem}"),
                    );
                }
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "POST /v1/admin/invalidate?tag=TAG, or POST /v1/admin/flush[?family=PATTERN]".to_owned(),
                    );
                }
            };
            admin(shared, request.headers(), action).await
        }
        "/v1/admin/invalidate" | "/v1/admin/flush" => method_not_allowed("POST"),
        "/v1/verify" => method_not_allowed("POST"),
        "/healthz" | "/v1/status" | "/metrics" => method_not_allowed("GET"),
        "/" if is_get && accepts_html(request.headers()) => response(
            StatusCode::OK,
            "text/html; charset=utf-8",
            Bytes::from_static(crate::ui::HOME.as_bytes()),
        ),
        "/" if is_get => json_response(
            StatusCode::OK,
            &json!({"name": "cachetail", "dashboard": "/ui", "routes": ["/v1/keys/{key}", "POST /v1/keys", "/v1/status", "/v1/events", "/metrics", "/v1/verify", "/healthz", "/ui"]}),
        ),
        _ if path == "/ui" || path.starts_with("/ui/") => match crate::ui::find(path) {
            Some(asset) if is_get => ui_asset(request.headers(), asset),
            Some(_) => method_not_allowed("GET"),
            None => error(
                StatusCode::NOT_FOUND,
                format!("no route {path}: the dashboard is at /ui"),
            ),
        },
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no route {path}: try GET /v1/keys/{{key}} or GET /v1/status"),
        ),
    }
}

async fn get_key(
    shared: &Arc<Shared>,
    raw_key: &str,
    fresh: bool,
    only_if_cached: bool,
) -> Response<Body> {
    match decode_key(raw_key) {
        Ok(key) => lookup(shared, key, fresh, only_if_cached).await,
        Err(problem) => malformed_key(&problem),
    }
}

/// Answers one key: from the cache, or filled from the database.
async fn lookup(
    shared: &Arc<Shared>,
    key: String,
    fresh: bool,
    only_if_cached: bool,
) -> Response<Body> {
    // The hot path: a hit needs no pattern matching (the entry knows its family).
    if !fresh
        && shared.redis.is_none()
        && !shared.bypass_cache()
        && let Some(entry) = shared.cache.get(&key)
    {
        shared.stats.hits.fetch_add(1, Ordering::Relaxed);
        entry.family.stats.hits.fetch_add(1, Ordering::Relaxed);
        return value_response(&key, &entry, "hit");
    }
    let config = shared.config();
    let Some((family, params)) = config.match_key(&key) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no key family matches the key {key:?}"),
        );
    };
    if fresh && let Err(response) = wait_until_applied(shared, config.fresh_timeout).await {
        return response;
    }
    if shared.paused.load(Ordering::Acquire) {
        return bypass(shared, &key, family, params, "paused").await;
    }
    if shared.bypass_cache() {
        return bypass(shared, &key, family, params, "standby").await;
    }
    let cached = match &shared.redis {
        None => shared.cache.get(&key),
        Some(redis) => match redis.get(&key).await {
            Ok(cached) => cached.map(|(body, remaining)| {
                let now = std::time::Instant::now();
                let age = family.ttl.saturating_sub(remaining);
                Arc::new(Entry {
                    version: 0,
                    body: Some(body),
                    family: Arc::clone(family),
                    tags: Box::new([]),
                    stored_at: now.checked_sub(age).unwrap_or(now),
                })
            }),
            // Redis is down or lost state: the database answers, never a stale value.
            Err(_) => return bypass(shared, &key, family, params, "redis-unavailable").await,
        },
    };
    if let Some(entry) = cached {
        shared.stats.hits.fetch_add(1, Ordering::Relaxed);
        family.stats.hits.fetch_add(1, Ordering::Relaxed);
        return value_response(&key, &entry, "hit");
    }
    if only_if_cached {
        return error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("the key {key:?} is not cached (only-if-cached)"),
        );
    }
    shared.stats.misses.fetch_add(1, Ordering::Relaxed);
    family.stats.misses.fetch_add(1, Ordering::Relaxed);
    match fill::fill(shared, Arc::from(key.as_str()), family, params).await {
        Ok(entry) => value_response(&key, &entry, "miss"),
        Err(message) => error(StatusCode::INTERNAL_SERVER_ERROR, message.to_string()),
    }
}

/// `Cache-Control: no-cache`: the value computed from the database now, whatever is cached.
async fn get_uncached(shared: &Arc<Shared>, raw_key: &str) -> Response<Body> {
    let key = match decode_key(raw_key) {
        Ok(key) => key,
        Err(problem) => return malformed_key(&problem),
    };
    let config = shared.config();
    let Some((family, params)) = config.match_key(&key) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no key family matches the key {key:?}"),
        );
    };
    bypass(shared, &key, family, params, "no-cache").await
}

/// An admin action, once the token checks out.
async fn admin(shared: &Arc<Shared>, headers: &hyper::HeaderMap, action: Action) -> Response<Body> {
    if let Err((status, message)) = crate::admin::authorize(&shared.config(), headers) {
        let mut answer = error(status, message);
        if status == StatusCode::UNAUTHORIZED {
            answer.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        return answer;
    }
    let worker = Arc::clone(shared);
    let described = format!("{action:?}");
    let done = tokio::task::spawn_blocking(move || crate::admin::perform(&worker, &action)).await;
    match done {
        Ok(Ok(position)) => json_response(
            StatusCode::OK,
            &json!({"done": described, "position": position}),
        ),
        Ok(Err((status, message))) => error(status, message),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Keys one multi-get may ask for, and the size of its body, at most.
const MAX_MULTI_KEYS: usize = 1_000;
const MAX_MULTI_BODY: usize = 1 << 20;

/// `POST /v1/keys` with a JSON list of keys (or `{"keys": [...]}`): each key answered as
/// `GET /v1/keys/{key}` would, in order, each with its own status.
async fn multi_get(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    use http_body_util::BodyExt;
    let fresh = wants_fresh(request.uri().query());
    let body = match http_body_util::Limited::new(request.into_body(), MAX_MULTI_BODY)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is over {MAX_MULTI_BODY} bytes (or could not be read)"),
            );
        }
    };
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Keys {
        List(Vec<String>),
        Object { keys: Vec<String> },
    }
    let keys = match serde_json::from_slice::<Keys>(&body) {
        Ok(Keys::List(keys) | Keys::Object { keys }) => keys,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body must be a JSON list of keys, or {{\"keys\": [...]}}: {e}"),
            );
        }
    };
    if keys.len() > MAX_MULTI_KEYS {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} keys asked for; at most {MAX_MULTI_KEYS} per request",
                keys.len()
            ),
        );
    }
    let mut lookups = tokio::task::JoinSet::new();
    for (index, key) in keys.iter().cloned().enumerate() {
        let shared = Arc::clone(shared);
        lookups.spawn(async move {
            let answer = match check_key(key) {
                Ok(key) => lookup(&shared, key, fresh, false).await,
                Err(problem) => malformed_key(&problem),
            };
            (index, answer)
        });
    }
    let mut answers: Vec<Option<Response<Body>>> = (0..keys.len()).map(|_| None).collect();
    while let Some(joined) = lookups.join_next().await {
        if let Ok((index, answer)) = joined
            && let Some(slot) = answers.get_mut(index)
        {
            *slot = Some(answer);
        }
    }
    /// One key's answer; the value is embedded as the very JSON a GET returns.
    #[derive(serde::Serialize)]
    struct Answer<'a> {
        key: &'a str,
        status: u16,
        #[serde(skip_serializing_if = "Option::is_none")]
        cache: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        value: Option<Box<serde_json::value::RawValue>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<serde_json::Value>,
    }
    let mut results = Vec::with_capacity(keys.len());
    for (key, answer) in keys.iter().zip(answers) {
        let Some(answer) = answer else {
            results.push(Answer {
                key,
                status: 500,
                cache: None,
                value: None,
                error: Some(json!("the lookup failed")),
            });
            continue;
        };
        let status = answer.status().as_u16();
        let cache = answer
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = answer
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&body).into_owned();
        results.push(if status == 200 {
            Answer {
                key,
                status,
                cache,
                value: serde_json::value::RawValue::from_string(text).ok(),
                error: None,
            }
        } else {
            let error = serde_json::from_str::<serde_json::Value>(&text)
                .map(|mut v| v["error"].take())
                .unwrap_or_default();
            Answer {
                key,
                status,
                cache: None,
                value: None,
                error: Some(error),
            }
        });
    }
    #[derive(serde::Serialize)]
    struct Answers<'a> {
        results: Vec<Answer<'a>>,
    }
    match serde_json::to_vec(&Answers { results }) {
        Ok(body) => response(StatusCode::OK, "application/json", Bytes::from(body)),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Answers straight from the database, storing nothing, because the cache cannot be trusted
/// now (`reason`: capture is paused, this daemon is a standby with the memory backend, Redis is
/// unavailable) or the client asked for it (`no-cache`).
async fn bypass(
    shared: &Arc<Shared>,
    key: &str,
    family: &Arc<Family>,
    params: Params,
    reason: &'static str,
) -> Response<Body> {
    let family_for_query = Arc::clone(family);
    let computed = shared
        .read(move |conn| fill::compute(conn, &family_for_query, &params))
        .await;
    match computed {
        Ok(computed) => {
            let entry = Entry {
                version: computed.version,
                body: computed.body,
                family: Arc::clone(family),
                tags: Box::new([]),
                stored_at: std::time::Instant::now(),
            };
            let mut response = value_response(key, &entry, "bypass");
            let headers = response.headers_mut();
            headers.insert("x-cachetail-bypass", HeaderValue::from_static(reason));
            if reason == "paused" {
                headers.insert("x-cachetail-paused", HeaderValue::from_static("1"));
            }
            response
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the query of key family `{}` failed: {e}", family.pattern),
        ),
    }
}

/// Waits until the daemon has applied every change committed before now (read-your-writes).
async fn wait_until_applied(shared: &Arc<Shared>, timeout: Duration) -> Result<(), Response<Body>> {
    let head = shared.read(tail::head).await.map_err(|e| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read the outbox head: {e}"),
        )
    })?;
    let mut applied = shared.applied.subscribe();
    match tokio::time::timeout(timeout, applied.wait_for(|&position| position >= head)).await {
        Ok(Ok(_)) => Ok(()),
        _ => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not fresh within {timeout:?}: the daemon has applied changes up to {} of {head}; retry, or read without ?fresh=1",
                shared.applied()
            ),
        )),
    }
}

/// A value's answer: the JSON with `X-Cache`, an `ETag` (a hash of the body), `Age` (seconds
/// since it was computed) and `Cache-Control: max-age` (the rest of its TTL; `no-cache` for an
/// answer that bypassed the cache).
fn value_response(key: &str, entry: &Entry, cache: &'static str) -> Response<Body> {
    let mut response = match &entry.body {
        Some(body) => response(StatusCode::OK, "application/json", body.clone()),
        None => error(
            StatusCode::NOT_FOUND,
            format!("the key {key:?} has no value: its family's query returned no row"),
        ),
    };
    let headers = response.headers_mut();
    headers.insert("x-cache", HeaderValue::from_static(cache));
    if let Some(body) = &entry.body {
        let age = entry.stored_at.elapsed();
        let control = if cache == "bypass" {
            "no-cache".to_owned()
        } else {
            format!("max-age={}", entry.family.ttl.saturating_sub(age).as_secs())
        };
        let tag = etag(body);
        for (name, value) in [
            (hyper::header::ETAG, tag),
            (hyper::header::AGE, age.as_secs().to_string()),
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
fn etag(body: &[u8]) -> String {
    format!("\"{:016x}\"", crate::fnv1a(body))
}

/// A browser asking for a page (`Accept: text/html`), not a client asking for JSON.
fn accepts_html(headers: &hyper::HeaderMap) -> bool {
    headers
        .get_all(hyper::header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("text/html")))
}

/// A file of the dashboard, with its validator and the page's security headers.
fn ui_asset(request: &hyper::HeaderMap, asset: &crate::ui::Asset) -> Response<Body> {
    let mut answer = response(
        StatusCode::OK,
        asset.content_type,
        Bytes::from_static(asset.body.as_bytes()),
    );
    let headers = answer.headers_mut();
    headers.insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    headers.insert(
        hyper::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(crate::ui::CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        hyper::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        hyper::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if let Ok(tag) = HeaderValue::from_str(&etag(asset.body.as_bytes())) {
        headers.insert(hyper::header::ETAG, tag);
    }
    not_modified_if_matching(request, answer)
}

/// `If-None-Match` naming the answer's `ETag` (or `*`): `304 Not Modified`, headers only.
fn not_modified_if_matching(
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

async fn metrics(shared: &Arc<Shared>) -> Response<Body> {
    let backlog = crate::status::read_backlog(shared).await.ok();
    match crate::metrics::render(Arc::clone(shared), backlog) {
        Ok(text) => response(
            StatusCode::OK,
            crate::metrics::CONTENT_TYPE,
            Bytes::from(text),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn status(shared: &Arc<Shared>) -> Response<Body> {
    json_response(StatusCode::OK, &crate::status::full(shared).await)
}

/// `POST /v1/verify?sample=N`: recompute up to N cached values (default 1000, at most 100000)
/// and report the stale ones.
async fn verify(shared: &Arc<Shared>, query: Option<&str>) -> Response<Body> {
    let sample = query
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("sample="))
        .map(str::parse::<usize>);
    let sample = match sample {
        None => 1000,
        Some(Ok(n)) if n > 0 => n.min(100_000),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "`sample` must be a whole number above zero".to_owned(),
            );
        }
    };
    let worker = Arc::clone(shared);
    let wait = shared.config().fresh_timeout;
    match tokio::task::spawn_blocking(move || crate::verify::verify(&worker, sample, wait)).await {
        Ok(report) => json_response(StatusCode::OK, &json!(report)),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("verify failed: {e}"),
        ),
    }
}

/// Decodes a percent-encoded key. Refuses bad escapes, invalid UTF-8, control characters and
/// keys longer than `MAX_KEY_BYTES`.
pub fn decode_key(raw: &str) -> Result<String, String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .ok_or("a `%` is not followed by two hex digits")?;
            let hex =
                std::str::from_utf8(hex).map_err(|_| "a `%` is not followed by two hex digits")?;
            let byte = u8::from_str_radix(hex, 16)
                .map_err(|_| "a `%` is not followed by two hex digits")?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let key = String::from_utf8(out).map_err(|_| "the key is not valid UTF-8".to_owned())?;
    check_key(key)
}

/// The rules every key meets: not empty, at most `MAX_KEY_BYTES`, no control characters.
pub fn check_key(key: String) -> Result<String, String> {
    if key.is_empty() {
        return Err("the key is empty".to_owned());
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "the key is {} bytes long; at most {MAX_KEY_BYTES} are allowed",
            key.len()
        ));
    }
    if key.chars().any(char::is_control) {
        return Err("the key contains a control character".to_owned());
    }
    Ok(key)
}

fn wants_fresh(query: Option<&str>) -> bool {
    query
        .unwrap_or("")
        .split('&')
        .any(|pair| matches!(pair, "fresh" | "fresh=1" | "fresh=true"))
}

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    response(status, "application/json", Bytes::from(body))
}

fn error(status: StatusCode, message: String) -> Response<Body> {
    json_response(status, &json!({ "error": message }))
}

fn malformed_key(problem: &str) -> Response<Body> {
    error(StatusCode::BAD_REQUEST, format!("malformed key: {problem}"))
}

fn method_not_allowed(allowed: &'static str) -> Response<Body> {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("only {allowed} is allowed here"),
    );
    response
        .headers_mut()
        .insert(hyper::header::ALLOW, HeaderValue::from_static(allowed));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_measured_as_a_client_writes_it() {
        let raw = "GET /v1/keys/book:1?fresh=1 HTTP/1.1\r\nHost: x\r\nX-Padding: abc\r\n\r\n";
        let request = Request::get("/v1/keys/book:1?fresh=1")
            .header("Host", "x")
            .header("X-Padding", "abc")
            .body(())
            .expect("a request");
        assert_eq!(head_bytes(&request), raw.len());
        let absolute = Request::get("http://x:80/healthz")
            .body(())
            .expect("a request");
        assert_eq!(
            head_bytes(&absolute),
            "GET http://x:80/healthz HTTP/1.1\r\n\r\n".len()
        );
    }

    #[test]
    fn keys_are_percent_decoded_and_checked() {
        assert_eq!(decode_key("book%3A42").as_deref(), Ok("book:42"));
        assert_eq!(decode_key("book:42").as_deref(), Ok("book:42"));
        assert_eq!(decode_key("caf%C3%A9").as_deref(), Ok("café"));
        assert!(decode_key("bad%4").is_err());
        assert!(decode_key("bad%zz").is_err());
        assert!(decode_key("%FF").is_err());
        assert!(decode_key("").is_err());
        assert!(decode_key("a%0Ab").is_err());
        assert!(decode_key(&"k".repeat(MAX_KEY_BYTES + 1)).is_err());
    }
}
