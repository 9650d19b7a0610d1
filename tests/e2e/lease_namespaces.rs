//! Two daemons on one host in separate PID namespaces (two containers sharing the database's
//! folder, same hostname): neither may read the other's pid as "gone" and take the lease while
//! its holder lives. One daemon runs inside `unshare --pid --fork --mount-proc` (or, where plain
//! unshare is not permitted, in a user namespace too), the other outside. The takeover happens
//! when the lease runs out after the holder is killed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

/// Short, so the test waits for it to run out; the holder renews it every third.
const LEASE: &str = "2s";
/// How long a standby is watched while the holder lives: longer than the lease, and ten times
/// the standby's poll (a wrong "process gone" verdict takes over at its first poll).
const WATCH: Duration = Duration::from_millis(2500);
/// A takeover sooner than this after kill -9 did not wait for the lease (2 s, renewed every
/// 667 ms: at least 1.33 s of it is left at any moment).
const NOT_BEFORE: Duration = Duration::from_millis(1000);

/// How to enter new PID (and mount) namespaces here: plain `unshare` as root, else with a user
/// namespace. None: neither works on this machine.
fn unshare_flags() -> Option<Vec<&'static str>> {
    let plain = vec!["--pid", "--fork", "--kill-child", "--mount-proc"];
    let user = vec![
        "--user",
        "--map-root-user",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
    ];
    [plain, user].into_iter().find(|flags| {
        Command::new("unshare")
            .args(flags)
            .args(["sh", "-c", "test \"$$\" = 1"])
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// A pid nobody uses outside the namespace now, to give the daemon inside: a process outside that
/// looked it up in its own `/proc` would find it gone.
fn pid_free_outside() -> u32 {
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|m| m.trim().parse().ok())
        .unwrap_or(32768);
    (max / 2..max)
        .find(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        .expect("a free pid")
}

/// `cachetail run --config CONFIG` inside new PID and mount namespaces, as pid `pid` there (set
/// through `ns_last_pid`, which the namespace's own root may write). Killing the `unshare`
/// process kills everything inside (`--kill-child` kills its init).
fn inside_namespace(flags: &[&str], config: &Path, pid: u32) -> Command {
    let mut command = Command::new("unshare");
    command
        .args(flags)
        .args([
            "sh",
            "-c",
            "echo $(($0 - 1)) > /proc/sys/kernel/ns_last_pid; \"$1\" run --config \"$2\" & wait",
        ])
        .arg(pid.to_string())
        .arg(env!("CARGO_BIN_EXE_cachetail"))
        .arg(config)
        .env("RUST_LOG", "warn,cachetail=info");
    command
}

fn outside(config: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cachetail"));
    command
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn,cachetail=info");
    command
}

fn role(daemon: &mut Daemon) -> String {
    daemon.status()["role"].as_str().unwrap_or("").to_owned()
}

fn config_for(catalog: &Catalog, name: &str, port: u16) -> PathBuf {
    let text = reference_config(port).replace(
        "[write_behind]",
        &format!("[tail]\nlease = \"{LEASE}\"\n\n[write_behind]"),
    );
    let path = catalog.path().join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// `standby` stays a standby for `WATCH` while `holder` keeps the lease.
fn no_takeover_while_the_holder_lives(holder: &mut Daemon, standby: &mut Daemon, what: &str) {
    let start = Instant::now();
    while start.elapsed() < WATCH {
        assert_eq!(
            role(standby),
            "standby",
            "{what}: the standby took the lease after {:?} while its holder was alive",
            start.elapsed()
        );
        assert_eq!(role(holder), "active", "{what}: the holder lost the lease");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// kill -9 of `holder`: `standby` takes over once the lease ran out, not before.
fn takeover_after_the_lease(holder: &mut Daemon, standby: &mut Daemon, what: &str) -> Duration {
    holder.kill();
    let killed = Instant::now();
    eventually(&format!("{what}: the standby takes over"), || {
        (role(standby) == "active").then_some(())
    });
    let took = killed.elapsed();
    assert!(
        took >= NOT_BEFORE,
        "{what}: the standby took over {took:?} after kill -9, before the lease ({LEASE}) ran out: \
         it cannot know that a process in another PID namespace is gone"
    );
    took
}

#[test]
fn daemons_in_separate_pid_namespaces_do_not_take_the_lease_from_a_live_holder() {
    let Some(flags) = unshare_flags() else {
        eprintln!(
            "SKIPPED: neither `unshare --pid --fork --mount-proc` nor its `--user --map-root-user` \
             variant works on this machine, so no second PID namespace can be made"
        );
        return;
    };
    let catalog = Catalog::new();
    let (port_out, port_in) = (free_port(), free_port());
    let config_out = config_for(&catalog, "outside.toml", port_out);
    let config_in = config_for(&catalog, "inside.toml", port_in);
    let pid_in = pid_free_outside();

    // The holder outside, a standby inside: inside, the holder's pid names no process.
    let (mut out, _log_out) = Daemon::start_logged(outside(&config_out), &config_out, port_out);
    eventually("the daemon outside holds the lease", || {
        (role(&mut out) == "active").then_some(())
    });
    let (mut inside, _log_in) = Daemon::start_logged(
        inside_namespace(&flags, &config_in, pid_in),
        &config_in,
        port_in,
    );
    no_takeover_while_the_holder_lives(&mut out, &mut inside, "holder outside, standby inside");
    let took_in = takeover_after_the_lease(&mut out, &mut inside, "holder outside killed");

    // The holder inside (as a pid no process has outside), a standby outside.
    let (mut out, _log_out) = Daemon::start_logged(outside(&config_out), &config_out, port_out);
    no_takeover_while_the_holder_lives(&mut inside, &mut out, "holder inside, standby outside");
    let took_out = takeover_after_the_lease(&mut inside, &mut out, "holder inside killed");
    eprintln!(
        "takeovers across PID namespaces after kill -9 (lease {LEASE}): {took_in:?} inside, {took_out:?} outside"
    );

    // The daemon that took over applies.
    catalog.sqlite_cli("INSERT INTO reviews (book_id, user_id, rating) VALUES (2, 3, 3)");
    let reply = out.get_path("/v1/keys/book:2?fresh=1");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(json(&reply)["review_count"], 2);
}
