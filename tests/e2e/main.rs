//! End-to-end tests: the real `cachetail` binary (or library), a real SQLite file written by
//! separate processes, real HTTP over loopback. One test binary, so the crate links once.

mod browser;
mod common;
mod config_claims;
mod crash;
mod demo;
mod feed;
mod fuzz;
mod http;
mod in_flight;
mod lease_namespaces;
mod lifecycle;
mod migrations;
mod never_hurt;
mod outbox_rebuilt;
mod poisoned_rows;
mod race;
mod redis;
mod redis_claims;
mod reload;
mod strategies;
mod write_shapes;
