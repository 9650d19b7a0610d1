//! Hot reload: when the config file changes (or on SIGHUP), parse → validate → check against the
//! database → diff with the config in force (`config::diff`, a pure function) → apply: the
//! registry swaps in the new config, keeping the state of the families it continues and retiring
//! the others (their values are no longer served; with Redis they are removed there). The tail
//! then adjusts capture for the new rules (it owns the triggers, so two installers never undo
//! each other). On any failure the running config stays in force, and the error is logged (with
//! line and column) and shown in `/v1/status`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::cache::Cache;
use crate::config::{Config, Reads, check, diff};
use crate::escape::Escaped;
use crate::ops::Sources;
use crate::registry::Registry;
use crate::tail::Doorbell;

/// Quiet time after the last file event before reloading: editors write in several steps.
const SETTLE: Duration = Duration::from_millis(100);

/// What a reload changes: the registry, and the cache's retired families.
pub struct Reloader {
    registry: Arc<Registry>,
    cache: Arc<Cache>,
}

impl Reloader {
    pub fn new(sources: &Sources) -> Reloader {
        Reloader {
            registry: Arc::clone(&sources.registry),
            cache: Arc::clone(&sources.cache),
        }
    }

    /// The reload loop, on its own thread until the shutdown signal.
    pub fn run(&self, bell: &Doorbell, tail_bell: &Doorbell, stop: &watch::Receiver<bool>) {
        while !*stop.borrow() {
            if !bell.wait(Duration::from_secs(1)) || *stop.borrow() {
                continue;
            }
            while bell.wait(SETTLE) {}
            if self.reload().is_ok() {
                tail_bell.ring();
            }
        }
    }

    /// Reloads the config file now. Returns the error that kept the running config, if any.
    pub fn reload(&self) -> Result<(), String> {
        let running = self.registry.config();
        let Some(path) = running.path.clone() else {
            return Ok(());
        };
        let outcome = load_checked(&path, &running).map(|(config, reads)| {
            let diff = diff::diff(&running, &config);
            let retired = self.registry.apply(config, reads, &diff);
            self.cache.retire(&retired);
        });
        self.registry.record_reload(&outcome);
        match &outcome {
            Ok(()) => {
                let live = self.registry.live();
                for gap in check::tracking_gaps(&live.config, &live.reads) {
                    tracing::warn!("{}", Escaped(gap));
                }
                tracing::info!(path = %path.display(), "config reloaded");
            }
            Err(error) => {
                tracing::error!(path = %path.display(), error = %Escaped(error), "config reload refused; the running config stays in force");
            }
        }
        outcome
    }
}

/// The new config, checked against the database, and what its queries read; or why not.
fn load_checked(path: &Path, running: &Config) -> Result<(Config, Reads), String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let fixed = diff::diff(running, &config).fixed;
    if !fixed.is_empty() {
        return Err(fixed.join("\n"));
    }
    let mut conn = crate::db::open(&config.database).map_err(|e| e.to_string())?;
    let reads = check::check_database(&config, &mut conn).map_err(|e| e.to_string())?;
    Ok((config, reads))
}
