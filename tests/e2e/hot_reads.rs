//! The hot path (a GET of a value in memory, answered at once with no timeout armed): what it
//! answers is what the slow path answers — the same bytes, `X-Cache`, an `ETag` that is the body's
//! hash, `Age`, `Cache-Control`, `304` on `If-None-Match` — whatever spelling of the key reaches
//! it, and every hit from many connections at once is counted (the hit counters are striped per
//! thread and summed when read).

use std::sync::{Arc, Barrier};

use crate::common::*;

/// FNV-1a, 64 bits: the ETag's hash (as the daemon computes it).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn hits_from_many_connections_are_answered_whole_and_each_counted() {
    let catalog = Catalog::new();
    let port = free_port();
    let mut daemon = Daemon::start(&catalog, &reference_config(port), port);
    let filled = daemon.get("book:1");
    assert_eq!((filled.status, x_cache(&filled)), (200, "miss"));
    let body = filled.body.clone();
    let etag = format!("\"{:016x}\"", fnv1a(&body));
    assert_eq!(filled.header("etag"), Some(etag.as_str()));

    let hits_before = daemon.status()["hits"].as_u64().expect("hits");
    const CLIENTS: usize = 8;
    const EACH: usize = 300;
    let start = Arc::new(Barrier::new(CLIENTS));
    let readers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (start, body, etag) = (Arc::clone(&start), body.clone(), etag.clone());
            let address = daemon.address;
            std::thread::spawn(move || {
                let mut client = Client::new(address);
                start.wait();
                for n in 0..EACH {
                    // Every other client spells the key percent-encoded: decoded, it is the
                    // same key, served from memory all the same.
                    let path = match i % 2 {
                        0 => "/v1/keys/book:1",
                        _ => "/v1/keys/book%3A1",
                    };
                    let reply = client.get(path).expect("GET book:1");
                    assert_eq!((reply.status, x_cache(&reply)), (200, "hit"), "read {n}");
                    assert_eq!(reply.body, body, "read {n}");
                    assert_eq!(reply.header("etag"), Some(etag.as_str()), "read {n}");
                    assert_eq!(reply.header("content-type"), Some("application/json"));
                    let age: u64 = reply.header("age").expect("Age").parse().expect("a number");
                    let control = reply.header("cache-control").expect("Cache-Control");
                    let max_age: u64 = control
                        .strip_prefix("max-age=")
                        .and_then(|s| s.parse().ok())
                        .unwrap_or_else(|| panic!("Cache-Control: {control}"));
                    // The reference config's book family: a TTL of 600 s.
                    assert!(
                        age + max_age <= 600 && age + max_age >= 598,
                        "{age} + {max_age}"
                    );
                }
            })
        })
        .collect();
    for reader in readers {
        reader.join().expect("a reader");
    }
    let status = daemon.status();
    assert_eq!(
        status["hits"].as_u64().expect("hits") - hits_before,
        (CLIENTS * EACH) as u64,
        "every hit is counted once"
    );
    let family = status["config"]["families"]
        .as_array()
        .expect("families")
        .iter()
        .find(|f| f["pattern"] == "book:{id}")
        .expect("the book family")
        .clone();
    assert!(family["hits"].as_u64().expect("family hits") >= (CLIENTS * EACH) as u64);

    // Revalidation on the hot path: 304 with the tag, headers only.
    let revalidated = Client::new(daemon.address)
        .request("GET", "/v1/keys/book:1", &[("If-None-Match", &etag)], &[])
        .expect("revalidate");
    assert_eq!(revalidated.status, 304);
    assert!(revalidated.body.is_empty());
    assert_eq!(revalidated.header("etag"), Some(etag.as_str()));
    // A malformed key is refused at once, as before: 400 with what is wrong.
    let malformed = daemon.get_path("/v1/keys/book%zz");
    assert_eq!(malformed.status, 400);
    assert!(
        malformed.text().contains("malformed key"),
        "{}",
        malformed.text()
    );
}
