//! The binary's HTTP client for a daemon's endpoint (bench, demo, verify): `ureq`, blocking, a
//! kept-alive connection per `Client` (its agent's pool), and any status an answer (a 4xx or 5xx
//! is a `Reply`, not an error).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> io::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    /// A client of the daemon listening on `address`. A daemon listening on every interface
    /// (`0.0.0.0`, `[::]`) is reached on loopback, so the `Host` sent is an address it answers to.
    pub fn new(address: SocketAddr) -> Client {
        let address = reachable(address);
        Client {
            base: format!("http://{address}"),
            agent: agent(Duration::from_secs(30)),
        }
    }

    /// How long a connect, or any one read or write, may take (30 s unless set).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.agent = agent(timeout);
        self
    }

    /// `GET path` (path already percent-encoded where needed).
    pub fn get(&mut self, path: &str) -> io::Result<Reply> {
        self.request("GET", path, &[], &[])
    }

    /// Sends a request on the kept-alive connection (a new one if the daemon closed it), again
    /// once if the connection broke under it.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Reply> {
        match self.send(method, path, headers, body) {
            Err(e) if broken(&e) => self.send(method, path, headers, body),
            answered => answered,
        }
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Reply> {
        let mut request = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(body).map_err(io::Error::other)?;
        let response = self.agent.run(request).map_err(into_io)?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .with_config()
            .limit(u64::MAX)
            .read_to_vec()
            .map_err(into_io)?;
        Ok(Reply { status, body })
    }
}

/// Where to connect to reach a daemon listening on `address`: the address itself, or loopback
/// for an unspecified one.
pub fn reachable(address: SocketAddr) -> SocketAddr {
    match address.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, address.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, address.port()))
        }
        _ => address,
    }
}

/// An agent for one daemon on loopback: statuses are answers, redirects are not followed, any
/// method may be sent, and `timeout` bounds the connect and each read and write. Its buffers are
/// 16 KiB, not ureq's 128 KiB: the stampede bench holds a thousand connections at once, and the
/// daemon's answer heads are small (bodies stream through).
fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .input_buffer_size(16 * 1024)
        .output_buffer_size(16 * 1024)
        .http_status_as_error(false)
        .max_redirects(0)
        .allow_non_standard_methods(true)
        .timeout_connect(Some(timeout))
        .timeout_per_read(Some(timeout))
        .timeout_per_write(Some(timeout))
        .build()
        .into()
}

/// Whether an error means the connection was closed under the request (a kept-alive one the
/// daemon closed as it was reused).
fn broken(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

fn into_io(error: ureq::Error) -> io::Error {
    match error {
        ureq::Error::Io(e) => e,
        ureq::Error::Timeout(t) => io::Error::new(io::ErrorKind::TimedOut, t.to_string()),
        other => io::Error::other(other),
    }
}
