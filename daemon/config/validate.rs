//! Validation: the file's serde structs into the plain data of `Config`, section by section
//! (top-level settings, `[cache]`, `[write_behind]`, `[http]`, `[tail]`, key families, rules).
//! Every problem is collected with its location; none stops the others from being found.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use super::backend::backend;
use super::limits;
use super::limits::{
    MAX_BATCH_SIZE, MAX_CONNECTIONS, MAX_ENTRIES, MAX_EVENT_STREAMS, MAX_READ_QUEUE, MAX_READERS,
    MAX_WAIT, MAX_WORKERS, MIN_MAX_BYTES, count, duration, positive, ttl,
};
use super::parse::{
    Problems, RawCache, RawConfig, RawFamily, RawHttp, RawRule, RawTail, RawWriteBehind,
};
use super::template::Template;
use super::{
    AllowedHost, Backend, CacheSettings, Config, DEFAULT_LISTEN, Family, HttpSettings, Rule,
    Secret, TailSettings, WriteBehindSettings,
};
use crate::maintain::Shape;
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
    let max_bytes = raw
        .max_bytes
        .as_ref()
        .and_then(|size| limits::size(size, "cache.max_bytes", MIN_MAX_BYTES, problems));
    // With `max_bytes`, the count bounds the values only if it is given.
    let max_entries = (raw.max_entries.is_some() || max_bytes.is_none()).then(|| {
        positive(
            raw.max_entries.as_ref(),
            "cache.max_entries",
            100_000,
            MAX_ENTRIES,
            problems,
        )
    });
    let backend = backend(raw, base, problems);
    if let (Some(size), Backend::Redis { .. }) = (&raw.max_bytes, &backend) {
        problems.at(
            size.span(),
            "`cache.max_bytes` bounds the in-process cache: with `backend = \"redis\"` the values live in Redis, bound them with Redis's own `maxmemory`",
        );
    }
    CacheSettings {
        backend,
        max_entries,
        max_bytes,
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
            alike: d.alike,
            lookups: d
                .lookups
                .into_iter()
                .map(|lookup| super::RuleLookup {
                    lookup,
                    key: pattern.clone(),
                })
                .collect(),
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
    let maintain = maintain(&raw, pattern_text, &pattern, &query, problems);
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
        maintain,
    })
}

/// `maintain`: `"recompute"` (the default: None) or `"incremental"`, which needs a query of a
/// shape `maintain::analyse` accepts; refused at the query with the reason otherwise.
fn maintain(
    raw: &RawFamily,
    pattern_text: &Spanned<String>,
    pattern: &Template,
    query: &str,
    problems: &mut Problems<'_>,
) -> Option<Arc<Shape>> {
    let setting = raw.maintain.as_ref()?;
    match setting.get_ref().as_str() {
        "recompute" => None,
        "incremental" => match crate::maintain::analyse(query, !pattern.params().is_empty()) {
            Ok(shape) => Some(Arc::new(shape)),
            Err(reason) => {
                problems.at(
                    raw.query.span(),
                    format!(
                        "key family `{pattern_text}`: `maintain = \"incremental\"` cannot maintain this query: {reason}"
                    ),
                );
                None
            }
        },
        other => {
            problems.at(
                setting.span(),
                format!(
                    "key family `{pattern_text}`: `maintain` is \"recompute\" or \"incremental\", not {other:?}"
                ),
            );
            None
        }
    }
}

/// The group name of a family generation (Redis keeps a sorted set of its keys): a value
/// computed by another definition of the family (before a reload changed its query) is in
/// another group, which the reload retires. Stable across builds, so two daemons on one config
/// agree.
fn family_group(pattern: &str, definition: &str) -> String {
    format!("f:{pattern}:{:016x}", crate::fnv1a(definition.as_bytes()))
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
        lookups: Vec::new(),
        alike: Vec::new(),
    })
}
