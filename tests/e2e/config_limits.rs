//! Numbers and durations past what the daemon can use: every numeric and duration setting has
//! a documented maximum (README, "Config reference"); a value beyond it, or one that overflows,
//! is negative or not a number, is refused by `cachetail check` and `cachetail run` (exit 2,
//! `file:line:column` and the setting's name), and by a reload, which leaves the running config
//! in force; never a panic at run time. Each setting at its maximum runs.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::strategies::catalog_config;

/// Where a setting is written: at the top of the file, or in a section appended at its end.
enum Place {
    Top,
    Section(&'static str),
}

/// A setting written with a value: where, its name in messages (None: TOML itself refuses the
/// value, before any setting is read), the key and the value as written.
struct Case {
    place: Place,
    name: Option<&'static str>,
    key: &'static str,
    value: &'static str,
}

const fn case(
    place: Place,
    name: Option<&'static str>,
    key: &'static str,
    value: &'static str,
) -> Case {
    Case {
        place,
        name,
        key,
        value,
    }
}

/// A duration that fits a `Duration` but no `Instant` or timer can be set that far ahead.
const CENTURIES: &str = "\"100000000000y\"";
/// The most seconds a `Duration` holds.
const MAX_SECONDS: &str = "\"18446744073709551615s\"";
/// The largest TOML integer.
const I64_MAX: &str = "9223372036854775807";

fn refused_cases() -> Vec<Case> {
    use Place::*;
    let family = Section("[keys.\"book:{id}\"]\nquery = \"SELECT id FROM books WHERE id = :id\"");
    vec![
        case(Top, Some("fresh_timeout"), "fresh_timeout", CENTURIES),
        case(Top, Some("fresh_timeout"), "fresh_timeout", MAX_SECONDS),
        case(Top, Some("fresh_timeout"), "fresh_timeout", "\"2h\""),
        case(Section("[cache]"), Some("cache.ttl"), "ttl", CENTURIES),
        case(Section("[cache]"), Some("cache.ttl"), "ttl", "\"400d\""),
        case(Section("[cache]"), Some("cache.ttl"), "ttl", "\"0s\""),
        case(family, Some("keys.\"book:{id}\".ttl"), "ttl", CENTURIES),
        case(
            Section("[cache]"),
            Some("cache.max_entries"),
            "max_entries",
            I64_MAX,
        ),
        case(
            Section("[cache]"),
            Some("cache.max_entries"),
            "max_entries",
            "1000000001",
        ),
        case(
            Section("[cache]"),
            Some("cache.max_entries"),
            "max_entries",
            "-1",
        ),
        // Past i64: TOML refuses it, located.
        case(
            Section("[cache]"),
            None,
            "max_entries",
            "18446744073709551616",
        ),
        case(Section("[cache]"), None, "max_entries", "nan"),
        case(Section("[cache]"), None, "max_entries", "1e3"),
        case(
            Section("[cache]"),
            Some("cache.max_bytes"),
            "max_bytes",
            "0",
        ),
        case(
            Section("[cache]"),
            Some("cache.max_bytes"),
            "max_bytes",
            "-1",
        ),
        case(
            Section("[cache]"),
            Some("cache.max_bytes"),
            "max_bytes",
            I64_MAX,
        ),
        case(
            Section("[cache]"),
            Some("cache.max_bytes"),
            "max_bytes",
            "\"1KiB\"",
        ),
        case(
            Section("[cache]"),
            Some("cache.max_bytes"),
            "max_bytes",
            "\"2TiB\"",
        ),
        case(
            Section("[cache]"),
            Some("cache.max_bytes"),
            "max_bytes",
            "\"1.5GiB\"",
        ),
        case(
            Section("[cache]"),
            Some("cache.max_bytes"),
            "max_bytes",
            "\"12 parsecs\"",
        ),
        case(
            Section("[cache]"),
            Some("cache.max_bytes"),
            "max_bytes",
            "\"99999999999999999999TiB\"",
        ),
        case(Section("[cache]"), None, "max_bytes", "1.5"),
        case(Section("[cache]"), None, "max_bytes", "[1]"),
        case(
            Section("[write_behind]"),
            Some("write_behind.delay"),
            "delay",
            CENTURIES,
        ),
        case(
            Section("[write_behind]"),
            Some("write_behind.delay"),
            "delay",
            MAX_SECONDS,
        ),
        case(
            Section("[write_behind]"),
            Some("write_behind.workers"),
            "workers",
            I64_MAX,
        ),
        case(
            Section("[write_behind]"),
            Some("write_behind.workers"),
            "workers",
            "1025",
        ),
        case(
            Section("[tail]"),
            Some("tail.poll_interval"),
            "poll_interval",
            CENTURIES,
        ),
        case(
            Section("[tail]"),
            Some("tail.batch_size"),
            "batch_size",
            I64_MAX,
        ),
        case(
            Section("[tail]"),
            Some("tail.batch_size"),
            "batch_size",
            "1000001",
        ),
        case(Section("[tail]"), Some("tail.lease"), "lease", CENTURIES),
        // tokio's Semaphore::MAX_PERMITS + 1 (usize::MAX >> 3 on 64 bits).
        case(
            Section("[http]"),
            Some("http.max_connections"),
            "max_connections",
            "2305843009213693952",
        ),
        case(
            Section("[http]"),
            Some("http.max_connections"),
            "max_connections",
            I64_MAX,
        ),
        case(
            Section("[http]"),
            Some("http.max_connections"),
            "max_connections",
            "1000001",
        ),
        case(
            Section("[http]"),
            Some("http.max_event_streams"),
            "max_event_streams",
            "100001",
        ),
        case(Section("[http]"), Some("http.readers"), "readers", I64_MAX),
        case(Section("[http]"), Some("http.readers"), "readers", "1025"),
        case(Section("[http]"), Some("http.readers"), "readers", "0"),
        case(
            Section("[http]"),
            Some("http.read_queue"),
            "read_queue",
            "1000001",
        ),
        case(
            Section("[http]"),
            Some("http.request_timeout"),
            "request_timeout",
            CENTURIES,
        ),
        case(
            Section("[http]"),
            Some("http.header_timeout"),
            "header_timeout",
            MAX_SECONDS,
        ),
        case(
            Section("[cache]\nbackend = \"redis\""),
            Some("cache.url"),
            "url",
            "\"redis://127.0.0.1:6379/99999999999999999999\"",
        ),
        case(
            Section("[cache]\nbackend = \"redis\""),
            Some("cache.url"),
            "url",
            "\"redis://127.0.0.1:6379/-1\"",
        ),
        case(
            Section("[cache]\nbackend = \"redis\""),
            Some("cache.url"),
            "url",
            "\"redis://127.0.0.1:0/0\"",
        ),
    ]
}

/// A small valid config on `catalog.db` listening on `port`, with `case` written in.
fn config_with(port: u16, case: &Case) -> String {
    let setting = format!("{} = {}", case.key, case.value);
    let top = match case.place {
        Place::Top => format!("{setting}\n"),
        Place::Section(_) => String::new(),
    };
    let section = match case.place {
        Place::Top => String::new(),
        Place::Section(header) => format!("\n{header}\n{setting}\n"),
    };
    let families = if case.key == "ttl" && case.name.is_some_and(|n| n.starts_with("keys.")) {
        ""
    } else {
        "[keys.\"book:{id}\"]\nquery = \"SELECT id FROM books WHERE id = :id\"\n"
    };
    format!(
        "{top}database = \"catalog.db\"\nlisten = \"127.0.0.1:{port}\"\n\n{families}\n[[rules]]\ntable = \"books\"\nkeys = [\"book:{{id}}\"]\n{section}"
    )
}

/// `file:line:column:` of the case's value in `text`.
fn location(text: &str, case: &Case) -> String {
    let setting = format!("{} = {}", case.key, case.value);
    let (index, line) = text
        .lines()
        .enumerate()
        .find(|(_, l)| l.starts_with(&setting))
        .expect("the setting is in the text");
    let column = line.find(case.value).expect("the value") + 1;
    format!("config.toml:{}:{column}:", index + 1)
}

/// Runs `cachetail VERB --config CONFIG`, at most `DEADLINE`: its exit code (None: it was still
/// running, and was killed) and what it printed.
fn run_verb(verb: &str, config: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cachetail"))
        .arg(verb)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cachetail runs");
    let started = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("its output");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (code, said)
}

#[test]
fn check_and_run_refuse_numbers_and_durations_past_their_maximum_with_line_and_column() {
    let catalog = Catalog::new();
    let port = free_port();
    let mut wrong = Vec::new();
    for case in refused_cases() {
        let text = config_with(port, &case);
        let path = catalog.write_config(&text);
        let at = location(&text, &case);
        for verb in ["check", "run"] {
            let (code, said) = run_verb(verb, &path);
            let named = case
                .name
                .is_none_or(|name| said.contains(&format!("{at} `{name}`")));
            if code != Some(2) || !said.contains(&at) || !named || said.contains("panicked") {
                wrong.push(format!(
                    "{verb} with `{} = {}`: exit {code:?}, expected 2 and `{at} {}`; it said:\n{said}",
                    case.key,
                    case.value,
                    case.name.map(|n| format!("`{n}`")).unwrap_or_default()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

/// Every numeric and duration setting at the maximum the README gives.
const AT_THE_MAXIMA: &str = r#"fresh_timeout = "1h"
database = "catalog.db"
listen = "127.0.0.1:PORT"

[cache]
max_entries = 1000000000
max_bytes = "1TiB"
ttl = "365d"

[write_behind]
delay = "1h"
workers = 1024

[tail]
poll_interval = "1h"
batch_size = 1000000
lease = "1h"

[http]
max_connections = 1000000
request_timeout = "1h"
header_timeout = "1h"
max_event_streams = 100000
readers = 1024
read_queue = 1000000

[keys."book:{id}"]
query = "SELECT b.id, count(r.id) AS review_count FROM books b LEFT JOIN reviews r ON r.book_id = b.id WHERE b.id = :id GROUP BY b.id"
ttl = "365d"

[[rules]]
table = "reviews"
keys = ["book:{book_id}"]
strategy = "write-through"
"#;

#[test]
fn every_setting_at_its_maximum_is_accepted_and_runs() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = AT_THE_MAXIMA.replace("PORT", &port.to_string());
    let path = catalog.write_config(&config);
    let (code, said) = run_verb("check", &path);
    assert_eq!(code, Some(0), "{said}");
    let mut daemon = Daemon::start_existing(&path, port);
    assert_eq!(json(&daemon.get("book:1"))["review_count"], 2);
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5)')");
    daemon.wait_caught_up();
    let after = daemon.get("book:1");
    assert_eq!(
        (x_cache(&after), json(&after)["review_count"].as_i64()),
        ("hit", Some(3))
    );
    assert_eq!(daemon.stop().code(), Some(0));
}

#[test]
fn a_reload_with_a_value_past_its_maximum_is_refused_and_the_running_config_stays() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog_config(port, "write-behind", "20ms");
    let mut daemon = Daemon::start(&catalog, &config, port);
    assert_eq!(json(&daemon.get("book:1"))["review_count"], 2);
    for (i, (from, to, name)) in [
        (
            "delay = \"20ms\"",
            "delay = \"100000000000y\"",
            "write_behind.delay",
        ),
        (
            "poll_interval = \"100ms\"",
            "poll_interval = \"100ms\"\nbatch_size = 9223372036854775807",
            "tail.batch_size",
        ),
        (
            "[write_behind]",
            "[write_behind]\nworkers = 9223372036854775807",
            "write_behind.workers",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let edited = config.replace(from, to);
        assert_ne!(edited, config);
        catalog.write_config(&edited);
        let status = eventually("the reload is refused", || {
            let status = daemon.status();
            (status["config"]["reload_failures"] == i as u64 + 1).then_some(status)
        });
        assert_eq!(status["config"]["reloads"], 0, "{status}");
        let error = status["config"]["last_reload_error"]
            .as_str()
            .expect("the reload error");
        let value = to.lines().last().expect("a line");
        let line = edited
            .lines()
            .position(|l| l == value)
            .expect("the edited line")
            + 1;
        let column = value.find(" = ").expect("a setting") + 4;
        assert!(
            error.contains(&format!("config.toml:{line}:{column}: `{name}`")),
            "{error}"
        );
    }
    // The running config (a 20 ms write-behind delay) still recomputes.
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5)')");
    eventually("the write-behind recompute lands", || {
        let reply = daemon.peek("book:1");
        (reply.status == 200 && json(&reply)["review_count"] == 3).then_some(())
    });
    assert!(
        daemon.get_path("/healthz").status == 200,
        "the daemon is still up"
    );
}
