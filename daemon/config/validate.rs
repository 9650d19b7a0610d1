//! Validation: the file's serde structs into the plain data of `Config`, section by section
//! (top-level settings, `[cache]`, `[write_behind]`, `[http]`, `[tail]`, key families, rules).
//! Every problem is collected with its location; none stops the others from being found.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use super::limits::{
    MAX_BATCH_SIZE, MAX_CONNECTIONS, MAX_ENTRIES, MAX_EVENT_STREAMS, MAX_READ_QUEUE, MAX_READERS,
    MAX_REDIS_CONNECTIONS, MAX_STREAM_LEN, MAX_WAIT, MAX_WORKERS, count, duration, positive, ttl,
};
use super::parse::{
    Problems, RawCache, RawConfig, RawFamily, RawHttp, RawRule, RawTail, RawWriteBehind,
};
use super::redis_url::sentinel_address;
use super::template::Template;
use super::{
    AllowedHost, Backend, CacheSettings, Config, DEFAULT_LISTEN, Family, HttpSettings, RedisUrl,
    Rule, Secret, Sentinels, TailSettings, WriteBehindSettings,
};
use crate::types::{Op, Strategy};

/// The whole config, every section validated.
pub(super) fn validate(raw: RawConfig, base: &Path, problems: &mut Problems<'_>) -> Config {
    let cache = cache_settings(&raw.cache, base, problems);
    let (families, derived) = families(raw.keys, raw.invalidate.as_ref(), &cache, problems);
    let mut rules: Vec<Rule> = raw
        .rules
        .into_iter()
        .filter_map(|rule| validate_rule(rule, problems))
        .collect();
    rules.extend(derived);
    let mut rules_by_table: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, rule) in rules.iter().enumerate() {
        rules_by_table
            .entry(rule.table.clone())
            .or_default()
            .push(i);
    }
    Config {
        path: None,
        database: database(&raw.database, base, problems),
        listen: listen(raw.listen.as_ref(), problems),
        fresh_timeout: duration(
            raw.fresh_timeout.as_ref(),
            "fresh_timeout",
            Duration::from_secs(5),
            MAX_WAIT,
            problems,
        ),
        admin_token: admin_token(raw.admin_token.as_ref(), problems),
        cache,
        write_behind: write_behind_settings(&raw.write_behind, problems),
        tail: tail_settings(&raw.tail, problems),
        http: http_settings(&raw.http, problems),
        families,
        rules,
        rules_by_table,
        source: String::new(),
        file: String::new(),
    }
}

/// `database`, relative to the config file's folder.
fn database(raw: &Spanned<String>, base: &Path, problems: &mut Problems<'_>) -> PathBuf {
    let path = PathBuf::from(raw.get_ref());
    if raw.get_ref().is_empty() {
        problems.at(
            raw.span(),
            "`database` is empty: name the app's SQLite file",
        );
    }
    if path.is_absolute() {
        path
    } else {
        base.join(path)
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn listen(raw: Option<&Spanned<String>>, problems: &mut Problems<'_>) -> SocketAddr {
    let Some(text) = raw else {
        return default_listen();
    };
    text.get_ref().parse().unwrap_or_else(|e| {
        problems.at(
            text.span(),
            format!(
                "`listen` = {:?} is not an address like {DEFAULT_LISTEN}: {e}",
                text.get_ref()
            ),
        );
        default_listen()
    })
}

fn admin_token(raw: Option<&Spanned<Secret>>, problems: &mut Problems<'_>) -> Option<Secret> {
    let token = raw?;
    let text = token.get_ref().expose().trim();
    if text.len() < 16 {
        problems.at(
            token.span(),
            "`admin_token` must be at least 16 characters (it guards cache flushes)",
        );
        return None;
    }
    Some(Secret::new(text))
}

/// `[cache]`.
fn cache_settings(raw: &RawCache, base: &Path, problems: &mut Problems<'_>) -> CacheSettings {
    CacheSettings {
        backend: backend(raw, base, problems),
        max_entries: positive(
            raw.max_entries.as_ref(),
            "cache.max_entries",
            100_000,
            MAX_ENTRIES,
            problems,
        ),
        ttl: ttl(
            raw.ttl.as_ref(),
            "cache.ttl",
            Duration::from_secs(600),
            problems,
        ),
    }
}

/// `[write_behind]`.
fn write_behind_settings(raw: &RawWriteBehind, problems: &mut Problems<'_>) -> WriteBehindSettings {
    WriteBehindSettings {
        delay: duration(
            raw.delay.as_ref(),
            "write_behind.delay",
            Duration::from_millis(50),
            MAX_WAIT,
            problems,
        ),
        workers: count(
            raw.workers.as_ref(),
            "write_behind.workers",
            4,
            MAX_WORKERS,
            problems,
        ),
    }
}

/// `[http]`.
fn http_settings(raw: &RawHttp, problems: &mut Problems<'_>) -> HttpSettings {
    let settings = HttpSettings {
        max_connections: count(
            raw.max_connections.as_ref(),
            "http.max_connections",
            1024,
            MAX_CONNECTIONS,
            problems,
        ),
        request_timeout: duration(
            raw.request_timeout.as_ref(),
            "http.request_timeout",
            Duration::from_secs(30),
            MAX_WAIT,
            problems,
        ),
        header_timeout: duration(
            raw.header_timeout.as_ref(),
            "http.header_timeout",
            Duration::from_secs(10),
            MAX_WAIT,
            problems,
        ),
        max_event_streams: count(
            raw.max_event_streams.as_ref(),
            "http.max_event_streams",
            16,
            MAX_EVENT_STREAMS,
            problems,
        ),
        readers: count(
            raw.readers.as_ref(),
            "http.readers",
            HttpSettings::default_readers(),
            MAX_READERS,
            problems,
        ),
        read_queue: count(
            raw.read_queue.as_ref(),
            "http.read_queue",
            1024,
            MAX_READ_QUEUE,
            problems,
        ),
        allowed_hosts: allowed_hosts(raw.allowed_hosts.as_deref(), problems),
    };
    for (value, name, raw_value) in [
        (
            settings.request_timeout,
            "http.request_timeout",
            &raw.request_timeout,
        ),
        (
            settings.header_timeout,
            "http.header_timeout",
            &raw.header_timeout,
        ),
    ] {
        if value.is_zero()
            && let Some(span) = raw_value.as_ref().map(Spanned::span)
        {
            problems.at(span, format!("`{name}` must be above zero"));
        }
    }
    settings
}

/// `http.allowed_hosts`: each entry a host with an optional port, or `"*"`.
fn allowed_hosts(raw: Option<&[Spanned<String>]>, problems: &mut Problems<'_>) -> Vec<AllowedHost> {
    let mut hosts = Vec::new();
    for entry in raw.unwrap_or_default() {
        match AllowedHost::parse(entry.get_ref()) {
            Ok(host) => hosts.push(host),
            Err(problem) => problems.at(entry.span(), format!("`http.allowed_hosts`: {problem}")),
        }
    }
    hosts
}

/// `[tail]`.
fn tail_settings(raw: &RawTail, problems: &mut Problems<'_>) -> TailSettings {
    let settings = TailSettings {
        poll_interval: duration(
            raw.poll_interval.as_ref(),
            "tail.poll_interval",
            Duration::from_millis(250),
            MAX_WAIT,
            problems,
        ),
        batch_size: count(
            raw.batch_size.as_ref(),
            "tail.batch_size",
            10_000,
            MAX_BATCH_SIZE,
            problems,
        ),
        lease: duration(
            raw.lease.as_ref(),
            "tail.lease",
            Duration::from_secs(5),
            MAX_WAIT,
            problems,
        ),
    };
    if settings.lease < Duration::from_millis(500)
        && let Some(span) = raw.lease.as_ref().map(Spanned::span)
    {
        problems.at(span, "`tail.lease` must be at least 500ms");
    }
    if settings.poll_interval.is_zero()
        && let Some(span) = raw.poll_interval.as_ref().map(Spanned::span)
    {
        problems.at(span, "`tail.poll_interval` must be above zero");
    }
    settings
}

/// `[keys."PATTERN"]`: the families, most specific pattern first, and the rules `invalidate =
/// "auto"` derives from their queries.
fn families(
    raw: std::collections::BTreeMap<Spanned<String>, RawFamily>,
    invalidate: Option<&Spanned<String>>,
    cache: &CacheSettings,
    problems: &mut Problems<'_>,
) -> (Vec<Arc<Family>>, Vec<Rule>) {
    let auto_everywhere = match invalidate {
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
    let mut derived = Vec::new();
    let mut families = Vec::new();
    for (pattern_text, mut family) in raw {
        if family_is_auto(&pattern_text, &family, auto_everywhere, problems) {
            derived.extend(derive_rules(&pattern_text, &mut family, problems));
        }
        let Some(f) = validate_family(&pattern_text, family, cache.ttl, problems) else {
            continue;
        };
        // Every key the family matches starts with the pattern's leading literal text: a
        // placeholder there could take `#state` or `#m:book:1`, and `{prefix}{key}` would be
        // cachetail's own bookkeeping.
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
    // Most specific first: `book:top` wins over `book:{id}` for the key "book:top".
    families.sort_by(|a, b| {
        b.pattern
            .literal_len()
            .cmp(&a.pattern.literal_len())
            .then_with(|| a.pattern.source().cmp(b.pattern.source()))
    });
    (families, derived)
}

/// Whether a family derives its rules from its query (`invalidate = "auto"`, its own or the
/// file's), and a `strategy` given without it is a mistake.
fn family_is_auto(
    pattern_text: &Spanned<String>,
    family: &RawFamily,
    auto_everywhere: bool,
    problems: &mut Problems<'_>,
) -> bool {
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
    auto
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
    let derived = match super::auto::derive(&pattern, family.query.get_ref()) {
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
    let tag = super::auto::family_tag(pattern_text.get_ref());
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
    let ttl = ttl(
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
    let definition = format!(
        "{query}\0{}\0{}\0{}",
        raw.many,
        ttl.as_millis(),
        tags.iter()
            .map(Template::source)
            .collect::<Vec<_>>()
            .join("\0")
    );
    Some(Family {
        group: family_group(pattern_text.get_ref(), &definition),
        definition,
        pattern,
        query,
        many: raw.many,
        ttl,
        tags,
        warm: raw
            .warm
            .as_ref()
            .map(|w| w.get_ref().trim().to_owned())
            .filter(|w| !w.is_empty()),
        warm_span: raw.warm.as_ref().map(Spanned::span),
        pattern_span: pattern_text.span(),
        query_span: raw.query.span(),
    })
}

/// The group name of a family generation (Redis keeps a sorted set of its keys): a value
/// computed by another definition of the family (before a reload changed its query) is in
/// another group, which the reload retires. Stable across builds, so two daemons on one config
/// agree.
fn family_group(pattern: &str, definition: &str) -> String {
    format!("f:{pattern}:{:016x}", crate::fnv1a(definition.as_bytes()))
}

fn backend(raw: &RawCache, base: &Path, problems: &mut Problems<'_>) -> Backend {
    let name = raw
        .backend
        .as_ref()
        .map_or("memory", |b| b.get_ref().as_str());
    match name {
        "memory" => {
            for (field, span) in [
                ("url", raw.url.as_ref().map(Spanned::span)),
                ("prefix", raw.prefix.as_ref().map(Spanned::span)),
                (
                    "max_connections",
                    raw.max_connections.as_ref().map(Spanned::span),
                ),
                ("tls_ca", raw.tls_ca.as_ref().map(Spanned::span)),
                (
                    "stream_max_len",
                    raw.stream_max_len.as_ref().map(Spanned::span),
                ),
                ("sentinels", raw.sentinels.as_ref().map(Spanned::span)),
                (
                    "sentinel_master",
                    raw.sentinel_master.as_ref().map(Spanned::span),
                ),
                ("cluster", raw.cluster.as_ref().map(Spanned::span)),
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
            let mut url = match &raw.url {
                None => RedisUrl::local(),
                Some(text) => RedisUrl::parse(text.get_ref().expose()).unwrap_or_else(|e| {
                    problems.at(text.span(), format!("`cache.url`: {e}"));
                    RedisUrl::local()
                }),
            };
            url.tls_ca = raw
                .tls_ca
                .as_ref()
                .and_then(|ca| tls_ca(ca, &url, base, problems));
            url.sentinel = sentinels(raw, problems);
            let prefix = raw
                .prefix
                .as_ref()
                .map_or_else(|| "cachetail:".to_owned(), |p| p.get_ref().clone());
            if let Some(given) = &raw.prefix
                && given.get_ref().is_empty()
            {
                problems.at(
                    given.span(),
                    "`cache.prefix` must not be empty: every key cachetail writes starts with it, and rebuilding Redis removes every key under it (with an empty prefix, the whole database)",
                );
            }
            if let Some(seeds) = &raw.cluster {
                if url.sentinel.is_some() {
                    problems.at(
                        seeds.span(),
                        "`cache.cluster` and `cache.sentinels` cannot be used together: a Redis Cluster fails its primaries over itself (list its nodes in `cluster`), Sentinel watches one primary (list the Sentinels in `sentinels`)",
                    );
                }
                url = cluster(seeds, raw, url, &prefix, problems);
            }
            Backend::Redis {
                url,
                prefix,
                publish: raw.publish.unwrap_or(true),
                max_connections: redis_connections(raw.max_connections.as_ref(), problems),
                stream_max_len: stream_max_len(raw, problems),
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

/// `cache.tls_ca`: a PEM file holding at least one certificate (relative to the config file's
/// folder), for a `rediss://` URL only. Read again at each connection, so a renewed CA is used
/// without a restart; checked here so that a wrong path is an error with its place in the file.
fn tls_ca(
    raw: &Spanned<String>,
    url: &RedisUrl,
    base: &Path,
    problems: &mut Problems<'_>,
) -> Option<PathBuf> {
    if !url.tls {
        problems.at(
            raw.span(),
            "`cache.tls_ca` is for TLS: the `cache.url` must start with rediss://",
        );
        return None;
    }
    let path = base.join(raw.get_ref());
    match std::fs::read(&path) {
        Err(e) => problems.at(
            raw.span(),
            format!(
                "`cache.tls_ca`: cannot read {}: {e} (name the PEM file of the CA that signed the Redis server's certificate)",
                path.display()
            ),
        ),
        Ok(pem) if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") => problems.at(
            raw.span(),
            format!(
                "`cache.tls_ca`: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        ),
        Ok(_) => return Some(path),
    }
    None
}

/// `cache.sentinels` and `cache.sentinel_master`: both or neither; a non-empty list of
/// `host:port` and a name without spaces.
fn sentinels(raw: &RawCache, problems: &mut Problems<'_>) -> Option<Box<Sentinels>> {
    let (list, master) = match (&raw.sentinels, &raw.sentinel_master) {
        (None, None) => return None,
        (Some(list), Some(master)) => (list, master),
        (Some(list), None) => {
            problems.at(
                list.span(),
                "`cache.sentinels` needs `cache.sentinel_master`: the name the Sentinels monitor the primary under (their `sentinel monitor <name> …`)",
            );
            return None;
        }
        (None, Some(master)) => {
            problems.at(
                master.span(),
                "`cache.sentinel_master` needs `cache.sentinels`: the Sentinels' addresses, like [\"10.0.0.5:26379\", \"10.0.0.6:26379\"]",
            );
            return None;
        }
    };
    if list.get_ref().is_empty() {
        problems.at(
            list.span(),
            "`cache.sentinels` is empty: name at least one Sentinel, like [\"10.0.0.5:26379\"] (three, for a failover to survive one of them)",
        );
    }
    let mut addresses = Vec::new();
    for entry in list.get_ref() {
        match sentinel_address(entry.get_ref()) {
            Ok(address) => addresses.push(address),
            Err(e) => problems.at(entry.span(), format!("`cache.sentinels`: {e}")),
        }
    }
    let name = master.get_ref();
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        problems.at(
            master.span(),
            "`cache.sentinel_master` must be the name the Sentinels monitor the primary under: not empty, no spaces",
        );
    }
    Some(Box::new(Sentinels {
        addresses,
        master: name.clone(),
    }))
}

/// `cache.cluster`: the seed nodes of a Redis Cluster, each `host:port`, at least one. The
/// `cache.url` then gives the user, the password and TLS (its host:port is not used), and its
/// database must be 0 (a cluster has no other). A prefix holding `{` or `}` is refused: Redis would hash every key by the text between
/// them, putting the whole cache in one slot, and cachetail's bookkeeping names rely on theirs.
fn cluster(
    seeds: &Spanned<Vec<Spanned<String>>>,
    raw: &RawCache,
    mut url: RedisUrl,
    prefix: &str,
    problems: &mut Problems<'_>,
) -> RedisUrl {
    for seed in seeds.get_ref() {
        match RedisUrl::seed(seed.get_ref()) {
            Ok(node) => url.cluster.push(node),
            Err(e) => problems.at(seed.span(), format!("`cache.cluster`: {e}")),
        }
    }
    if seeds.get_ref().is_empty() {
        problems.at(
            seeds.span(),
            "`cache.cluster` must list at least one seed node, host:port (or leave it out for one Redis server)",
        );
    }
    if prefix.contains(['{', '}']) {
        let span = raw.prefix.as_ref().map_or(seeds.span(), Spanned::span);
        problems.at(
            span,
            "`cache.prefix` must not hold `{` or `}` with `cache.cluster`: Redis would place every key by the text between them, all in one slot",
        );
    }
    if let Some(text) = &raw.url
        && url.db != 0
    {
        problems.at(
            text.span(),
            "`cache.url`: a Redis Cluster has only database 0 (end the URL with /0 or nothing)",
        );
    }
    // The URL's host:port is not used unless it is a seed (as with Sentinel, it may name any
    // server): the crate needs an address, the first seed's.
    if let Some((host, port)) = url.cluster.first().cloned()
        && !url.cluster.contains(&(url.host.clone(), url.port))
    {
        (url.host, url.port) = (host, port);
    }
    url
}

/// `cache.max_connections`: at least 1, at most 10,000 (Redis's own default client limit).
fn redis_connections(raw: Option<&Spanned<i64>>, problems: &mut Problems<'_>) -> usize {
    let n = positive(
        raw,
        "cache.max_connections",
        64,
        MAX_REDIS_CONNECTIONS,
        problems,
    );
    usize::try_from(n).unwrap_or(64)
}

/// `cache.stream_max_len`: the invalidation stream's length, from 1 to ten million; it follows
/// `publish`, so it is refused beside `publish = false` (it would bound nothing).
fn stream_max_len(raw: &RawCache, problems: &mut Problems<'_>) -> u64 {
    let given = raw.stream_max_len.as_ref();
    if let Some(given) = given
        && raw.publish == Some(false)
    {
        problems.at(
            given.span(),
            "`cache.stream_max_len` has no effect with `publish = false`: nothing is appended to the invalidation stream; remove one of them",
        );
    }
    positive(
        given,
        "cache.stream_max_len",
        100_000,
        MAX_STREAM_LEN,
        problems,
    )
}

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
        derived_from: None,
    })
}
