//! The configuration: `config.toml` parsed into serde structs, then validated into the types the
//! daemon runs on. Every problem is collected and reported at once with file:line:column, the way
//! a user fixes them: all in one pass.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::resp::RedisUrl;
use crate::template::{Params, Template};

/// What a change to a watched table does to the keys a rule names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Remove the key; the next read misses and refills from the database.
    Delete,
    /// Remove now, recompute soon in the background.
    WriteBehind,
    /// Recompute now, before the change counts as applied: the next read is a fresh hit.
    WriteThrough,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Delete => "delete",
            Strategy::WriteBehind => "write-behind",
            Strategy::WriteThrough => "write-through",
        }
    }
}

/// A row operation, as the capture triggers record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    pub const ALL: [Op; 3] = [Op::Insert, Op::Update, Op::Delete];

    pub fn code(self) -> i64 {
        match self {
            Op::Insert => 1,
            Op::Update => 2,
            Op::Delete => 3,
        }
    }

    pub fn from_code(code: i64) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.code() == code)
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The file format.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    database: Spanned<String>,
    listen: Option<Spanned<String>>,
    fresh_timeout: Option<Spanned<String>>,
    admin_token: Option<Spanned<String>>,
    /// `"auto"`: every family derives its rules from its query (unless it says otherwise).
    invalidate: Option<Spanned<String>>,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    write_behind: RawWriteBehind,
    #[serde(default)]
    tail: RawTail,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    keys: BTreeMap<Spanned<String>, RawFamily>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCache {
    max_entries: Option<Spanned<i64>>,
    ttl: Option<Spanned<String>>,
    backend: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    prefix: Option<Spanned<String>>,
    publish: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWriteBehind {
    delay: Option<Spanned<String>>,
    workers: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    max_connections: Option<Spanned<i64>>,
    request_timeout: Option<Spanned<String>>,
    header_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTail {
    poll_interval: Option<Spanned<String>>,
    batch_size: Option<Spanned<i64>>,
    lease: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct RawFamily {
    query: Spanned<String>,
    #[serde(default)]
    many: bool,
    ttl: Option<Spanned<String>>,
    #[serde(default)]
    tags: Vec<Spanned<String>>,
    warm: Option<Spanned<String>>,
    /// `"auto"`: derive the family's rules from its query.
    invalidate: Option<Spanned<String>>,
    /// The strategy of its derived rules (default: delete).
    strategy: Option<Strategy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    table: Spanned<String>,
    on: Option<Vec<Op>>,
    #[serde(default)]
    keys: Vec<Spanned<String>>,
    #[serde(default)]
    tags: Vec<Spanned<String>>,
    strategy: Option<Strategy>,
}

// ---------------------------------------------------------------------------------------------
// The validated configuration.

/// The daemon's configuration, validated.
#[derive(Debug)]
pub struct Config {
    /// The file it came from, when it came from one (reloads watch it).
    pub path: Option<PathBuf>,
    pub database: PathBuf,
    pub listen: SocketAddr,
    /// How long `?fresh=1` waits for the daemon to catch up before answering 503.
    pub fresh_timeout: Duration,
    /// The bearer token admin actions need; none: they are disabled.
    pub admin_token: Option<String>,
    pub cache: CacheSettings,
    pub write_behind: WriteBehindSettings,
    pub tail: TailSettings,
    pub http: HttpSettings,
    /// Key families, most specific pattern first (that is the order keys are matched in).
    pub families: Vec<Arc<Family>>,
    pub rules: Vec<Rule>,
    /// For each watched table, the indexes of its rules in `rules`.
    rules_by_table: HashMap<String, Vec<usize>>,
    /// The text it was parsed from and the name of its file, to locate problems found later
    /// (by `check` against the database).
    pub source: String,
    pub file: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    pub max_entries: u64,
    pub ttl: Duration,
    pub backend: Backend,
}

/// Where values are kept.
#[derive(Debug, Clone, PartialEq)]
pub enum Backend {
    /// In the daemon's memory (moka): the default.
    Memory,
    /// In Redis, shared by every app server; `publish` sends each batch of invalidations on
    /// `{prefix}invalidations`.
    Redis {
        url: RedisUrl,
        prefix: String,
        publish: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct WriteBehindSettings {
    pub delay: Duration,
    pub workers: usize,
}

/// Limits that keep one client from holding the endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpSettings {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// A request's whole answer (a fill included) takes at most this long, else a 503.
    pub request_timeout: Duration,
    /// A client has this long to send a request's headers, else the connection is closed.
    pub header_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TailSettings {
    /// The fallback poll: file notifications are a doorbell, not the truth.
    pub poll_interval: Duration,
    /// How many outbox rows one batch reads at most.
    pub batch_size: usize,
    /// How long the applying daemon's lease lasts without renewal: a standby takes over after
    /// it (at once when the holder's process is gone).
    pub lease: Duration,
}

/// A key family: the keys one pattern matches, and the query that computes their values.
#[derive(Debug)]
pub struct Family {
    pub pattern: Template,
    pub query: String,
    /// The value is a JSON array of row objects; otherwise one object (404 without a row).
    pub many: bool,
    pub ttl: Duration,
    pub tags: Vec<Template>,
    /// Set when a reload replaced this family: values it computed are no longer served.
    pub retired: AtomicBool,
    /// Its group in the Redis backend: pattern plus a hash of its definition.
    pub group: String,
    /// A query listing the keys to fill at start (warm start), and where it is in the file.
    pub warm: Option<String>,
    pub warm_span: Option<Range<usize>>,
    /// Values computed before this outbox position are no longer served (a family flush).
    pub floor: AtomicU64,
    /// Counters, kept across reloads that leave the family unchanged.
    pub stats: FamilyStats,
    /// The tables its query reads, as SQLite's authorizer reported them when `check` prepared
    /// it. Unknown (unset) means "assume it reads everything".
    pub reads: OnceLock<Vec<String>>,
    /// The (table, column) pairs its query reads, likewise.
    pub read_columns: OnceLock<Vec<(String, String)>>,
    /// Where the pattern and the query stand in the config text.
    pub pattern_span: Range<usize>,
    pub query_span: Range<usize>,
    raw: RawFamily,
}

#[derive(Debug, Default)]
pub struct FamilyStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub fills: AtomicU64,
    /// Queries run for this family (fills and recomputes), and their total time.
    pub computes: AtomicU64,
    pub compute_micros: AtomicU64,
}

/// A rule: what a change to one table does to the cache.
#[derive(Debug)]
pub struct Rule {
    pub table: String,
    pub on: Vec<Op>,
    pub keys: Vec<Template>,
    pub tags: Vec<Template>,
    pub strategy: Strategy,
    /// Where the table name and each key template stand in the config text.
    pub table_span: Range<usize>,
    pub key_spans: Vec<Range<usize>>,
    /// Keys and tags it invalidated, and of those keys the ones it had recomputed (since the
    /// config that holds it was loaded).
    pub invalidations: AtomicU64,
    pub recomputes: AtomicU64,
    /// Set for a rule `invalidate = "auto"` derived from this family's query.
    pub derived_from: Option<String>,
}

impl Family {
    /// Whether the family's query reads `table` (true when unknown: flushing too much is safe).
    pub fn reads_table(&self, table: &str) -> bool {
        self.reads
            .get()
            .is_none_or(|tables| tables.iter().any(|t| t.eq_ignore_ascii_case(table)))
    }
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

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

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
        let mut config = validate(raw, base, &mut problems);
        config.source = source.to_owned();
        config.file = file.to_owned();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems.into_error(file))
        }
    }

    /// The family whose pattern matches `key`, with the parameters the key gives it.
    pub fn match_key(&self, key: &str) -> Option<(&Arc<Family>, Params)> {
        self.families
            .iter()
            .find_map(|family| family.pattern.match_key(key).map(|params| (family, params)))
    }

    /// The rules that watch `table`.
    pub fn rules_for(&self, table: &str) -> impl Iterator<Item = &Rule> {
        self.rules_for_indexed(table).map(|(_, rule)| rule)
    }

    /// `rules_for`, with each rule's index in `rules`.
    pub fn rules_for_indexed(&self, table: &str) -> impl Iterator<Item = (usize, &Rule)> {
        self.rules_by_table
            .get(table)
            .into_iter()
            .flatten()
            .map(|&i| (i, &self.rules[i]))
    }

    /// Every watched table with the columns its rules' templates read, sorted: what capture
    /// records for each change.
    pub fn captured_columns(&self) -> BTreeMap<String, Vec<String>> {
        let mut tables: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for rule in &self.rules {
            let columns = tables.entry(rule.table.clone()).or_default();
            for template in rule.keys.iter().chain(&rule.tags) {
                for param in template.params() {
                    if !columns.iter().any(|c| c == param) {
                        columns.push(param.to_owned());
                    }
                }
            }
        }
        for columns in tables.values_mut() {
            columns.sort();
        }
        tables
    }

    /// Carries runtime state over from the running config: families whose definition did not
    /// change keep their object (and so their cached values and counters); the others are retired,
    /// which drops their cached values.
    pub fn adopt_families_from(&mut self, running: &Config) {
        for family in &mut self.families {
            let same = running
                .families
                .iter()
                .find(|old| old.pattern == family.pattern && old.raw == family.raw);
            if let Some(old) = same {
                *family = Arc::clone(old);
            }
        }
        for old in &running.families {
            if !self.families.iter().any(|f| Arc::ptr_eq(f, old)) {
                old.retired
                    .store(true, std::sync::atomic::Ordering::Release);
            }
        }
    }

    /// The settings a reload may not change, with a message for each that differs.
    pub fn fixed_settings_changed(&self, running: &Config) -> Vec<String> {
        let mut changed = Vec::new();
        if self.database != running.database {
            changed.push(format!(
                "`database` cannot change while the daemon runs (running: {}, file: {}); restart it",
                running.database.display(),
                self.database.display()
            ));
        }
        if self.cache.backend != running.cache.backend {
            changed.push(
                "`cache.backend`, `cache.url`, `cache.prefix` and `cache.publish` cannot change while the daemon runs; restart it".to_owned(),
            );
        }
        if self.listen != running.listen {
            changed.push(format!(
                "`listen` cannot change while the daemon runs (running: {}, file: {}); restart it",
                running.listen, self.listen
            ));
        }
        changed
    }
}

fn validate(raw: RawConfig, base: &Path, problems: &mut Problems<'_>) -> Config {
    let database = {
        let path = PathBuf::from(raw.database.get_ref());
        if raw.database.get_ref().is_empty() {
            problems.at(
                raw.database.span(),
                "`database` is empty: name the app's SQLite file",
            );
        }
        if path.is_absolute() {
            path
        } else {
            base.join(path)
        }
    };
    let listen = match &raw.listen {
        None => DEFAULT_LISTEN.parse().expect("the default address parses"),
        Some(text) => text.get_ref().parse().unwrap_or_else(|e| {
            problems.at(
                text.span(),
                format!(
                    "`listen` = {:?} is not an address like 127.0.0.1:8080: {e}",
                    text.get_ref()
                ),
            );
            DEFAULT_LISTEN.parse().expect("the default address parses")
        }),
    };
    let fresh_timeout = duration(
        raw.fresh_timeout.as_ref(),
        "fresh_timeout",
        Duration::from_secs(5),
        problems,
    );
    let admin_token = raw.admin_token.as_ref().and_then(|token| {
        let text = token.get_ref().trim();
        if text.len() < 16 {
            problems.at(
                token.span(),
                "`admin_token` must be at least 16 characters (it guards cache flushes)",
            );
            return None;
        }
        Some(text.to_owned())
    });
    let backend = backend(&raw.cache, problems);
    let cache = CacheSettings {
        backend,
        max_entries: positive(
            raw.cache.max_entries.as_ref(),
            "cache.max_entries",
            100_000,
            problems,
        ),
        ttl: duration(
            raw.cache.ttl.as_ref(),
            "cache.ttl",
            Duration::from_secs(600),
            problems,
        ),
    };
    let write_behind = WriteBehindSettings {
        delay: duration(
            raw.write_behind.delay.as_ref(),
            "write_behind.delay",
            Duration::from_millis(50),
            problems,
        ),
        workers: positive(
            raw.write_behind.workers.as_ref(),
            "write_behind.workers",
            4,
            problems,
        ) as usize,
    };
    let http = HttpSettings {
        max_connections: positive(
            raw.http.max_connections.as_ref(),
            "http.max_connections",
            1024,
            problems,
        ) as usize,
        request_timeout: duration(
            raw.http.request_timeout.as_ref(),
            "http.request_timeout",
            Duration::from_secs(30),
            problems,
        ),
        header_timeout: duration(
            raw.http.header_timeout.as_ref(),
            "http.header_timeout",
            Duration::from_secs(10),
            problems,
        ),
    };
    for (value, name, raw_value) in [
        (
            http.request_timeout,
            "http.request_timeout",
            &raw.http.request_timeout,
        ),
        (
            http.header_timeout,
            "http.header_timeout",
            &raw.http.header_timeout,
        ),
    ] {
        if value.is_zero()
            && let Some(span) = raw_value.as_ref().map(Spanned::span)
        {
            problems.at(span, format!("`{name}` must be above zero"));
        }
    }
    let tail = TailSettings {
        poll_interval: duration(
            raw.tail.poll_interval.as_ref(),
            "tail.poll_interval",
            Duration::from_millis(250),
            problems,
        ),
        batch_size: positive(
            raw.tail.batch_size.as_ref(),
            "tail.batch_size",
            10_000,
            problems,
        ) as usize,
        lease: duration(
            raw.tail.lease.as_ref(),
            "tail.lease",
            Duration::from_secs(5),
            problems,
        ),
    };
    if tail.lease < Duration::from_millis(500)
        && let Some(span) = raw.tail.lease.as_ref().map(Spanned::span)
    {
        problems.at(span, "`tail.lease` must be at least 500ms");
    }
    if tail.poll_interval.is_zero()
        && let Some(span) = raw.tail.poll_interval.as_ref().map(Spanned::span)
    {
        problems.at(span, "`tail.poll_interval` must be above zero");
    }

    let auto_everywhere = match &raw.invalidate {
        None => false,
        Some(value) if value.get_ref() == "auto" => true,
        Some(value) => {
            problems.at(
                value.span(),
                format!(
                    "`invalidate` = {:?}: the only value is \"auto\"",
                    value.get_ref()
                ),
            );
            false
        }
    };
    let mut derived_rules = Vec::new();
    let mut families = Vec::new();
    for (pattern_text, mut family) in raw.keys {
        let auto = match family.invalidate.as_ref() {
            None => auto_everywhere,
            Some(value) if value.get_ref() == "auto" => true,
            Some(value) if value.get_ref() == "rules" => false,
            Some(value) => {
                problems.at(
                    value.span(),
                    format!(
                        "key family `{pattern_text}`: `invalidate` = {:?}: use \"auto\" (derive the rules from the query) or \"rules\" (only the [[rules]])",
                        value.get_ref()
                    ),
                );
                false
            }
        };
        if !auto && let Some(strategy) = family.strategy {
            problems.at(
                family.query.span(),
                format!(
                    "key family `{pattern_text}`: `strategy = \"{}\"` applies to derived rules: add `invalidate = \"auto\"`",
                    strategy.name()
                ),
            );
        }
        if auto {
            derived_rules.extend(derive_rules(&pattern_text, &mut family, problems));
        }
        if let Some(f) = validate_family(&pattern_text, family, cache.ttl, problems) {
            // Every key the family matches starts with the pattern's leading literal text: a
            // placeholder there could take `#state` or `#m:book:1`, and `{prefix}{key}` would
            // be cachetail's own bookkeeping.
            let lead = f.pattern.leading_literal();
            if matches!(cache.backend, Backend::Redis { .. })
                && (lead.is_empty() || lead.starts_with('#'))
            {
                problems.at(
                    f.pattern_span.clone(),
                    format!("key family `{pattern_text}`: with the redis backend, a pattern must begin with literal text other than `#` (cachetail keeps its bookkeeping under `{{prefix}}#`, where a key beginning with `#` would land)"),
                );
            }
            families.push(Arc::new(f));
        }
    }
    // Most specific first: `book:top` wins over `book:{id}` for the key "book:top".
    families.sort_by(|a, b| {
        b.pattern
            .literal_len()
            .cmp(&a.pattern.literal_len())
            .then_with(|| a.pattern.source().cmp(b.pattern.source()))
    });

    let mut rules = Vec::new();
    for rule in raw.rules {
        if let Some(r) = validate_rule(rule, problems) {
            rules.push(r);
        }
    }
    rules.extend(derived_rules);
    let mut rules_by_table: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, rule) in rules.iter().enumerate() {
        rules_by_table
            .entry(rule.table.clone())
            .or_default()
            .push(i);
    }

    Config {
        path: None,
        database,
        listen,
        fresh_timeout,
        admin_token,
        cache,
        write_behind,
        tail,
        http,
        families,
        rules,
        rules_by_table,
        source: String::new(),
        file: String::new(),
    }
}

/// The rules `invalidate = "auto"` derives from a family's query (see `auto`). A family whose
/// values a derived rule must drop wholesale gets the tag that rule names.
fn derive_rules(
    pattern_text: &Spanned<String>,
    family: &mut RawFamily,
    problems: &mut Problems<'_>,
) -> Vec<Rule> {
    let Ok(pattern) = Template::parse(pattern_text.get_ref(), false) else {
        return Vec::new(); // reported by validate_family
    };
    let derived = match crate::auto::derive(&pattern, family.query.get_ref()) {
        Ok(derived) => derived,
        Err(e) => {
            problems.at(
                family.query.span(),
                format!(
                    "key family `{pattern_text}`: invalidate = \"auto\" cannot read the query: {e}"
                ),
            );
            return Vec::new();
        }
    };
    let tag = crate::auto::family_tag(pattern_text.get_ref());
    let mut rules = Vec::new();
    for d in derived {
        let keys: Vec<Template> = d
            .keys
            .iter()
            .filter_map(|k| Template::parse(k, true).ok())
            .collect();
        let tags: Vec<Template> = if d.flush {
            if !family.tags.iter().any(|t| t.get_ref() == &tag) {
                family
                    .tags
                    .push(Spanned::new(family.query.span(), tag.clone()));
            }
            Template::parse(&tag, true).into_iter().collect()
        } else {
            Vec::new()
        };
        rules.push(Rule {
            table: d.table,
            on: Op::ALL.to_vec(),
            key_spans: keys.iter().map(|_| family.query.span()).collect(),
            keys,
            tags,
            strategy: family.strategy.unwrap_or(Strategy::Delete),
            table_span: family.query.span(),
            invalidations: AtomicU64::new(0),
            recomputes: AtomicU64::new(0),
            derived_from: Some(pattern_text.get_ref().clone()),
        });
    }
    rules
}

fn validate_family(
    pattern_text: &Spanned<String>,
    raw: RawFamily,
    default_ttl: Duration,
    problems: &mut Problems<'_>,
) -> Option<Family> {
    let pattern = match Template::parse(pattern_text.get_ref(), false) {
        Ok(p) => p,
        Err(e) => {
            problems.at(
                pattern_text.span(),
                format!("key family `{pattern_text}`: {e}"),
            );
            return None;
        }
    };
    let query = raw.query.get_ref().trim().to_owned();
    if query.is_empty() {
        problems.at(
            raw.query.span(),
            format!("key family `{pattern_text}`: `query` is empty"),
        );
    }
    let ttl = duration(
        raw.ttl.as_ref(),
        &format!("keys.\"{pattern_text}\".ttl"),
        default_ttl,
        problems,
    );
    let mut tags = Vec::new();
    for tag in &raw.tags {
        match Template::parse(tag.get_ref(), true) {
            Ok(t) => {
                for param in t.params() {
                    if !pattern.params().contains(&param) {
                        problems.at(
                            tag.span(),
                            format!(
                                "key family `{pattern_text}`: tag `{tag}` uses `{{{param}}}`, which the pattern does not have"
                            ),
                        );
                    }
                }
                tags.push(t);
            }
            Err(e) => problems.at(
                tag.span(),
                format!("key family `{pattern_text}`: tag `{tag}`: {e}"),
            ),
        }
    }
    let group = crate::redis_cache::family_group(
        pattern_text.get_ref(),
        &format!(
            "{query}\0{}\0{}\0{}",
            raw.many,
            ttl.as_millis(),
            tags.iter()
                .map(Template::source)
                .collect::<Vec<_>>()
                .join("\0")
        ),
    );
    Some(Family {
        pattern,
        query,
        many: raw.many,
        ttl,
        tags,
        retired: AtomicBool::new(false),
        group,
        warm: raw
            .warm
            .as_ref()
            .map(|w| w.get_ref().trim().to_owned())
            .filter(|w| !w.is_empty()),
        warm_span: raw.warm.as_ref().map(Spanned::span),
        floor: AtomicU64::new(0),
        stats: FamilyStats::default(),
        reads: OnceLock::new(),
        read_columns: OnceLock::new(),
        pattern_span: pattern_text.span(),
        query_span: raw.query.span(),
        raw,
    })
}

fn backend(raw: &RawCache, problems: &mut Problems<'_>) -> Backend {
    let name = raw
        .backend
        .as_ref()
        .map_or("memory", |b| b.get_ref().as_str());
    match name {
        "memory" => {
            for (field, span) in [
                ("url", raw.url.as_ref().map(Spanned::span)),
                ("prefix", raw.prefix.as_ref().map(Spanned::span)),
            ] {
                if let Some(span) = span {
                    problems.at(
                        span,
                        format!("`cache.{field}` is for `backend = \"redis\"`; the memory backend has none"),
                    );
                }
            }
            Backend::Memory
        }
        "redis" => {
            let url = match &raw.url {
                None => RedisUrl::parse(DEFAULT_REDIS_URL).expect("the default url parses"),
                Some(text) => RedisUrl::parse(text.get_ref()).unwrap_or_else(|e| {
                    problems.at(text.span(), format!("`cache.url`: {e}"));
                    RedisUrl::parse(DEFAULT_REDIS_URL).expect("the default url parses")
                }),
            };
            let prefix = raw
                .prefix
                .as_ref()
                .map_or_else(|| "cachetail:".to_owned(), |p| p.get_ref().clone());
            Backend::Redis {
                url,
                prefix,
                publish: raw.publish.unwrap_or(true),
            }
        }
        other => {
            if let Some(b) = &raw.backend {
                problems.at(
                    b.span(),
                    format!(
                        "`cache.backend` = {other:?}: use \"memory\" (the default) or \"redis\""
                    ),
                );
            }
            Backend::Memory
        }
    }
}

const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";

fn validate_rule(raw: RawRule, problems: &mut Problems<'_>) -> Option<Rule> {
    let table = raw.table.get_ref().clone();
    if table.is_empty() {
        problems.at(raw.table.span(), "rule: `table` is empty");
        return None;
    }
    if table.starts_with("cachetail_") || table.starts_with("sqlite_") {
        problems.at(
            raw.table.span(),
            format!("rule: table `{table}` is internal and cannot be watched"),
        );
        return None;
    }
    if raw.keys.is_empty() && raw.tags.is_empty() {
        problems.at(
            raw.table.span(),
            format!("rule for table `{table}` names no `keys` and no `tags`: it would do nothing"),
        );
    }
    let mut parse_all = |list: &[Spanned<String>], what: &str| -> Vec<Template> {
        list.iter()
            .filter_map(|t| match Template::parse(t.get_ref(), true) {
                Ok(template) => Some(template),
                Err(e) => {
                    problems.at(
                        t.span(),
                        format!("rule for table `{table}`: {what} `{t}`: {e}"),
                    );
                    None
                }
            })
            .collect()
    };
    let keys = parse_all(&raw.keys, "key");
    let tags = parse_all(&raw.tags, "tag");
    let key_spans = if keys.len() == raw.keys.len() {
        raw.keys.iter().map(Spanned::span).collect()
    } else {
        Vec::new()
    };
    let mut on = raw.on.unwrap_or_else(|| Op::ALL.to_vec());
    on.dedup();
    if on.is_empty() {
        problems.at(
            raw.table.span(),
            format!("rule for table `{table}`: `on` is empty: it would do nothing"),
        );
    }
    Some(Rule {
        table,
        on,
        keys,
        tags,
        strategy: raw.strategy.unwrap_or(Strategy::Delete),
        table_span: raw.table.span(),
        key_spans,
        invalidations: AtomicU64::new(0),
        recomputes: AtomicU64::new(0),
        derived_from: None,
    })
}

fn duration(
    value: Option<&Spanned<String>>,
    name: &str,
    default: Duration,
    problems: &mut Problems<'_>,
) -> Duration {
    let Some(text) = value else { return default };
    humantime::parse_duration(text.get_ref().trim()).unwrap_or_else(|e| {
        problems.at(
            text.span(),
            format!(
                "`{name}` = {:?} is not a duration like \"50ms\", \"10s\" or \"10m\": {e}",
                text.get_ref()
            ),
        );
        default
    })
}

fn positive(
    value: Option<&Spanned<i64>>,
    name: &str,
    default: u64,
    problems: &mut Problems<'_>,
) -> u64 {
    let Some(number) = value else { return default };
    match u64::try_from(*number.get_ref()) {
        Ok(n) if n > 0 => n,
        _ => {
            problems.at(
                number.span(),
                format!(
                    "`{name}` must be a whole number above zero, not {}",
                    number.get_ref()
                ),
            );
            default
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "config.toml", Path::new("/srv"))
    }

    #[test]
    fn the_reference_config_is_valid() {
        let config = parse(include_str!("../config.toml")).expect("reference config");
        assert_eq!(config.database, PathBuf::from("/srv/catalog.db"));
        assert!(config.match_key("book:42").is_some());
        assert!(config.match_key("top-books").is_some());
        assert!(config.match_key("nothing:here").is_none());
        let captured = config.captured_columns();
        assert_eq!(
            captured["reviews"],
            vec!["book_id".to_owned(), "user_id".to_owned()]
        );
        assert_eq!(captured["books"], Vec::<String>::new());
    }

    #[test]
    fn every_problem_is_reported_with_its_line_and_column() {
        let err = parse(
            "database = \"x.db\"\n[cache]\nttl = \"soon\"\n[keys.\"a:{id\"]\nquery = \"SELECT 1\"\n[[rules]]\ntable = \"t\"\nstrategy = \"delete\"\n",
        )
        .expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains("config.toml:3:7: `cache.ttl`"), "{text}");
        assert!(
            text.contains("config.toml:4:7: key family `a:{id`"),
            "{text}"
        );
        assert!(
            text.contains("config.toml:7:9: rule for table `t` names no `keys`"),
            "{text}"
        );
        assert_eq!(err.problems.len(), 3);
    }

    #[test]
    fn toml_errors_and_unknown_fields_are_located() {
        let err = parse("database = \"x.db\"\nlisten = 5\n").expect_err("invalid");
        assert!(err.to_string().starts_with("config.toml:2:10:"), "{err}");
        let err = parse("database = \"x.db\"\n[cache]\nmax_entrys = 5\n").expect_err("invalid");
        assert!(err.to_string().contains("config.toml:3:1:"), "{err}");
        assert!(err.to_string().contains("max_entrys"), "{err}");
        let err = parse(
            "database = \"x.db\"\n[[rules]]\ntable = \"t\"\nkeys = [\"k\"]\nstrategy = \"later\"\n",
        )
        .expect_err("invalid");
        assert!(err.to_string().contains("config.toml:5:12:"), "{err}");
    }

    #[test]
    fn every_setting_has_the_default_the_readme_states() {
        let config = parse("database = \"x.db\"\n").expect("valid");
        assert_eq!(config.listen, DEFAULT_LISTEN.parse().expect("an address"));
        assert_eq!(config.fresh_timeout, Duration::from_secs(5));
        assert_eq!(config.admin_token, None);
        assert_eq!(config.cache.max_entries, 100_000);
        assert_eq!(config.cache.ttl, Duration::from_secs(600));
        assert_eq!(config.cache.backend, Backend::Memory);
        assert_eq!(config.write_behind.delay, Duration::from_millis(50));
        assert_eq!(config.write_behind.workers, 4);
        assert_eq!(config.tail.poll_interval, Duration::from_millis(250));
        assert_eq!(config.tail.batch_size, 10_000);
        assert_eq!(config.tail.lease, Duration::from_secs(5));
        assert_eq!(config.http.max_connections, 1024);
        assert_eq!(config.http.request_timeout, Duration::from_secs(30));
        assert_eq!(config.http.header_timeout, Duration::from_secs(10));
        let redis = parse("database = \"x.db\"\n[cache]\nbackend = \"redis\"\n").expect("valid");
        let Backend::Redis {
            url,
            prefix,
            publish,
        } = &redis.cache.backend
        else {
            panic!("the redis backend");
        };
        assert_eq!(
            (url.host.as_str(), url.port, url.db),
            ("127.0.0.1", 6379, 0)
        );
        assert_eq!((prefix.as_str(), *publish), ("cachetail:", true));
    }

    #[test]
    fn the_most_specific_family_matches_first() {
        let config = parse(
            "database = \"x.db\"\n[keys.\"book:{id}\"]\nquery = \"SELECT :id\"\n[keys.\"book:top\"]\nquery = \"SELECT 1\"\n",
        )
        .expect("valid");
        let (family, _) = config.match_key("book:top").expect("matches");
        assert_eq!(family.pattern.source(), "book:top");
        let (family, params) = config.match_key("book:7").expect("matches");
        assert_eq!(family.pattern.source(), "book:{id}");
        assert_eq!(params, vec![("id".to_owned(), "7".to_owned())]);
    }
}
