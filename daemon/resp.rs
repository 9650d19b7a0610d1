//! A small Redis client: RESP2 over TCP, blocking and async, for the handful of commands the
//! Redis backend sends (GET, HGET, EVALSHA, SCRIPT LOAD, SCAN, UNLINK, PING, AUTH, SELECT).
//!
//! Hand-written on purpose: RESP2 has five reply types, and the `redis` crate would bring about a
//! hundred crates (url/idna/icu, combine, futures) for these few commands.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    #[error("redis url {0:?}: {1}")]
    BadUrl(String, String),
}

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Nil,
    Status(String),
    Int(i64),
    Bulk(Vec<u8>),
    Array(Vec<Reply>),
    /// An error reply, kept as a value inside arrays; `Conn::cmd` turns a top-level one into
    /// `RedisError::Server`.
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

/// Where the server is: `redis://[[user]:password@]host[:port][/db]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisUrl {
    pub host: String,
    pub port: u16,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl RedisUrl {
    pub fn parse(url: &str) -> Result<RedisUrl, RedisError> {
        let bad = |why: &str| RedisError::BadUrl(url.to_owned(), why.to_owned());
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

    /// The commands that prepare a new connection: AUTH and SELECT, as needed.
    fn handshake(&self) -> Vec<Vec<Vec<u8>>> {
        let mut commands = Vec::new();
        if let Some(password) = &self.password {
            let mut auth = vec![b"AUTH".to_vec()];
            if let Some(user) = &self.username {
                auth.push(user.clone().into_bytes());
            }
            auth.push(password.clone().into_bytes());
            commands.push(auth);
        }
        if self.db != 0 {
            commands.push(vec![b"SELECT".to_vec(), self.db.to_string().into_bytes()]);
        }
        commands
    }
}

/// Appends one command (an array of bulk strings) to `out`.
pub fn encode<A: AsRef<[u8]>>(out: &mut Vec<u8>, args: &[A]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        let arg = arg.as_ref();
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses one reply from the start of `buf`: `Ok(None)` when more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, RedisError> {
    let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let Some((&kind, line)) = buf[..line_end].split_first() else {
        return Err(RedisError::Protocol("empty line".into()));
    };
    let text = || String::from_utf8_lossy(line).into_owned();
    let number = || -> Result<i64, RedisError> {
        std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| RedisError::Protocol(format!("bad length {:?}", text())))
    };
    let after = line_end + 2;
    match kind {
        b'+' => Ok(Some((Reply::Status(text()), after))),
        b'-' => Ok(Some((Reply::Error(text()), after))),
        b':' => Ok(Some((Reply::Int(number()?), after))),
        b'$' => {
            let len = number()?;
            if len < 0 {
                return Ok(Some((Reply::Nil, after)));
            }
            let len = len as usize;
            if buf.len() < after + len + 2 {
                return Ok(None);
            }
            Ok(Some((
                Reply::Bulk(buf[after..after + len].to_vec()),
                after + len + 2,
            )))
        }
        b'*' => {
            let count = number()?;
            if count < 0 {
                return Ok(Some((Reply::Nil, after)));
            }
            let mut items = Vec::with_capacity((count as usize).min(1024));
            let mut at = after;
            for _ in 0..count {
                match parse(&buf[at..])? {
                    Some((item, used)) => {
                        items.push(item);
                        at += used;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(items), at)))
        }
        other => Err(RedisError::Protocol(format!(
            "unknown reply type {:?}",
            other as char
        ))),
    }
}

const READ_CHUNK: usize = 16 * 1024;

/// Drops the first `used` bytes of a read buffer (usually all of it: then nothing moves).
fn consume(buf: &mut Vec<u8>, used: usize) {
    if used >= buf.len() {
        buf.clear();
    } else {
        buf.drain(..used);
    }
}

fn top_level(reply: Reply) -> Result<Reply, RedisError> {
    match reply {
        Reply::Error(e) => Err(RedisError::Server(e)),
        other => Ok(other),
    }
}

/// A blocking connection (for the applying thread and fills, which run on blocking threads).
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn connect(url: &RedisUrl, timeout: Duration) -> Result<Conn, RedisError> {
        let address = (url.host.as_str(), url.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| RedisError::BadUrl(url.host.clone(), "no address".into()))?;
        let stream = TcpStream::connect_timeout(&address, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut conn = Conn {
            stream,
            buf: Vec::with_capacity(4096),
        };
        for command in url.handshake() {
            conn.cmd(&command)?;
        }
        Ok(conn)
    }

    /// Sends one command and reads its reply.
    pub fn cmd<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Result<Reply, RedisError> {
        let mut out = Vec::new();
        encode(&mut out, args);
        self.stream.write_all(&out)?;
        top_level(self.read_reply()?)
    }

    fn read_reply(&mut self) -> Result<Reply, RedisError> {
        loop {
            if let Some((reply, used)) = parse(&self.buf)? {
                consume(&mut self.buf, used);
                return Ok(reply);
            }
            let filled = self.buf.len();
            self.buf.resize(filled + READ_CHUNK, 0);
            let n = self.stream.read(&mut self.buf[filled..]);
            self.buf.truncate(filled + *n.as_ref().unwrap_or(&0));
            if n? == 0 {
                return Err(RedisError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Reads the next message pushed to a subscribed connection.
    pub fn next_push(&mut self) -> Result<Reply, RedisError> {
        self.read_reply()
    }
}

/// An async connection (for the endpoint's reads, on the tokio runtime).
pub struct AsyncConn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl AsyncConn {
    pub async fn connect(url: &RedisUrl) -> Result<AsyncConn, RedisError> {
        let stream = tokio::net::TcpStream::connect((url.host.as_str(), url.port)).await?;
        stream.set_nodelay(true)?;
        let mut conn = AsyncConn {
            stream,
            buf: Vec::with_capacity(4096),
        };
        for command in url.handshake() {
            let replies = conn.pipeline(&[command]).await?;
            if let Some(Reply::Error(e)) = replies.into_iter().next() {
                return Err(RedisError::Server(e));
            }
        }
        Ok(conn)
    }

    /// Sends several commands at once and reads their replies, in order (one round trip).
    pub async fn pipeline<A: AsRef<[u8]>>(
        &mut self,
        commands: &[Vec<A>],
    ) -> Result<Vec<Reply>, RedisError> {
        let mut out = Vec::new();
        for command in commands {
            encode(&mut out, command);
        }
        self.stream.write_all(&out).await?;
        let mut replies = Vec::with_capacity(commands.len());
        while replies.len() < commands.len() {
            if let Some((reply, used)) = parse(&self.buf)? {
                consume(&mut self.buf, used);
                replies.push(reply);
                continue;
            }
            // Straight into the buffer's spare room: no chunk on the stack of the future.
            self.buf.reserve(READ_CHUNK);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(RedisError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
        Ok(replies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_reply_type_and_waits_for_more() {
        let wire = b"*5\r\n+OK\r\n:-3\r\n$5\r\nhe\r\no\r\n$-1\r\n-ERR no\r\n";
        let (reply, used) = parse(wire).expect("valid").expect("complete");
        assert_eq!(used, wire.len());
        assert_eq!(
            reply,
            Reply::Array(vec![
                Reply::Status("OK".into()),
                Reply::Int(-3),
                Reply::Bulk(b"he\r\no".to_vec()),
                Reply::Nil,
                Reply::Error("ERR no".into()),
            ])
        );
        for cut in 0..wire.len() {
            assert!(parse(&wire[..cut]).expect("valid prefix").is_none());
        }
        assert!(parse(b"?x\r\n").is_err());
    }

    #[test]
    fn encodes_binary_safe_bulk_strings() {
        let mut out = Vec::new();
        encode(&mut out, &[&b"SET"[..], b"k", b"a\r\nb"]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\na\r\nb\r\n");
    }

    #[test]
    fn parses_urls() {
        let url = RedisUrl::parse("redis://:secret@10.0.0.2:6380/3").expect("valid");
        assert_eq!(
            (url.host.as_str(), url.port, url.db, url.password.as_deref()),
            ("10.0.0.2", 6380, 3, Some("secret"))
        );
        let url = RedisUrl::parse("redis://localhost").expect("valid");
        assert_eq!((url.port, url.db, url.password), (6379, 0, None));
        assert!(RedisUrl::parse("http://x").is_err());
        assert!(RedisUrl::parse("redis://x:99999").is_err());
        assert!(RedisUrl::parse("redis://x/db").is_err());
    }
}
