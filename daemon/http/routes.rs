//! The routes: a `matchit` table from path to route, then each route's methods. A path no
//! route matches is a 404, a method a route does not take a 405 with `Allow`.

use std::sync::LazyLock;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::reply::{self, Body};
use super::{Http, admin, keys, ui};
use crate::types::AdminAction;

/// What a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/v1/keys/{key}` (the key may hold `/`), and `/v1/keys/` (an empty key).
    Key,
    EmptyKey,
    /// `/v1/keys`: the multi-get.
    Keys,
    Health,
    Status,
    Events,
    Metrics,
    Verify,
    AdminInvalidate,
    AdminFlush,
    Home,
    Ui,
}

static ROUTES: LazyLock<matchit::Router<Route>> = LazyLock::new(|| {
    let mut router = matchit::Router::new();
    for (path, route) in [
        ("/v1/keys/{*key}", Route::Key),
        ("/v1/keys/", Route::EmptyKey),
        ("/v1/keys", Route::Keys),
        ("/healthz", Route::Health),
        ("/v1/status", Route::Status),
        ("/v1/events", Route::Events),
        ("/metrics", Route::Metrics),
        ("/v1/verify", Route::Verify),
        ("/v1/admin/invalidate", Route::AdminInvalidate),
        ("/v1/admin/flush", Route::AdminFlush),
        ("/", Route::Home),
        ("/ui", Route::Ui),
        ("/ui/{*asset}", Route::Ui),
    ] {
        // The table is fixed: a conflict is a bug caught by the unit test below.
        if let Err(e) = router.insert(path, route) {
            tracing::error!(path, error = %e, "a route could not be registered");
        }
    }
    router
});

/// The route a path names.
pub fn route(path: &str) -> Option<Route> {
    ROUTES.at(path).ok().map(|matched| *matched.value)
}

/// The key a `/v1/keys/{key}` path names, as written (percent-encoded).
pub fn raw_key(path: &str) -> &str {
    path.strip_prefix("/v1/keys/").unwrap_or_default()
}

/// Answers a request (every route but the live feed, which streams).
pub async fn dispatch(http: &Http, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let Some(route) = route(&path) else {
        return reply::error(
            StatusCode::NOT_FOUND,
            format!("no route {path}: try GET /v1/keys/{{key}} or GET /v1/status"),
        );
    };
    let method = request.method().clone();
    match (route, method) {
        (Route::Key, Method::GET) => keys::get(http, raw_key(&path), &request).await,
        (Route::Key | Route::EmptyKey, Method::DELETE) => match keys::decode_key(raw_key(&path)) {
            Ok(key) => {
                let key = key.into_owned();
                admin::act(http, request.headers(), AdminAction::Key(key)).await
            }
            Err(problem) => reply::malformed_key(&problem),
        },
        (Route::EmptyKey, Method::GET) => reply::malformed_key("the key is empty"),
        (Route::Key | Route::EmptyKey, _) => reply::method_not_allowed("GET, DELETE"),
        (Route::Keys, Method::POST) => keys::multi_get(http, request).await,
        (Route::Keys, _) => reply::method_not_allowed("POST"),
        (Route::AdminInvalidate | Route::AdminFlush, Method::POST) => {
            match admin::action_of(&path, request.uri().query()) {
                Ok(action) => admin::act(http, request.headers(), action).await,
                Err((status, message)) => reply::error(status, message),
            }
        }
        (Route::AdminInvalidate | Route::AdminFlush | Route::Verify, _)
            if request.method() != Method::POST =>
        {
            reply::method_not_allowed("POST")
        }
        (Route::Verify, _) => super::report::verify(http, &request).await,
        (Route::Health, Method::GET) => reply::response(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"ok\n"),
        ),
        (Route::Status, Method::GET) => super::report::status(http).await,
        (Route::Metrics, Method::GET) => super::report::metrics(http).await,
        (Route::Home, Method::GET) => home(&request),
        (Route::Ui, Method::GET) => match ui::find(&path) {
            Some(asset) => ui::serve_asset(request.headers(), asset),
            None => reply::error(
                StatusCode::NOT_FOUND,
                format!("no route {path}: the dashboard is at /ui"),
            ),
        },
        _ => reply::method_not_allowed("GET"),
    }
}

/// `GET /`: a page linking the dashboard for a browser, JSON for anything else.
fn home(request: &Request<Incoming>) -> Response<Body> {
    let wants_html = request
        .headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("text/html")));
    if wants_html {
        return reply::response(
            StatusCode::OK,
            "text/html; charset=utf-8",
            Bytes::from_static(ui::HOME.as_bytes()),
        );
    }
    reply::json(
        StatusCode::OK,
        &json!({"name": "cachetail", "dashboard": "/ui", "routes": ["/v1/keys/{key}", "POST /v1/keys", "/v1/status", "/v1/events", "/metrics", "/v1/verify", "/healthz", "/ui"]}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_finds_its_route() {
        assert_eq!(route("/v1/keys/book:1"), Some(Route::Key));
        assert_eq!(route("/v1/keys/a/b%2Fc"), Some(Route::Key));
        assert_eq!(route("/v1/keys/"), Some(Route::EmptyKey));
        assert_eq!(route("/v1/keys"), Some(Route::Keys));
        assert_eq!(route("/v1/events"), Some(Route::Events));
        assert_eq!(route("/v1/admin/flush"), Some(Route::AdminFlush));
        assert_eq!(route("/ui"), Some(Route::Ui));
        assert_eq!(route("/ui/app.js"), Some(Route::Ui));
        assert_eq!(route("/"), Some(Route::Home));
        assert_eq!(route("/nope"), None);
        assert_eq!(route("/v1/statusx"), None);
        assert_eq!(
            ROUTES.at("/healthz").ok().map(|m| *m.value),
            Some(Route::Health)
        );
    }
}
