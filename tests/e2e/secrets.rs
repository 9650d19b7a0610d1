//! Credentials stay secret: a mistyped `cache.url` holding the Redis password, reloaded into a
//! running daemon, shows up nowhere anyone can read (`/v1/status`, the live feed, `/metrics`, the
//! daemon's log, `cachetail check`'s output), and a password or user name percent-encoded in the
//! URL is decoded before it is sent, against a real `redis-server` started with
//! `--requirepass` and an ACL user made with `ACL SETUSER`.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::common::*;
use crate::strategies::catalog_config;

/// A Redis password that needs no escaping in a URL.
const PLAIN: &str = "hunter2-the-redis-password";
/// A Redis password with characters a URL must percent-encode, and as a URL writes it.
const PASSWORD: &str = "hunter2 p@ss/w:rd%ü";
const PASSWORD_IN_URL: &str = "hunter2%20p%40ss%2Fw%3Ard%25%C3%BC";
const ADMIN_TOKEN: &str = "the-admin-token-nobody-may-read";
const PREFIX: &str = "sec:";

/// A `redis-server` on a free loopback port started with `--requirepass`; killed when dropped.
struct LockedRedis {
    child: Child,
    port: u16,
    password: &'static str,
    _dir: tempfile::TempDir,
}

impl LockedRedis {
    fn start(password: &'static str) -> LockedRedis {
        let port = free_port();
        let dir = tempfile::tempdir().expect("temp dir");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--requirepass", password])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs (apt-get install redis-server)");
        let redis = LockedRedis {
            child,
            port,
            password,
            _dir: dir,
        };
        eventually("redis-server answers PING", || {
            (redis.cli(&["PING"]).trim() == "PONG").then_some(())
        });
        redis
    }

    /// `redis-cli` as the default user (with the password); its output, trimmed.
    fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--no-auth-warning", "--raw"])
            .args(["-a", self.password])
            .args(args)
            .output()
            .expect("redis-cli runs (apt-get install redis-tools)");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

impl Drop for LockedRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The catalog config on the Redis backend at `url`, with an admin token.
fn config_with_url(port: u16, url: &str) -> String {
    format!(
        "admin_token = \"{ADMIN_TOKEN}\"\n{}",
        catalog_config(port, "write-through", "20ms").replace(
            "[tail]\npoll_interval = \"100ms\"",
            &format!(
                "[tail]\npoll_interval = \"100ms\"\n\n[cache]\nbackend = \"redis\"\nurl = \"{url}\"\nprefix = \"{PREFIX}\""
            ),
        )
    )
}

/// Every form the secrets could take in text: as written, decoded, and their distinctive parts.
fn secret_forms() -> Vec<&'static str> {
    vec![
        PLAIN,
        PASSWORD,
        PASSWORD_IN_URL,
        "hunter2",
        "p@ss/w:rd",
        "p%40ss",
        ADMIN_TOKEN,
    ]
}

/// Panics if `text` (from `source`) holds any form of a secret.
fn assert_no_secret(source: &str, text: &str) {
    for secret in secret_forms() {
        assert!(
            !text.contains(secret),
            "{source} shows the secret {secret:?}:\n{text}"
        );
    }
}

/// The live feed's decoded body, collected on a thread of its own as it comes.
struct FeedTap {
    text: Arc<Mutex<String>>,
}

impl FeedTap {
    fn open(daemon: &Daemon) -> FeedTap {
        let text = Arc::new(Mutex::new(String::new()));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_per_read(Some(DEADLINE))
            .build()
            .into();
        let response = agent
            .get(format!("http://{}/v1/events", daemon.address))
            .call()
            .expect("GET /v1/events");
        let mut body = response.into_body().into_reader();
        let sink = Arc::clone(&text);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = body.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let chunk = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().expect("feed text").push_str(&chunk);
            }
        });
        FeedTap { text }
    }

    fn text(&self) -> String {
        self.text.lock().expect("feed text").clone()
    }
}

/// Runs `cachetail check` on `config`: its exit code and everything it printed.
fn check(config: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cachetail"))
        .args(["check", "--config"])
        .arg(config)
        .output()
        .expect("cachetail check runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), said)
}

/// URLs with the password that do not parse, each a typo an operator could make.
fn mistyped_urls(redis_port: u16) -> Vec<String> {
    vec![
        // One slash short.
        format!("redis:/:{PLAIN}@127.0.0.1:{redis_port}/0"),
        // The same, the password percent-encoded.
        format!("redis:/:{PASSWORD_IN_URL}@127.0.0.1:{redis_port}/0"),
        // The password written raw: its `/` ends the host part early.
        format!("redis://:{PASSWORD}@127.0.0.1:{redis_port}/0"),
        // No `@`: the password reads as a port.
        format!("redis://:{PLAIN}"),
        // A database that is not a number.
        format!("redis://:{PLAIN}@127.0.0.1:{redis_port}/db{PLAIN}"),
        // TLS, one slash short.
        format!("rediss:/default:{PLAIN}@127.0.0.1:{redis_port}/0"),
    ]
}

#[test]
fn a_mistyped_redis_url_reloaded_shows_its_password_nowhere() {
    let redis = LockedRedis::start(PLAIN);
    let catalog = Catalog::new();
    let port = free_port();
    let good_url = format!("redis://:{PLAIN}@127.0.0.1:{}/0", redis.port);
    let config = config_with_url(port, &good_url);
    let config_path = catalog.write_config(&config);
    let mut command = Command::new(env!("CARGO_BIN_EXE_cachetail"));
    command
        .args(["run", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "debug");
    let (mut daemon, log) = Daemon::start_logged(command, &config_path, port);
    let feed = FeedTap::open(&daemon);
    eventually("the daemon authenticates to redis", || {
        (daemon.status()["redis"]["ok"] == true).then_some(())
    });
    assert_eq!(x_cache(&daemon.get("book:1")), "miss");
    assert_eq!(x_cache(&daemon.get("book:1")), "hit");

    for (i, url) in mistyped_urls(redis.port).iter().enumerate() {
        let failures = i as u64 + 1;
        let text = config.replace(&good_url, url);
        catalog.write_config(&text);
        let status = eventually("the mistyped url is refused", || {
            let status = daemon.status();
            (status["config"]["reload_failures"] == failures).then_some(status)
        });
        let error = status["config"]["last_reload_error"]
            .as_str()
            .expect("a reload error")
            .to_owned();
        let line = text
            .lines()
            .position(|l| l.starts_with("url = "))
            .expect("the url line")
            + 1;
        assert!(
            error.contains(&format!("config.toml:{line}:7: `cache.url`")),
            "the error still says where: {error}"
        );
        assert_no_secret("/v1/status's last_reload_error", &error);
        // The feed's status event carries it too: wait for one that does.
        eventually("the feed shows the failed reload", || {
            feed.text()
                .contains(&format!("\"reload_failures\":{failures}"))
                .then_some(())
        });
        // `cachetail check` on the same file.
        let (code, said) = check(&catalog.path().join("config.toml"));
        assert_eq!(code, Some(2), "check refuses it: {said}");
        assert!(said.contains("`cache.url`"), "{said}");
        assert_no_secret("cachetail check", &said);
    }
    // The old config (and its URL) stays in force.
    assert_eq!(daemon.status()["redis"]["ok"], true);
    assert_eq!(x_cache(&daemon.get("book:1")), "hit");

    assert_no_secret("/v1/status", &daemon.get_path("/v1/status").text());
    assert_no_secret("/metrics", &daemon.get_path("/metrics").text());
    assert_no_secret("the dashboard", &daemon.get_path("/ui").text());
    assert_no_secret("/v1/events", &feed.text());
    daemon.stop();
    let said: Vec<String> = log.try_iter().collect();
    assert!(
        said.iter().any(|l| l.contains("config reload refused")),
        "the refusals are logged: {said:#?}"
    );
    assert_no_secret("the daemon's log", &said.join("\n"));
}

#[test]
fn a_wrong_redis_password_is_reported_without_being_shown() {
    let redis = LockedRedis::start(PLAIN);
    let catalog = Catalog::new();
    let port = free_port();
    let wrong = "hunter2-but-wrong";
    let config = config_with_url(
        port,
        &format!("redis://:{wrong}@127.0.0.1:{}/0", redis.port),
    );
    let config_path = catalog.write_config(&config);
    let (code, said) = check(&config_path);
    assert_eq!(code, Some(0), "a refused password is a warning: {said}");
    assert!(said.contains("does not answer"), "{said}");
    assert!(!said.contains(wrong), "check shows the password: {said}");
    let mut command = Command::new(env!("CARGO_BIN_EXE_cachetail"));
    command
        .args(["run", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "debug");
    let (mut daemon, log) = Daemon::start_logged(command, &config_path, port);
    let status = eventually("the daemon reports the refused password", || {
        let status = daemon.status();
        status["redis"]["last_error"].is_string().then_some(status)
    });
    let error = status["redis"]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("WRONGPASS"), "{error}");
    for (source, text) in [
        ("/v1/status", daemon.get_path("/v1/status").text()),
        ("/metrics", daemon.get_path("/metrics").text()),
    ] {
        assert!(!text.contains(wrong), "{source} shows the password: {text}");
    }
    daemon.stop();
    let said: Vec<String> = log.try_iter().collect();
    assert!(
        !said.join("\n").contains(wrong),
        "the log shows the password: {said:#?}"
    );
}

/// Stores `book:1` through the daemon and reads it back from Redis as a plain client would.
fn stored_through(daemon: &mut Daemon, redis: &LockedRedis) -> Value {
    eventually("the daemon authenticates to redis", || {
        (daemon.status()["redis"]["ok"] == true).then_some(())
    });
    let first = daemon.get("book:1");
    assert_eq!((first.status, x_cache(&first)), (200, "miss"));
    assert_eq!(x_cache(&daemon.get("book:1")), "hit");
    let stored = redis.cli(&["GET", &format!("{PREFIX}book:1")]);
    assert_eq!(stored, first.text(), "stored in redis");
    serde_json::from_str(&stored).expect("JSON")
}

#[test]
fn a_percent_encoded_password_and_user_authenticate_against_a_real_redis() {
    let redis = LockedRedis::start(PASSWORD);
    // The default user, with `--requirepass`.
    {
        let catalog = Catalog::new();
        let port = free_port();
        let url = format!("redis://:{PASSWORD_IN_URL}@127.0.0.1:{}/0", redis.port);
        let mut daemon = Daemon::start(&catalog, &config_with_url(port, &url), port);
        stored_through(&mut daemon, &redis);
        daemon.stop();
    }
    redis.cli(&["FLUSHALL"]);
    // An ACL user whose name and password both need escaping in a URL.
    let (user, password) = ("app@corp:1", "pa:ss@w/rd%25 x");
    redis.cli(&[
        "ACL",
        "SETUSER",
        user,
        "on",
        &format!(">{password}"),
        "~*",
        "&*",
        "+@all",
    ]);
    let catalog = Catalog::new();
    let port = free_port();
    let url = format!(
        "redis://app%40corp%3A1:pa%3Ass%40w%2Frd%2525%20x@127.0.0.1:{}/0",
        redis.port
    );
    let mut daemon = Daemon::start(&catalog, &config_with_url(port, &url), port);
    stored_through(&mut daemon, &redis);
    let clients = redis.cli(&["CLIENT", "LIST"]);
    assert!(
        clients
            .lines()
            .any(|c| c.contains(&format!(" user={user} "))),
        "the daemon connects as {user}: {clients}"
    );
    let status = daemon.get_path("/v1/status").text();
    assert!(!status.contains(password), "{status}");
}
