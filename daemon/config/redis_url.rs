//! `[cache] url`: where the Redis server is, parsed from `redis://[[user]:password@]host[:port][/db]`.

/// A Redis server's address, database and credentials.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisUrl {
    pub host: String,
    pub port: u16,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
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
        }
    }

    pub fn parse(url: &str) -> Result<RedisUrl, String> {
        let bad = |why: &str| format!("redis url {url:?}: {why}");
        let rest = url
            .strip_prefix("redis://")
            .ok_or_else(|| bad("it must start with redis:// (TLS is not supported)"))?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (credentials, host_port) = match authority.rsplit_once('@') {
            Some((c, h)) => (Some(c), h),
            None => (None, authority),
        };
        let (username, password) = match credentials {
            None => (None, None),
            Some(c) => match c.split_once(':') {
                Some((u, p)) => ((!u.is_empty()).then(|| u.to_owned()), Some(p.to_owned())),
                None => (Some(c.to_owned()), None),
            },
        };
        let (host, port) = match host_port.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| bad("the port is not a number from 1 to 65535"))?,
            ),
            None => (host_port, 6379),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let db = if path.is_empty() {
            0
        } else {
            path.parse::<i64>()
                .map_err(|_| bad("the path must be a database number, like /0"))?
        };
        Ok(RedisUrl {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            db,
            username,
            password,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let url = RedisUrl::parse("redis://:secret@10.0.0.2:6380/3").expect("valid");
        assert_eq!(
            (url.host.as_str(), url.port, url.db, url.password.as_deref()),
            ("10.0.0.2", 6380, 3, Some("secret"))
        );
        let url = RedisUrl::parse("redis://localhost").expect("valid");
        assert_eq!((url.port, url.db, url.password), (6379, 0, None));
        assert_eq!(
            RedisUrl::parse("redis://127.0.0.1:6379/0"),
            Ok(RedisUrl::local())
        );
        assert!(RedisUrl::parse("http://x").is_err());
        assert!(RedisUrl::parse("redis://x:99999").is_err());
        assert!(RedisUrl::parse("redis://x/db").is_err());
    }
}
