//! The config file as written: TOML into serde structs (`deny_unknown_fields`, with spans), and
//! the problems found in it, each located at `file:line:column`. `validate` turns these structs
//! into the plain data of `Config`.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::{Config, Secret};
use crate::types::{Op, Strategy};

// The file format.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) database: Spanned<String>,
    pub(super) listen: Option<Spanned<String>>,
    pub(super) fresh_timeout: Option<Spanned<String>>,
    pub(super) admin_token: Option<Spanned<Secret>>,
    /// `"auto"`: every family derives its rules from its query (unless it says otherwise).
    pub(super) invalidate: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) cache: RawCache,
    #[serde(default)]
    pub(super) write_behind: RawWriteBehind,
    #[serde(default)]
    pub(super) tail: RawTail,
    #[serde(default)]
    pub(super) http: RawHttp,
    #[serde(default)]
    pub(super) keys: BTreeMap<Spanned<String>, RawFamily>,
    #[serde(default)]
    pub(super) rules: Vec<RawRule>,
}

/// A size: a number of bytes, or a text with a unit (`"512MiB"`, `"2 GB"`).
#[derive(Deserialize, Debug, Clone)]
#[serde(
    untagged,
    expecting = "a size: a whole number of bytes, or a text such as \"512MiB\" or \"2GB\""
)]
pub(super) enum RawSize {
    Bytes(i64),
    Text(String),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    pub(super) max_entries: Option<Spanned<i64>>,
    pub(super) max_bytes: Option<Spanned<RawSize>>,
    pub(super) ttl: Option<Spanned<String>>,
    pub(super) backend: Option<Spanned<String>>,
    /// A secret until parsed: it may hold the Redis password.
    pub(super) url: Option<Spanned<Secret>>,
    pub(super) prefix: Option<Spanned<String>>,
    pub(super) publish: Option<bool>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) tls_ca: Option<Spanned<String>>,
    pub(super) stream_max_len: Option<Spanned<i64>>,
    pub(super) sentinels: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) sentinel_master: Option<Spanned<String>>,
    pub(super) cluster: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWriteBehind {
    pub(super) delay: Option<Spanned<String>>,
    pub(super) workers: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) request_timeout: Option<Spanned<String>>,
    pub(super) header_timeout: Option<Spanned<String>>,
    pub(super) max_event_streams: Option<Spanned<i64>>,
    pub(super) readers: Option<Spanned<i64>>,
    pub(super) read_queue: Option<Spanned<i64>>,
    pub(super) allowed_hosts: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTail {
    pub(super) poll_interval: Option<Spanned<String>>,
    pub(super) batch_size: Option<Spanned<i64>>,
    pub(super) lease: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFamily {
    pub(super) query: Spanned<String>,
    #[serde(default)]
    pub(super) many: bool,
    pub(super) ttl: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) tags: Vec<Spanned<String>>,
    pub(super) warm: Option<Spanned<String>>,
    /// `"auto"`: derive the family's rules from its query.
    pub(super) invalidate: Option<Spanned<String>>,
    /// The strategy of its derived rules (default: delete).
    pub(super) strategy: Option<Strategy>,
    /// `"incremental"`: keep the value up to date from the changes (default `"recompute"`).
    pub(super) maintain: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub(super) table: Spanned<String>,
    pub(super) on: Option<Vec<Op>>,
    #[serde(default)]
    pub(super) keys: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) tags: Vec<Spanned<String>>,
    pub(super) strategy: Option<Strategy>,
}

/// One thing wrong with a config, located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Every problem found in a config file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if p.line == 0 {
                write!(f, "{}: {}", self.file, p.message)?;
            } else {
                write!(f, "{}:{}:{}: {}", self.file, p.line, p.column, p.message)?;
            }
        }
        Ok(())
    }
}

/// Collects problems while validating, turning byte spans into line and column.
pub(crate) struct Problems<'s> {
    source: &'s str,
    found: Vec<Problem>,
}

impl<'s> Problems<'s> {
    pub(crate) fn new(source: &'s str) -> Self {
        Problems {
            source,
            found: Vec::new(),
        }
    }

    pub(crate) fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = line_column(self.source, span.start);
        self.found.push(Problem {
            line,
            column,
            message: message.into(),
        });
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    pub(crate) fn into_error(mut self, file: &str) -> ConfigError {
        self.found.sort_by_key(|p| (p.line, p.column));
        ConfigError {
            file: file.to_owned(),
            problems: self.found,
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

impl Config {
    /// Reads and validates a config file. Relative paths in it are relative to the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let source = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            problems: vec![Problem {
                line: 0,
                column: 0,
                message: format!("cannot read the config file: {e}"),
            }],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = Config::parse(&source, &file, base)?;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and validates config text. `file` names it in errors; `base` anchors relative paths.
    pub fn parse(source: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(source).map_err(|e| {
            let mut problems = Problems::new(source);
            problems.at(e.span().unwrap_or(0..0), e.message().trim().to_owned());
            problems.into_error(file)
        })?;
        let mut problems = Problems::new(source);
        let mut config = super::validate::validate(raw, base, &mut problems);
        config.source = source.to_owned();
        config.file = file.to_owned();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems.into_error(file))
        }
    }
}
