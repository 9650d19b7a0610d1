//! The key routes: `GET /v1/keys/{key}` and the multi-get `POST /v1/keys`. Both build on one
//! lookup (`answer`), which returns what the cache found for a key; GET writes it as an HTTP
//! answer, the multi-get embeds it (the value byte for byte) in its list. A multi-get looks each
//! distinct key up once, serves what is in memory at once, and looks the rest up a few at a
//! time (as many as there are readers), so that one request cannot fill the readers' line.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{HeaderMap, Request, Response, StatusCode};
use percent_encoding::percent_decode_str;
use serde_json::value::RawValue;

use super::Http;
use super::reply::{self, Body};
use crate::cache::{Entry, Lookup, Source, Want};
use crate::db::{ReadError, read_head_and_pause};

/// Keys longer than this are refused (400): no family needs them, and they cost memory.
pub const MAX_KEY_BYTES: usize = 1024;

/// Keys one multi-get may ask for, and the size of its body, at most.
const MAX_MULTI_KEYS: usize = 1_000;
const MAX_MULTI_BODY: usize = 1 << 20;

/// What a request for one key comes to.
#[derive(Clone)]
pub enum Answer {
    Value(Arc<Entry>, Source),
    /// No family's pattern matches the key.
    NoFamily,
    /// Asked for from the cache only, and not cached.
    NotCached,
    /// `?fresh=1`, and the daemon did not catch up in time.
    NotFresh(String),
    /// The family's query failed.
    Failed(String),
    /// Too many reads wait for a reader: 503 with `Retry-After`.
    Busy(String),
}

/// Looks one key up: the hot path first (a value in memory needs no pattern matching), else
/// its family, the wait for `?fresh=1`, and the cache's lookup (a hit, a fill, or the database
/// when the cache cannot be trusted now).
pub async fn answer(http: &Http, key: &str, fresh: bool, want: Want) -> Answer {
    let cache = &http.sources.cache;
    if !fresh
        && want.may_use_cached()
        && let Some(entry) = cache.hot(key)
    {
        return Answer::Value(entry, Source::Hit);
    }
    let live = http.sources.registry.live();
    let Some((family, params)) = live.match_key(key) else {
        return Answer::NoFamily;
    };
    let mut want = want;
    if fresh {
        match wait_until_applied(http, live.config.fresh_timeout).await {
            Ok(paused) => want.paused = paused,
            Err(answer) => return answer,
        }
    }
    match cache.lookup(key, family, params, want).await {
        Lookup::Value(entry, source) => Answer::Value(entry, source),
        Lookup::NotCached => Answer::NotCached,
        Lookup::Failed(message) => Answer::Failed(message),
        Lookup::Busy(message) => Answer::Busy(message),
    }
}

/// An answer that is not a value: its status and message (also an entry of a multi-get).
fn failure(key: &str, answer: &Answer) -> (StatusCode, String) {
    match answer {
        Answer::Value(..) => (
            StatusCode::NOT_FOUND,
            format!("the key {key:?} has no value: its family's query returned no row"),
        ),
        Answer::NoFamily => (
            StatusCode::NOT_FOUND,
            format!("no key family matches the key {key:?}"),
        ),
        Answer::NotCached => (
            StatusCode::GATEWAY_TIMEOUT,
            format!("the key {key:?} is not cached (only-if-cached)"),
        ),
        Answer::NotFresh(message) | Answer::Busy(message) => {
            (StatusCode::SERVICE_UNAVAILABLE, message.clone())
        }
        Answer::Failed(message) => (StatusCode::INTERNAL_SERVER_ERROR, message.clone()),
    }
}

/// `GET /v1/keys/{key}`, `Cache-Control: only-if-cached` (answer from the cache or 504, never
/// fill) or `no-cache` (answer from the database now, leaving the cache alone), `?fresh=1`,
/// `If-None-Match`.
pub async fn get(http: &Http, raw_key: &str, request: &Request<Incoming>) -> Response<Body> {
    let key = match decode_key(raw_key) {
        Ok(key) => key,
        Err(problem) => return reply::malformed_key(&problem),
    };
    let fresh = wants_fresh(request.uri().query());
    let answered = answer(http, &key, fresh, want(request.headers())).await;
    respond(&key, answered, request.headers())
}

/// `get` when it needs no wait: a malformed key's 400, or a value in memory that may answer the
/// request as it is (no `?fresh=1`, no `no-cache`), answered at once, with nothing awaited and
/// no timeout armed. None: the key must be looked up (`get`).
pub fn get_at_once(
    http: &Http,
    raw_key: &str,
    request: &Request<Incoming>,
) -> Option<Response<Body>> {
    let key = match decode_key(raw_key) {
        Ok(key) => key,
        Err(problem) => return Some(reply::malformed_key(&problem)),
    };
    if wants_fresh(request.uri().query()) || !want(request.headers()).may_use_cached() {
        return None;
    }
    let entry = http.sources.cache.hot(&key)?;
    Some(respond(
        &key,
        Answer::Value(entry, Source::Hit),
        request.headers(),
    ))
}

/// A GET's answer, `304 Not Modified` when the request's `If-None-Match` names its `ETag`.
fn respond(key: &str, answered: Answer, request: &HeaderMap) -> Response<Body> {
    let response = match answered {
        Answer::Value(entry, source) => reply::value(key, entry, source),
        Answer::Busy(message) => reply::busy(message),
        other => {
            let (status, message) = failure(key, &other);
            reply::error(status, message)
        }
    };
    reply::not_modified_if_matching(request, response)
}

/// What the request's `Cache-Control` asks for.
fn want(headers: &HeaderMap) -> Want {
    let mut want = Want::default();
    let directives = headers
        .get_all(hyper::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    for directive in directives {
        want.only_if_cached |= directive.eq_ignore_ascii_case("only-if-cached");
        want.uncached |= directive.eq_ignore_ascii_case("no-cache");
    }
    want
}

/// One key's entry in a multi-get's answer; the value is embedded as the very JSON a GET returns.
#[derive(serde::Serialize)]
struct KeyResult<'a> {
    key: &'a str,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// `POST /v1/keys` with a JSON list of keys (or `{"keys": [...]}`): each key answered as
/// `GET /v1/keys/{key}` would, in order, each with its own status. A key listed twice is looked
/// up once, and answered at each of its positions.
pub async fn multi_get(http: &Http, request: Request<Incoming>) -> Response<Body> {
    let fresh = wants_fresh(request.uri().query());
    let keys = match read_keys(request).await {
        Ok(keys) => keys,
        Err(response) => return response,
    };
    // `?fresh=1`: one wait for the apply, for every key; after it, what is cached is as fresh.
    let (not_fresh, paused) = match fresh {
        true => {
            match wait_until_applied(http, http.sources.registry.config().fresh_timeout).await {
                Ok(paused) => (None, paused),
                Err(answer) => (Some(answer), false),
            }
        }
        false => (None, false),
    };
    let mut answers: HashMap<&str, Result<Answer, String>> = HashMap::with_capacity(keys.len());
    let mut seen = HashSet::with_capacity(keys.len());
    let mut to_look_up = Vec::new();
    for key in &keys {
        if !seen.insert(key.as_str()) {
            continue;
        }
        let answered = match (check_key(key), &not_fresh) {
            (Err(problem), _) => Err(problem),
            (Ok(()), Some(not_fresh)) => Ok(not_fresh.clone()),
            // In memory: served now, without waiting behind the misses (not when a fresh read
            // found capture paused: then from the database).
            (Ok(()), None) => match http.sources.cache.hot(key).filter(|_| !paused) {
                Some(entry) => Ok(Answer::Value(entry, Source::Hit)),
                None => {
                    to_look_up.push(key.clone());
                    continue;
                }
            },
        };
        answers.insert(key, answered);
    }
    let want = Want {
        paused,
        ..Want::default()
    };
    let looked_up = look_up(http, to_look_up, want).await;
    for (key, answer) in &looked_up {
        answers.insert(key, Ok(answer.clone()));
    }
    let results: Vec<KeyResult<'_>> = keys
        .iter()
        .map(|key| entry_of(key, answers.get(key.as_str())))
        .collect();
    #[derive(serde::Serialize)]
    struct Answers<'a> {
        results: Vec<KeyResult<'a>>,
    }
    reply::json(StatusCode::OK, &Answers { results })
}

/// Looks `keys` (distinct, checked) up, at most as many at once as there are readers: a miss
/// waits for one anyway, and a thousand at once would only fill the line other requests wait in.
/// Dropping the future (the request timed out) stops the lookups and their queries.
async fn look_up(http: &Http, keys: Vec<String>, want: Want) -> Vec<(String, Answer)> {
    let at_once = http.sources.pool.size();
    let mut pending = keys.into_iter();
    let mut lookups = tokio::task::JoinSet::new();
    let mut answered = Vec::new();
    let start = |lookups: &mut tokio::task::JoinSet<_>, key: String| {
        let http = http.clone();
        lookups.spawn(async move {
            let answer = answer(&http, &key, false, want).await;
            (key, answer)
        });
    };
    for key in pending.by_ref().take(at_once) {
        start(&mut lookups, key);
    }
    while let Some(joined) = lookups.join_next().await {
        if let Ok(done) = joined {
            answered.push(done);
        }
        if let Some(key) = pending.next() {
            start(&mut lookups, key);
        }
    }
    answered
}

/// The keys a multi-get's body lists, or the answer refusing it.
async fn read_keys(request: Request<Incoming>) -> Result<Vec<String>, Response<Body>> {
    let body = match http_body_util::Limited::new(request.into_body(), MAX_MULTI_BODY)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return Err(reply::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is over {MAX_MULTI_BODY} bytes (or could not be read)"),
            ));
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
            return Err(reply::error(
                StatusCode::BAD_REQUEST,
                format!("the body must be a JSON list of keys, or {{\"keys\": [...]}}: {e}"),
            ));
        }
    };
    if keys.len() > MAX_MULTI_KEYS {
        return Err(reply::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} keys asked for; at most {MAX_MULTI_KEYS} per request",
                keys.len()
            ),
        ));
    }
    Ok(keys)
}

/// One key's entry in a multi-get's answer.
fn entry_of<'a>(key: &'a str, answered: Option<&Result<Answer, String>>) -> KeyResult<'a> {
    let refused = |status: StatusCode, message: String| KeyResult {
        key,
        status: status.as_u16(),
        cache: None,
        value: None,
        error: Some(message),
    };
    match answered {
        None => refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the lookup failed".to_owned(),
        ),
        Some(Err(problem)) => refused(StatusCode::BAD_REQUEST, format!("malformed key: {problem}")),
        Some(Ok(Answer::Value(entry, source))) if entry.body.is_some() => KeyResult {
            key,
            status: 200,
            cache: Some(reply::cache_header(*source)),
            value: entry.body.as_deref().and_then(raw_json),
            error: None,
        },
        Some(Ok(other)) => {
            let (status, message) = failure(key, other);
            refused(status, message)
        }
    }
}

/// A value's bytes, embedded as they are (they are JSON: the family query's encoding).
fn raw_json(body: &[u8]) -> Option<Box<RawValue>> {
    let text = std::str::from_utf8(body).ok()?;
    RawValue::from_string(text.to_owned()).ok()
}

/// Waits until the daemon has applied every change committed before now (read-your-writes).
/// Returns at once whether capture is paused: then no wait covers the writes made since (they
/// have no outbox row), and the read must come from the database.
async fn wait_until_applied(http: &Http, timeout: Duration) -> Result<bool, Answer> {
    let progress = &http.sources.progress;
    let mut applied = progress.subscribe();
    // Read before the head: the tail may apply rows committed after the head was read, so a
    // position read after it may lawfully be above it.
    let before = *applied.borrow();
    let head = match http.sources.pool.read(read_head_and_pause).await {
        Ok((_, true)) => return Ok(true),
        Ok((head, false)) => head,
        Err(e @ ReadError::Busy { .. }) => return Err(Answer::Busy(e.to_string())),
        Err(e) => {
            return Err(Answer::NotFresh(format!(
                "cannot read the outbox head: {e}"
            )));
        }
    };
    // The head is never below a position applied before it was read (pruning keeps the row at
    // the cursor) unless the outbox was emptied by hand: the tail then restarts above every
    // position it used (`tail::outbox`), and the changes committed meanwhile are applied only
    // from there.
    let target = if head < before { before + 1 } else { head };
    match tokio::time::timeout(timeout, applied.wait_for(|&position| position >= target)).await {
        Ok(Ok(_)) => Ok(false),
        _ => Err(Answer::NotFresh(format!(
            "not fresh within {timeout:?}: the daemon has applied changes up to {} of {head}; retry, or read without ?fresh=1",
            progress.applied()
        ))),
    }
}

fn wants_fresh(query: Option<&str>) -> bool {
    query
        .unwrap_or("")
        .split('&')
        .any(|pair| matches!(pair, "fresh" | "fresh=1" | "fresh=true"))
}

/// Decodes a percent-encoded key (borrowed as it is when it has no escape). Refuses bad escapes,
/// invalid UTF-8, control characters and keys longer than `MAX_KEY_BYTES`.
pub fn decode_key(raw: &str) -> Result<Cow<'_, str>, String> {
    let key = match raw.contains('%') {
        true => Cow::Owned(decode_component(raw)?),
        false => Cow::Borrowed(raw),
    };
    check_key(&key)?;
    Ok(key)
}

/// Percent-decodes one part of a URL strictly: every `%` must start an escape (a lenient
/// decoder would keep `%zz` as text, and a client's typo would name another key).
pub fn decode_component(raw: &str) -> Result<String, String> {
    let bytes = raw.as_bytes();
    let escapes_ok = bytes.iter().enumerate().all(|(i, &b)| {
        b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_ok {
        return Err("a `%` is not followed by two hex digits".to_owned());
    }
    percent_decode_str(raw)
        .decode_utf8()
        .map(|text| text.into_owned())
        .map_err(|_| "the key is not valid UTF-8".to_owned())
}

/// The rules every key meets: not empty, at most `MAX_KEY_BYTES`, no control characters.
pub fn check_key(key: &str) -> Result<(), String> {
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
