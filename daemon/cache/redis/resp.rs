//! A small Redis client: RESP2 over TCP, blocking and async, for the handful of commands the
//! Redis backend sends (GET, HGET, EVALSHA, SCRIPT LOAD, SCAN, UNLINK, PING, AUTH, SELECT).
//!
//! Hand-written on purpose: RESP2 has five reply types, and the `redis` crate would bring about a
//! hundred crates (url/idna/icu, combine, futures) for these few commands.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// The commands that prepare a new connection: AUTH and SELECT, as needed.
fn handshake(url: &RedisUrl) -> Vec<Vec<Vec<u8>>> {
    let mut commands = Vec::new();
    if let Some(password) = &url.password {
        let mut auth = vec![b"AUTH".to_vec()];
        if let Some(user) = &url.username {
            auth.push(user.clone().into_bytes());
        }
        auth.push(password.expose().as_bytes().to_vec());
        commands.push(auth);
    }
    if url.db != 0 {
        commands.push(vec![b"SELECT".to_vec(), url.db.to_string().into_bytes()]);
    }
    commands
}

/// A handshake's error with the password (should a server quote the AUTH it refused, as some
/// proxies do) replaced by `***`.
fn hide_password(error: RedisError, url: &RedisUrl) -> RedisError {
    match (error, &url.password) {
        (RedisError::Server(text), Some(password)) if !password.expose().is_empty() => {
            RedisError::Server(text.replace(password.expose(), "***"))
        }
        (error, _) => error,
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
            .ok_or_else(|| RedisError::NoAddress(url.host.clone()))?;
        let stream = TcpStream::connect_timeout(&address, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut conn = Conn {
            stream,
            buf: Vec::with_capacity(4096),
        };
        for command in handshake(url) {
            conn.cmd(&command).map_err(|e| hide_password(e, url))?;
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
    #[cfg(test)]
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
        for command in handshake(url) {
            let replies = conn.pipeline(&[command]).await?;
            if let Some(Reply::Error(e)) = replies.into_iter().next() {
                return Err(hide_password(RedisError::Server(e), url));
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
}
