//! Two daemons on one database, seen from the standby's side: a standby never serves from a
//! Redis restored from a snapshot older than the durable cursor (whether it started before or
//! after the restore), and admin actions sent to a standby take effect, on the Redis and on the
//! memory backend, through the outbox the active daemon applies.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

use crate::common::*;
use crate::redis::{RedisServer, redis_config};
use crate::strategies::catalog_config;

const PREFIX: &str = "ct:";
const TOKEN: &str = "standby-admin-token-0123456789";

fn role(daemon: &mut Daemon) -> String {
    daemon.status()["role"].as_str().unwrap_or("").to_owned()
}

fn start_active(config: &Path, port: u16) -> Daemon {
    let mut daemon = Daemon::start_existing(config, port);
    eventually("the daemon holds the lease", || {
        (role(&mut daemon) == "active").then_some(())
    });
    daemon
}

fn start_standby(config: &Path, port: u16) -> Daemon {
    let mut daemon = Daemon::start_existing(config, port);
    assert_eq!(role(&mut daemon), "standby");
    daemon
}

fn write_named(catalog: &Catalog, name: &str, text: &str) -> PathBuf {
    let path = catalog.path().join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// The config with a lease far longer than the test: the standby stays a standby.
fn with_long_lease(config: &str) -> String {
    let with = if config.contains("lease = \"1s\"") {
        config.replace("lease = \"1s\"", "lease = \"30s\"")
    } else {
        config.replace(
            "[tail]\npoll_interval = \"100ms\"",
            "[tail]\npoll_interval = \"100ms\"\nlease = \"30s\"",
        )
    };
    assert_ne!(with, config, "the lease was not set");
    with
}

fn signal(daemon: &Daemon, signal: &str) {
    let pid = daemon.pid().expect("running");
    let ok = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
}

fn review_count(text: &str) -> i64 {
    serde_json::from_str::<Value>(text).expect("JSON")["review_count"]
        .as_i64()
        .unwrap_or_else(|| panic!("a review_count in {text}"))
}

fn durable_cursor(catalog: &Catalog) -> u64 {
    catalog
        .sqlite_cli("SELECT position FROM cachetail_cursor")
        .parse()
        .expect("the durable cursor")
}

fn outbox_head(catalog: &Catalog) -> u64 {
    catalog
        .sqlite_cli("SELECT max(id) FROM cachetail_outbox")
        .parse()
        .expect("the outbox head")
}

#[test]
fn a_standby_never_serves_from_a_redis_restored_from_a_snapshot_older_than_the_durable_cursor() {
    let mut redis = RedisServer::start();
    let catalog = Catalog::new();
    let ports = [free_port(), free_port(), free_port()];
    let config = |port| with_long_lease(&redis_config(port, &redis, "delete"));
    let config_c = write_named(&catalog, "c.toml", &config(ports[2]));
    let mut a = start_active(&catalog.write_config(&config(ports[0])), ports[0]);
    // A standby running since before the restore, which never reads before it.
    let mut b = start_standby(
        &write_named(&catalog, "b.toml", &config(ports[1])),
        ports[1],
    );
    for key in ["book:1", "book:2", "top-books", "user:1"] {
        assert_eq!(a.get(key).status, 200, "{key}");
    }
    assert_eq!(x_cache(&a.get("book:1")), "hit");
    let stale = redis.value("book:1").expect("book:1 is in redis");
    assert_eq!(review_count(&stale), 2);

    // A snapshot, then a change the active daemon applies (Redis drops book:1) and makes durable.
    assert_eq!(redis.cli(&["SAVE"]), "OK");
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 5)')");
    let position = outbox_head(&catalog);
    eventually("the change is applied and the cursor durable", || {
        (redis.value("book:1").is_none() && durable_cursor(&catalog) >= position).then_some(())
    });
    eventually("the standby follows the durable cursor", || {
        (b.status()["cursor"].as_u64()? >= position).then_some(())
    });

    // The active daemon is frozen: it applies nothing new and looks at nothing. Redis comes back
    // from the snapshot, which misses the change the durable cursor covers.
    signal(&a, "-STOP");
    redis.restart();
    assert_eq!(redis.value("book:1"), Some(stale.clone()), "the snapshot");
    let restored: u64 = redis
        .cli(&["HGET", &format!("{PREFIX}#state"), "applied"])
        .parse()
        .expect("applied");
    assert!(restored < position, "{restored} < {position}");
    // A standby started now.
    let mut c = start_standby(&config_c, ports[2]);
    for (name, standby) in [
        ("a standby started after the restore", &mut c),
        ("a standby that never read before the restore", &mut b),
    ] {
        for _ in 0..3 {
            let reply = standby.get("book:1");
            assert_eq!(reply.status, 200, "{name}: {}", reply.text());
            assert_eq!(
                review_count(&reply.text()),
                3,
                "{name} served the snapshot's value, older than the durable cursor ({} {:?})",
                x_cache(&reply),
                reply.header("x-cachetail-bypass")
            );
            assert_eq!(
                (x_cache(&reply), reply.header("x-cachetail-bypass")),
                ("bypass", Some("redis-unavailable")),
                "{name}"
            );
        }
    }
    assert_eq!(
        redis.value("book:1"),
        Some(stale),
        "nothing was stored into the lost state"
    );

    // The active daemon resumes: it finds on its own, with no change to apply, that Redis lost
    // what it had applied, and rebuilds it. The standbys then use Redis again.
    signal(&a, "-CONT");
    let started = Instant::now();
    for standby in [&mut c, &mut b] {
        eventually("the standby serves from the rebuilt redis", || {
            let reply = standby.get("book:1");
            assert_eq!(review_count(&reply.text()), 3);
            (x_cache(&reply) == "hit").then_some(())
        });
    }
    eprintln!(
        "redis rebuilt by the idle active daemon {:?} after it resumed",
        started.elapsed()
    );
    assert_eq!(a.status()["role"], "active");
}

/// The catalog config on either backend, an admin token, a long lease, and a family no rule
/// refreshes (`year:{id}`, tagged `years`): a change to a book's year leaves it stale, which is
/// what operators flush for.
fn admin_config(port: u16, redis: Option<&RedisServer>) -> String {
    let base = match redis {
        Some(redis) => redis_config(port, redis, "delete"),
        None => catalog_config(port, "delete", "20ms"),
    };
    let with_token = base.replacen(
        "\n[tail]",
        &format!("\nadmin_token = \"{TOKEN}\"\nfresh_timeout = \"1s\"\n\n[tail]"),
        1,
    );
    assert_ne!(with_token, base);
    format!(
        "{}\n[keys.\"year:{{id}}\"]\nquery = \"SELECT id, year FROM books WHERE id = :id\"\ntags = [\"years\"]\n",
        with_long_lease(&with_token)
    )
}

fn year(reply: &Reply) -> i64 {
    json(reply)["year"]
        .as_i64()
        .unwrap_or_else(|| panic!("a year in {}", reply.text()))
}

/// Admin actions sent to the standby `b` while `a` is active: each takes effect on what the
/// active daemon serves (and on the standby's answers), at once.
fn admin_actions_sent_to_the_standby_take_effect(redis: Option<&RedisServer>) {
    let catalog = Catalog::new();
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = start_active(&catalog.write_config(&admin_config(port_a, redis)), port_a);
    let mut b = start_standby(
        &write_named(&catalog, "b.toml", &admin_config(port_b, redis)),
        port_b,
    );
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let actions = [
        ("DELETE", "/v1/keys/year:1"),
        ("POST", "/v1/admin/invalidate?tag=years"),
        ("POST", "/v1/admin/flush?family=year%3A%7Bid%7D"),
        ("POST", "/v1/admin/flush"),
    ];
    for (round, (method, path)) in actions.into_iter().enumerate() {
        a.get("year:1");
        let cached = a.get("year:1");
        assert_eq!(x_cache(&cached), "hit", "{path}");
        // A change no rule maps to `year:1`: the active daemon keeps the old value.
        let new_year = 1900 + round as i64;
        catalog.python(&format!(
            "con.execute('UPDATE books SET year = {new_year} WHERE id = 1')"
        ));
        a.wait_caught_up();
        let stale = a.get("year:1");
        assert_eq!(
            (x_cache(&stale), year(&stale)),
            ("hit", year(&cached)),
            "{path}: the active daemon's value is stale before the action"
        );

        let reply = b.request_with(method, path, &auth).expect("admin");
        assert_eq!(reply.status, 200, "{method} {path}: {}", reply.text());
        let position = json(&reply)["position"].as_u64().expect("a position");
        // As soon as the standby answered, the active daemon has applied it.
        let after = a.get("year:1");
        assert_eq!(
            year(&after),
            new_year,
            "{method} {path} sent to the standby (position {position}) did nothing on the active daemon ({})",
            x_cache(&after)
        );
        assert_eq!(year(&b.get("year:1")), new_year, "{path}");
        if let Some(redis) = redis {
            let stored = redis.value("year:1").expect("refilled");
            assert_eq!(
                serde_json::from_str::<Value>(&stored).expect("JSON")["year"],
                new_year
            );
        }
        assert!(a.status()["cursor"].as_u64() >= Some(position));
    }

    // Without the right token a standby refuses as the active daemon does.
    let reply = b
        .request_with("POST", "/v1/admin/flush", &[])
        .expect("admin");
    assert_eq!(reply.status, 401, "{}", reply.text());

    // The active daemon frozen: the standby cannot have the action applied in time. It says so,
    // naming the active daemon, and the action takes effect once that daemon resumes.
    a.get("year:1");
    catalog.python("con.execute('UPDATE books SET year = 1850 WHERE id = 1')");
    a.wait_caught_up();
    assert_eq!(x_cache(&a.get("year:1")), "hit");
    signal(&a, "-STOP");
    let reply = b
        .request_with("DELETE", "/v1/keys/year:1", &auth)
        .expect("admin");
    signal(&a, "-CONT");
    assert_eq!(reply.status, 202, "{}", reply.text());
    let answer = json(&reply);
    let pid = a.pid().expect("running").to_string();
    let holder = answer["active"].as_str().unwrap_or("");
    assert!(
        holder.contains(&format!(":{pid}:")),
        "the answer names the active daemon (pid {pid}): {answer}"
    );
    assert_eq!(answer["applied"], false, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains(holder)),
        "{answer}"
    );
    eventually(
        "the action takes effect once the active daemon resumes",
        || (year(&a.get("year:1")) == 1850).then_some(()),
    );
}

#[test]
fn admin_actions_sent_to_a_standby_on_redis_take_effect() {
    let redis = RedisServer::start();
    admin_actions_sent_to_the_standby_take_effect(Some(&redis));
}

#[test]
fn admin_actions_sent_to_a_standby_on_memory_take_effect_on_the_active_daemon() {
    admin_actions_sent_to_the_standby_take_effect(None);
}
