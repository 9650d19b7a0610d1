//! The dashboard in a real browser: Debian's headless Chromium, driven through chromedriver's
//! WebDriver protocol over loopback. `bash tests/run.sh` installs both (`apt-get install chromium
//! chromium-driver`; on Ubuntu `chromium-browser chromium-chromedriver`). Screenshots are saved
//! under the target folder as test artifacts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};

use crate::common::{Catalog, Client, Daemon, Reply, eventually, free_port, reference_config};

/// Debian's Chromium, or Ubuntu's (a snap behind `chromium-browser`).
fn chromium() -> &'static str {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|path| Path::new(path).exists())
        .unwrap_or("/usr/bin/chromium")
}
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const TOKEN: &str = "dashboard-test-token-0123456789";

/// A chromedriver process and one Chromium session; both end when dropped.
struct Browser {
    driver: Child,
    client: Client,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        for program in [chromium(), CHROMEDRIVER] {
            assert!(
                Path::new(program).exists(),
                "{program} is missing: apt-get install -y chromium chromium-driver (bash tests/run.sh does)"
            );
        }
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let mut client = Client::new(format!("127.0.0.1:{port}").parse().expect("address"));
        eventually("chromedriver is ready", || {
            let reply = client.get("/status").ok()?;
            reply.json().ok()?["value"]["ready"]
                .as_bool()?
                .then_some(())
        });
        let profile = tempfile::tempdir().expect("a fresh profile folder");
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--disable-dev-shm-usage", // a small /dev/shm (containers) must not crash tabs
            "--window-size=1280,1100",
        ]
        .map(String::from)
        .into_iter()
        .chain([format!("--user-data-dir={}", profile.path().display())])
        .collect::<Vec<_>>();
        let mut browser = Browser {
            driver,
            client,
            session: String::new(),
            _profile: profile,
        };
        let created = browser.command(
            "POST",
            "/session",
            &json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": chromium(), "args": args},
            }}}),
        );
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        browser
    }

    /// A WebDriver command; returns its `value`.
    fn command(&mut self, method: &str, path: &str, body: &Value) -> Value {
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let reply: Reply = self
            .client
            .request(
                method,
                path,
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            )
            .unwrap_or_else(|e| panic!("chromedriver {method} {path}: {e}"));
        let value = reply.json().unwrap_or(Value::Null)["value"].clone();
        assert_eq!(reply.status, 200, "chromedriver {method} {path}: {value}");
        value
    }

    fn session_command(&mut self, method: &str, path: &str, body: &Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        self.command(method, &path, body)
    }

    fn open(&mut self, url: &str) {
        self.session_command("POST", "/url", &json!({ "url": url }));
    }

    /// Runs a script in the page; returns what it returns.
    fn script(&mut self, body: &str) -> Value {
        self.session_command(
            "POST",
            "/execute/sync",
            &json!({"script": body, "args": []}),
        )
    }

    fn text(&mut self, id: &str) -> String {
        let found = self.script(&format!(
            "const e = document.getElementById({id:?}); return e ? e.textContent : null;"
        ));
        found.as_str().unwrap_or_default().to_owned()
    }

    fn resize(&mut self, width: u32, height: u32) {
        self.session_command(
            "POST",
            "/window/rect",
            &json!({"width": width, "height": height}),
        );
    }

    /// Saves a screenshot of the window as a PNG under the target folder; returns its path.
    fn screenshot(&mut self, name: &str) -> PathBuf {
        let encoded = self.session_command("GET", "/screenshot", &Value::Null);
        let png = base64_decode(encoded.as_str().expect("base64 PNG"));
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
        let folder = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui");
        std::fs::create_dir_all(&folder).expect("artifact folder");
        let path = folder.join(name);
        std::fs::write(&path, &png).expect("write the screenshot");
        eprintln!("screenshot: {} ({} bytes)", path.display(), png.len());
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let path = format!("/session/{}", self.session);
            let _ = self.client.request("DELETE", &path, &[], &[]);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    };
    let digits: Vec<u32> = text.bytes().filter_map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, d)| n | d << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// The feed's entries, newest first, as the page shows them.
fn feed(browser: &mut Browser) -> Vec<String> {
    let items = browser
        .script("return Array.from(document.querySelectorAll('#feed li'), li => li.textContent);");
    items
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A number as the page prints it (`1,234`), or None for `–`.
fn number(text: &str) -> Option<u64> {
    text.replace(',', "").trim().parse().ok()
}

#[test]
fn the_dashboard_shows_each_change_live_and_reconnects() {
    let catalog = Catalog::new();
    let port = free_port();
    // The reference config, an admin token, and a family whose rules are derived (`auto`).
    let config = reference_config(port).replacen(
        "\n[cache]",
        &format!("\nadmin_token = \"{TOKEN}\"\n\n[cache]"),
        1,
    ) + r#"
[keys."reviews-by-user:{id}"]
query = "SELECT count(*) AS n FROM reviews r JOIN users u ON u.id = r.user_id WHERE u.id = :id"
invalidate = "auto"
"#;
    let mut daemon = Daemon::start(&catalog, &config, port);
    let base = format!("http://127.0.0.1:{port}");

    // `/` links the page for a browser; the page and its assets come from the binary.
    let home = daemon
        .request_with("GET", "/", &[("Accept", "text/html")])
        .expect("GET /");
    assert!(home.text().contains("href=\"/ui\""), "{}", home.text());
    let page = daemon.get_path("/ui");
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-security-policy")
            .is_some_and(|csp| csp.contains("script-src 'self'"))
    );

    let mut browser = Browser::start();
    browser.open(&format!("{base}/ui"));
    eventually("the page connects to the live feed", || {
        (browser.text("conn") == "live").then_some(())
    });
    let rules = daemon.status()["config"]["rules"]
        .as_array()
        .map_or(0, Vec::len) as u64;
    assert!(rules > 0);
    eventually("the rules in force are listed", || {
        let shown = browser.script("return document.querySelectorAll('#rules tbody tr').length;");
        (shown.as_u64()? == rules).then_some(())
    });
    let listed = browser.text("rules");
    assert!(
        listed.contains("auto, from reviews-by-user:{id}"),
        "the derived rule is marked: {listed}"
    );

    // Reads move the per-family counters.
    let events_before = eventually("the counters show", || number(&browser.text("events")));
    daemon.get("book:3");
    daemon.get("book:3");
    eventually("the page counts the hit and the miss of book:3", || {
        let row = browser.script(
            "const r = document.querySelector('#families tr[data-family=\"book:{id}\"]');\
             return r ? [r.cells[2].textContent, r.cells[3].textContent] : null;",
        );
        let hits = number(row.get(0)?.as_str()?)?;
        let misses = number(row.get(1)?.as_str()?)?;
        (hits >= 1 && misses >= 1).then_some(())
    });

    // A review posted by a separate writer shows in the feed with the keys it refreshed.
    catalog.python(
        "con.execute(\"INSERT INTO reviews (book_id, user_id, rating, body) VALUES (3, 2, 5, 'loved it')\")",
    );
    let entry = eventually("the review shows in the feed", || {
        feed(&mut browser)
            .into_iter()
            .find(|e| e.contains("reviews") && e.contains("book_id=3"))
    });
    for expected in [
        "insert",
        "user_id=2",
        "book:3write-through",
        "top-bookswrite-through",
        "catalog-statswrite-through",
        "book:3:reviewswrite-behind",
        "user:2write-behind",
        "reviews-by-user:2delete",
    ] {
        assert!(
            entry.contains(expected),
            "feed entry lacks {expected:?}: {entry}"
        );
    }
    eventually("the counters move", || {
        let events = number(&browser.text("events"))?;
        let fresh = browser.text("fresh");
        (events > events_before && fresh.contains(" / ")).then_some(())
    });
    let shot = browser.screenshot("dashboard.png");
    assert!(std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0) > 20_000);

    // Admin actions need the token: the page shows the API's answer.
    let submit = |token: &str| {
        format!(
            "document.getElementById('admin-action').value = 'key';\
             document.getElementById('admin-target').value = 'book:3';\
             document.getElementById('admin-token').value = {token:?};\
             document.getElementById('admin-result').textContent = '';\
             document.getElementById('admin').requestSubmit();"
        )
    };
    browser.script(&submit("not-the-token"));
    let refused = eventually("the refusal shows", || {
        Some(browser.text("admin-result")).filter(|t| !t.is_empty())
    });
    assert!(refused.starts_with("401"), "{refused}");
    assert_eq!(
        daemon.peek("book:3").status,
        200,
        "a refused action drops nothing"
    );
    browser.script(&submit(TOKEN));
    let done = eventually("the action's answer shows", || {
        Some(browser.text("admin-result")).filter(|t| !t.is_empty())
    });
    assert!(done.starts_with("200"), "{done}");
    assert_eq!(daemon.peek("book:3").status, 504, "book:3 was dropped");

    // Readable on a phone: nothing wider than the screen.
    browser.resize(390, 844);
    eventually("the page fits a phone's width", || {
        let fits =
            browser.script("return document.documentElement.scrollWidth <= window.innerWidth;");
        fits.as_bool()?.then_some(())
    });
    browser.screenshot("dashboard-phone.png");
    browser.resize(1280, 1100);

    // A config saved broken: the page shows why (the old rules stay); fixed: the notice goes.
    let good = std::fs::read_to_string(&daemon.config).expect("config");
    let error_shown = |browser: &mut Browser| {
        browser
            .script("return !document.getElementById('reload-error').hidden;")
            .as_bool()
    };
    catalog.write_config(&format!("{good}\n[keys.\"broken:{{id}}\"]\nqueryy = 1\n"));
    eventually("the page shows the reload error", || {
        error_shown(&mut browser)?.then_some(())
    });
    let why = browser.text("reload-error-text");
    assert!(why.contains("queryy"), "{why}");
    catalog.write_config(&good);
    eventually("a good reload clears it", || {
        (!error_shown(&mut browser)?).then_some(())
    });

    // The daemon restarts: the page says so, reconnects on its own, and the feed goes on.
    daemon.stop();
    eventually("the page notices the daemon went", || {
        (browser.text("conn") != "live").then_some(())
    });
    let mut daemon = Daemon::start_existing(&daemon.config, port);
    eventually("the page reconnects", || {
        (browser.text("conn") == "live").then_some(())
    });
    catalog.sqlite_cli("UPDATE users SET name = 'renamed' WHERE id = 1");
    let entry = eventually("a change after the restart shows", || {
        feed(&mut browser)
            .into_iter()
            .find(|e| e.contains("users") && e.contains("update"))
    });
    assert!(entry.contains("user:1"), "{entry}");
    assert!(entry.contains("leaderboard:most-reviewed"), "{entry}");
    daemon.wait_caught_up();
}
