//! The daemons the figures measure: in this process through the library's `cachetail::run`
//! (`Running`), or as `cachetail run` processes of this same binary (`DaemonProcess`); and a
//! `redis-server` of the bench's own. All are observed over HTTP only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cachetail::Config;

use crate::client::Client;
use crate::embedded::Embedded;

/// The daemon in this process (`cachetail::run` on a runtime of two threads, a free loopback
/// port), active; stopped when dropped.
pub(super) struct Running {
    pub(super) address: SocketAddr,
    client: Client,
    _daemon: Embedded,
}

impl Running {
    /// Starts it and waits until it holds the lease (alone on its database, at once).
    pub(super) fn start(config: Config) -> anyhow::Result<Running> {
        let daemon = Embedded::start(config, SocketAddr::from(([127, 0, 0, 1], 0)), Some(2))?;
        let mut running = Running {
            address: daemon.address,
            client: Client::new(daemon.address),
            _daemon: daemon,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while running.status()?["role"] != "active" {
            anyhow::ensure!(Instant::now() < deadline, "the daemon never took the lease");
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(running)
    }

    /// `GET /v1/status`.
    pub(super) fn status(&mut self) -> anyhow::Result<serde_json::Value> {
        status(&mut self.client)
    }
}

fn status(client: &mut Client) -> anyhow::Result<serde_json::Value> {
    let reply = client.get("/v1/status")?;
    anyhow::ensure!(reply.status == 200, "/v1/status: {}", reply.status);
    Ok(reply.json()?)
}

pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `cachetail run` as deployed: this very binary (the release build under `cargo run --release
/// -- bench`) in its own process, with its own config file; killed when dropped.
pub(super) struct DaemonProcess {
    child: std::process::Child,
    address: SocketAddr,
    client: Client,
    log: PathBuf,
}

impl DaemonProcess {
    /// Starts it and waits until it answers `/healthz`. Its log (warnings) goes to `dir/NAME.log`.
    pub(super) fn start(
        dir: &Path,
        config: &Path,
        port: u16,
        name: &str,
    ) -> anyhow::Result<DaemonProcess> {
        let log = dir.join(format!("{name}.log"));
        let child = std::process::Command::new(std::env::current_exe()?)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let mut daemon = DaemonProcess {
            child,
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            client: Client::new(SocketAddr::from(([127, 0, 0, 1], port))),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !daemon.client.get("/healthz").is_ok_and(|r| r.status == 200) {
            if let Some(exit) = daemon.child.try_wait()? {
                anyhow::bail!(
                    "{name}: `cachetail run` exited ({exit}): {}",
                    daemon.log_text()
                );
            }
            anyhow::ensure!(Instant::now() < deadline, "{name}: no answer on /healthz");
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(daemon)
    }

    pub(super) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(super) fn status(&mut self) -> anyhow::Result<serde_json::Value> {
        status(&mut self.client)
    }

    /// Where it serves.
    pub(super) fn address(&self) -> SocketAddr {
        self.address
    }

    /// Its process id (for `/proc/PID/status`).
    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn role(&mut self) -> anyhow::Result<String> {
        Ok(self.status()?["role"].as_str().unwrap_or("").to_owned())
    }

    /// Polls `/v1/status` (about every millisecond) until the role is `role`; returns how long
    /// that took.
    pub(super) fn wait_role(&mut self, role: &str, within: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            if self.role()? == role {
                return Ok(start.elapsed());
            }
            anyhow::ensure!(
                start.elapsed() < within,
                "the daemon was not {role} within {within:?}: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Sends a signal (`-STOP`, `-CONT`) with kill(1).
    pub(super) fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill {signal} failed");
        Ok(())
    }

    /// kill -9, and reap it.
    pub(super) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `redis-server` of the benchmark's own, on a free port; stopped when dropped.
pub(super) struct RedisProcess {
    child: std::process::Child,
    pub(super) port: u16,
}

impl RedisProcess {
    /// Starts one (None: redis-server is not installed).
    pub(super) fn start() -> anyhow::Result<Option<RedisProcess>> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let spawned = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn();
        let Ok(child) = spawned else {
            return Ok(None);
        };
        let server = RedisProcess { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Some(server))
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
