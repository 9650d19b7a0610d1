//! The configuration as plain data: what `config.toml` says, validated. It carries no runtime
//! state (no counters, no atomics, nothing a running daemon changes): the daemon keeps what it
//! learns per family and rule in its registry, and a reload is a diff between two of these.
//!
//! - `parse`: the file's format (serde structs with spans) and located problems;
//! - `validate`: those structs into `Config`, section by section;
//! - `limits`: the range of each numeric and duration setting, and their readers;
//! - `secret`: the admin token and the Redis URL, which print as `***`;
//! - `template`: `{name}` templates (key patterns, rule keys and tags);
//! - `auto`: the rules `invalidate = "auto"` derives from a family's query;
//! - `check`: the config against its database (tables, columns, queries, what each query reads);
//! - `spelling`: which spellings of a key the rules can reach (how a query compares its
//!   placeholders);
//! - `diff`: what a reload changes.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

mod auto;
mod backend;
pub use backend::read_ca_file;
pub mod check;
pub mod diff;
mod hosts;
mod limits;
pub mod lookup_scans;
mod parse;
mod redis_url;
mod secret;
pub mod spelling;
pub mod template;
mod validate;

pub use auto::Lookup;
pub use check::{Reads, check_database, tracking_gaps};
pub use diff::ConfigDiff;
pub use hosts::{AllowedHost, split_host};
pub(crate) use parse::Problems;
pub use parse::{ConfigError, Problem};
pub use redis_url::{RedisUrl, Sentinels};
pub use secret::Secret;
pub use template::Template;

use crate::maintain::Shape;
use crate::types::{Op, Params, Strategy};

/// `listen` when the config says nothing: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// The daemon's configuration, validated. Its `Debug` shows no secret: the admin token and the
/// Redis password print as `***`, and the source text (which holds them) is left out.
pub struct Config {
    /// The file it came from, when it came from one (reloads watch it).
    pub path: Option<PathBuf>,
    pub database: PathBuf,
    pub listen: SocketAddr,
    /// How long `?fresh=1` waits for the daemon to catch up before answering 503.
    pub fresh_timeout: Duration,
    /// The bearer token admin actions need; none: they are disabled. Prints as `***`.
    pub admin_token: Option<Secret>,
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
    /// The bound on the count of values (in memory); None: only `max_bytes` bounds them.
    pub max_entries: Option<u64>,
    /// The bound on the bytes the values take (in memory): keys, bodies, tags and the
    /// per-entry overhead, as `cache::entry_bytes` counts them.
    pub max_bytes: Option<u64>,
    pub ttl: Duration,
    pub backend: Backend,
}

/// Where values are kept.
#[derive(Debug, Clone, PartialEq)]
pub enum Backend {
    /// In the daemon's memory (moka): the default.
    Memory,
    /// In Redis, shared by every app server; `publish` sends each batch of invalidations on
    /// `{prefix}invalidations` and appends it to the stream `{prefix}#invalidations`, which
    /// keeps the last `stream_max_len` entries; at most `max_connections` connections for reads
    /// and fills.
    Redis {
        url: RedisUrl,
        prefix: String,
        publish: bool,
        max_connections: usize,
        stream_max_len: u64,
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
    /// Live feeds (`GET /v1/events`) open at once, beside `max_connections` (a stream gives
    /// its connection's slot back); more are answered 503.
    pub max_event_streams: usize,
    /// SQLite connections reading for requests at once (fills, `no-cache`, the outbox head of
    /// `?fresh=1`, status): the read pool's size.
    pub readers: usize,
    /// Reads that may wait for a free reader; more are answered 503 at once.
    pub read_queue: usize,
    /// Names a request's `Host` may give besides the listen address's own.
    pub allowed_hosts: Vec<AllowedHost>,
}

impl HttpSettings {
    /// `readers` when the config says nothing: twice the machine's cores, at least 4 (SQLite
    /// reads are mostly CPU; a few more than the cores cover the ones waiting on the disk).
    pub fn default_readers() -> usize {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        (2 * cores).clamp(4, limits::MAX_READERS as usize)
    }
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
    /// What its values mean (query, shape, TTL, tags): two families with the same pattern and
    /// definition compute the same values, so a reload keeps what the old one cached.
    pub definition: String,
    /// Its group in the Redis backend: pattern plus a hash of its definition.
    pub group: String,
    /// A query listing the keys to fill at start (warm start), and where it is in the file.
    pub warm: Option<String>,
    pub warm_span: Option<Range<usize>>,
    /// Where the pattern and the query stand in the config text.
    pub pattern_span: Range<usize>,
    pub query_span: Range<usize>,
    /// `maintain = "incremental"`: the shape its value is kept up to date by (None: recomputed).
    pub maintain: Option<Arc<Shape>>,
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
    /// Set for a rule `invalidate = "auto"` derived from this family's query.
    pub derived_from: Option<String>,
    /// A derived rule's lookups: the keys a change reaches through other tables, found at apply
    /// time (`apply::lookups`); each value found renders `key`.
    pub lookups: Vec<RuleLookup>,
    /// A derived rule's column pairs its direct keys rely on comparing alike (see
    /// `auto::Derived::alike`); checked against the schema when the rule fires.
    pub alike: Vec<[(String, String); 2]>,
}

/// One lookup of a derived rule (see `auto`) and the key template (the family's pattern) each
/// value it finds renders.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleLookup {
    pub lookup: Lookup,
    pub key: Template,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("path", &self.path)
            .field("database", &self.database)
            .field("listen", &self.listen)
            .field("fresh_timeout", &self.fresh_timeout)
            .field("admin_token", &self.admin_token)
            .field("cache", &self.cache)
            .field("write_behind", &self.write_behind)
            .field("tail", &self.tail)
            .field("http", &self.http)
            .field("families", &self.families)
            .field("rules", &self.rules)
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl Family {
    /// The tags its value for a key carries, rendered from the key's parameters.
    pub fn render_tags(&self, params: &Params) -> Box<[Arc<str>]> {
        self.tags
            .iter()
            .filter_map(|t| t.render_with(params))
            .map(Arc::from)
            .collect()
    }
}

impl Config {
    /// The index of the family whose pattern matches `key`, with the parameters the key gives.
    pub fn match_key(&self, key: &str) -> Option<(usize, Params)> {
        self.families
            .iter()
            .enumerate()
            .find_map(|(i, family)| family.pattern.match_key(key).map(|params| (i, params)))
    }

    /// The index of the family written as `pattern` in the config.
    pub fn family_named(&self, pattern: &str) -> Option<usize> {
        self.families
            .iter()
            .position(|f| f.pattern.source() == pattern)
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

    /// Whether a rule on `table` refreshes `family`: it names a key the family's pattern may
    /// match, or a tag the family's values carry.
    pub fn refreshes(&self, table: &str, family: &Family) -> bool {
        self.rules_for(table).any(|rule| {
            rule.keys.iter().any(|k| k.may_match(&family.pattern))
                || rule
                    .lookups
                    .iter()
                    .any(|l| l.key.may_match(&family.pattern))
                || rule
                    .tags
                    .iter()
                    .any(|t| family.tags.iter().any(|ft| t.may_match(ft)))
        })
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
            for input in rule.lookups.iter().map(|l| &l.lookup.input) {
                if !columns.contains(input) {
                    columns.push(input.clone());
                }
            }
        }
        // A maintained family follows every change to the tables it reads, with the columns
        // its state needs, whatever the rules say.
        for shape in self.families.iter().filter_map(|f| f.maintain.as_deref()) {
            let needed = shape.tables().into_iter().map(|t| (t, None));
            let columns = shape.columns().into_iter().map(|(t, c)| (t, Some(c)));
            for (table, column) in needed.chain(columns) {
                // Table names are case-insensitive: one capture per table.
                let name = tables
                    .keys()
                    .find(|t| t.eq_ignore_ascii_case(&table))
                    .cloned()
                    .unwrap_or(table);
                let columns = tables.entry(name).or_default();
                let known = |c: &String| columns.iter().any(|k| k.eq_ignore_ascii_case(c));
                if let Some(column) = column.filter(|c| !known(c)) {
                    columns.push(column);
                }
            }
        }
        for columns in tables.values_mut() {
            columns.sort();
        }
        tables
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "config.toml", Path::new("/srv"))
    }

    #[test]
    fn the_reference_config_is_valid() {
        let config = parse(include_str!("../../config.toml")).expect("reference config");
        assert_eq!(config.database, PathBuf::from("/srv/catalog.db"));
        assert!(config.match_key("book:42").is_some());
        assert!(config.match_key("top-books").is_some());
        assert!(config.match_key("nothing:here").is_none());
        // The rules' templates need `book_id`, `user_id` and `id`; the maintained aggregates
        // read `rating`, and the columns they show (`title`, `name`).
        let captured = config.captured_columns();
        let names = |list: &[&str]| list.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        assert_eq!(
            captured["reviews"],
            names(&["book_id", "id", "rating", "user_id"])
        );
        assert_eq!(captured["books"], names(&["id", "title"]));
        assert_eq!(captured["users"], names(&["id", "name"]));
        let maintained = config
            .families
            .iter()
            .filter(|f| f.maintain.is_some())
            .count();
        assert_eq!(maintained, 4);
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
    fn tls_ca_needs_a_rediss_url_and_a_readable_pem_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            dir.path().join("ca.pem"),
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .expect("write ca.pem");
        std::fs::write(dir.path().join("key.pem"), "-----BEGIN PRIVATE KEY-----\n")
            .expect("write key.pem");
        let redis = |url: &str, ca: &str| {
            Config::parse(
                &format!(
                    "database = \"x.db\"\n[cache]\nbackend = \"redis\"\nurl = \"{url}\"\ntls_ca = \"{ca}\"\n"
                ),
                "config.toml",
                dir.path(),
            )
        };
        let config = redis("rediss://:hunter2@h:6380/0", "ca.pem").expect("valid");
        let Backend::Redis { url, .. } = &config.cache.backend else {
            panic!("the redis backend");
        };
        assert!(url.tls);
        assert_eq!(url.tls_ca, Some(dir.path().join("ca.pem")));
        for (url, ca, problem) in [
            (
                "redis://h:6379/0",
                "ca.pem",
                "config.toml:5:10: `cache.tls_ca` is for TLS: the `cache.url` must start with rediss://",
            ),
            (
                "rediss://h:6380/0",
                "missing.pem",
                "config.toml:5:10: `cache.tls_ca`: cannot read",
            ),
            (
                "rediss://h:6380/0",
                "key.pem",
                "config.toml:5:10: `cache.tls_ca`: ",
            ),
        ] {
            let err = redis(url, ca).expect_err(ca);
            assert!(err.to_string().contains(problem), "{url} {ca}: {err}");
        }
        assert!(
            redis("rediss://h:6380/0", "key.pem")
                .expect_err("no certificate")
                .to_string()
                .contains("holds no PEM certificate")
        );
        let err =
            parse("database = \"x.db\"\n[cache]\ntls_ca = \"ca.pem\"\n").expect_err("redis only");
        assert!(
            err.to_string()
                .contains("`cache.tls_ca` is for `backend = \"redis\"`"),
            "{err}"
        );
    }

    #[test]
    fn sentinels_come_with_a_master_name_and_host_port_addresses() {
        let config = parse(
            "database = \"x.db\"\n[cache]\nbackend = \"redis\"\nurl = \"redis://:pw@ignored/2\"\nsentinels = [\"10.0.0.5:26379\", \"[::1]:26380\"]\nsentinel_master = \"m\"\n",
        )
        .expect("valid");
        let Backend::Redis { url, .. } = &config.cache.backend else {
            panic!("the redis backend");
        };
        assert_eq!(
            url.sentinel,
            Some(Box::new(Sentinels {
                addresses: vec![("10.0.0.5".to_owned(), 26379), ("::1".to_owned(), 26380)],
                master: "m".to_owned(),
            }))
        );
        assert_eq!(url.db, 2);
        let redis = |settings: &str| {
            parse(&format!(
                "database = \"x.db\"\n[cache]\nbackend = \"redis\"\n{settings}\n"
            ))
        };
        for (settings, problem) in [
            (
                "sentinels = [\"h:26379\"]",
                "config.toml:4:13: `cache.sentinels` needs `cache.sentinel_master`",
            ),
            (
                "sentinel_master = \"m\"",
                "config.toml:4:19: `cache.sentinel_master` needs `cache.sentinels`",
            ),
            (
                "sentinels = []\nsentinel_master = \"m\"",
                "config.toml:4:13: `cache.sentinels` is empty",
            ),
            (
                "sentinels = [\"h:26379\", \"h\"]\nsentinel_master = \"m\"",
                "config.toml:4:25: `cache.sentinels`: \"h\" is not `host:port`",
            ),
            (
                "sentinels = [\"h:0\"]\nsentinel_master = \"m\"",
                "config.toml:4:14: `cache.sentinels`: \"h:0\": the port must be a number from 1 to 65535",
            ),
            (
                "sentinels = [\"h:26379\"]\nsentinel_master = \"my master\"",
                "config.toml:5:19: `cache.sentinel_master` must be the name",
            ),
        ] {
            let err = redis(settings).expect_err(settings);
            assert!(err.to_string().contains(problem), "{settings}: {err}");
        }
        let err =
            parse("database = \"x.db\"\n[cache]\nsentinels = [\"h:1\"]\nsentinel_master = \"m\"\n")
                .expect_err("redis only");
        for field in ["sentinels", "sentinel_master"] {
            assert!(
                err.to_string()
                    .contains(&format!("`cache.{field}` is for `backend = \"redis\"`")),
                "{err}"
            );
        }
    }

    #[test]
    fn redis_connection_limits_and_the_prefix_are_checked() {
        let redis = |settings: &str| {
            parse(&format!(
                "database = \"x.db\"\n[cache]\nbackend = \"redis\"\n{settings}\n"
            ))
        };
        for (settings, problem) in [
            (
                "max_connections = 0",
                "config.toml:4:19: `cache.max_connections` must be a whole number from 1 to 10000, not 0",
            ),
            (
                "max_connections = 20000",
                "config.toml:4:19: `cache.max_connections` must be a whole number from 1 to 10000, not 20000",
            ),
            (
                "prefix = \"\"",
                "config.toml:4:10: `cache.prefix` must not be empty",
            ),
            (
                "stream_max_len = 0",
                "config.toml:4:18: `cache.stream_max_len` must be a whole number from 1 to 10000000, not 0",
            ),
            (
                "stream_max_len = 10000001",
                "config.toml:4:18: `cache.stream_max_len` must be a whole number from 1 to 10000000, not 10000001",
            ),
            (
                "publish = false\nstream_max_len = 10",
                "config.toml:5:18: `cache.stream_max_len` has no effect with `publish = false`",
            ),
        ] {
            let err = redis(settings).expect_err(settings);
            assert!(err.to_string().contains(problem), "{settings}: {err}");
        }
        let err =
            parse("database = \"x.db\"\n[cache]\nmax_connections = 8\n").expect_err("redis only");
        assert!(
            err.to_string()
                .contains("`cache.max_connections` is for `backend = \"redis\"`"),
            "{err}"
        );
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
        assert_eq!(config.cache.max_entries, Some(100_000));
        assert_eq!(config.cache.max_bytes, None);
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
        assert_eq!(config.http.max_event_streams, 16);
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        assert_eq!(config.http.readers, (2 * cores).clamp(4, 1024));
        assert_eq!(config.http.read_queue, 1024);
        assert_eq!(config.http.allowed_hosts, Vec::new());
        let redis = parse("database = \"x.db\"\n[cache]\nbackend = \"redis\"\n").expect("valid");
        let Backend::Redis {
            url,
            prefix,
            publish,
            max_connections,
            stream_max_len,
        } = &redis.cache.backend
        else {
            panic!("the redis backend");
        };
        assert_eq!(
            (url.host.as_str(), url.port, url.db),
            ("127.0.0.1", 6379, 0)
        );
        assert_eq!((prefix.as_str(), *publish), ("cachetail:", true));
        assert_eq!(*max_connections, 64);
        assert_eq!((url.tls, &url.tls_ca), (false, &None));
        assert_eq!(url.sentinel, None);
        assert_eq!(*stream_max_len, 100_000);
        assert!(url.cluster.is_empty(), "one server unless `cluster` is set");
        let cluster = parse(
            "database = \"x.db\"\n[cache]\nbackend = \"redis\"\ncluster = [\"10.0.0.1:7000\", \"[::1]:7001\"]\nurl = \"rediss://u:p@10.0.0.1:7000\"\n",
        )
        .expect("valid");
        let Backend::Redis { url, .. } = &cluster.cache.backend else {
            panic!("the redis backend");
        };
        assert_eq!(
            url.cluster,
            vec![("10.0.0.1".to_owned(), 7000), ("::1".to_owned(), 7001)]
        );
        assert!(url.tls && url.username.as_deref() == Some("u"));
    }

    #[test]
    fn no_error_or_debug_output_shows_a_secret() {
        let config = parse(
            "database = \"x.db\"\nadmin_token = \"token-hunter2-0123456789\"\n[cache]\nbackend = \"redis\"\nurl = \"redis://u:hunter2@h:1/0\"\n",
        )
        .expect("valid");
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("***"), "{debug}");
        for broken in [
            "url = \"redis:/u:hunter2@h\"",
            "url = \"redis://u:hunter2@h",
            "url = \"redis://u:hunter2\\q@h\"",
            "url = redis://u:hunter2@h",
            "url = 91827364554637",
            "url = [\"redis://u:hunter2@h\"]",
        ] {
            let text = format!("database = \"x.db\"\n[cache]\nbackend = \"redis\"\n{broken}\n");
            let err = parse(&text).expect_err(broken).to_string();
            assert!(err.starts_with("config.toml:4:"), "{broken}: {err}");
            assert!(!err.contains("hunter2"), "{broken}: {err}");
            assert!(!err.contains("91827364554637"), "{broken}: {err}");
        }
        let err = parse("database = \"x.db\"\nadmin_token = 918273645546372819\n")
            .expect_err("not a string")
            .to_string();
        assert!(!err.contains("918273645546372819"), "{err}");
    }

    #[test]
    fn the_most_specific_family_matches_first() {
        let config = parse(
            "database = \"x.db\"\n[keys.\"book:{id}\"]\nquery = \"SELECT :id\"\n[keys.\"book:top\"]\nquery = \"SELECT 1\"\n",
        )
        .expect("valid");
        let (family, _) = config.match_key("book:top").expect("matches");
        assert_eq!(config.families[family].pattern.source(), "book:top");
        let (family, params) = config.match_key("book:7").expect("matches");
        assert_eq!(config.families[family].pattern.source(), "book:{id}");
        assert_eq!(params, vec![("id".to_owned(), "7".to_owned())]);
    }
}
