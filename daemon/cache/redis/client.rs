//! The connection to Redis, on the `redis` crate (redis-rs): its sync `Connection` for the
//! tail's blocking work, its multiplexed async connection (`pool.rs`) for everything else, and
//! the one error type the rest of the daemon sees (`RedisError`, re-exported as
//! `cache::StoreError`), with the replies as the small `Reply` enum the backend matches on.
//!
//! The crate replaced a hand-written RESP2 client: it brings multiplexing (many requests in
//! flight on one connection, the speed goal of issue 15), and TLS, Sentinel, Cluster and RESP3
//! for the topologies real deployments run.
//!
//! Where connections go is a `Target`: the server of `[cache] url`, or, with `[cache] sentinels`,
//! the primary the Sentinels name at the moment a connection is opened (asked again for every
//! new connection, so a connection that failed after a failover reconnects to the new primary).
//! A server that turns out to be a replica (it answers `ROLE` as one, or refuses a write with
//! `READONLY`) is treated like a server that does not answer: the connection is dropped and the
//! primary looked up again, and meanwhile reads answer from the database.

use std::time::Duration;

use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
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
        // A primary demoted to a replica (a failover happened): like a server that went away,
        // the connection is replaced (through Sentinel, by the primary it names now).
        if e.code() == Some("READONLY") || e.to_string().contains("READONLY") {
            return RedisError::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                format!("the server is a replica, not the primary ({e})"),
            ));
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

/// The shortest and longest waits before a cluster command is retried.
const CLUSTER_RETRY_MIN: Duration = Duration::from_millis(10);
const CLUSTER_RETRY_MAX: Duration = Duration::from_millis(100);

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
    // The crate waits at least 1.28 s before retrying a command that met a slot in migration
    // (`TRYAGAIN`), a moved slot or a node gone: a batch, and every `?fresh=1` waiting for it,
    // stood still that long for a migration that ends in milliseconds. Retries start after
    // 10 ms and wait at most 100 ms (16 of them: ~1.5 s), inside the caller's own time limit
    // (2 s for a read, then the database; a batch is retried by the tail).
    let mut builder = redis::cluster::ClusterClientBuilder::new(seeds)
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .min_retry_wait(CLUSTER_RETRY_MIN.as_millis() as u64)
        .max_retry_wait(CLUSTER_RETRY_MAX.as_millis() as u64);
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
            let pem = crate::config::read_ca_file(path).map_err(|e| {
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

/// Where connections go: the server of `[cache] url`, or the primary the Sentinels of
/// `[cache] sentinels` name (the URL's user, password, database and TLS apply to it, and TLS
/// and `tls_ca` to the Sentinels too; the Sentinels are asked without a password).
pub struct Target {
    url: RedisUrl,
    /// Built once: it keeps a connection to each Sentinel it asked.
    sentinel: Option<Result<tokio::sync::Mutex<SentinelClient>, String>>,
    /// The primary the Sentinels named last (for `/v1/status` and the logs).
    named: std::sync::Mutex<Option<(String, u16)>>,
}

impl Target {
    pub fn new(url: &RedisUrl) -> Target {
        Target {
            url: url.clone(),
            sentinel: url
                .sentinel
                .as_ref()
                .map(|_| sentinel_client(url).map(tokio::sync::Mutex::new)),
            named: std::sync::Mutex::new(None),
        }
    }

    /// The URL connections are made from (with Sentinel: its user, password, database, TLS).
    pub fn url(&self) -> &RedisUrl {
        &self.url
    }

    pub fn is_sentinel(&self) -> bool {
        self.sentinel.is_some()
    }

    /// Where the primary is, as last known: the URL's address, or the one the Sentinels named
    /// last (None before they were first asked).
    pub fn address(&self) -> Option<(String, u16)> {
        match self.sentinel {
            None => Some((self.url.host.clone(), self.url.port)),
            Some(_) => self.named.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }

    /// The URL to connect to now: `[cache] url`, or with Sentinel, that URL at the address of
    /// the primary the Sentinels name (the crate asks them in turn, skips one that does not
    /// answer or sees the primary down, and checks the node with `ROLE`). At most `timeout`.
    pub async fn primary(&self, timeout: Duration) -> Result<RedisUrl, RedisError> {
        let Some(sentinel) = &self.sentinel else {
            return Ok(self.url.clone());
        };
        let sentinel = sentinel
            .as_ref()
            .map_err(|e| RedisError::Io(std::io::Error::other(e.clone())))?;
        let named = tokio::time::timeout(timeout, async {
            let client = sentinel.lock().await.async_get_client().await?;
            match client.get_connection_info().addr() {
                ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                    Ok((host.clone(), *port))
                }
                other => Err(RedisError::Protocol(format!(
                    "sentinel named an address of an unexpected kind: {other:?}"
                ))),
            }
        })
        .await
        .unwrap_or_else(|_| {
            Err(RedisError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the sentinels did not name a primary in time",
            )))
        })
        .map_err(|e| hide_password(e, &self.url))?;
        *self.named.lock().unwrap_or_else(|e| e.into_inner()) = Some(named.clone());
        let mut url = self.url.clone();
        (url.host, url.port) = named;
        Ok(url)
    }
}

/// The crate's Sentinel client for `url`'s `[cache] sentinels`: the Sentinels over TLS when the
/// URL is `rediss://` (verified like the primary), the primary checked with the URL's
/// credentials and database.
fn sentinel_client(url: &RedisUrl) -> Result<SentinelClient, String> {
    let Some(sentinels) = &url.sentinel else {
        return Err("no sentinels".to_owned());
    };
    let addresses = sentinels.addresses.iter().map(|(host, port)| {
        if url.tls {
            ConnectionAddr::TcpTls {
                host: host.clone(),
                port: *port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host.clone(), *port)
        }
    });
    let nodelay = || redis::io::tcp::TcpSettings::default().set_nodelay(true);
    let mut builder =
        SentinelClientBuilder::new(addresses, &sentinels.master, SentinelServerType::Master)
            .map_err(|e| e.to_string())?
            .set_client_to_redis_db(url.db)
            .set_client_to_redis_tcp_settings(nodelay())
            .set_client_to_sentinel_tcp_settings(nodelay());
    if let Some(user) = &url.username {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = &url.password {
        builder = builder.set_client_to_redis_password(password.expose());
    }
    if url.tls {
        crypto_provider();
        builder = builder
            .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
        if let Some(path) = &url.tls_ca {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read `[cache] tls_ca` {}: {e}", path.display()))?;
            let certificates = || redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            };
            builder = builder
                .set_client_to_redis_certificates(certificates())
                .set_client_to_sentinel_certificates(certificates());
        }
    }
    builder.build().map_err(|e| e.to_string())
}

/// Whether a `ROLE` reply is a primary's (`master`, …); else the error that drops the
/// connection.
pub fn check_primary(role: &Value, url: &RedisUrl) -> Result<(), RedisError> {
    match role {
        Value::Array(items) if matches!(items.first(), Some(Value::BulkString(r)) if r == b"master") => {
            Ok(())
        }
        _ => Err(RedisError::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!(
                "{}:{} is not the primary (a failover is under way); asking the sentinels again",
                url.host, url.port
            ),
        ))),
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

/// Connects to the primary (with Sentinel: the one the Sentinels name) and sends `PING`, for
/// `cachetail check`. Blocking.
pub fn ping(url: &RedisUrl, timeout: Duration) -> Result<(), RedisError> {
    let target = Target::new(url);
    let url = if target.is_sentinel() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(target.primary(timeout))?
    } else {
        url.clone()
    };
    Conn::connect(&url, timeout, target.is_sentinel())?.cmd(&["PING"])?;
    Ok(())
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
    /// Connects to `url`'s server; `primary`: and checks it is a primary (with Sentinel, where
    /// the URL is the one the Sentinels just named).
    pub fn connect(url: &RedisUrl, timeout: Duration, primary: bool) -> Result<Conn, RedisError> {
        let connected = (|| {
            let mut conn = client(url)?.get_connection_with_timeout(timeout)?;
            conn.set_read_timeout(Some(timeout))?;
            conn.set_write_timeout(Some(timeout))?;
            if primary {
                let role: Value = redis::cmd("ROLE").query(&mut conn)?;
                check_primary(&role, url)?;
            }
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
