//! The connection to Redis, on the `redis` crate (redis-rs): its sync `Connection` for the
//! tail's blocking work, its multiplexed async connection (`pool.rs`) for everything else, and
//! the one error type the rest of the daemon sees (`RedisError`, re-exported as
//! `cache::StoreError`), with the replies as the small `Reply` enum the backend matches on.
//!
//! The crate replaced a hand-written RESP2 client: it brings multiplexing (many requests in
//! flight on one connection, the speed goal of issue 15), and TLS, Sentinel, Cluster and RESP3
//! for the topologies real deployments run.

use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo, Value};

use crate::config::RedisUrl;

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis: {0}")]
    Io(#[from] std::io::Error),
    #[error("redis replied with an error: {0}")]
    Server(String),
    #[error("redis: malformed reply: {0}")]
    Protocol(String),
    #[error(
        "redis lost cachetail's state (restarted or flushed); answering from the database until the daemon rebuilds it"
    )]
    StateLost,
    #[error("redis refused the batch: another daemon took over the lease (fenced)")]
    Fenced,
    #[error("redis: cannot resolve {0:?}")]
    NoAddress(String),
    #[error(
        "redis: all {0} connections (`[cache] max_connections`) are in use; answering from the database"
    )]
    PoolFull(usize),
}

/// The crate's errors as ours: anything about the connection (refused, dropped, timed out) is
/// `Io`, which the backend retries once on a new connection and counts as an outage; an error
/// reply is `Server`; a reply of an unexpected shape is `Protocol`.
impl From<redis::RedisError> for RedisError {
    fn from(e: redis::RedisError) -> RedisError {
        use redis::ErrorKind;
        let io = |kind| RedisError::Io(std::io::Error::new(kind, e.to_string()));
        if e.is_timeout() {
            return io(std::io::ErrorKind::TimedOut);
        }
        if e.is_connection_dropped() || e.is_io_error() {
            return io(std::io::ErrorKind::ConnectionAborted);
        }
        match e.kind() {
            ErrorKind::Parse | ErrorKind::UnexpectedReturnType => {
                RedisError::Protocol(e.to_string())
            }
            // The crate drops the server's text of a refused AUTH: it was WRONGPASS.
            ErrorKind::AuthenticationFailed => RedisError::Server(
                "WRONGPASS redis refused the user name or password of `[cache] url`".to_owned(),
            ),
            // As Redis wrote it: `OOM command not allowed when…`.
            ErrorKind::Server(_) | ErrorKind::Extension => RedisError::Server(match e.code() {
                Some(code) => format!("{code} {}", e.detail().unwrap_or_default()),
                None => e.to_string(),
            }),
            _ => io(std::io::ErrorKind::Other),
        }
    }
}

/// One reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Nil,
    Status(String),
    Int(i64),
    Bulk(Vec<u8>),
    Array(Vec<Reply>),
    /// An error reply, kept as a value inside arrays.
    Error(String),
}

impl Reply {
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Reply::Int(i) => Some(*i),
            Reply::Bulk(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            Reply::Status(s) => s.parse().ok(),
            _ => None,
        }
    }
}

impl From<Value> for Reply {
    fn from(value: Value) -> Reply {
        match value {
            Value::Nil => Reply::Nil,
            Value::Int(i) => Reply::Int(i),
            Value::BulkString(b) => Reply::Bulk(b),
            Value::Array(items) | Value::Set(items) => {
                Reply::Array(items.into_iter().map(Reply::from).collect())
            }
            Value::SimpleString(s) => Reply::Status(s),
            Value::Okay => Reply::Status("OK".to_owned()),
            Value::ServerError(e) => Reply::Error(format!("{e:?}")),
            other => Reply::Error(format!("an unexpected reply: {other:?}")),
        }
    }
}

/// Where and how to connect: the address, the database, the user and the password; over TLS for
/// `rediss://`, the server's certificate verified against `tls_ca` (read at each connection, so a
/// renewed CA file is picked up) or else the system roots.
pub fn client(url: &RedisUrl) -> Result<redis::Client, RedisError> {
    let info = connection_info(url, &url.host, url.port)?;
    match ca_certificates(url)? {
        Some(certificates) => Ok(redis::Client::build_with_tls(info, certificates)?),
        None => Ok(redis::Client::open(info)?),
    }
}

/// A Redis Cluster client from `[cache] cluster`'s seed nodes (user, password and TLS from
/// `[cache] url`, as `client`): it learns the slots' owners from them and follows them.
pub fn cluster_client(
    url: &RedisUrl,
    timeout: Duration,
) -> Result<redis::cluster::ClusterClient, RedisError> {
    let seeds = url
        .cluster
        .iter()
        .map(|(host, port)| connection_info(url, host, *port))
        .collect::<Result<Vec<_>, _>>()?;
    let mut builder = redis::cluster::ClusterClientBuilder::new(seeds)
        .connection_timeout(timeout)
        .response_timeout(timeout);
    if let Some(certificates) = ca_certificates(url)? {
        builder = builder.certs(certificates);
    }
    Ok(builder.build()?)
}

/// The connection details of one server (`host`, `port`) with `url`'s user, password and TLS.
fn connection_info(url: &RedisUrl, host: &str, port: u16) -> Result<ConnectionInfo, RedisError> {
    let mut redis = RedisConnectionInfo::default()
        .set_db(url.db)
        .set_skip_set_lib_name();
    if let Some(user) = &url.username {
        redis = redis.set_username(user);
    }
    if let Some(password) = &url.password {
        redis = redis.set_password(password.expose());
    }
    let addr = if url.tls {
        crypto_provider();
        ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(host.to_owned(), port)
    };
    Ok(addr
        .into_connection_info()?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true))
        .set_redis_settings(redis))
}

/// The CA of `[cache] tls_ca`, when TLS is on and one is set.
fn ca_certificates(url: &RedisUrl) -> Result<Option<redis::TlsCertificates>, RedisError> {
    match &url.tls_ca {
        Some(path) if url.tls => {
            let pem = std::fs::read(path).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot read `[cache] tls_ca` {}: {e}", path.display()),
                )
            })?;
            Ok(Some(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            }))
        }
        _ => Ok(None),
    }
}

/// Installs rustls's `ring` provider as the process's default, once: the redis crate builds its
/// TLS configuration from the default provider and leaves the choice to the application.
fn crypto_provider() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // Err: one is installed already (by another part of the process), which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A connection's error with the password (should a server quote the AUTH it refused, as some
/// proxies do) replaced by `***`.
pub fn hide_password(error: RedisError, url: &RedisUrl) -> RedisError {
    let Some(password) = url.password.as_ref().filter(|p| !p.expose().is_empty()) else {
        return error;
    };
    let hide = |text: String| text.replace(password.expose(), "***");
    match error {
        RedisError::Server(text) => RedisError::Server(hide(text)),
        RedisError::Protocol(text) => RedisError::Protocol(hide(text)),
        RedisError::Io(e) => RedisError::Io(std::io::Error::new(e.kind(), hide(e.to_string()))),
        other => other,
    }
}

/// A command from its arguments.
pub fn command<A: AsRef<[u8]>>(args: &[A]) -> redis::Cmd {
    let mut cmd = redis::Cmd::new();
    for arg in args {
        cmd.arg(arg.as_ref());
    }
    cmd
}

/// A blocking connection (for the tail thread's batches, which run outside the runtime).
pub struct Conn {
    conn: redis::Connection,
}

impl Conn {
    pub fn connect(url: &RedisUrl, timeout: Duration) -> Result<Conn, RedisError> {
        let connected = (|| {
            let conn = client(url)?.get_connection_with_timeout(timeout)?;
            conn.set_read_timeout(Some(timeout))?;
            conn.set_write_timeout(Some(timeout))?;
            Ok(Conn { conn })
        })();
        connected.map_err(|e| hide_password(e, url))
    }

    /// Sends one command and reads its reply.
    pub fn cmd<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Result<Reply, RedisError> {
        let value: Value = command(args).query(&mut self.conn)?;
        Ok(Reply::from(value))
    }

    pub(super) fn inner(&mut self) -> &mut redis::Connection {
        &mut self.conn
    }

    /// Reads the next message pushed to a subscribed connection.
    #[cfg(test)]
    pub fn next_push(&mut self) -> Result<Reply, RedisError> {
        Ok(Reply::from(self.conn.recv_response()?))
    }
}
