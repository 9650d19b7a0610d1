//! The daemon's shared connections to Redis, for reads (async, from the endpoint) and fills'
//! stores (blocking, from fill threads): a few multiplexed connections of the `redis` crate,
//! each carrying many requests at once (pipelined: no round trip per request per connection),
//! and at most `max` requests in flight over all of them (`[cache] max_connections`). A request
//! that finds every one taken waits at most `WAIT`; past it, it goes without Redis (a read
//! answers from the database, a fill is not stored), as when Redis is down. So a burst of
//! requests, or a Redis that stopped answering, never queues without bound.
//!
//! A connection that failed is opened again by the next request that needs it; one whose open
//! failed is not tried again before a delay that doubles (`BACKOFF_FIRST` to `BACKOFF_MAX`, or
//! `SENTINEL_BACKOFF_MAX` with Sentinel: a new primary must be found within a second of its
//! promotion), and meanwhile requests fail at once (reads answer from the database without
//! waiting). Each open goes where the `Target` says: with Sentinel, the primary named now.
//!
//! The connections live on a runtime of their own (one thread): their driver tasks outlive any
//! request, and blocking callers (fill threads, `verify`) run their requests on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use tokio::sync::{Mutex, Semaphore, SemaphorePermit};
use tokio::time::Instant;

use super::client::{RedisError, Target, check_primary, hide_password};

/// How long a request waits for a free place when `max` are in flight.
const WAIT: Duration = Duration::from_millis(100);
/// How many multiplexed connections (fewer when `max` is smaller): each carries any number of
/// requests, a few spread the work of reading replies.
const CONNECTIONS: usize = 4;
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// With Sentinel, a retry costs a question to the Sentinels, and the new primary of a failover
/// must be found soon after they name it.
const SENTINEL_BACKOFF_MAX: Duration = Duration::from_millis(250);

/// A shared connection: to one server, or to a Redis Cluster (the crate's, which routes each
/// command to the node of its key's slot and follows MOVED/ASK redirects).
#[derive(Clone)]
pub(super) enum Link {
    One(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Link::One(c) => c.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Link::One(c) => c.req_packed_commands(cmd, offset, count),
            Link::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::One(c) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
        }
    }
}

/// One shared connection, or when to try opening it again.
#[derive(Default)]
struct Shared {
    conn: Option<Link>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

pub(super) struct Pool {
    max: usize,
    target: Arc<Target>,
    /// With `[cache] cluster`: the client every connection is opened from.
    cluster: Option<Result<Box<redis::cluster::ClusterClient>, String>>,
    in_flight: Semaphore,
    shared: Vec<Mutex<Shared>>,
    next: AtomicUsize,
    io_timeout: Duration,
    /// Always `Some` until dropped.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Pool {
    /// Without waiting for the connections' tasks (a pool may be dropped on a runtime's thread,
    /// where waiting is not allowed).
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Pool {
    pub(super) fn new(target: Arc<Target>, max: usize, io_timeout: Duration) -> Pool {
        let max = max.max(1);
        let url = target.url().clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("redis-io")
            .enable_all()
            .build()
            .expect("a one-thread runtime for the redis connections can be built");
        Pool {
            max,
            cluster: (!url.cluster.is_empty()).then(|| {
                super::client::cluster_client(&url, io_timeout)
                    .map(Box::new)
                    .map_err(|e| e.to_string())
            }),
            target,
            in_flight: Semaphore::new(max),
            // A cluster connection holds one multiplexed connection per node already.
            shared: (0..if url.cluster.is_empty() {
                CONNECTIONS.min(max)
            } else {
                1
            })
                .map(|_| Mutex::new(Shared::default()))
                .collect(),
            next: AtomicUsize::new(0),
            io_timeout,
            runtime: Some(runtime),
        }
    }

    /// Runs `work` on a shared connection: a place among `max`, waiting at most `WAIT` for
    /// one; a connection that fails with `Io` is replaced, and `work` tried once more on the
    /// new one (a Redis restart closes every connection).
    pub(super) async fn run<R, F>(&self, work: impl Fn(Link) -> F) -> Result<R, RedisError>
    where
        F: Future<Output = Result<R, RedisError>>,
    {
        self.run_for(self.io_timeout, work).await
    }

    /// `run`, the work given `timeout` instead of the usual one (a cluster's rebuild, a batch
    /// touching many slots).
    pub(super) async fn run_for<R, F>(
        &self,
        timeout: Duration,
        work: impl Fn(Link) -> F,
    ) -> Result<R, RedisError>
    where
        F: Future<Output = Result<R, RedisError>>,
    {
        let _permit = self.permit().await?;
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.shared.len();
        let shared = &self.shared[index];
        let conn = self.connection(shared).await?;
        let result = self.timed(timeout, work(conn)).await;
        if !matches!(result, Err(RedisError::Io(_))) {
            return result;
        }
        tracing::debug!("a shared redis connection failed; reconnecting");
        self.forget(shared).await;
        let conn = self.connection(shared).await?;
        self.timed(timeout, work(conn)).await
    }

    /// `run_for`, blocking.
    pub(super) fn run_blocking_for<R, F>(
        &self,
        timeout: Duration,
        work: impl Fn(Link) -> F,
    ) -> Result<R, RedisError>
    where
        F: Future<Output = Result<R, RedisError>>,
    {
        match &self.runtime {
            Some(runtime) => runtime.block_on(self.run_for(timeout, work)),
            None => Err(RedisError::Io(std::io::ErrorKind::NotConnected.into())),
        }
    }

    /// `run`, blocking (for fill threads and `verify`: never from a runtime's worker thread).
    pub(super) fn run_blocking<R, F>(&self, work: impl Fn(Link) -> F) -> Result<R, RedisError>
    where
        F: Future<Output = Result<R, RedisError>>,
    {
        self.run_blocking_for(self.io_timeout, work)
    }

    /// Runs `work` on this pool's runtime, blocking (for the tail thread's Sentinel lookups:
    /// the crate's connections to the Sentinels live on this runtime).
    pub(super) fn block_on<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        self.runtime.as_ref().map(|runtime| runtime.block_on(work))
    }

    async fn permit(&self) -> Result<SemaphorePermit<'_>, RedisError> {
        // A free place is taken without arming a timer (the usual case, on every read).
        if let Ok(permit) = self.in_flight.try_acquire() {
            return Ok(permit);
        }
        match tokio::time::timeout(WAIT, self.in_flight.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(RedisError::PoolFull(self.max)),
        }
    }

    async fn timed<T>(
        &self,
        timeout: Duration,
        work: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, RedisError> {
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| Err(RedisError::Io(std::io::ErrorKind::TimedOut.into())))
    }

    /// The shared connection, opened now if it is not (unless the last open failed less than
    /// its backoff ago: then at once an error).
    async fn connection(&self, shared: &Mutex<Shared>) -> Result<Link, RedisError> {
        let mut shared = match shared.try_lock() {
            Ok(shared) => shared,
            Err(_) => match tokio::time::timeout(WAIT, shared.lock()).await {
                Ok(shared) => shared,
                Err(_) => return Err(RedisError::PoolFull(self.max)),
            },
        };
        if let Some(conn) = &shared.conn {
            return Ok(conn.clone());
        }
        if shared.retry_at.is_some_and(|at| Instant::now() < at) {
            return Err(RedisError::Io(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "not connected (the last attempt failed; retrying shortly)",
            )));
        }
        match self.open().await {
            Ok(conn) => {
                *shared = Shared {
                    conn: Some(conn.clone()),
                    ..Shared::default()
                };
                Ok(conn)
            }
            Err(e) => {
                let max = if self.target.is_sentinel() {
                    SENTINEL_BACKOFF_MAX
                } else {
                    BACKOFF_MAX
                };
                shared.backoff = (shared.backoff * 2).clamp(BACKOFF_FIRST, max);
                shared.retry_at = Some(Instant::now() + shared.backoff);
                Err(e)
            }
        }
    }

    async fn forget(&self, shared: &Mutex<Shared>) {
        if let Ok(mut shared) = tokio::time::timeout(WAIT, shared.lock()).await {
            shared.conn = None;
        }
    }

    /// Opens a connection on this pool's runtime (where its driver task then lives): to the
    /// cluster, or to where the target says now (with Sentinel, checked to be the primary).
    async fn open(&self) -> Result<Link, RedisError> {
        let (target, timeout) = (Arc::clone(&self.target), self.io_timeout);
        let cluster = self.cluster.clone();
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let Some(runtime) = &self.runtime else {
            return Err(RedisError::Io(std::io::ErrorKind::NotConnected.into()));
        };
        let opened = runtime
            .spawn(async move {
                if let Some(cluster) = cluster {
                    let client = cluster.map_err(|e| RedisError::Io(std::io::Error::other(e)))?;
                    return Ok(Link::Cluster(client.get_async_connection().await?));
                }
                let url = target.primary(timeout).await?;
                let connected = async {
                    let mut conn = super::client::client(&url)?
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?;
                    if target.is_sentinel() {
                        let role: redis::Value = redis::cmd("ROLE").query_async(&mut conn).await?;
                        check_primary(&role, &url)?;
                    }
                    Ok(Link::One(conn))
                };
                connected.await.map_err(|e| hide_password(e, &url))
            })
            .await;
        match opened {
            Ok(result) => result,
            Err(e) => Err(RedisError::Io(std::io::Error::other(e.to_string()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_in_flight_are_capped_and_a_waiter_gets_a_freed_place_or_gives_up() {
        let url = crate::config::RedisUrl::parse("redis://127.0.0.1:1/0").expect("url");
        let pool = Pool::new(Arc::new(Target::new(&url)), 2, Duration::from_secs(1));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let first = pool.permit().await.expect("a place");
            let second = pool.permit().await.expect("a place");
            let started = std::time::Instant::now();
            assert!(matches!(pool.permit().await, Err(RedisError::PoolFull(2))));
            assert!(started.elapsed() >= WAIT);
            drop(first);
            let third = pool.permit().await.expect("the freed place");
            drop((second, third));
            // Nothing listens on port 1: the open fails, and the next try within the backoff
            // fails at once.
            assert!(matches!(
                pool.run(|_| async { Ok(()) }).await,
                Err(RedisError::Io(_))
            ));
            let started = std::time::Instant::now();
            assert!(pool.connection(&pool.shared[0]).await.is_err());
            assert!(pool.connection(&pool.shared[0]).await.is_err());
            assert!(started.elapsed() < WAIT);
        });
    }
}
