//! The daemon in this process, as the library offers it: `cachetail::run` on a tokio runtime of
//! its own, serving on a listener bound here, stopped through its shutdown future. The demo and
//! the bench start it this way and watch it over HTTP only, as any client would.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use cachetail::Config;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::client::Client;

/// How long start-up may take: `cachetail::run` waits up to two minutes for an app transaction
/// that holds the write lock.
const START_TIMEOUT: Duration = Duration::from_secs(150);

pub struct Embedded {
    pub address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), cachetail::Error>>>,
    runtime: Runtime,
}

impl Embedded {
    /// Runs `cachetail::run(config, …)` serving on `listen` (port 0: any free one), on a runtime
    /// of `workers` threads (None: one per core); returns once it answers `/healthz`.
    pub fn start(
        config: Config,
        listen: SocketAddr,
        workers: Option<usize>,
    ) -> anyhow::Result<Embedded> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(workers) = workers {
            builder.worker_threads(workers);
        }
        let runtime = builder.enable_all().build()?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(listen))
            .with_context(|| format!("cannot listen on {listen}"))?;
        let address = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = runtime.spawn(cachetail::run(config, listener, async {
            let _ = stopped.await;
        }));
        let mut embedded = Embedded {
            address,
            stop: Some(stop),
            task: Some(task),
            runtime,
        };
        embedded.wait_serving()?;
        Ok(embedded)
    }

    fn wait_serving(&mut self) -> anyhow::Result<()> {
        let mut client = Client::new(self.address);
        let started = Instant::now();
        while !client.get("/healthz").is_ok_and(|r| r.status == 200) {
            if self.task.as_ref().is_some_and(JoinHandle::is_finished) {
                self.finish()?;
                anyhow::bail!("the daemon stopped before it served");
            }
            anyhow::ensure!(
                started.elapsed() < START_TIMEOUT,
                "the daemon did not answer /healthz within {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// The runtime the daemon runs on, for tasks beside it (a Ctrl-C handler).
    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime.handle()
    }

    /// Stops it as SIGTERM stops `cachetail run` (no new requests, in-flight ones finished, the
    /// cursor persisted) and returns how `run` ended.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => Ok(self.runtime.block_on(task)??),
            None => Ok(()),
        }
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}
