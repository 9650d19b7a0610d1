//! The subcommands that call the library: `run` (the daemon), `check`, `install`, `pause`,
//! `resume`, `uninstall` and `explain` (on a config and its database, no daemon needed), and
//! `verify` (asks the running daemon over HTTP).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use cachetail::Config;
use cachetail::commands::{self as library, Op};
use cachetail::escape::Escaped;

use crate::client::Client;

/// `cachetail run`: the daemon, until Ctrl-C or SIGTERM.
pub fn run(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        println!("cachetail listening on http://{}", listener.local_addr()?);
        cachetail::run(config, listener, shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

/// `cachetail check`: the config, then against its database; derived rules and tracking gaps.
pub fn check(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let report = library::check(&config)?;
    // Table and column names come from the app's schema: printed escaped.
    for warning in &report.warnings {
        eprintln!("warning: {}", Escaped(warning));
    }
    for line in &report.derived {
        println!("{}", Escaped(line));
    }
    for gap in &report.gaps {
        eprintln!("warning: {}", Escaped(gap));
    }
    println!(
        "{}: ok ({} key families, {} rules, watching {})",
        config.file,
        config.families.len(),
        config.rules.len(),
        config
            .captured_columns()
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

/// `cachetail install`.
pub fn install(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    library::install(&config)?;
    println!("capture installed in {}", config.database.display());
    Ok(ExitCode::SUCCESS)
}

/// `cachetail pause`.
pub fn pause(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let triggers = library::pause(&config)?;
    println!(
        "capture paused: {triggers} triggers removed from {}; run your migration, then `cachetail resume`",
        config.database.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `cachetail resume`.
pub fn resume(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let resumed = library::resume(&config)?;
    println!(
        "capture resumed: {} triggers installed; values read from {} before are dropped",
        resumed.triggers,
        resumed.flushed.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

/// `cachetail uninstall`.
pub fn uninstall(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let triggers = library::uninstall(&config)?;
    println!(
        "removed {triggers} triggers and cachetail's tables from {}",
        config.database.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `cachetail explain`: the keys, tags and strategies a synthetic change maps to (exit 2 if the
/// change cannot be explained).
pub fn explain(
    config_path: &Path,
    table: &str,
    op: &str,
    old: Option<&str>,
    new: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let op = match op {
        "insert" => Op::Insert,
        "update" => Op::Update,
        _ => Op::Delete,
    };
    let explained = match library::explain_change(&config, table, (op, old, new)) {
        Ok(explained) => explained,
        Err(e) => {
            eprintln!("error: {}", Escaped(&e));
            return Ok(ExitCode::from(2));
        }
    };
    println!("{} on {table}:", op.name());
    if explained.flush_all {
        println!("  everything is dropped (the change cannot be mapped to keys)");
    }
    // Keys and tags rendered from row values: printed escaped.
    let keys: Vec<(String, &str)> = explained
        .keys
        .iter()
        .map(|(key, strategy)| (cachetail::escape::escape(key), strategy.name()))
        .collect();
    let width = keys
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    for (key, strategy) in &keys {
        println!("  key  {key:<width$}  {strategy}");
    }
    for tag in &explained.tags {
        println!("  tag  {}", Escaped(tag));
    }
    if explained.keys.is_empty()
        && explained.tags.is_empty()
        && explained.lookups.is_empty()
        && !explained.flush_all
    {
        println!("  nothing (no rule fires for it)");
    }
    for note in &explained.not_shown {
        println!("  (not shown: {note})");
    }
    for looked in &explained.lookups {
        println!("{}", looked_line(looked));
    }
    for (pattern, shape) in &explained.maintained {
        println!(
            "  maintained  {pattern}  ({shape}: its state takes the change in, not a full re-run)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One lookup a change asks for, and what it found (or why its family is dropped instead).
fn looked_line(looked: &library::Looked) -> String {
    let asked = Escaped(&looked.values.join(", ")).to_string();
    let head = format!("  lookup  {} via {} for {asked}", looked.key, looked.via);
    match &looked.outcome {
        None => format!("{head} (the database is not at hand: not run)"),
        Some(Ok(found)) => {
            let mut found = found.clone();
            found.dedup();
            format!("{head}: found {}", Escaped(&found.join(", ")))
        }
        Some(Err(reason)) => format!("{head}: the whole family is dropped instead ({reason})"),
    }
}

/// `cachetail verify`: `POST /v1/verify` on the running daemon; exit 1 if anything was stale.
pub fn verify(config_path: &Path, sample: usize) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let mut client = Client::new(config.listen);
    let bearer = config
        .admin_token
        .as_ref()
        .map(|t| format!("Bearer {}", t.expose()));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("Authorization", b)])
        .unwrap_or_default();
    let reply = client
        .request(
            "POST",
            &format!("/v1/verify?sample={sample}"),
            &headers,
            &[],
        )
        .with_context(|| format!("cannot reach the daemon at {}", config.listen))?;
    let report = reply.json()?;
    if reply.status != 200 {
        anyhow::bail!("the daemon answered {}: {}", reply.status, report["error"]);
    }
    // JSON escapes control characters but not bidi overrides or C1 controls: the stale keys
    // are the app's data.
    for line in serde_json::to_string_pretty(&report)?.lines() {
        println!("{}", Escaped(line));
    }
    let stale = report["stale"].as_u64().unwrap_or(0);
    Ok(if stale == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
