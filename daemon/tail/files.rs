//! File notifications (`notify`): ring the tail's doorbell when the database or its `-wal` file
//! changes, and the reload doorbell when the config file does.
//!
//! Directories are watched, not files: editors replace a config by renaming over it, and SQLite
//! creates and deletes the `-wal` file. The `-shm` file is ignored: the daemon's own reads touch it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use notify::{EventKind, RecursiveMode, Watcher};

use super::Doorbell;

struct Target {
    names: Vec<OsString>,
    bell: Arc<Doorbell>,
}

/// Starts watching. Keep the returned watcher alive for as long as notifications are wanted.
pub fn watch_files(
    database: &Path,
    config: Option<&Path>,
    database_bell: Arc<Doorbell>,
    config_bell: Arc<Doorbell>,
) -> notify::Result<notify::RecommendedWatcher> {
    let db_name = file_name(database);
    let mut wal_name = db_name.clone();
    wal_name.push("-wal");
    let mut targets = vec![Target {
        names: vec![db_name, wal_name],
        bell: database_bell,
    }];
    let mut dirs: Vec<PathBuf> = vec![parent(database)];
    if let Some(config) = config {
        targets.push(Target {
            names: vec![file_name(config)],
            bell: config_bell,
        });
        let dir = parent(config);
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        for target in &targets {
            let hit = event
                .paths
                .iter()
                .filter_map(|p| p.file_name())
                .any(|name| target.names.iter().any(|n| n == name));
            if hit {
                target.bell.ring();
            }
        }
    })?;
    for dir in &dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}

fn file_name(path: &Path) -> OsString {
    path.file_name().map(OsString::from).unwrap_or_default()
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
