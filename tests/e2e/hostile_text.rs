//! App data cannot write to an operator's terminal or forge log lines: a row value holding an
//! ANSI escape and a newline, rendered into a key and a tag and quoted back by a failing SQL
//! query, and a requested key holding a bidi override, reach the text log, the JSON log and
//! `cachetail watch` escaped (`\x1b`, `\n`, `\u{202e}`), never raw.

use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

/// A row value meant to recolour a terminal and start a fake log line.
const HOSTILE: &str = "\x1b[31m\nFAKE LOG LINE";
/// The same, as the daemon and `watch` must print it.
const ESCAPED: &str = "\\x1b[31m\\nFAKE LOG LINE";
/// A requested key with a right-to-left override (HTTP keys may hold it: it is not a control
/// character), and its escaped form.
const BIDI_KEY: &str = "path:\u{202e}txt.exe";
const BIDI_ESCAPED: &str = "path:\\u{202e}txt.exe";

/// Books whose title names a `path:` key and a tag; the `path:` family's query quotes its
/// parameter back in its error (a JSON path that is not one).
fn config(port: u16) -> String {
    format!(
        r#"database = "catalog.db"
listen = "127.0.0.1:{port}"

[keys."book:{{id}}"]
query = "SELECT id, title FROM books WHERE id = :id"

[keys."path:{{p}}"]
query = "SELECT json_extract('{{}}', :p) AS v"

[[rules]]
table = "books"
keys = ["book:{{id}}", "path:{{title}}"]
tags = ["title:{{title}}"]
strategy = "write-through"
"#
    )
}

/// Characters that must never reach a terminal raw: C0 controls (but the line's own end), DEL,
/// C1 controls, bidi embeddings, overrides and isolates, and the Unicode line separators.
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
                | '\u{2028}' | '\u{2029}'
        )
}

fn assert_clean(source: &str, lines: &[String]) {
    for line in lines {
        assert!(
            !line.chars().any(unsafe_char),
            "{source} printed a raw control or bidi character: {line:?}"
        );
        assert!(
            !line.starts_with("FAKE LOG LINE"),
            "{source} let a value start a line of its own: {lines:#?}"
        );
    }
}

/// `cachetail watch --url` on the daemon; killed when dropped.
struct Watch(Child);

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Collects `lines` until one contains `needle` (or the deadline), returning all seen.
fn until(lines: &Receiver<String>, seen: &mut Vec<String>, needle: &str, source: &str) {
    let start = Instant::now();
    while !seen.iter().any(|l| l.contains(needle)) {
        assert!(
            start.elapsed() < DEADLINE,
            "{source} never printed {needle:?}: {seen:#?}"
        );
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(50)) {
            seen.push(line);
        }
    }
}

/// Runs the scenario with the daemon logging in `format`: the log's lines and watch's lines.
fn scenario(format: &str) -> (Vec<String>, Vec<String>) {
    let catalog = Catalog::new();
    let port = free_port();
    let path = catalog.write_config(&config(port));
    let mut command = Command::new(env!("CARGO_BIN_EXE_cachetail"));
    command
        .args(["--log-format", format, "run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info");
    let (mut daemon, log) = Daemon::start_logged(command, &path, port);
    let mut watch = Watch(
        Command::new(env!("CARGO_BIN_EXE_cachetail"))
            .args(["watch", "--url", &format!("http://127.0.0.1:{port}")])
            .stdout(Stdio::piped())
            .spawn()
            .expect("cachetail watch runs"),
    );
    let watched = lines_of(watch.0.stdout.take().expect("watch's stdout"));
    let mut watch_lines = Vec::new();
    until(&watched, &mut watch_lines, "-- following", "watch");

    // A writer process puts the hostile text in a row.
    catalog.python(
        "con.execute('UPDATE books SET title = ? WHERE id = 1', (\"\\x1b[31m\\nFAKE LOG LINE\",))",
    );
    daemon.wait_caught_up();
    until(&watched, &mut watch_lines, "#", "watch");
    // Requested keys: control characters are refused; a bidi override is a key like any other.
    assert_eq!(daemon.get(&format!("path:{HOSTILE}")).status, 400);
    let bidi = daemon.get(BIDI_KEY);
    assert!(bidi.status >= 400, "{}", bidi.text());
    let fill_errors = daemon.status()["fill_errors"].as_u64().unwrap_or(0);
    assert!(fill_errors >= 2, "both fills failed: {fill_errors}");
    daemon.stop();
    drop(watch);
    while let Ok(line) = watched.recv_timeout(Duration::from_millis(100)) {
        watch_lines.push(line);
    }
    (log.try_iter().collect(), watch_lines)
}

#[test]
fn a_hostile_row_value_and_key_reach_the_text_log_and_watch_escaped() {
    let (log, watched) = scenario("text");
    assert_clean("the text log", &log);
    assert_clean("cachetail watch", &watched);
    let fill_failed: Vec<&String> = log.iter().filter(|l| l.contains("fill failed")).collect();
    assert!(
        fill_failed
            .iter()
            .any(|l| l.contains(&format!("path:{ESCAPED}"))),
        "the failed recompute's key, escaped: {log:#?}"
    );
    assert!(
        fill_failed.iter().any(|l| l.contains(BIDI_ESCAPED)),
        "the requested key, escaped: {log:#?}"
    );
    let change = watched
        .iter()
        .find(|l| l.starts_with('#') && l.contains("books"))
        .unwrap_or_else(|| panic!("watch shows the change: {watched:#?}"));
    assert!(
        change.contains(&format!("path:{ESCAPED} (write-through)"))
            && change.contains(&format!("tags title:{ESCAPED}")),
        "the key and tag, escaped: {change}"
    );
}

#[test]
fn json_log_lines_carry_hostile_values_escaped() {
    let (log, _) = scenario("json");
    let mut values = Vec::new();
    for line in &log {
        let event: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a JSON log line ({e}): {line:?}"));
        for (_, value) in event["fields"].as_object().into_iter().flatten() {
            if let Some(text) = value.as_str() {
                values.push(text.to_owned());
            }
        }
    }
    assert_clean("the JSON log", &log);
    assert_clean("the JSON log's decoded fields", &values);
    assert!(
        values.iter().any(|v| v.contains(BIDI_ESCAPED)),
        "the requested key, escaped: {values:#?}"
    );
    assert!(
        values
            .iter()
            .any(|v| v.contains(&format!("path:{ESCAPED}"))),
        "the failed recompute's key, escaped: {values:#?}"
    );
}
