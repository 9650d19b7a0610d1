//! `[cache] url`: where the Redis server is, parsed from `redis://[[user]:password@]host[:port][/db]`,
//! or `rediss://…` for TLS (the server verified against the system roots, or the CA file
//! `[cache] tls_ca`, which the config's validation sets here).
//! The user and the password are percent-decoded (`%40` for `@`, `%2F` for `/`, `%25` for `%`).
//! The URL may hold a password, so an error about it never repeats it, nor any part of it: the
//! error's `file:line:column` says where it is.

use std::path::PathBuf;

use super::secret::Secret;

/// The highest database number accepted (Redis has 16 by default; `databases` raises it).
pub const MAX_DB: i64 = 65_535;

/// A Redis server's address, database, credentials and TLS (the password prints as `***`).
#[derive(Debug, Clone, PartialEq)]
pub struct RedisUrl {
    pub host: String,
    pub port: u16,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// `rediss://`: TLS, the server's certificate verified (never skipped).
    pub tls: bool,
    /// `[cache] tls_ca`: the PEM file of the CA(s) to verify the server against instead of the
    /// system roots (only with `tls`).
    pub tls_ca: Option<PathBuf>,
    /// `[cache] sentinels` and `sentinel_master`: the primary is found through Sentinel (the
    /// URL's host and port are then not used; its user, password, database and TLS are).
    pub sentinel: Option<Box<Sentinels>>,
    /// `[cache] cluster`: the seed nodes of a Redis Cluster, (host, port); empty for one server.
    /// With seeds, `host` and `port` name one of them and the rest (user, password, TLS) apply
    /// to every node.
    pub cluster: Vec<(String, u16)>,
}

/// Where the Sentinels are, and the name they monitor the primary under.
#[derive(Debug, Clone, PartialEq)]
pub struct Sentinels {
    pub addresses: Vec<(String, u16)>,
    pub master: String,
}

/// A Sentinel's address: `host:port` or `[v6]:port` (the port is required: Sentinels usually
/// listen on 26379, not Redis's 6379).
pub fn sentinel_address(text: &str) -> Result<(String, u16), String> {
    let has_port = match text.strip_prefix('[') {
        Some(rest) => rest
            .split_once(']')
            .is_some_and(|(_, after)| after.starts_with(':')),
        None => text.contains(':'),
    };
    if !has_port || text.trim() != text || text.contains('/') {
        return Err(format!(
            "{text:?} is not `host:port` (like \"10.0.0.5:26379\" or \"[::1]:26379\")"
        ));
    }
    host_and_port(text).map_err(|e| format!("{text:?}: {e}"))
}

impl RedisUrl {
    /// The default: `redis://127.0.0.1:6379/0`.
    pub fn local() -> RedisUrl {
        RedisUrl {
            host: "127.0.0.1".to_owned(),
            port: 6379,
            db: 0,
            username: None,
            password: None,
            tls: false,
            tls_ca: None,
            sentinel: None,
            cluster: Vec::new(),
        }
    }

    /// Parses a URL. The error says what is wrong without quoting the URL.
    pub fn parse(url: &str) -> Result<RedisUrl, String> {
        let (tls, rest) = match (url.strip_prefix("rediss://"), url.strip_prefix("redis://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            (None, None) => return Err(
                "it must start with redis:// or, for TLS, rediss:// (like redis://:password@127.0.0.1:6379/0)"
                    .to_owned(),
            ),
        };
        // A database number has no `@`: everything before the last one is the user and password
        // (which may then hold a raw `/` or `@`).
        let (credentials, location) = match rest.rsplit_once('@') {
            Some((c, l)) => (Some(c), l),
            None => (None, rest),
        };
        let (username, password) = match credentials {
            None => (None, None),
            Some(c) => {
                let (user, password) = match c.split_once(':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (c, None),
                };
                let user = decode(user, "the user name")?;
                let password = password
                    .map(|p| decode(p, "the password"))
                    .transpose()?
                    .map(Secret::new);
                ((!user.is_empty()).then_some(user), password)
            }
        };
        let (host_port, path) = location.split_once('/').unwrap_or((location, ""));
        let (host, port) = host_and_port(host_port)?;
        let db = if path.is_empty() {
            0
        } else {
            path.parse::<i64>()
                .ok()
                .filter(|db| (0..=MAX_DB).contains(db))
                .ok_or(format!(
                    "the path must be a database number from 0 to {MAX_DB}, like /0"
                ))?
        };
        Ok(RedisUrl {
            host,
            port,
            db,
            username,
            password,
            tls,
            tls_ca: None,
            sentinel: None,
            cluster: Vec::new(),
        })
    }

    /// One seed node of `[cache] cluster`: `host:port` (`[v6]:port`), the port required.
    pub fn seed(text: &str) -> Result<(String, u16), String> {
        let has_port = text.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && !port.is_empty() && !port.ends_with(']')
        });
        if !has_port || text.contains(['@', '/']) {
            return Err(format!(
                "{text:?} is not host:port (like \"10.0.0.1:7000\"; user, password and TLS go in `cache.url`)"
            ));
        }
        let url = RedisUrl::parse(&format!("redis://{text}"))?;
        Ok((url.host, url.port))
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn host_and_port(text: &str) -> Result<(String, u16), String> {
    let (host, port) = match text.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or("an IPv6 host needs its closing `]`")?;
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or("`]` must be followed by `:port` or nothing")?,
                    ),
                ),
            }
        }
        None => match text.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        },
    };
    if host.is_empty() {
        return Err("no host (like redis://127.0.0.1:6379/0)".to_owned());
    }
    let port = match port {
        None => 6379,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or("the port must be a number from 1 to 65535")?,
    };
    Ok((host.to_owned(), port))
}

/// Percent-decodes a user name or password strictly: every `%` starts two hex digits, and the
/// result is UTF-8.
fn decode(text: &str, what: &str) -> Result<String, String> {
    let bad_escape =
        || format!("{what} has a `%` that does not start an escape like %40: write a `%` as %25");
    let bytes = text.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'%'
            && !bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
        {
            return Err(bad_escape());
        }
    }
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| format!("{what} is not UTF-8 once percent-decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let url = RedisUrl::parse("redis://:secret@10.0.0.2:6380/3").expect("valid");
        assert_eq!((url.host.as_str(), url.port, url.db), ("10.0.0.2", 6380, 3));
        assert_eq!(url.password.as_ref().map(Secret::expose), Some("secret"));
        let url = RedisUrl::parse("redis://localhost").expect("valid");
        assert_eq!((url.port, url.db, url.password), (6379, 0, None));
        assert_eq!(
            RedisUrl::parse("redis://127.0.0.1:6379/0"),
            Ok(RedisUrl::local())
        );
        let url = RedisUrl::parse("redis://[::1]:6390/2").expect("valid");
        assert_eq!((url.host.as_str(), url.port, url.db), ("::1", 6390, 2));
        let url = RedisUrl::parse("redis://[::1]").expect("valid");
        assert_eq!((url.host.as_str(), url.port), ("::1", 6379));
        assert!(!url.tls);
        let url = RedisUrl::parse("rediss://u:p%40w@cache.example:6380/2").expect("valid");
        assert!(url.tls);
        assert_eq!(
            (url.host.as_str(), url.port, url.db, url.username.as_deref()),
            ("cache.example", 6380, 2, Some("u"))
        );
        assert_eq!(url.password.as_ref().map(Secret::expose), Some("p@w"));
        for bad in [
            "http://x",
            "redis+tls://x",
            "rediss:/x",
            "rediss://x:0",
            "redis://x:99999",
            "redis://x:0",
            "redis://x/db",
            "redis://x/-1",
            "redis://x/65536",
            "redis://:6379",
            "redis://[::1",
        ] {
            assert!(RedisUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sentinel_addresses_need_a_host_and_a_port() {
        assert_eq!(
            sentinel_address("10.0.0.5:26379"),
            Ok(("10.0.0.5".to_owned(), 26379))
        );
        assert_eq!(
            sentinel_address("[::1]:26380"),
            Ok(("::1".to_owned(), 26380))
        );
        for bad in [
            "10.0.0.5", "[::1]", ":26379", "h:0", "h:x", "h:99999", " h:1", "h:1/0", "",
        ] {
            assert!(sentinel_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn user_and_password_are_percent_decoded() {
        let url = RedisUrl::parse("redis://app%40corp%3A1:pa%3Ass%40w%2Frd%2525%20x@h:1/0")
            .expect("valid");
        assert_eq!(url.username.as_deref(), Some("app@corp:1"));
        assert_eq!(
            url.password.as_ref().map(Secret::expose),
            Some("pa:ss@w/rd%25 x")
        );
        // A raw `@` or `/` in the password: the last `@` ends it.
        let url = RedisUrl::parse("redis://:p@ss/w@h:7/1").expect("valid");
        assert_eq!(url.password.as_ref().map(Secret::expose), Some("p@ss/w"));
        assert_eq!((url.host.as_str(), url.port, url.db), ("h", 7, 1));
        assert_eq!(
            RedisUrl::parse("redis://user@h").expect("valid").username,
            Some("user".to_owned())
        );
        for bad in ["redis://:50%@h", "redis://:%zz@h", "redis://:%ff@h"] {
            assert!(RedisUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn no_error_repeats_the_url_or_its_password() {
        for url in [
            "redis:/:hunter2@h:1/0",
            "rediss:/:hunter2@h:1/0",
            "rediss://:hunter2@h:1/hunter2",
            "rediss://:hunter2%@h:1/0",
            "redis://:hunter2",
            "redis://:hunter2@h:1/hunter2",
            "redis://:hunter2@h:hunter2/0",
            "redis://:hunter2%@h:1/0",
            "redis://:hunter2%ff@h:1/0",
            "redis://:hunter2@[h:1/0",
            "redis://:hunter2@:1/0",
        ] {
            let error = RedisUrl::parse(url).expect_err(url);
            assert!(!error.contains("hunter2"), "{url}: {error}");
        }
        let url = RedisUrl::parse("redis://u:hunter2@h").expect("valid");
        assert!(!format!("{url:?}").contains("hunter2"), "{url:?}");
    }
}
