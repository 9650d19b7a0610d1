//! `cachetail demo --dir DIR` writes only where it may: into a new or empty folder, or over a
//! demo it made itself. A folder holding anything else (an app's database, a config, any other
//! file) is refused with a clear message and a non-zero exit, and left byte for byte as it was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::*;

/// Runs a short, small demo into `dir` on a free port.
fn demo(dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cachetail"))
        .arg("demo")
        .arg("--dir")
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--seconds", "1"])
        .args(["--books", "20", "--users", "5", "--reviews", "50"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("cachetail demo runs")
}

/// Every file under `dir` with its bytes.
fn contents(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("read the folder") {
        let path = entry.expect("an entry").path();
        if path.is_file() {
            let bytes = std::fs::read(&path).expect("read a file");
            files.insert(path, bytes);
        }
    }
    files
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts the demo refuses `dir` (non-zero exit, a message naming the folder and what to do)
/// and leaves every file in it as it was.
fn assert_refused(dir: &Path, what: &str) {
    let before = contents(dir);
    assert!(!before.is_empty(), "{what}: the folder holds files");
    let out = demo(dir);
    let text = said(&out);
    assert!(
        !out.status.success(),
        "{what}: the demo ran over it: {text}"
    );
    assert!(
        text.contains(&dir.display().to_string()) && text.contains("--dir"),
        "{what}: the message names the folder and says to pick another: {text}"
    );
    assert!(!text.contains("panicked"), "{what}: {text}");
    assert_eq!(contents(dir), before, "{what}: the folder's files changed");
}

#[test]
fn the_demo_refuses_a_folder_holding_an_apps_database_or_config_and_leaves_it_unchanged() {
    // An app's own catalog database and config, as `cachetail` users have them.
    let app = Catalog::new();
    app.write_config(&reference_config(free_port()));
    assert_refused(app.path(), "an app's database and config");

    // Only a database named like the demo's.
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("catalog.db");
    python_on(
        &db,
        "con.execute('CREATE TABLE precious (x)')\ncon.execute(\"INSERT INTO precious VALUES ('data')\")",
    );
    assert_refused(dir.path(), "a database named catalog.db");

    // Only a config named like the demo's.
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("config.toml"), "database = \"app.db\"\n").expect("write");
    assert_refused(dir.path(), "a config named config.toml");

    // Any other file: the folder is someone's.
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("notes.txt"), "mine").expect("write");
    assert_refused(dir.path(), "a folder with another file");

    // The demo's own database beside a config it did not write.
    let dir = tempfile::tempdir().expect("temp dir");
    let demo_dir = dir.path().join("demo");
    let out = demo(&demo_dir);
    assert!(out.status.success(), "{}", said(&out));
    std::fs::write(demo_dir.join("config.toml"), "database = \"app.db\"\n").expect("write");
    assert_refused(
        &demo_dir,
        "the demo's database beside a config of the user's",
    );
}

#[test]
fn the_demo_runs_again_over_its_own_folder_and_in_an_empty_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let demo_dir = dir.path().join("demo");
    for run in ["a new folder", "its own folder, again"] {
        let out = demo(&demo_dir);
        assert!(out.status.success(), "{run}: {}", said(&out));
        assert!(said(&out).contains("cachetail is serving"), "{run}");
    }
    let empty = tempfile::tempdir().expect("temp dir");
    let out = demo(empty.path());
    assert!(out.status.success(), "an empty folder: {}", said(&out));
}
