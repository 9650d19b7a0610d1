//! `[cache]`'s backend: memory, or Redis (one server, a primary found through Sentinel, or a
//! Cluster), with its URL, TLS CA, prefix, connections and invalidation stream, validated.

use std::path::{Path, PathBuf};

use toml::Spanned;

use super::limits::{MAX_REDIS_CONNECTIONS, MAX_STREAM_LEN, positive};
use super::parse::{Problems, RawCache};
use super::redis_url::sentinel_address;
use super::{Backend, RedisUrl, Sentinels};

pub(super) fn backend(raw: &RawCache, base: &Path, problems: &mut Problems<'_>) -> Backend {
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
    match read_ca_file(&path) {
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

/// A CA file's bytes, at most this many: a bundle of every public root is about 200 KiB.
const MAX_CA_FILE: u64 = 1 << 20;

/// Reads `[cache] tls_ca`: a regular file of at most `MAX_CA_FILE` bytes (not a device that never
/// ends, like `/dev/zero`, nor a FIFO that blocks until a writer comes).
pub fn read_ca_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    // Looked at before it is opened: opening a FIFO blocks.
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let file = std::fs::File::open(path)?;
    let mut pem = Vec::new();
    file.take(MAX_CA_FILE + 1).read_to_end(&mut pem)?;
    if pem.len() as u64 > MAX_CA_FILE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("over {MAX_CA_FILE} bytes: not a file of CA certificates"),
        ));
    }
    Ok(pem)
}
