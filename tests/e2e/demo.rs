//! The README's first steps, run as a user would: `cachetail demo` with its flags (what it
//! prints, where it serves and writes, when it stops), the dashboard's "edit a rule, save,
//! write: the next change shows what the new rule does" read from the live feed as raw
//! Server-Sent Events, and `systemctl reload` of the example unit reloading a running daemon.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::Client;
use serde_json::{Value, json};

use crate::common::*;
use crate::strategies::catalog_config;

/// How long the demo runs in the test.
const DEMO_SECONDS: u64 = 4;

#[test]
fn the_demo_serves_where_told_prints_a_live_line_each_second_and_stops_after_its_seconds() {
    let dir = tempfile::tempdir().expect("temp dir");
    let demo_dir = dir.path().join("my-demo");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let mut demo = Reaped(
        Command::new(env!("CARGO_BIN_EXE_cachetail"))
            .arg("demo")
            .arg("--dir")
            .arg(&demo_dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--seconds", &DEMO_SECONDS.to_string()])
            // A small catalog: the flags are honoured, and it builds in an instant.
            .args(["--books", "40", "--users", "10", "--reviews", "200"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("cachetail demo runs"),
    );
    let child = &mut demo.0;
    let lines = lines_of(child.stdout.take().expect("stdout"));
    let mut printed: Vec<(Instant, String)> = Vec::new();
    let mut next_line = |what: &str| -> String {
        let line = lines
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("the demo prints {what}; it printed {printed:?}"));
        printed.push((Instant::now(), line.clone()));
        line
    };
    let serving = loop {
        let line = next_line("the address it serves");
        if line.starts_with("cachetail is serving ") {
            break line;
        }
    };
    assert!(
        serving.starts_with(&format!("cachetail is serving {base} for ")),
        "it serves where --listen says: {serving:?}"
    );
    // It serves where it was told, from the database and config in its folder.
    let mut client = Client::new(format!("127.0.0.1:{port}").parse().expect("address"));
    let status = client
        .get("/v1/status")
        .expect("the demo serves on --listen")
        .json()
        .expect("JSON");
    assert_eq!(
        status["config"]["path"],
        demo_dir.join("config.toml").display().to_string()
    );
    assert!(demo_dir.join("catalog.db").is_file());
    let config = std::fs::read_to_string(demo_dir.join("config.toml")).expect("its config");
    assert!(
        config.contains(&format!("listen = \"127.0.0.1:{port}\"")),
        "{config}"
    );
    let books = python_on(
        &demo_dir.join("catalog.db"),
        "print(con.execute('SELECT count(*) FROM books').fetchone()[0])",
    );
    assert_eq!(books.trim(), "40", "--books");
    let ui = client.get("/ui").expect("GET /ui");
    assert_eq!(ui.status, 200);

    // Then everything it prints, until it exits on its own.
    let limit = Duration::from_secs(DEMO_SECONDS) + DEADLINE;
    let exit = loop {
        while let Ok(line) = lines.recv_timeout(Duration::from_millis(50)) {
            printed.push((Instant::now(), line));
        }
        if let Some(status) = child.try_wait().expect("wait") {
            while let Ok(line) = lines.recv_timeout(Duration::from_secs(1)) {
                printed.push((Instant::now(), line));
            }
            break status;
        }
        if started.elapsed() > limit {
            panic!(
                "the demo did not stop after --seconds {DEMO_SECONDS}: still running after {limit:?}"
            );
        }
    };
    let took = started.elapsed();
    assert_eq!(exit.code(), Some(0), "the demo exits 0");
    assert!(
        took >= Duration::from_secs(DEMO_SECONDS),
        "it ran {took:?}, not --seconds {DEMO_SECONDS}"
    );
    let text: Vec<&str> = printed.iter().map(|(_, l)| l.as_str()).collect();
    for expected in [
        format!("dashboard: {base}/ui"),
        format!("  curl -i {base}/v1/keys/book:1"),
        format!("  curl -s {base}/v1/status"),
    ] {
        assert!(
            text.iter().any(|l| l.starts_with(&expected)),
            "{expected:?} in {text:#?}"
        );
    }

    // The live line, once a second: `events applied …/s | lag … | hit ratio …% (h hits, m
    // misses) | commit→fresh p50 … p99 … (n samples) | app writes w | aggregates fresh hits h/n`.
    let live: Vec<&(Instant, String)> = printed
        .iter()
        .filter(|(_, l)| l.starts_with("events applied"))
        .collect();
    assert!(
        live.len() as u64 >= DEMO_SECONDS - 1,
        "a live line a second for {DEMO_SECONDS} s: {text:#?}"
    );
    let number_after = |line: &str, label: &str| -> u64 {
        let rest = &line[line
            .find(label)
            .unwrap_or_else(|| panic!("{label:?} in {line:?}"))
            + label.len()..];
        rest.trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a number after {label:?} in {line:?}"))
    };
    let (mut events, mut reads, mut samples) = (0, 0, 0);
    let mut writes = Vec::new();
    for (_, line) in &live {
        for part in [
            "/s | lag",
            "| hit ratio",
            "| commit→fresh p50",
            "| app writes",
        ] {
            assert!(line.contains(part), "{part:?} in {line:?}");
        }
        events += number_after(line, "events applied");
        reads += number_after(line, "% (") + number_after(line, "hits, ");
        let before_samples = &line[..line.find(" samples)").expect("samples")];
        samples += before_samples[before_samples.rfind('(').expect("(") + 1..]
            .parse::<u64>()
            .expect("a sample count");
        writes.push(number_after(line, "app writes"));
    }
    assert!(events > 0, "the daemon applied the app's writes: {live:#?}");
    assert!(reads > 0, "the readers read through the cache: {live:#?}");
    assert!(samples > 0, "commit→fresh was measured: {live:#?}");
    // The aggregates are maintained incrementally and written through: right after a posted
    // review shows on its book, they are cached (fresh) hits.
    let last = live.last().map(|(_, l)| l.as_str()).unwrap_or("");
    let (hits, asked) = (
        number_after(last, "aggregates fresh hits"),
        number_after(
            last,
            &format!(
                "aggregates fresh hits {}/",
                number_after(last, "aggregates fresh hits")
            ),
        ),
    );
    // A rare miss is allowed (a few in a thousand were seen under load; a miss is answered
    // fresh from the database, never stale): what must not happen is the aggregates waiting
    // for a background recompute, as they did on write-behind.
    assert!(
        asked > 0 && hits * 100 >= asked * 99,
        "the aggregates are fresh hits after each review: {last}"
    );
    assert!(
        writes.windows(2).all(|w| w[1] >= w[0]) && writes.last() > Some(&0),
        "app writes count up: {writes:?}"
    );
    let gaps: Vec<Duration> = live.windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert!(
        gaps.iter()
            .all(|g| *g > Duration::from_millis(500) && *g < Duration::from_millis(2500)),
        "a line about once a second: {gaps:?}"
    );
    assert!(
        text.last().is_some_and(|l| l.starts_with("stopped;")),
        "{text:#?}"
    );
}

/// A child process killed when dropped (a failing test leaves no demo running).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A reader of `GET /v1/events` on its own connection (chunked Server-Sent Events).
struct Feed {
    reader: BufReader<TcpStream>,
    pending: String,
}

impl Feed {
    fn connect(address: SocketAddr) -> Feed {
        let mut stream = TcpStream::connect(address).expect("connect");
        stream
            .set_read_timeout(Some(DEADLINE))
            .expect("read timeout");
        stream
            .write_all(format!("GET /v1/events HTTP/1.1\r\nHost: {address}\r\n\r\n").as_bytes())
            .expect("send the request");
        let mut reader = BufReader::new(stream);
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("a response head line");
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push(line.trim_end().to_ascii_lowercase());
        }
        assert_eq!(head.first().map(String::as_str), Some("http/1.1 200 ok"));
        assert!(
            head.iter().any(|h| h == "transfer-encoding: chunked"),
            "{head:?}"
        );
        Feed {
            reader,
            pending: String::new(),
        }
    }

    /// The next `data:` event, as JSON (`retry:` lines skipped).
    fn next(&mut self) -> Value {
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let event: String = self.pending.drain(..end + 2).collect();
                if let Some(data) = event.trim_end().strip_prefix("data: ") {
                    return serde_json::from_str(data).expect("JSON data");
                }
                continue;
            }
            let mut size = String::new();
            self.reader
                .read_line(&mut size)
                .expect("a chunk (the feed went silent)");
            let size = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
            assert!(size > 0, "the feed ended");
            let mut data = vec![0; size + 2];
            self.reader.read_exact(&mut data).expect("a chunk");
            data.truncate(size);
            self.pending
                .push_str(std::str::from_utf8(&data).expect("UTF-8"));
        }
    }

    /// The change event at `position`.
    fn change_at(&mut self, position: u64) -> Value {
        loop {
            let event = self.next();
            if event["type"] == "change" && event["position"].as_u64() >= Some(position) {
                assert_eq!(event["position"], position, "{event}");
                return event;
            }
        }
    }
}

fn outbox_head(catalog: &Catalog) -> u64 {
    catalog
        .sqlite_cli("SELECT max(id) FROM cachetail_outbox")
        .parse()
        .expect("the outbox head")
}

#[test]
fn after_a_saved_rule_edit_the_next_change_on_the_feed_shows_what_the_new_rule_does() {
    let catalog = Catalog::new();
    let port = free_port();
    let before = catalog_config(port, "delete", "50ms");
    let mut daemon = Daemon::start(&catalog, &before, port);
    let mut feed = Feed::connect(daemon.address);

    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5)')");
    let change = feed.change_at(outbox_head(&catalog));
    assert_eq!(
        (&change["table"], &change["row"], &change["keys"]),
        (
            &json!("reviews"),
            &json!({"book_id": 1}),
            &json!([{"key": "book:1", "strategy": "delete", "rule": 0}, {"key": "top-books", "strategy": "delete", "rule": 0}])
        ),
        "{change}"
    );

    // As on the dashboard: edit the rule (write-through now), add one (a review refreshes its
    // author's page too, which needs a column not captured so far), save.
    let after = before.replace("strategy = \"delete\"", "strategy = \"write-through\"")
        + "\n[[rules]]\ntable = \"reviews\"\nkeys = [\"user:{user_id}\"]\nstrategy = \"write-behind\"\n";
    catalog.write_config(&after);
    eventually("the daemon reloads the saved config", || {
        (daemon.status()["config"]["reloads"] == 1).then_some(())
    });
    eventually("capture records the new rule's column", || {
        let triggers = catalog.sqlite_cli(
            "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'reviews' AND sql LIKE '%user_id%'",
        );
        (triggers != "0").then_some(())
    });

    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 4)')");
    let change = feed.change_at(outbox_head(&catalog));
    assert_eq!(
        (
            &change["table"],
            &change["row"],
            &change["keys"],
            &change["flush"]
        ),
        (
            &json!("reviews"),
            &json!({"book_id": 1, "user_id": 3}),
            &json!([
                {"key": "book:1", "strategy": "write-through", "rule": 0},
                {"key": "top-books", "strategy": "write-through", "rule": 0},
                {"key": "user:3", "strategy": "write-behind", "rule": 3}
            ]),
            &json!(false)
        ),
        "the next change shows the edited and the added rule: {change}"
    );
}

#[test]
fn systemctl_reload_of_the_example_unit_sends_sighup_which_reloads_the_config() {
    let unit = include_str!("../../examples/cachetail.service");
    let mut section = "";
    let mut reload = None;
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if let Some(command) = line.strip_prefix("ExecReload=") {
            assert_eq!(section, "[Service]", "ExecReload= belongs in [Service]");
            reload = Some(command);
        }
    }
    let reload = reload.expect("the unit has an ExecReload= line");

    // Run it as systemd does on `systemctl reload`: $MAINPID is the daemon's pid.
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &catalog_config(port, "delete", "50ms"), port);
    assert_eq!(daemon.status()["config"]["reloads"], 0);
    let pid = daemon.pid().expect("running").to_string();
    let argv: Vec<String> = reload
        .split_whitespace()
        .map(|word| word.replace("${MAINPID}", &pid).replace("$MAINPID", &pid))
        .collect();
    let ran = Command::new(&argv[0])
        .args(&argv[1..])
        .status()
        .unwrap_or_else(|e| panic!("ExecReload={reload} runs: {e}"));
    assert!(ran.success(), "ExecReload={reload}: {ran}");
    eventually("the daemon reloads its config", || {
        (daemon.status()["config"]["reloads"] == 1).then_some(())
    });
    // And it goes on running (the signal was not a stop).
    std::thread::sleep(Duration::from_millis(200));
    let reply = daemon.get_path("/healthz");
    assert_eq!(reply.status, 200, "the daemon still runs after ExecReload");
    assert_eq!(daemon.stop().code(), Some(0));
}
