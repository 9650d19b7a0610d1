//! Who may ask. A web page the user opens can reach a daemon on loopback in two ways, and both
//! are refused before any route runs:
//!
//! - **DNS rebinding**: the page's own name (`rebind.example`) is made to resolve to 127.0.0.1,
//!   so its scripts read the daemon as if it were their own origin. Their requests still carry
//!   `Host: rebind.example:PORT`: a request whose `Host` (or absolute target) does not name this
//!   daemon is answered 421.
//! - **Cross-site writes**: a form or a `fetch` in no-cors mode can POST anywhere. A write (any
//!   method but GET, HEAD and OPTIONS) whose `Origin` is not this daemon's, or that the browser
//!   marks `Sec-Fetch-Site: cross-site`, is answered 403. Clients that send no `Origin` (curl,
//!   apps, cachetail's tools) are not browsers running someone else's page.
//!
//! The daemon's names: its listen address itself; `localhost` when it listens on loopback; any
//! IP address when it listens on every interface (`0.0.0.0`, `[::]`: a page can only send an
//! address as its `Host` by being served from that address, which is no rebinding); always with
//! the listen port; and whatever `[http] allowed_hosts` adds.

use std::net::{IpAddr, SocketAddr};

use hyper::header::{HOST, HeaderValue, ORIGIN};
use hyper::{Method, Request, StatusCode, Version};

use crate::config::{AllowedHost, split_host};

/// The names this daemon answers to.
pub struct Names {
    listen: SocketAddr,
    allowed: Vec<AllowedHost>,
    /// The `Host` values clients send most (the listen address as written, `localhost:PORT` on
    /// loopback), accepted by a comparison before any parsing: every request is checked.
    usual: Vec<String>,
}

impl Names {
    /// `listen` is the address actually bound (a config's port 0 is a real port here).
    pub fn new(listen: SocketAddr, allowed: Vec<AllowedHost>) -> Names {
        let mut usual = vec![listen.to_string()];
        if listen.ip().is_loopback() || listen.ip().is_unspecified() {
            usual.push(format!("localhost:{}", listen.port()));
        }
        Names {
            listen,
            allowed,
            usual,
        }
    }

    /// Whether `host` is one of the usual `Host` values (each of which `accepts` takes too).
    fn is_usual(&self, host: &HeaderValue) -> bool {
        let host = host.as_bytes();
        self.usual
            .iter()
            .any(|u| u.as_bytes().eq_ignore_ascii_case(host))
    }

    /// Whether `host` (lowercase, an IPv6 address without brackets) with `port` (None: the
    /// scheme's default, `default_port`) names this daemon.
    fn accepts(&self, host: &str, port: Option<u16>, default_port: u16) -> bool {
        if self.allowed.iter().any(|a| a.matches(host, port)) {
            return true;
        }
        if port.unwrap_or(default_port) != self.listen.port() {
            return false;
        }
        let listening = self.listen.ip();
        match host.parse::<IpAddr>() {
            Ok(address) => listening.is_unspecified() || address == listening,
            Err(_) => {
                host == "localhost" && (listening.is_loopback() || listening.is_unspecified())
            }
        }
    }

    /// The names, for an error message.
    fn describe(&self) -> String {
        let port = self.listen.port();
        let ip = self.listen.ip();
        let mut names = if ip.is_unspecified() {
            vec![
                format!("any IP address with port {port}"),
                format!("localhost:{port}"),
            ]
        } else {
            let mut own = vec![self.listen.to_string()];
            if ip.is_loopback() {
                own.push(format!("localhost:{port}"));
            }
            own
        };
        names.extend(self.allowed.iter().map(|a| match a {
            AllowedHost::Any => "*".to_owned(),
            AllowedHost::Name { host, port: None } => host.clone(),
            AllowedHost::Name {
                host,
                port: Some(port),
            } => format!("{host}:{port}"),
        }));
        names.join(", ")
    }
}

/// Why a request is refused: its status and what to do.
pub type Refusal = (StatusCode, String);

/// Checks a request's `Host` and, for a write, where it comes from. Err: the answer refusing it.
pub fn check<B>(names: &Names, request: &Request<B>) -> Result<(), Refusal> {
    check_host(names, request)?;
    if is_write(request.method()) {
        check_origin(names, request)?;
    }
    Ok(())
}

fn check_host<B>(names: &Names, request: &Request<B>) -> Result<(), Refusal> {
    let mut hosts = request.headers().get_all(HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err((
            StatusCode::BAD_REQUEST,
            "the request has more than one Host header".to_owned(),
        ));
    }
    // An absolute target (`GET http://host/path`) names the host the request is for, too.
    let target = request.uri().authority().map(|a| a.as_str());
    if target.is_none() && header.is_some_and(|h| names.is_usual(h)) {
        return Ok(());
    }
    if header.is_none() && target.is_none() {
        if request.version() == Version::HTTP_11 {
            return Err((
                StatusCode::BAD_REQUEST,
                "an HTTP/1.1 request needs a Host header".to_owned(),
            ));
        }
        return Ok(()); // HTTP/1.0 without a Host: not a browser
    }
    let given = header
        .map(HeaderValue::to_str)
        .into_iter()
        .chain(target.map(Ok));
    for text in given {
        let Ok(text) = text else {
            return Err(misdirected(names, "(not text)"));
        };
        match split_host(text.trim()) {
            Some((host, port)) if names.accepts(&host, port, 80) => {}
            _ => return Err(misdirected(names, text)),
        }
    }
    Ok(())
}

fn misdirected(names: &Names, host: &str) -> Refusal {
    (
        StatusCode::MISDIRECTED_REQUEST,
        format!(
            "the Host {host:?} does not name this daemon, which answers to {}: a page that rebinds its own name to this address is refused. If it is one of the daemon's names (a proxy's, a DNS name), add it to `[http] allowed_hosts`",
            names.describe()
        ),
    )
}

/// Methods a form or a no-cors `fetch` from any page could send with an effect.
fn is_write(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

fn check_origin<B>(names: &Names, request: &Request<B>) -> Result<(), Refusal> {
    let headers = request.headers();
    let cross_site = headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"));
    let foreign_origin = headers
        .get_all(ORIGIN)
        .iter()
        .find(|origin| !origin_is_ours(names, origin));
    if !cross_site && foreign_origin.is_none() {
        return Ok(());
    }
    let from = foreign_origin.map_or_else(
        || "Sec-Fetch-Site: cross-site".to_owned(),
        |origin| format!("Origin {:?}", String::from_utf8_lossy(origin.as_bytes())),
    );
    Err((
        StatusCode::FORBIDDEN,
        format!(
            "cross-origin {} refused ({from}): writes are taken from the daemon's own pages and from clients that send no Origin (curl, apps), not from another site's page",
            request.method()
        ),
    ))
}

/// Whether an `Origin` (`scheme://host[:port]`) is this daemon (its port defaulting to the
/// scheme's). `null` (a sandboxed page, a file) is not.
fn origin_is_ours(names: &Names, origin: &HeaderValue) -> bool {
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let Some((scheme, authority)) = origin.trim().split_once("://") else {
        return false;
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return false,
    };
    split_host(authority).is_some_and(|(host, port)| names.accepts(&host, port, default_port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(listen: &str, allowed: &[&str]) -> Names {
        let allowed = allowed
            .iter()
            .map(|a| AllowedHost::parse(a).expect("valid"))
            .collect();
        Names::new(listen.parse().expect("an address"), allowed)
    }

    fn status(names: &Names, method: &str, target: &str, headers: &[(&str, &str)]) -> u16 {
        let mut request = Request::builder().method(method).uri(target);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(()).expect("a request");
        check(names, &request).map_or_else(|(status, _)| status.as_u16(), |()| 200)
    }

    #[test]
    fn a_loopback_daemon_answers_to_its_address_and_localhost_only() {
        let loopback = names("127.0.0.1:8080", &[]);
        let host = |h: &str| status(&loopback, "GET", "/v1/status", &[("Host", h)]);
        assert_eq!(host("127.0.0.1:8080"), 200);
        assert_eq!(host("localhost:8080"), 200);
        assert_eq!(host("LOCALHOST.:8080"), 200);
        assert_eq!(host("localhost"), 421, "port 80 is another origin");
        assert_eq!(host("127.0.0.2:8080"), 421);
        assert_eq!(host("[::1]:8080"), 421, "not the address it listens on");
        assert_eq!(host("rebind.example:8080"), 421);
        assert_eq!(host("localhost:8080/x"), 421);
        assert_eq!(status(&loopback, "GET", "/v1/status", &[]), 400);
        let v6 = names("[::1]:9000", &[]);
        assert_eq!(status(&v6, "GET", "/", &[("Host", "[::1]:9000")]), 200);
        assert_eq!(status(&v6, "GET", "/", &[("Host", "localhost:9000")]), 200);
        let lan = names("10.0.0.5:80", &[]);
        assert_eq!(status(&lan, "GET", "/", &[("Host", "10.0.0.5")]), 200);
        assert_eq!(status(&lan, "GET", "/", &[("Host", "localhost")]), 421);
    }

    #[test]
    fn a_wildcard_daemon_answers_to_any_address_and_the_names_listed() {
        let any = names("0.0.0.0:8080", &["cache.internal"]);
        let host = |h: &str| status(&any, "GET", "/", &[("Host", h)]);
        assert_eq!(host("192.0.2.7:8080"), 200);
        assert_eq!(host("[2001:db8::1]:8080"), 200);
        assert_eq!(host("192.0.2.7:8081"), 421);
        assert_eq!(host("cache.internal"), 200);
        assert_eq!(host("rebind.example:8080"), 421);
        let open = names("127.0.0.1:8080", &["*"]);
        assert_eq!(status(&open, "GET", "/", &[("Host", "anything:1")]), 200);
    }

    #[test]
    fn writes_from_another_origin_are_refused() {
        let daemon = names("127.0.0.1:8080", &[]);
        let post = |headers: &[(&str, &str)]| {
            let mut all = vec![("Host", "127.0.0.1:8080")];
            all.extend_from_slice(headers);
            status(&daemon, "POST", "/v1/admin/flush", &all)
        };
        assert_eq!(post(&[]), 200);
        assert_eq!(post(&[("Origin", "http://127.0.0.1:8080")]), 200);
        assert_eq!(post(&[("Origin", "http://localhost:8080")]), 200);
        assert_eq!(post(&[("Sec-Fetch-Site", "same-origin")]), 200);
        assert_eq!(post(&[("Origin", "http://evil.example")]), 403);
        assert_eq!(post(&[("Origin", "null")]), 403);
        assert_eq!(post(&[("Origin", "http://127.0.0.1:8081")]), 403);
        assert_eq!(post(&[("Origin", "https://127.0.0.1:8080")]), 200);
        assert_eq!(post(&[("Origin", "ftp://127.0.0.1:8080")]), 403);
        assert_eq!(post(&[("Sec-Fetch-Site", "Cross-Site")]), 403);
        let get = status(
            &daemon,
            "GET",
            "/v1/status",
            &[
                ("Host", "127.0.0.1:8080"),
                ("Origin", "http://evil.example"),
            ],
        );
        assert_eq!(
            get, 200,
            "a read is the browser's to withhold (no CORS grant)"
        );
    }
}
