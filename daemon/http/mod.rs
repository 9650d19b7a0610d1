//! HTTP: the endpoint apps read through (hyper 1, HTTP/1.1 with keep-alive).
//!
//! `keys` answers `GET /v1/keys/{key}` and the multi-get from the cache; `admin` carries out
//! operators' invalidations behind the token; `events` streams the live feed; `report` serves
//! status, metrics and verify; `ui` the dashboard; `routes` maps paths to all of them; `guard`
//! refuses what a web page could send (a `Host` that is not the daemon's, a cross-site write).
//! A client's mistake gets a 4xx with a JSON error, never a 5xx; no client can hold the endpoint
//! (connections, header and request timeouts, a bound on request heads, live feeds on slots of
//! their own).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::config::HttpSettings;
use crate::ops::Sources;
use crate::tail::Feed;

mod admin;
mod events;
mod guard;
mod keys;
mod reply;
mod report;
mod routes;
mod ui;

/// A request's line and headers, at most: 431 past it.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How long open connections get to finish after shutdown is asked for.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the endpoint reads: the stages' state, the live feed, and the shutdown signal (long
/// streams end on it).
#[derive(Clone)]
pub struct Http {
    pub sources: Sources,
    pub feed: Feed,
    pub stopping: watch::Receiver<bool>,
}

/// What every connection shares: the limits read at start, the live feeds' places, and the
/// names the daemon answers to.
struct Limits {
    request_timeout: Duration,
    header_timeout: Duration,
    max_event_streams: usize,
    streams: Arc<Semaphore>,
    names: guard::Names,
}

/// A connection's place among `max_connections`: given back when the connection ends, or as
/// soon as it turns into a live feed (which never ends, and has a place of its own).
type Slot = Mutex<Option<OwnedSemaphorePermit>>;

/// What one connection's requests read: cloned once per connection, so a request takes one
/// count on its own connection's `Arc` rather than a count on each of the shared stages' (lines
/// every connection's requests would pass back and forth between threads).
struct Connection {
    http: Http,
    limits: Arc<Limits>,
    slot: Slot,
}

/// An answer's body: whole (every route but one), or the live feed's stream.
type Reply = Either<Full<Bytes>, BoxBody<Bytes, Infallible>>;

/// Accepts connections until `stopping` turns true, then lets in-flight requests finish.
pub async fn serve(http: Http, listener: TcpListener, settings: HttpSettings) {
    let graceful = GracefulShutdown::new();
    // At most `max_connections` served at once: past it, new ones wait in the listen backlog.
    let connections = Arc::new(Semaphore::new(settings.max_connections));
    // The address bound, not the config's: a `listen` on port 0 serves on a port of its own.
    let bound = listener
        .local_addr()
        .unwrap_or(http.sources.registry.config().listen);
    let limits = Arc::new(Limits {
        request_timeout: settings.request_timeout,
        header_timeout: settings.header_timeout,
        max_event_streams: settings.max_event_streams,
        streams: Arc::new(Semaphore::new(settings.max_event_streams)),
        names: guard::Names::new(bound, settings.allowed_hosts.clone()),
    });
    let mut stopping = http.stopping.clone();
    let stop = async move {
        // The guard `wait_for` answers with is dropped at once (it is not `Send`).
        stopping.wait_for(|&s| s).await.ok();
    };
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = &mut stop => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let state = Arc::new(Connection {
            http: http.clone(),
            limits: Arc::clone(&limits),
            slot: Mutex::new(Some(permit)),
        });
        let connection = graceful.watch(connection(stream, state));
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections were still open after {DRAIN_TIMEOUT:?}; closing them");
    }
}

/// One client connection: its requests answered in turn, within the limits. Its slot is held
/// by the service, so it goes back when the connection ends (or earlier, for a live feed).
fn connection(
    stream: TcpStream,
    state: Arc<Connection>,
) -> impl hyper_util::server::graceful::GracefulConnection + use<> {
    let _ = stream.set_nodelay(true);
    let header_timeout = state.limits.header_timeout;
    let service = service_fn(move |request| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(answer(&state, request).await) }
    });
    // hyper refuses a head that fills its buffer before it ends (its own 431), but a head that
    // arrives in one large read can be parsed past it: `head_bytes` holds every request to the
    // limit, whatever the reads were.
    http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), service)
}

/// One request's answer. A request (its fill included) that takes too long gets a 503, and its
/// connection is free again; the work it started stops with it (a query nobody waits for is
/// interrupted). A GET of a value in memory is answered at once, with no timeout armed (it
/// awaits nothing). The live feed streams.
async fn answer(connection: &Connection, request: Request<Incoming>) -> Response<Reply> {
    let Connection { http, limits, slot } = connection;
    if head_bytes(&request) > MAX_HEAD_BYTES {
        return reply::error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("the request's head is over {MAX_HEAD_BYTES} bytes"),
        )
        .map(Either::Left);
    }
    if let Err((status, message)) = guard::check(&limits.names, &request) {
        return reply::error(status, message).map(Either::Left);
    }
    match routes::route(request.uri().path()) {
        Some(routes::Route::Events) => {
            return events_stream(http, &request, limits, slot).map(Either::Right);
        }
        Some(routes::Route::Key) if request.method() == Method::GET => {
            let raw_key = routes::raw_key(request.uri().path());
            if let Some(response) = keys::get_at_once(http, raw_key, &request) {
                return response.map(Either::Left);
            }
        }
        _ => {}
    }
    let timeout = limits.request_timeout;
    tokio::time::timeout(timeout, routes::dispatch(http, request))
        .await
        .unwrap_or_else(|_| {
            reply::error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no answer within http.request_timeout ({timeout:?})"),
            )
        })
        .map(Either::Left)
}

/// `GET /v1/events`: the live feed, as Server-Sent Events, on a place of its own among
/// `max_event_streams` (503 past it). The connection gives its own slot back: a feed never
/// ends, and must not keep key reads, health checks or admin calls waiting. It closes when the
/// feed ends, so it never serves a request again without a slot.
fn events_stream(
    http: &Http,
    request: &Request<Incoming>,
    limits: &Limits,
    slot: &Slot,
) -> Response<BoxBody<Bytes, Infallible>> {
    if request.method() != Method::GET {
        return reply::method_not_allowed("GET").map(BodyExt::boxed);
    }
    let Ok(place) = Arc::clone(&limits.streams).try_acquire_owned() else {
        let max = limits.max_event_streams;
        return reply::busy(format!(
            "{max} live feeds are open already, the most `http.max_event_streams` allows: close one (a dashboard tab, a `cachetail watch`) or raise the setting"
        ))
        .map(BodyExt::boxed);
    };
    drop(slot.lock().unwrap_or_else(|e| e.into_inner()).take());
    let mut response = Response::new(BodyExt::boxed(events::subscribe(http, place)));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    headers.insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    response
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
}
