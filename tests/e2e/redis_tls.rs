//! Redis over TLS (`rediss://`) against a real `redis-server` serving TLS only, with a CA and a
//! server certificate (for 127.0.0.1 and localhost) the test makes with the `openssl` CLI: with
//! `[cache] tls_ca` naming that CA, values are stored in and read from Redis, a write-through
//! change is fresh through the daemon and in Redis (read by `redis-cli --tls`); with a CA that did
//! not sign the server's certificate, the daemon never talks to it: reads answer from the
//! database, `/v1/status` says why (without the password), and nothing is stored.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::common::*;
use crate::strategies::catalog_config;

const PREFIX: &str = "tls:";
/// The Redis password, in the URL too: it must show up nowhere.
const PASSWORD: &str = "hunter2-over-tls";

/// Runs `openssl` with `args` in `dir`; panics with its output if it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (apt-get install openssl)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A self-signed CA in `dir`: `{name}.pem` and `{name}.key`.
fn make_ca(dir: &Path, name: &str) -> PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN=cachetail test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    dir.join(format!("{name}.pem"))
}

/// A server certificate for 127.0.0.1 and localhost signed by the CA `ca`: `server.pem`,
/// `server.key`.
fn make_server_cert(dir: &Path, ca: &str) {
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write server.ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
}

/// A `redis-server` that serves TLS only (`--port 0`), on a free loopback port, with a password;
/// killed when dropped.
struct TlsRedis {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl TlsRedis {
    /// Makes the CA `ca` and the server's certificate, and starts Redis with them.
    fn start() -> TlsRedis {
        let dir = tempfile::tempdir().expect("temp dir");
        make_ca(dir.path(), "ca");
        make_server_cert(dir.path(), "ca");
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args([
                "--tls-cert-file",
                "server.pem",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                PASSWORD,
            ])
            .arg("--dir")
            .arg(dir.path())
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs (apt-get install redis-server)");
        let redis = TlsRedis { child, port, dir };
        eventually("redis-server answers PING over TLS", || {
            (redis.cli(&["PING"]) == "PONG").then_some(())
        });
        redis
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// `redis-cli --tls`, verifying the server against the CA; its output, trimmed.
    fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["--tls", "--cacert"])
            .arg(self.ca())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["--no-auth-warning", "--raw", "-a", PASSWORD])
            .args(args)
            .output()
            .expect("redis-cli runs (apt-get install redis-tools)");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    fn url(&self) -> String {
        format!("rediss://:{PASSWORD}@127.0.0.1:{}/0", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The catalog config (write-through) on Redis at `url`, verified against `ca`.
fn tls_config(port: u16, url: &str, ca: &Path) -> String {
    catalog_config(port, "write-through", "20ms").replace(
        "[tail]\npoll_interval = \"100ms\"",
        &format!(
            "[tail]\npoll_interval = \"100ms\"\n\n[cache]\nbackend = \"redis\"\nurl = \"{url}\"\nprefix = \"{PREFIX}\"\ntls_ca = \"{}\"",
            ca.display()
        ),
    )
}

#[test]
fn rediss_with_a_ca_file_stores_values_and_a_write_through_change_is_fresh() {
    let redis = TlsRedis::start();
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &tls_config(port, &redis.url(), &redis.ca()), port);
    eventually("the daemon reaches redis over TLS", || {
        (daemon.status()["redis"]["ok"] == true).then_some(())
    });
    let first = daemon.get("book:1");
    assert_eq!((first.status, x_cache(&first)), (200, "miss"));
    assert_eq!(x_cache(&daemon.get("book:1")), "hit");
    let key = format!("{PREFIX}book:1");
    assert_eq!(redis.cli(&["GET", &key]), first.text(), "stored in redis");

    // A write-through change: recomputed, stored in Redis, and fresh through the daemon.
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 1)')");
    let fresh = daemon.get_path("/v1/keys/book:1?fresh=1");
    assert_eq!(fresh.status, 200, "{}", fresh.text());
    let expected = daemon.get_uncached("book:1").text();
    assert_ne!(expected, first.text(), "the change altered book:1");
    assert_eq!(fresh.text(), expected, "?fresh=1 answers the change");
    eventually("the recomputed value is stored in redis", || {
        (redis.cli(&["GET", &key]) == expected).then_some(())
    });
    let again = daemon.get("book:1");
    assert_eq!((x_cache(&again), again.text()), ("hit", expected.clone()));
    let status = daemon.status();
    assert_eq!(status["redis"]["ok"], true, "{status}");
    let clients = redis.cli(&["CLIENT", "LIST"]);
    assert!(
        clients.lines().count() >= 2,
        "the daemon is connected over TLS: {clients}"
    );
    daemon.stop();
}

#[test]
fn rediss_with_a_ca_that_did_not_sign_the_server_answers_from_the_database_and_stores_nothing() {
    let redis = TlsRedis::start();
    let other = tempfile::tempdir().expect("temp dir");
    let wrong_ca = make_ca(other.path(), "other-ca");
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &tls_config(port, &redis.url(), &wrong_ca), port);
    let status = eventually("the daemon reports the refused certificate", || {
        let status = daemon.status();
        status["redis"]["last_error"].is_string().then_some(status)
    });
    let error = status["redis"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(status["redis"]["ok"], false, "{status}");
    assert!(
        error.to_lowercase().contains("certificate"),
        "the error says the certificate is not trusted: {error}"
    );
    for _ in 0..3 {
        let reply = daemon.get("book:1");
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(
            (x_cache(&reply), reply.header("X-Cachetail-Bypass")),
            ("bypass", Some("redis-unavailable"))
        );
    }
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 1)')");
    // The change is read from the database at once (`?fresh=1` would wait for an apply that
    // needs Redis: the tail cannot take its lease there).
    let expected = daemon.get_uncached("book:1").text();
    let after = daemon.get("book:1");
    assert_eq!(
        (after.status, x_cache(&after), after.text()),
        (200, "bypass", expected),
        "answered from the database"
    );
    assert!(
        error.contains("UnknownIssuer")
            || error.contains("not trusted")
            || error.contains("unknown"),
        "{error}"
    );
    assert_eq!(redis.cli(&["DBSIZE"]), "0", "nothing stored in redis");
    for text in [
        daemon.get_path("/v1/status").text(),
        daemon.get_path("/metrics").text(),
    ] {
        assert!(!text.contains("hunter2"), "a secret shows: {text}");
    }
    daemon.stop();
}

/// A `tls_ca` that is no file of certificates: `/dev/zero` (endless) or a FIFO (blocks until a
/// writer comes). `cachetail check` refuses each at once with its place in the file, instead of
/// reading forever (memory without bound) or hanging.
#[test]
fn a_tls_ca_that_is_endless_or_no_regular_file_is_refused_at_once() {
    let catalog = Catalog::new();
    let fifo = catalog.path().join("ca.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    for ca in [Path::new("/dev/zero"), fifo.as_path()] {
        let config =
            catalog.write_config(&tls_config(free_port(), "rediss://127.0.0.1:6390/0", ca));
        let mut child = Command::new(env!("CARGO_BIN_EXE_cachetail"))
            .args(["check", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cachetail check");
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if started.elapsed() > std::time::Duration::from_secs(15) {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "`cachetail check` still runs after 15 s with tls_ca = {}",
                    ca.display()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
            .expect("stderr");
        assert!(!status.success(), "{} accepted: {stderr}", ca.display());
        assert!(
            stderr.contains("cache.tls_ca") && stderr.contains("regular file"),
            "{}: {stderr}",
            ca.display()
        );
    }
}
