//! Write-behind recomputes stay off the app's path: they run on threads of their own, at the
//! lowest CPU priority, and still bring a key back fresh without a read.

use crate::common::*;
use crate::strategies::catalog_config;

/// The daemon's threads named `cachetail-wb-*`, with their nice values (Linux's
/// `/proc/<pid>/task/<tid>/stat`, field 19).
fn write_behind_threads(pid: u32) -> Vec<(String, i64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the daemon's threads");
    let mut found = Vec::new();
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("cachetail-wb-") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).expect("stat");
        // After the name in parentheses: state is field 3, nice field 19.
        let after_name = &stat[stat.rfind(')').expect("a name in parentheses") + 2..];
        let nice = after_name
            .split(' ')
            .nth(16)
            .and_then(|n| n.parse().ok())
            .expect("nice");
        found.push((comm.trim().to_owned(), nice));
    }
    found.sort();
    found
}

#[test]
fn write_behind_recomputes_run_on_their_own_threads_at_the_lowest_priority() {
    let catalog = Catalog::new();
    let port = free_port();
    let config = catalog_config(port, "write-behind", "10ms")
        .replace("[write_behind]\n", "[write_behind]\nworkers = 3\n");
    let mut daemon = Daemon::start(&catalog, &config, port);
    let pid = daemon.pid().expect("the daemon's pid");
    let threads = eventually("the write-behind workers run", || {
        Some(write_behind_threads(pid)).filter(|t| t.len() == 3)
    });
    assert!(
        threads.iter().all(|(_, nice)| *nice == 19),
        "every write-behind worker runs at nice 19: {threads:?}"
    );

    // They do their work: a change to a cached key brings it back fresh without a read.
    assert_eq!(json(&daemon.get("book:1"))["review_count"], 2);
    catalog
        .python("con.execute('INSERT INTO reviews (book_id, user_id, rating) VALUES (1, 3, 1)')");
    daemon.wait_caught_up();
    let back = eventually("the write-behind recompute stores book:1", || {
        Some(daemon.peek("book:1")).filter(|r| r.status == 200)
    });
    assert_eq!(json(&back)["review_count"], 3);
    assert_eq!(daemon.status()["write_behind_queue"], 0);
}
