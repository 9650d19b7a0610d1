//! Making Redis trustworthy again: a look at its applied position (at start, at a takeover,
//! after a failure, and every `PROBE_EVERY`), and when it lost state, a rebuild of the namespace
//! that tells app-local caches to drop everything.

use std::sync::atomic::Ordering;

use super::batches::fan_out_message;
use super::client::{Conn, RedisError, Reply};
use super::{PROBE_EVERY, RedisStore, glob_escape};

impl RedisStore {
    /// Makes Redis's contents trustworthy for a daemon whose applied position is `cursor`: if
    /// Redis has not applied everything up to it (restarted from an older snapshot, flushed) or
    /// has applied beyond the database's outbox (the outbox was recreated), every cachetail key
    /// is removed and the state starts at `cursor`. Blocking.
    pub fn reconcile(&self, cursor: u64, head: Option<u64>) -> Result<(), RedisError> {
        if self.cluster.is_some() {
            return self.cluster_reconcile(cursor, head);
        }
        let mut guard = self.apply_conn.lock().unwrap_or_else(|e| e.into_inner());
        let result = self.reconcile_on(&mut guard, cursor, head);
        self.note(&result);
        if result.is_err() {
            *guard = None;
        }
        result
    }

    pub(super) fn reconcile_on(
        &self,
        slot: &mut Option<Conn>,
        cursor: u64,
        head: Option<u64>,
    ) -> Result<(), RedisError> {
        let conn = self.connected(slot)?;
        let state = format!("{}#state", self.prefix);
        // Redis's epoch only grows: a server that missed this daemon's claim (a replica promoted
        // after a failover) gets it back before anything else (refused if above: then batches
        // are fenced, as they would be anyway).
        let epoch = self.epoch.load(Ordering::Acquire);
        if epoch > 0 {
            let args = [self.prefix.as_bytes(), epoch.to_string().as_bytes()].map(<[u8]>::to_vec);
            self.claim_script.run(conn, &args)?;
        }
        let applied = conn.cmd(&[&b"HGET"[..], state.as_bytes(), b"applied"])?;
        let applied = applied.as_int().map(|a| a.max(0) as u64);
        let trustworthy = match applied {
            Some(a) => a >= cursor && head.is_none_or(|h| a <= h),
            None => false,
        };
        if trustworthy {
            self.seen.fetch_max(applied.unwrap_or(0), Ordering::AcqRel);
            return Ok(());
        }
        // `applied` goes first, so stores and batches find the state lost (and refuse) while
        // keys are removed; `#state` itself stays, with the epoch: fencing must never go back.
        conn.cmd(&[&b"HDEL"[..], state.as_bytes(), b"applied", b"floor"])?;
        let removed = self.remove_namespace(conn, &state)?;
        conn.cmd(&[
            &b"HSET"[..],
            state.as_bytes(),
            b"applied",
            cursor.to_string().as_bytes(),
            b"floor",
            cursor.to_string().as_bytes(),
        ])?;
        self.seen.fetch_max(cursor, Ordering::AcqRel);
        self.announce_rebuild(conn, cursor)?;
        tracing::warn!(
            redis_applied = ?applied,
            cursor,
            removed,
            "redis did not hold every applied invalidation (restarted, flushed, or a new outbox): its cachetail keys were removed"
        );
        Ok(())
    }

    /// Tells app-local caches that everything must go (the namespace was rebuilt: the stream
    /// went with it, and with it the entries a subscriber still connected had not read yet): an
    /// `all` message, published and first in the new stream.
    pub(super) fn announce_rebuild(&self, conn: &mut Conn, cursor: u64) -> Result<(), RedisError> {
        if self.channel.is_empty() {
            return Ok(());
        }
        // Never below a position published before (a daemon taking over may start from a
        // durable cursor behind what its predecessor applied): `position` only grows.
        let position = cursor.max(self.seen.load(Ordering::Acquire));
        let message = fan_out_message(position, &[], &[], &[], true);
        let stream = format!("{}#invalidations", self.prefix);
        conn.cmd(&[
            &b"XADD"[..],
            stream.as_bytes(),
            b"MAXLEN",
            self.stream_max_len.to_string().as_bytes(),
            b"*",
            b"message",
            message.as_bytes(),
        ])?;
        conn.cmd(&[&b"PUBLISH"[..], self.channel.as_bytes(), message.as_bytes()])?;
        Ok(())
    }

    /// Removes every key under the prefix but `keep` (SCAN, not KEYS: never blocks Redis for
    /// long), a page at a time in one UNLINK.
    pub(super) fn remove_namespace(&self, conn: &mut Conn, keep: &str) -> Result<u64, RedisError> {
        remove_scanned(conn, &self.prefix, keep, |conn, keys| {
            let mut command = vec![b"UNLINK".to_vec()];
            command.extend(keys);
            conn.cmd(&command).map(drop)
        })
    }

    /// Reconciles again if Redis failed or lost state since the last look, and at least every
    /// `PROBE_EVERY` (called by the tail between batches, so a Redis restarted from an older
    /// snapshot is rebuilt even when no change comes and nobody reads through this daemon: a
    /// standby, or an app server reading Redis directly, may be reading it).
    pub fn heal(&self, cursor: u64) -> Result<(), RedisError> {
        let suspect = self.suspect.swap(false, Ordering::AcqRel);
        let mut probed_at = self.probed_at.lock().unwrap_or_else(|e| e.into_inner());
        let due = probed_at.is_none_or(|at| at.elapsed() >= PROBE_EVERY);
        if !suspect && !due {
            return Ok(());
        }
        *probed_at = Some(std::time::Instant::now());
        drop(probed_at);
        self.reconcile(cursor, None)
    }
}

/// Every key under `prefix` but `keep`, a SCAN page at a time (never blocking Redis for long),
/// handed to `remove`; returns how many.
pub(super) fn remove_scanned(
    conn: &mut Conn,
    prefix: &str,
    keep: &str,
    mut remove: impl FnMut(&mut Conn, Vec<Vec<u8>>) -> Result<(), RedisError>,
) -> Result<u64, RedisError> {
    let pattern = format!("{}*", glob_escape(prefix));
    let mut cursor = b"0".to_vec();
    let mut removed = 0u64;
    loop {
        let reply = conn.cmd(&[
            &b"SCAN"[..],
            &cursor,
            b"MATCH",
            pattern.as_bytes(),
            b"COUNT",
            b"1000",
        ])?;
        let Reply::Array(mut parts) = reply else {
            return Err(RedisError::Protocol("SCAN did not answer an array".into()));
        };
        let (Some(Reply::Array(keys)), Some(Reply::Bulk(next))) = (parts.pop(), parts.pop()) else {
            return Err(RedisError::Protocol("SCAN answered an odd shape".into()));
        };
        let keys: Vec<Vec<u8>> = keys
            .into_iter()
            .filter_map(|k| match k {
                Reply::Bulk(k) if k != keep.as_bytes() => Some(k),
                _ => None,
            })
            .collect();
        if !keys.is_empty() {
            removed += keys.len() as u64;
            remove(conn, keys)?;
        }
        if next == b"0" {
            return Ok(removed);
        }
        cursor = next;
    }
}
