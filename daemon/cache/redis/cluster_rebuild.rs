//! Rebuilding cachetail's namespace on a Redis Cluster (`cluster.rs`): trusted, or emptied on
//! every primary and started again at the cursor, every slot's state written anew, and app-local
//! caches told to drop everything.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::client::{self, Conn, RedisError, Reply};
use super::cluster::{Cluster, LONG, SLOTS, cmd, in_waves, int};
use super::{IO_TIMEOUT, RedisStore};

impl RedisStore {
    /// `reconcile` on a cluster: trusted if the global
    /// state holds at least `cursor` (and at most `head`) and no slot was seen to have lost
    /// state; else rebuilt. Blocking.
    pub(super) fn cluster_reconcile(
        &self,
        cursor: u64,
        head: Option<u64>,
    ) -> Result<(), RedisError> {
        let c = self.cluster()?;
        let _tail = self.apply_conn.lock().unwrap_or_else(|e| e.into_inner());
        let result = self.cluster_reconcile_on(c, cursor, head);
        self.note(&result);
        result
    }

    pub(super) fn cluster_reconcile_on(
        &self,
        c: &Cluster,
        cursor: u64,
        head: Option<u64>,
    ) -> Result<(), RedisError> {
        let state = [&b"HGETALL"[..], c.state.as_bytes()];
        let all = self.pool.run_blocking(|mut conn| {
            let state = &state;
            async move { cmd(&mut conn, state).await }
        })?;
        let Reply::Array(all) = all else {
            return Err(RedisError::Protocol(
                "HGETALL did not answer an array".into(),
            ));
        };
        let mut fields = BTreeMap::new();
        for pair in all.chunks(2) {
            if let [Reply::Bulk(name), value] = pair {
                fields.insert(String::from_utf8_lossy(name).into_owned(), int(Some(value)));
            }
        }
        let applied = fields.get("applied").copied().flatten();
        let trustworthy = applied.is_some_and(|a| a >= cursor && head.is_none_or(|h| a <= h));
        let lost = c.lost.load(Ordering::Acquire) > c.rebuilds.load(Ordering::Acquire);
        if trustworthy && !lost {
            self.seen.fetch_max(applied.unwrap_or(0), Ordering::AcqRel);
            if !c.loaded.swap(true, Ordering::AcqRel) {
                for (name, position) in &fields {
                    let slot = name.strip_prefix('s').and_then(|s| s.parse::<usize>().ok());
                    if let (Some(slot), Some(position)) = (slot.filter(|s| *s < SLOTS), position) {
                        c.known[slot].fetch_max(*position, Ordering::AcqRel);
                    }
                }
            }
            return Ok(());
        }
        let removed = self.cluster_rebuild(c, cursor)?;
        tracing::warn!(
            redis_applied = ?applied,
            cursor,
            removed,
            slot_lost = lost,
            "the redis cluster did not hold every applied invalidation (a node restarted or failed over, flushed, or a new outbox): its cachetail keys were removed"
        );
        Ok(())
    }

    /// Removes every cachetail key from every primary and starts the state at `cursor`: the
    /// global state first (reads refuse), then every slot's state (stores refuse), then the
    /// rest, then every slot's state again with `floor` = `cursor`, then the global state.
    pub(super) fn cluster_rebuild(&self, c: &Cluster, cursor: u64) -> Result<u64, RedisError> {
        let position = cursor.to_string();
        let state = [c.state.as_bytes()];
        self.pool.run_blocking(|mut conn| {
            let state = &state;
            async move { c.reset.run_keys_async(&mut conn, state, &[]).await }
        })?;
        let slot_states: Vec<String> = (0..SLOTS).map(|s| c.slot_state(s)).collect();
        self.each_slot_state(&slot_states, |name| {
            vec![b"DEL".to_vec(), name.as_bytes().to_vec()]
        })?;
        let mut removed = 0;
        for (host, port) in self.primaries()? {
            let mut url = self.url.clone();
            (url.host, url.port) = (host, port);
            let mut conn = Conn::connect(&url, IO_TIMEOUT, false)?;
            removed += remove_from_node(&mut conn, &c.prefix, &c.state)?;
        }
        for known in &c.known {
            known.store(0, Ordering::Release);
        }
        self.each_slot_state(&slot_states, |name| {
            [
                b"HSET",
                name.as_bytes(),
                b"applied",
                position.as_bytes(),
                b"floor",
                position.as_bytes(),
            ]
            .map(<[u8]>::to_vec)
            .to_vec()
        })?;
        let set = [
            &b"HSET"[..],
            c.state.as_bytes(),
            b"applied",
            position.as_bytes(),
            b"floor",
            position.as_bytes(),
        ];
        self.pool.run_blocking(|mut conn| {
            let set = &set;
            async move { cmd(&mut conn, set).await }
        })?;
        c.loaded.store(true, Ordering::Release);
        c.rebuilds.fetch_add(1, Ordering::AcqRel);
        self.seen.fetch_max(cursor, Ordering::AcqRel);
        self.cluster_announce_rebuild(c)?;
        Ok(removed)
    }

    /// The rebuild's `all` message, published and first in the new stream (see
    /// `announce_rebuild`: a subscriber behind lost its unread entries with the old stream).
    pub(super) fn cluster_announce_rebuild(&self, c: &Cluster) -> Result<(), RedisError> {
        if self.channel.is_empty() {
            return Ok(());
        }
        let position = self.seen.load(Ordering::Acquire);
        let message = super::fan_out_message(position, &[], &[], &[], true);
        let max_len = self.stream_max_len.to_string();
        let xadd = [
            &b"XADD"[..],
            c.stream.as_bytes(),
            b"MAXLEN",
            max_len.as_bytes(),
            b"*",
            b"message",
            message.as_bytes(),
        ];
        let publish = [&b"PUBLISH"[..], self.channel.as_bytes(), message.as_bytes()];
        self.pool.run_blocking(|mut conn| {
            let (xadd, publish) = (&xadd, &publish);
            async move {
                cmd(&mut conn, xadd).await?;
                cmd(&mut conn, publish).await
            }
        })?;
        Ok(())
    }

    /// One command per slot state, a wave at a time.
    pub(super) fn each_slot_state(
        &self,
        names: &[String],
        command: impl Fn(&str) -> Vec<Vec<u8>>,
    ) -> Result<(), RedisError> {
        let commands: Vec<Vec<Vec<u8>>> = names.iter().map(|n| command(n)).collect();
        let commands = &commands;
        self.pool.run_blocking_for(LONG, |conn| async move {
            let sends = commands.iter().map(|args| {
                let mut conn = conn.clone();
                async move {
                    let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
                    cmd(&mut conn, &args).await
                }
            });
            for sent in in_waves(sends.collect()).await {
                sent?;
            }
            Ok(())
        })
    }

    /// The primaries' addresses (CLUSTER SLOTS).
    pub(super) fn primaries(&self) -> Result<Vec<(String, u16)>, RedisError> {
        let reply = self.pool.run_blocking(|mut conn| async move {
            cmd(&mut conn, &[b"CLUSTER", b"SLOTS"]).await
        })?;
        let Reply::Array(ranges) = reply else {
            return Err(RedisError::Protocol(
                "CLUSTER SLOTS did not answer an array".into(),
            ));
        };
        let mut primaries = Vec::new();
        for range in ranges {
            let Reply::Array(parts) = range else { continue };
            let Some(Reply::Array(node)) = parts.get(2) else {
                continue;
            };
            let host = match node.first() {
                Some(Reply::Bulk(h)) if !h.is_empty() => String::from_utf8_lossy(h).into_owned(),
                _ => self.url.host.clone(),
            };
            let port = int(node.get(1)).and_then(|p| u16::try_from(p).ok());
            if let Some(port) = port
                && !primaries.contains(&(host.clone(), port))
            {
                primaries.push((host, port));
            }
        }
        Ok(primaries)
    }
}

/// Removes every key under `prefix` from one node but `keep` (SCAN; one UNLINK per key, as keys
/// of different slots cannot go in one command). Returns how many.
fn remove_from_node(conn: &mut Conn, prefix: &str, keep: &str) -> Result<u64, RedisError> {
    super::rebuild::remove_scanned(conn, prefix, keep, |conn, keys| {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.add_command(client::command(&[&b"UNLINK"[..], &key]));
        }
        let _: Vec<redis::Value> = pipe.query(conn.inner())?;
        Ok(())
    })
}
