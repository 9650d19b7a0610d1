//! A web page in the user's browser cannot use a loopback daemon (issue 14, item 11): a request
//! whose `Host` does not name the daemon (a page that rebound its own DNS name to 127.0.0.1) is
//! refused with 421, and a cross-site write (an `Origin` that is not the daemon's, or
//! `Sec-Fetch-Site: cross-site`) with 403. `allowed_hosts` names the daemon's other names.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;
use crate::limits::raw;
use crate::strategies::catalog_config;

const TOKEN: &str = "a-long-enough-admin-token";

/// `request` (the request line), with `headers`, answered: (status, head lines, body).
fn ask(address: SocketAddr, line: &str, headers: &[&str]) -> (u16, Vec<String>, String) {
    let mut request = format!("{line}\r\nConnection: close\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    if line.starts_with("POST") || line.starts_with("DELETE") {
        request.push_str("Content-Length: 0\r\n");
    }
    request.push_str("\r\n");
    raw(address, &request, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{line}: {e}"))
}

#[test]
fn a_page_that_rebinds_its_name_to_the_daemon_reads_nothing() {
    let (_catalog, mut daemon) = {
        let catalog = Catalog::new();
        let port = free_port();
        let daemon = Daemon::start(&catalog, &catalog_config(port, "delete", "50ms"), port);
        (catalog, daemon)
    };
    let address = daemon.address;
    let port = address.port();
    assert_eq!(daemon.get("book:1").status, 200);
    // The attacker's page at http://rebind.example:PORT, its name now resolving to 127.0.0.1.
    for path in [
        "/v1/keys/book:1",
        "/v1/status",
        "/v1/events",
        "/ui",
        "/metrics",
        "/healthz",
    ] {
        let (status, _, body) = ask(
            address,
            &format!("GET {path} HTTP/1.1"),
            &[&format!("Host: rebind.example:{port}")],
        );
        assert_eq!(status, 421, "{path}: {body}");
        assert!(body.contains("allowed_hosts"), "{path}: {body}");
        assert!(!body.contains("Book 1"), "{path}: {body}");
    }
    // An absolute request target names the host too.
    let (status, _, _) = ask(
        address,
        &format!("GET http://rebind.example:{port}/v1/status HTTP/1.1"),
        &[&format!("Host: 127.0.0.1:{port}")],
    );
    assert_eq!(status, 421);
    // HTTP/1.1 requires a Host.
    let (status, _, body) = ask(address, "GET /v1/status HTTP/1.1", &[]);
    assert_eq!(status, 400, "{body}");
    // The daemon's own names pass, in any letter case.
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("LocalHost:{port}"),
    ] {
        let (status, _, body) = ask(
            address,
            "GET /v1/keys/book:1 HTTP/1.1",
            &[&format!("Host: {host}")],
        );
        assert_eq!(status, 200, "{host}: {body}");
    }
    // Another port is another origin.
    let (status, _, _) = ask(
        address,
        "GET /v1/keys/book:1 HTTP/1.1",
        &[&format!("Host: localhost:{}", port ^ 1)],
    );
    assert_eq!(status, 421);
}

#[test]
fn cross_site_writes_are_refused_same_origin_ones_served() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog_config(port, "delete", "50ms")
        .replace("listen =", &format!("admin_token = \"{TOKEN}\"\nlisten ="));
    let mut daemon = Daemon::start(&catalog, &config, port);
    let address = daemon.address;
    let host = format!("Host: {address}");
    let auth = format!("Authorization: Bearer {TOKEN}");
    assert_eq!(daemon.get("book:1").status, 200);
    // A page elsewhere posting to the daemon: a form, or fetch() in no-cors mode.
    for (line, extra) in [
        (
            "POST /v1/admin/flush HTTP/1.1",
            "Origin: http://evil.example",
        ),
        ("POST /v1/admin/flush HTTP/1.1", "Origin: null"),
        (
            "POST /v1/admin/flush HTTP/1.1",
            "Sec-Fetch-Site: cross-site",
        ),
        (
            "POST /v1/admin/invalidate?tag=books HTTP/1.1",
            "Origin: http://localhost:1",
        ),
        (
            "DELETE /v1/keys/book:1 HTTP/1.1",
            "Origin: https://127.0.0.1",
        ),
        ("POST /v1/verify HTTP/1.1", "Origin: http://evil.example"),
        ("POST /v1/keys HTTP/1.1", "Origin: http://evil.example"),
    ] {
        let (status, _, body) = ask(address, line, &[&host, &auth, extra]);
        assert_eq!(status, 403, "{line} with {extra}: {body}");
        assert!(body.contains("cross-origin"), "{line} with {extra}: {body}");
    }
    let cached = daemon.peek("book:1");
    assert_eq!(cached.status, 200, "nothing was flushed or deleted");
    // The dashboard's own requests (same origin), and tools that send no Origin at all.
    let origin = format!("Origin: http://{address}");
    for extra in [
        origin.as_str(),
        "Sec-Fetch-Site: same-origin",
        "Sec-Fetch-Site: none",
        "X-Nothing: 1",
    ] {
        let (status, _, body) = ask(
            address,
            "POST /v1/admin/invalidate?tag=books HTTP/1.1",
            &[&host, &auth, extra],
        );
        assert_eq!(status, 200, "{extra}: {body}");
    }
    // Reads from another origin are answered, but without a CORS grant the page cannot read them.
    let (status, head, _) = ask(
        address,
        "GET /v1/keys/book:1 HTTP/1.1",
        &[&host, "Origin: http://evil.example"],
    );
    assert_eq!(status, 200);
    assert!(
        !head
            .iter()
            .any(|h| h.starts_with("access-control-allow-origin")),
        "{head:?}"
    );
}

#[test]
fn allowed_hosts_adds_names_and_a_wildcard_listen_takes_ip_addresses() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog_config(port, "delete", "50ms")
        .replace("listen = \"127.0.0.1:", "listen = \"0.0.0.0:")
        + "\n[http]\nallowed_hosts = [\"cache.internal\", \"proxy.example:8443\"]\n";
    let mut daemon = Daemon::start(&catalog, &config, port);
    let address = daemon.address;
    for (host, expected) in [
        (format!("cache.internal:{port}"), 200),
        ("cache.internal".to_owned(), 200),
        ("proxy.example:8443".to_owned(), 200),
        ("proxy.example:8080".to_owned(), 421),
        (format!("10.1.2.3:{port}"), 200),
        (format!("[::1]:{port}"), 200),
        (format!("localhost:{port}"), 200),
        (format!("rebind.example:{port}"), 421),
        ("10.1.2.3:1".to_owned(), 421),
    ] {
        let (status, _, body) = ask(
            address,
            "GET /v1/keys/book:1 HTTP/1.1",
            &[&format!("Host: {host}")],
        );
        assert_eq!(status, expected, "{host}: {body}");
    }
    // The binary's own tools reach a daemon listening on every interface.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cachetail"))
        .args(["verify", "--config"])
        .arg(&daemon.config)
        .output()
        .expect("cachetail verify runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(daemon.get("user:1").status, 200);
}

#[test]
fn check_refuses_an_allowed_host_that_is_not_a_host() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog_config(port, "delete", "50ms")
        + "\n[http]\nallowed_hosts = [\"http://cache.internal\", \"\"]\n";
    let path = catalog.write_config(&config);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cachetail"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("cachetail check runs");
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("http.allowed_hosts"), "{said}");
    assert!(said.contains("config.toml:"), "{said}");
}
