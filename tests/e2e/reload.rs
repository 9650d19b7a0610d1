//! Editing the config while the daemon runs.

use crate::common::*;
use crate::strategies::catalog_config;

#[test]
fn a_valid_edit_takes_effect_and_drops_the_values_of_a_changed_family() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog_config(port, "delete", "50ms");
    let mut daemon = Daemon::start(&catalog, &config, port);
    assert_eq!(daemon.get("author:1").status, 404, "no such family yet");
    assert_eq!(json(&daemon.get("user:1"))["name"], "user1");
    daemon.get("book:1");

    let edited = config.replace(
        "query = \"SELECT id, name FROM users WHERE id = :id\"",
        "query = \"SELECT id, upper(name) AS name FROM users WHERE id = :id\"",
    ) + "\n[keys.\"author:{id}\"]\nquery = \"SELECT id, author FROM books WHERE id = :id\"\n";
    catalog.write_config(&edited);
    eventually("the reload is counted", || {
        (daemon.status()["config"]["reloads"] == 1).then_some(())
    });
    assert_eq!(
        json(&daemon.get("author:1"))["author"],
        "Author 1",
        "the new family serves"
    );
    assert_eq!(
        json(&daemon.get("user:1"))["name"],
        "USER1",
        "the changed family's old value was dropped"
    );
    assert_eq!(
        x_cache(&daemon.get("book:1")),
        "hit",
        "an unchanged family keeps its values"
    );
}

#[test]
fn a_new_rule_adjusts_the_triggers() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog_config(port, "delete", "50ms");
    let mut daemon = Daemon::start(&catalog, &config, port);
    // A family no rule refreshes yet: the user's review count.
    let edited = config
        + "\n[keys.\"reviews-by:{id}\"]\nquery = \"SELECT count(*) AS n FROM reviews WHERE user_id = :id\"\n";
    catalog.write_config(&edited);
    eventually("first reload", || {
        (daemon.status()["config"]["reloads"] == 1).then_some(())
    });
    assert_eq!(json(&daemon.get("reviews-by:3"))["n"], 0);

    // Now a rule that captures reviews.user_id, which no trigger recorded before.
    let with_rule =
        edited + "\n[[rules]]\ntable = \"reviews\"\nkeys = [\"reviews-by:{user_id}\"]\n";
    catalog.write_config(&with_rule);
    eventually("second reload", || {
        (daemon.status()["config"]["reloads"] == 2).then_some(())
    });
    let triggers =
        catalog.sqlite_cli("SELECT sql FROM sqlite_master WHERE name = 'cachetail_insert_reviews'");
    assert!(
        triggers.contains("\"user_id\""),
        "the insert trigger now records user_id: {triggers}"
    );

    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (2, 3, 4)')");
    daemon.wait_caught_up();
    assert_eq!(json(&daemon.get("reviews-by:3"))["n"], 1);
}

#[test]
fn an_invalid_edit_keeps_the_running_rules_and_reports_where_it_is_wrong() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog_config(port, "write-through", "50ms");
    let mut daemon = Daemon::start(&catalog, &config, port);

    // A TOML syntax error on line 3.
    catalog.write_config(&config.replacen("listen", "listen = = ", 1));
    let error = eventually("the failed reload shows in /v1/status", || {
        daemon.status()["config"]["last_reload_error"]
            .as_str()
            .map(str::to_owned)
    });
    assert!(
        error.contains("config.toml:3:"),
        "the error names file:line:column: {error}"
    );

    // The running rules still apply.
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (5, 1, 5)')");
    daemon.wait_caught_up();
    let book = daemon.get("book:5");
    assert_eq!(
        (x_cache(&book), json(&book)["review_count"].as_i64()),
        ("hit", Some(1))
    );

    // A query that does not prepare is refused too, with its location.
    catalog
        .write_config(&config.replace("SELECT id, name FROM users", "SELECT id, nam FROM users"));
    let error = eventually("the second failure shows", || {
        let status = daemon.status();
        (status["config"]["reload_failures"] == 2)
            .then(|| status["config"]["last_reload_error"].to_string())
    });
    assert!(error.contains("no such column: nam"), "{error}");
    assert!(error.contains("config.toml:23:"), "{error}");

    // Changing `listen` live is refused with a clear message.
    let other = free_port();
    catalog.write_config(&config.replace(&port.to_string(), &other.to_string()));
    let error = eventually("the listen change is refused", || {
        let status = daemon.status();
        (status["config"]["reload_failures"] == 3)
            .then(|| status["config"]["last_reload_error"].to_string())
    });
    assert!(
        error.contains("`listen` cannot change while the daemon runs"),
        "{error}"
    );

    // Fixing the file clears the error.
    catalog.write_config(&config);
    eventually("a good file reloads", || {
        let status = daemon.status();
        (status["config"]["reloads"] == 1 && status["config"]["last_reload_error"].is_null())
            .then_some(())
    });
}

#[test]
fn sighup_reloads_the_config() {
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &catalog_config(port, "delete", "50ms"), port);
    let pid = daemon.pid().expect("running").to_string();
    // The file is unchanged, so no file notification: only the signal can cause this reload.
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    eventually("the reload is counted", || {
        (daemon.status()["config"]["reloads"] == 1).then_some(())
    });
    assert_eq!(daemon.get("user:1").status, 200, "still serving");
}
