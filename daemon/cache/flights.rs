//! Fills in flight, for both backends: at most one fill per key; concurrent misses join it (a
//! stampede runs one query). A flight can be superseded (an invalidation of its key, or a
//! write-through recompute starting): a superseded fill never stores, and the requests that
//! joined it are not handed its value (they fill again). A flight knows when nobody waits for it
//! any more (its fill is then abandoned: the query stops). The shard lock a key's flight lives
//! under is also the lock its in-memory value is stored and invalidated under.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::watch;

use super::{Entry, FillError, FillOutcome};
use crate::db::Body;
use crate::registry::FamilyState;

/// The receiving side of a flight: resolves once the fill is done.
pub type FillWaiter = watch::Receiver<Option<FillOutcome>>;

struct Flight {
    id: u64,
    family: Arc<FamilyState>,
    /// Joiners subscribe to it; held as a sender, so that the requests waiting are the only
    /// receivers, and their count tells when nobody waits any more.
    done: watch::Sender<Option<FillOutcome>>,
}

/// The right to store one fill's result, if nothing supersedes it first.
pub struct FillTicket {
    key: Arc<str>,
    id: u64,
    family: Arc<FamilyState>,
    done: watch::Sender<Option<FillOutcome>>,
}

impl FillTicket {
    pub fn family(&self) -> &Arc<FamilyState> {
        &self.family
    }

    pub fn key(&self) -> &Arc<str> {
        &self.key
    }

    /// Resolves once no request waits for this fill any more (all gave up or timed out).
    pub fn abandoned(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let done = self.done.clone();
        async move { done.closed().await }
    }
}

/// A ticket dropped unfinished (its fill panicked) still wakes the requests waiting on it, with
/// an error; its flight, left resolved in the map, is replaced by the next miss.
impl Drop for FillTicket {
    fn drop(&mut self) {
        if self.done.borrow().is_none() {
            self.done.send_replace(Some(Err(FillError::Failed(Arc::from(
                "the fill was abandoned",
            )))));
        }
    }
}

/// Either this request leads the fill (and must finish it), or it joins one already in flight,
/// or a fill landed since it missed and the value is cached now.
pub enum Begin {
    Lead(FillTicket, FillWaiter),
    Join(FillWaiter),
    Cached(Arc<Entry>),
}

/// A computed value, ready to store: its version, its body (None: no row), its rendered tags.
pub struct Filled {
    pub version: u64,
    pub body: Option<Body>,
    pub tags: Box<[Arc<str>]>,
}

const SHARDS: usize = 64;

type Shard = HashMap<Arc<str>, Flight>;

pub struct Flights {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    next_id: AtomicU64,
}

impl Flights {
    pub fn new() -> Flights {
        Flights {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            next_id: AtomicU64::new(1),
        }
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        let index = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.shards[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a fill for a missed key, or joins the one in flight. `cached` looks the key up
    /// under the flight lock (where a landing fill stores it): a flight that landed between this
    /// request's miss and now is served from there rather than run again.
    pub fn begin(
        &self,
        key: Arc<str>,
        family: &Arc<FamilyState>,
        cached: impl FnOnce(&str) -> Option<Arc<Entry>>,
    ) -> Begin {
        let mut flights = self.shard(&key);
        if let Some(flight) = flights.get(&key)
            && Arc::ptr_eq(&flight.family, family)
            && flight.done.borrow().is_none()
        {
            return Begin::Join(flight.done.subscribe());
        }
        if let Some(entry) = cached(&key).filter(|e| Arc::ptr_eq(&e.family, family)) {
            return Begin::Cached(entry);
        }
        let (ticket, waiter) = self.start(&mut flights, key, family);
        Begin::Lead(ticket, waiter)
    }

    /// Starts a recompute that supersedes any fill in flight (write-through): a fill that started
    /// before the change being applied must not store after it.
    pub fn begin_refresh(&self, key: Arc<str>, family: &Arc<FamilyState>) -> FillTicket {
        let mut flights = self.shard(&key);
        self.start(&mut flights, key, family).0
    }

    fn start(
        &self,
        flights: &mut Shard,
        key: Arc<str>,
        family: &Arc<FamilyState>,
    ) -> (FillTicket, FillWaiter) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, waiter) = watch::channel(None);
        let flight = Flight {
            id,
            family: Arc::clone(family),
            done: done.clone(),
        };
        flights.insert(Arc::clone(&key), flight);
        let ticket = FillTicket {
            key,
            id,
            family: Arc::clone(family),
            done,
        };
        (ticket, waiter)
    }

    /// Removes the key's flight (a fill that may have read before now can no longer store) and
    /// runs `then` under the same lock.
    pub fn supersede(&self, key: &str, then: impl FnOnce()) {
        let mut flights = self.shard(key);
        flights.remove(key);
        then();
    }

    /// Runs `then` under the key's flight lock, leaving its flight as it is.
    pub fn locked(&self, key: &str, then: impl FnOnce()) {
        let _flights = self.shard(key);
        then();
    }

    /// Finishes a fill whose flight is current: `store` runs under the flight lock (no
    /// invalidation of the key runs in between). Then wakes every request waiting on it, with
    /// `Superseded` when it was not stored. Returns whether it was stored.
    pub fn finish(
        &self,
        ticket: FillTicket,
        computed: Result<Filled, Arc<str>>,
        store: impl FnOnce(&Arc<str>, &Arc<Entry>) -> bool,
    ) -> bool {
        let outcome = resolve(&ticket, computed);
        let key = &ticket.key;
        let stored = {
            let mut flights = self.shard(key);
            let current = self.leave(&mut flights, &ticket);
            current && outcome.as_ref().is_ok_and(|entry| store(key, entry))
        };
        wake(&ticket.done, outcome, stored);
        stored
    }

    /// Ends a fill that read nothing to store (too many reads waiting, or abandoned): its flight
    /// leaves the map, and whoever still waits gets `error` (`Superseded`: fill again).
    pub fn give_up(&self, ticket: FillTicket, error: FillError) {
        self.leave(&mut self.shard(&ticket.key), &ticket);
        ticket.done.send_replace(Some(Err(error)));
    }

    /// Removes the ticket's flight, if it is still the key's current one. Returns whether it was.
    fn leave(&self, flights: &mut Shard, ticket: &FillTicket) -> bool {
        let current = flights.get(&ticket.key).is_some_and(|f| f.id == ticket.id);
        if current {
            flights.remove(&ticket.key);
        }
        current
    }

    /// Finishes a fill whose value is kept elsewhere (Redis, which guards it by version): the
    /// flight leaves the map, then `store` runs outside the lock, even if the flight was
    /// superseded (the store's own guard is exact, and a stored newer value keeps an older read
    /// from landing after this answer).
    pub fn finish_elsewhere(
        &self,
        ticket: FillTicket,
        computed: Result<Filled, Arc<str>>,
        store: impl FnOnce(&str, &Entry) -> bool,
    ) -> bool {
        let outcome = resolve(&ticket, computed);
        self.leave(&mut self.shard(&ticket.key), &ticket);
        let stored = outcome
            .as_ref()
            .is_ok_and(|entry| store(&ticket.key, entry));
        wake(&ticket.done, outcome, stored);
        stored
    }
}

/// What a fill read, as the entry it would store.
fn resolve(ticket: &FillTicket, computed: Result<Filled, Arc<str>>) -> FillOutcome {
    computed.map_err(FillError::Failed).map(|filled| {
        Arc::new(Entry::new(
            filled.version,
            filled.body,
            Arc::clone(&ticket.family),
            filled.tags,
            Instant::now(),
        ))
    })
}

/// A value that was not stored (its flight was superseded, a mark came after its read, or a
/// newer one is cached) is not handed out either: it may be newer than what the superseding
/// flight will store, or older than what is cached, and either way a later read could go
/// backwards. The waiters fill again (joining the superseding flight, or hitting the newer one).
fn wake(done: &watch::Sender<Option<FillOutcome>>, outcome: FillOutcome, stored: bool) {
    let outcome = match outcome {
        Ok(_) if !stored => Err(FillError::Superseded),
        other => other,
    };
    done.send_replace(Some(outcome));
}
