//! Hot reload: when the config file changes, parse → validate → check against the database →
//! swap. The tail then adjusts capture for the new rules (it owns the triggers, so two installers
//! never undo each other). On any failure the running config stays in force and the error is
//! logged (with line and column) and shown in `/v1/status`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use crate::config::Config;
use crate::state::Shared;
use crate::tail::Doorbell;
use crate::{check, sqlite};

/// Quiet time after the last file event before reloading: editors write in several steps.
const SETTLE: Duration = Duration::from_millis(100);

/// The reload loop, on its own thread until `stop`.
pub fn run(
    shared: Arc<Shared>,
    bell: Arc<Doorbell>,
    tail_bell: Arc<Doorbell>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Acquire) {
        if !bell.wait(Duration::from_secs(1)) || stop.load(Ordering::Acquire) {
            continue;
        }
        while bell.wait(SETTLE) {}
        if reload(&shared).is_ok() {
            tail_bell.ring();
        }
    }
}

/// Reloads the config file now. Returns the error that kept the running config, if any.
pub fn reload(shared: &Shared) -> Result<(), String> {
    let running = shared.config();
    let Some(path) = running.path.clone() else {
        return Ok(());
    };
    let outcome = load_checked(&path, &running).map(|mut config| {
        config.adopt_families_from(&running);
        let replaced: Vec<(String, String)> = running
            .families
            .iter()
            .filter(|old| old.retired.load(Ordering::Acquire))
            .filter(|old| !config.families.iter().any(|f| f.group == old.group))
            .map(|old| (old.pattern.source().to_owned(), old.group.clone()))
            .collect();
        shared.swap_config(Arc::new(config));
        if shared.redis.is_some() {
            shared.retire_families(replaced);
        }
    });
    let mut state = shared.reload.lock().unwrap_or_else(|e| e.into_inner());
    match &outcome {
        Ok(()) => {
            for gap in check::tracking_gaps(&shared.config()) {
                tracing::warn!("{gap}");
            }
            state.reloads += 1;
            state.last_error = None;
            state.loaded_at = Some(SystemTime::now());
            tracing::info!(path = %path.display(), "config reloaded");
        }
        Err(error) => {
            state.failures += 1;
            state.last_error = Some(error.clone());
            tracing::error!(path = %path.display(), "config reload refused; the running config stays in force:\n{error}");
        }
    }
    outcome
}

fn load_checked(path: &std::path::Path, running: &Config) -> Result<Config, String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let fixed = config.fixed_settings_changed(running);
    if !fixed.is_empty() {
        return Err(fixed.join("\n"));
    }
    let mut conn = sqlite::open(&config.database).map_err(|e| e.to_string())?;
    check::check_database(&config, &mut conn).map_err(|e| e.to_string())?;
    Ok(config)
}
