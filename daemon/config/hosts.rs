//! Host names as `[http] allowed_hosts` lists them and as a request's `Host` gives them:
//! `host[:port]`, the host a name, an IPv4 address or a bracketed IPv6 one, compared without
//! letter case or a trailing dot.

/// A name the daemon answers to, besides its listen address's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedHost {
    /// `"*"`: any `Host` at all (the check is off; only behind a proxy that checks it).
    Any,
    /// A host, with one port or (`port: None`) any.
    Name { host: String, port: Option<u16> },
}

impl AllowedHost {
    /// Parses one entry of `allowed_hosts`, or says what is wrong with it.
    pub fn parse(text: &str) -> Result<AllowedHost, String> {
        if text.trim() == "*" {
            return Ok(AllowedHost::Any);
        }
        let (host, port) = split_host(text).ok_or_else(|| {
            format!("{text:?} is not a host name or address with an optional port, like \"cache.internal\" or \"proxy.example:8443\" (no scheme, path or user)")
        })?;
        Ok(AllowedHost::Name { host, port })
    }

    /// Whether a request's host and port (None: the scheme's default) are this entry.
    pub fn matches(&self, host: &str, port: Option<u16>) -> bool {
        match self {
            AllowedHost::Any => true,
            AllowedHost::Name {
                host: name,
                port: wanted,
            } => name == host && wanted.is_none_or(|wanted| port == Some(wanted)),
        }
    }
}

/// Splits `host[:port]` into its host (lowercased, without a trailing dot; an IPv6 address
/// without its brackets) and its port. None when it is not such a thing: empty, a bad port,
/// or characters no host name has (a scheme, a path, a user, spaces).
pub fn split_host(text: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = match text.strip_prefix('[') {
        Some(rest) => {
            let (address, after) = rest.split_once(']')?;
            address.parse::<std::net::Ipv6Addr>().ok()?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':')?),
            };
            (address, port)
        }
        None => {
            let (host, port) = match text.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (text, None),
            };
            let name_like = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
            if !host.bytes().all(name_like) {
                return None;
            }
            (host, port)
        }
    };
    let port = match port {
        Some(digits) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            Some(digits.parse::<u16>().ok()?)
        }
        Some(_) => return None,
        None => None,
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    (!host.is_empty()).then_some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_split_into_a_lowercase_name_and_a_port() {
        let split = |t: &str| split_host(t);
        assert_eq!(
            split("LocalHost:8080"),
            Some(("localhost".into(), Some(8080)))
        );
        assert_eq!(
            split("cache.internal."),
            Some(("cache.internal".into(), None))
        );
        assert_eq!(split("[::1]:9"), Some(("::1".into(), Some(9))));
        assert_eq!(split("[::1]"), Some(("::1".into(), None)));
        assert_eq!(split("10.0.0.1:80"), Some(("10.0.0.1".into(), Some(80))));
        for bad in [
            "", ":80", "x:", "x:99999", "x:8o", "http://x", "x/y", "user@x", "a b", "[zz]:1",
            "[::1]x", "::1", "a:b:c",
        ] {
            assert_eq!(split(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_entry_without_a_port_takes_any() {
        let any_port = AllowedHost::parse("Cache.Internal").expect("valid");
        assert!(any_port.matches("cache.internal", Some(1)));
        assert!(any_port.matches("cache.internal", None));
        let one_port = AllowedHost::parse("proxy.example:8443").expect("valid");
        assert!(one_port.matches("proxy.example", Some(8443)));
        assert!(!one_port.matches("proxy.example", Some(80)));
        assert!(!one_port.matches("proxy.example", None));
        assert!(AllowedHost::parse("*").expect("valid").matches("x", None));
        assert!(AllowedHost::parse("https://x").is_err());
    }
}
