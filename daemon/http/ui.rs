//! The dashboard, `GET /ui`: one page and its script and style, compiled into the binary (no
//! CDN, no build step). The page reads `GET /v1/status` and the live feed `GET /v1/events`, and
//! sends admin actions only with a token the operator types in (the API's own check applies).

use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};

use super::reply::{self, Body};

/// A file of the page.
pub struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

const ASSETS: [Asset; 3] = [
    Asset {
        path: "/ui",
        content_type: "text/html; charset=utf-8",
        body: include_str!("ui/index.html"),
    },
    Asset {
        path: "/ui/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("ui/app.js"),
    },
    Asset {
        path: "/ui/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("ui/style.css"),
    },
];

/// The page's own scripts, styles and requests only: nothing inline, nothing from elsewhere, and
/// no framing (clickjacking).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// The asset at `path` (`/ui/` is the page too).
pub fn find(path: &str) -> Option<&'static Asset> {
    let path = if path == "/ui/" { "/ui" } else { path };
    ASSETS.iter().find(|asset| asset.path == path)
}

/// A file of the dashboard, with its validator and the page's security headers.
pub fn serve_asset(request: &HeaderMap, asset: &Asset) -> Response<Body> {
    let mut answer = reply::response(
        StatusCode::OK,
        asset.content_type,
        Bytes::from_static(asset.body.as_bytes()),
    );
    let headers = answer.headers_mut();
    for (name, value) in [
        (hyper::header::CACHE_CONTROL, "no-cache"),
        (
            hyper::header::CONTENT_SECURITY_POLICY,
            CONTENT_SECURITY_POLICY,
        ),
        (hyper::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (hyper::header::REFERRER_POLICY, "no-referrer"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers.insert(
        hyper::header::ETAG,
        reply::etag(crate::fnv1a(asset.body.as_bytes())),
    );
    reply::not_modified_if_matching(request, answer)
}

/// `GET /` from a browser: where things are.
pub const HOME: &str = "<!doctype html><html lang=\"en\"><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>cachetail</title>\
<h1>cachetail</h1><p><a href=\"/ui\">Open the dashboard</a></p><ul>\
<li><a href=\"/v1/status\">/v1/status</a><li><a href=\"/metrics\">/metrics</a>\
<li>/v1/events (the live feed)<li>/v1/keys/{key}</ul></html>";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_only_embedded_assets() {
        let page = find("/ui").map(|a| a.body).unwrap_or_default();
        for reference in ["/ui/app.js", "/ui/style.css"] {
            assert!(page.contains(reference), "the page must load {reference}");
            assert!(find(reference).is_some(), "{reference} must be embedded");
        }
        assert!(!page.contains("http://") && !page.contains("https://"));
        assert!(
            !page.contains("<script>"),
            "no inline script: the CSP forbids it"
        );
        assert_eq!(find("/ui/").map(|a| a.path), Some("/ui"));
        assert!(find("/ui/../Cargo.toml").is_none());
    }
}
