//! End-to-end tests: the real `cachetail` binary (or library), a real SQLite file written by
//! separate processes, real HTTP over loopback. One test binary, so the crate links once.

mod browser;
mod common;
mod config_claims;
mod config_limits;
mod crash;
mod demo;
mod demo_dir;
mod feed;
mod fuzz;
mod hostile_text;
mod hosts;
mod http;
mod in_flight;
mod lease_namespaces;
mod lifecycle;
mod limits;
mod migrations;
mod never_hurt;
mod outbox_rebuilt;
mod poisoned_rows;
mod race;
mod recompute;
mod redis;
mod redis_claims;
mod redis_limits;
mod reload;
mod secrets;
mod spellings;
mod standby;
mod startup;
mod strategies;
mod stream_fanout;
mod write_shapes;
