//! The Redis backend on a Redis Cluster (`[cache] cluster`): the same guard as on one server,
//! with every script touching one slot, so each runs atomically on the node that holds it.
//!
//! Names (README, "Beyond one machine"): a value stays `P{key}` (app servers read that name;
//! Redis places it by its hash-tag rule). For each slot `s` the daemon knows a short tag `t_s`
//! whose slot is `s` (`slot_tags`), and a value's bookkeeping lives in the value's slot: its key
//! mark `P#m:{t_s}key` and the slot's state `P#s:{t_s}` (`applied`: the last position applied to
//! the slot; `floor`: set by a rebuild). A group (a tag, a family generation) lives in the slot
//! of its name: `P#g:{t}group` and `P#gm:{t}group`. The global state `P#state{t}` (`applied`,
//! `floor`, `epoch`, and `s<slot>`: the last position applied to each slot) shares its slot with
//! the stream `P#invalidations`.
//!
//! A fill first registers its key in each of its groups, each in the group's slot, refused if
//! the group's mark is above its read position; then stores the value in the value's slot,
//! refused if the key's mark is. A group invalidation at `q` raises the group's mark, then
//! deletes each member read before it and raises the member's key mark to `q`, in the member's
//! slot. A fill registered before the mark is a member, so its store either comes before the
//! member's deletion (and is deleted) or after (and finds the key mark); one registering after
//! the mark is refused there. Members are not removed from a group's set (that could not be
//! made atomic with the member's store): they leave when their value's TTL is over.
//!
//! Loss (a primary's failover that dropped its last writes, a node restarted empty): every slot
//! state exists from the namespace's first rebuild on, and the global state records each
//! slot's last applied position, so a read or store that finds its slot's state missing, or
//! below that record (or below what this daemon applied itself), refuses it and the namespace
//! is rebuilt.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;

use super::client::{self, RedisError, Reply};
use super::cluster_scripts::{
    BEGIN, CLAIM, FINISH, KEYS_OF_SLOT, MARK, READ, REGISTER, RESET, STORE,
};
use super::pool::Link;
use super::scripts::Script;
use super::{Invalidation, MARK_TTL, RETIRED, RedisStore};
use crate::db::Body;

pub(super) const SLOTS: usize = 16384;
/// How long a batch or a rebuild may take on a cluster (one script per slot touched).
pub(super) const LONG: Duration = Duration::from_secs(60);
/// Scripts or commands sent at once, at most.
const WAVE: usize = 256;
/// The most keys one slot's script deletes.
const PER_SCRIPT: usize = 100;
/// A group member outlives its value's TTL by this much (clocks differ a little).
const MEMBER_MARGIN: Duration = Duration::from_secs(60);
/// Above every position: a key of the batch is deleted whatever its value read.
const ALWAYS: u64 = 1 << 53;

/// CRC16-XMODEM, as Redis Cluster hashes keys.
pub(super) fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a key name, with Redis's hash-tag rule: the text between the first `{` and the
/// first `}` after it, if not empty, stands for the name.
pub(super) fn slot_of(name: &[u8]) -> usize {
    let tagged = name.iter().position(|&b| b == b'{').and_then(|open| {
        let close = name[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &name[open + 1..open + 1 + close])
    });
    usize::from(crc16(tagged.unwrap_or(name))) % SLOTS
}

/// For each slot, the shortest tag (`0-9a-z`, fewest characters first) whose slot it is.
pub(super) fn slot_tags() -> Vec<String> {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut tags = vec![String::new(); SLOTS];
    let mut left = SLOTS;
    for len in 1..=5u32 {
        for mut n in 0..ALPHABET.len().pow(len) {
            let mut tag = String::with_capacity(len as usize);
            for _ in 0..len {
                tag.push(char::from(ALPHABET[n % ALPHABET.len()]));
                n /= ALPHABET.len();
            }
            let slot = usize::from(crc16(tag.as_bytes())) % SLOTS;
            if tags[slot].is_empty() {
                tags[slot] = tag;
                left -= 1;
                if left == 0 {
                    return tags;
                }
            }
        }
    }
    tags
}

/// What the daemon knows of a cluster: the names, the scripts, and per slot the last position
/// applied to it.
pub(super) struct Cluster {
    pub(super) prefix: String,
    pub(super) tags: Vec<String>,
    pub(super) state: String,
    pub(super) stream: String,
    /// Per slot: the highest position this daemon knows the slot's state holds.
    pub(super) known: Vec<AtomicU64>,
    /// `known` was loaded from the global state since the last rebuild.
    pub(super) loaded: AtomicBool,
    pub(super) rebuilds: AtomicU64,
    /// A slot was found to have lost state: the rebuild count + 1 when seen (a loss seen
    /// during a rebuild is not one).
    pub(super) lost: AtomicU64,
    pub(super) read: Script,
    pub(super) claim: Script,
    pub(super) begin: Script,
    pub(super) mark: Script,
    pub(super) keys_of_slot: Script,
    pub(super) finish: Script,
    pub(super) register: Script,
    pub(super) store: Script,
    pub(super) reset: Script,
}

impl Cluster {
    pub(super) fn new(prefix: &str) -> Cluster {
        let tags = slot_tags();
        let stream = format!("{prefix}#invalidations");
        let state = format!("{prefix}#state{{{}}}", tags[slot_of(stream.as_bytes())]);
        Cluster {
            prefix: prefix.to_owned(),
            tags,
            state,
            stream,
            known: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            loaded: AtomicBool::new(false),
            rebuilds: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            read: Script::new(READ),
            claim: Script::new(CLAIM),
            begin: Script::new(BEGIN),
            mark: Script::new(MARK),
            keys_of_slot: Script::new(KEYS_OF_SLOT),
            finish: Script::new(FINISH),
            register: Script::new(REGISTER),
            store: Script::new(STORE),
            reset: Script::new(RESET),
        }
    }

    fn value(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn slot(&self, key: &str) -> usize {
        slot_of(self.value(key).as_bytes())
    }

    fn meta(&self, key: &str) -> String {
        format!("{}#m:{{{}}}{key}", self.prefix, self.tags[self.slot(key)])
    }

    pub(super) fn slot_state(&self, slot: usize) -> String {
        format!("{}#s:{{{}}}", self.prefix, self.tags[slot])
    }

    fn group_tag(&self, group: &str) -> &str {
        &self.tags[usize::from(crc16(group.as_bytes())) % SLOTS]
    }

    pub(super) fn group_set(&self, group: &str) -> String {
        format!("{}#g:{{{}}}{group}", self.prefix, self.group_tag(group))
    }

    fn group_mark(&self, group: &str) -> String {
        format!("{}#gm:{{{}}}{group}", self.prefix, self.group_tag(group))
    }

    fn note_lost(&self, since: u64) {
        self.lost.fetch_max(since + 1, Ordering::AcqRel);
    }
}

pub(super) async fn cmd(conn: &mut Link, args: &[&[u8]]) -> Result<Reply, RedisError> {
    let value: redis::Value = client::command(args).query_async(conn).await?;
    Ok(Reply::from(value))
}

pub(super) fn int(reply: Option<&Reply>) -> Option<u64> {
    reply.and_then(Reply::as_int).map(|n| n.max(0) as u64)
}

/// Runs `futures` at most `WAVE` at a time; their results in order.
pub(super) async fn in_waves<T, F: Future<Output = T>>(futures: Vec<F>) -> Vec<T> {
    let mut results = Vec::with_capacity(futures.len());
    let mut futures = futures.into_iter().peekable();
    while futures.peek().is_some() {
        results.extend(join_all(futures.by_ref().take(WAVE)).await);
    }
    results
}

impl RedisStore {
    pub(super) fn cluster(&self) -> Result<&Cluster, RedisError> {
        self.cluster
            .as_ref()
            .ok_or_else(|| RedisError::Protocol("not a cluster".into()))
    }

    /// `get` on a cluster: the value with its slot's state (one script on its node) and, beside
    /// it, the global state's applied position and its record of the slot.
    pub(super) async fn cluster_get(
        &self,
        key: &str,
        known: u64,
    ) -> Result<Option<(Body, Duration)>, RedisError> {
        let c = self.cluster()?;
        let (value, slot) = (c.value(key), c.slot(key));
        let slot_state = c.slot_state(slot);
        let field = format!("s{slot}");
        let known = self.expected(known);
        let (knew, since) = (
            c.known[slot].load(Ordering::Acquire),
            c.rebuilds.load(Ordering::Acquire),
        );
        let keys = [value.as_bytes(), slot_state.as_bytes()];
        let read = |conn: Link| {
            let mut conn = conn;
            async move { c.read.run_keys_async(&mut conn, &keys, &[]).await }
        };
        let global = [
            &b"HMGET"[..],
            c.state.as_bytes(),
            b"applied",
            field.as_bytes(),
        ];
        let read_again = &read;
        let result = self
            .pool
            .run(|conn| async move {
                let mut other = conn.clone();
                let (read, state) = tokio::join!(read(conn), cmd(&mut other, &global));
                Ok((read?, state?))
            })
            .await;
        if result.is_err() {
            self.note(&result);
        }
        let (read, state) = result?;
        let Reply::Array(state) = state else {
            return Err(RedisError::Protocol("HMGET did not answer an array".into()));
        };
        let Some(applied) = int(state.first()) else {
            self.suspect.store(true, Ordering::Release);
            return Err(RedisError::StateLost);
        };
        self.seen.fetch_max(applied, Ordering::AcqRel);
        if applied < known {
            self.suspect.store(true, Ordering::Release);
            return Err(RedisError::StateLost);
        }
        let expected = knew.max(int(state.get(1)).unwrap_or(0));
        let (reader, mut read) = (read_again, read);
        if !slot_holds(&read, expected) {
            // The record may be of a batch that finished after the slot was read: read again.
            read = self.pool.run(reader).await?;
            if !slot_holds(&read, expected) {
                c.note_lost(since);
                self.suspect.store(true, Ordering::Release);
                return Err(RedisError::StateLost);
            }
        }
        let Reply::Array(mut parts) = read else {
            return Err(RedisError::Protocol("READ did not answer an array".into()));
        };
        parts.truncate(3);
        let ttl = int(parts.get(2)).unwrap_or(0);
        match parts.into_iter().next() {
            Some(Reply::Bulk(body)) => {
                Ok(Some((body.into_boxed_slice(), Duration::from_millis(ttl))))
            }
            _ => Ok(None),
        }
    }

    /// `store` on a cluster: registration in each group (in the group's slot), then the store
    /// in the value's slot. Blocking.
    pub(super) fn cluster_store(
        &self,
        key: &str,
        (version, known): (u64, u64),
        ttl: Duration,
        body: Option<&[u8]>,
        groups: &[String],
    ) -> Result<bool, RedisError> {
        let c = self.cluster()?;
        let slot = c.slot(key);
        let (value, meta, slot_state) = (c.value(key), c.meta(key), c.slot_state(slot));
        let field = format!("s{slot}");
        let known = self.expected(known);
        let (knew, since) = (
            c.known[slot].load(Ordering::Acquire),
            c.rebuilds.load(Ordering::Acquire),
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let margin = MEMBER_MARGIN.as_millis() as u64;
        let mode: &[u8] = if body.is_some() { b"store" } else { b"check" };
        let register_args: Vec<Vec<u8>> = [
            version.to_string().into_bytes(),
            (now + ttl_ms + margin).to_string().into_bytes(),
            now.saturating_sub(margin).to_string().into_bytes(),
            mode.to_vec(),
            (ttl_ms + margin).to_string().into_bytes(),
            key.as_bytes().to_vec(),
        ]
        .to_vec();
        let group_keys: Vec<[String; 2]> = groups
            .iter()
            .map(|g| [c.group_mark(g), c.group_set(g)])
            .collect();
        let (register_args, group_keys) = (&register_args, &group_keys);
        let (value, meta, slot_state, field) = (&value, &meta, &slot_state, &field);
        let result = self.pool.run_blocking(|conn| async move {
            let mut conn = conn;
            let global = [
                &b"HMGET"[..],
                c.state.as_bytes(),
                b"applied",
                field.as_bytes(),
            ];
            let Reply::Array(state) = cmd(&mut conn, &global).await? else {
                return Err(RedisError::Protocol("HMGET did not answer an array".into()));
            };
            match int(state.first()) {
                Some(applied) if applied >= known => {}
                _ => return Ok(-1),
            }
            let expected = knew.max(int(state.get(1)).unwrap_or(0));
            let registrations = group_keys.iter().map(|keys| {
                let mut conn = conn.clone();
                async move {
                    c.register
                        .run_keys_async(&mut conn, keys, register_args)
                        .await
                }
            });
            for registered in join_all(registrations).await {
                if registered?.as_int() != Some(1) {
                    return Ok(0);
                }
            }
            let args = [
                version.to_string().into_bytes(),
                ttl_ms.to_string().into_bytes(),
                body.unwrap_or_default().to_vec(),
                expected.to_string().into_bytes(),
                mode.to_vec(),
            ];
            let keys = [value, meta, slot_state];
            Ok(c.store
                .run_keys_async(&mut conn, &keys, &args)
                .await?
                .as_int()
                .unwrap_or(0))
        });
        self.note(&result);
        match result? {
            1 => Ok(true),
            -1 => {
                c.note_lost(since);
                self.suspect.store(true, Ordering::Release);
                Err(RedisError::StateLost)
            }
            _ => Ok(false),
        }
    }

    /// `claim_epoch` on a cluster: the known epoch. Blocking.
    pub(super) fn cluster_claim(&self, epoch: u64) -> Result<u64, RedisError> {
        let c = self.cluster()?;
        let args = [epoch.to_string().into_bytes()];
        let state = [c.state.as_bytes()];
        let result = self.pool.run_blocking(|mut conn| {
            let (args, state) = (&args, &state);
            async move { c.claim.run_keys_async(&mut conn, state, args).await }
        });
        self.note(&result);
        match result? {
            Reply::Int(known) => Ok(u64::try_from(known).unwrap_or(0)),
            other => Err(RedisError::Protocol(format!("CLAIM answered {other:?}"))),
        }
    }

    /// `apply` on a cluster. Blocking (the tail thread).
    pub(super) fn cluster_apply(
        &self,
        batch: &Invalidation,
        cursor: u64,
    ) -> Result<(), RedisError> {
        let c = self.cluster()?;
        let _tail = self.apply_conn.lock().unwrap_or_else(|e| e.into_inner());
        let result = (|| {
            if !c.loaded.load(Ordering::Acquire) {
                self.cluster_reconcile_on(c, cursor, None)?;
            }
            let mut outcome = self.cluster_batch(batch)?;
            if outcome == -1 {
                // A slot or the global state lost state: rebuild, retry.
                self.cluster_reconcile_on(c, cursor, None)?;
                outcome = self.cluster_batch(batch)?;
            }
            match outcome {
                -2 => Err(RedisError::Fenced),
                -1 => Err(RedisError::StateLost),
                _ => Ok(()),
            }
        })();
        self.note(&result);
        if result.is_ok() {
            self.seen.fetch_max(batch.position, Ordering::AcqRel);
        }
        result
    }

    /// One batch. The outcome: 1, -1 (lost state), -2 (fenced).
    fn cluster_batch(&self, batch: &Invalidation) -> Result<i64, RedisError> {
        let c = self.cluster()?;
        let since = c.rebuilds.load(Ordering::Acquire);
        let outcome = self
            .pool
            .run_blocking_for(LONG, |conn| self.cluster_batch_on(c, conn, batch));
        if let Ok(-1) = outcome {
            c.note_lost(since);
        }
        outcome
    }

    async fn cluster_batch_on(
        &self,
        c: &Cluster,
        conn: Link,
        batch: &Invalidation,
    ) -> Result<i64, RedisError> {
        let mut conn = conn;
        let seen = self.seen.load(Ordering::Acquire).to_string().into_bytes();
        let (pos, epoch) = (batch.position, batch.epoch.to_string().into_bytes());
        let begun = c
            .begin
            .run_keys_async(
                &mut conn,
                &[c.state.as_bytes()],
                &[
                    seen.clone(),
                    epoch.clone(),
                    batch.floor.to_string().into_bytes(),
                ],
            )
            .await?;
        if begun.as_int() != Some(1) {
            return Ok(begun.as_int().unwrap_or(-1));
        }
        let mark_ttl = MARK_TTL.as_millis().to_string().into_bytes();
        let marks = batch.groups.iter().map(|(group, mark)| {
            let mut conn = conn.clone();
            let (key, args) = (
                c.group_mark(group),
                [mark.to_string().into_bytes(), mark_ttl.clone()],
            );
            async move { c.mark.run_keys_async(&mut conn, &[key], &args).await }
        });
        for marked in in_waves(marks.collect()).await {
            marked?;
        }
        let by_slot = cluster_targets(c, &mut conn, batch).await?;
        if !self
            .cluster_delete_in_slots(c, &conn, &by_slot, pos, &mark_ttl)
            .await?
        {
            return Ok(-1);
        }
        let mut args = vec![
            pos.to_string().into_bytes(),
            seen,
            epoch,
            self.channel.as_bytes().to_vec(),
            batch.message.as_bytes().to_vec(),
            self.stream_max_len.to_string().into_bytes(),
        ];
        args.extend(by_slot.keys().map(|s| s.to_string().into_bytes()));
        let finished = c
            .finish
            .run_keys_async(&mut conn, &[c.state.as_bytes(), c.stream.as_bytes()], &args)
            .await?
            .as_int()
            .unwrap_or(-1);
        if finished == 1 {
            for slot in by_slot.keys() {
                c.known[*slot].fetch_max(pos, Ordering::AcqRel);
            }
        }
        Ok(finished)
    }

    /// Deletes each slot's targets (in scripts of at most `PER_SCRIPT` keys, a wave at a time),
    /// raising their key marks and the slot's applied position. False: a slot lost its state.
    async fn cluster_delete_in_slots(
        &self,
        c: &Cluster,
        conn: &Link,
        by_slot: &BySlot,
        pos: u64,
        mark_ttl: &[u8],
    ) -> Result<bool, RedisError> {
        let scripts = by_slot.iter().flat_map(|(slot, keys)| {
            keys.chunks(PER_SCRIPT).map(|chunk| {
                let mut conn = conn.clone();
                let mut names = vec![c.slot_state(*slot)];
                let mut args = vec![
                    pos.to_string().into_bytes(),
                    mark_ttl.to_vec(),
                    c.known[*slot]
                        .load(Ordering::Acquire)
                        .to_string()
                        .into_bytes(),
                ];
                for (key, below, mark) in chunk {
                    names.extend([c.value(key), c.meta(key)]);
                    args.extend([
                        below.to_string().into_bytes(),
                        mark.to_string().into_bytes(),
                    ]);
                }
                async move {
                    c.keys_of_slot
                        .run_keys_async(&mut conn, &names, &args)
                        .await
                }
            })
        });
        for done in in_waves(scripts.collect()).await {
            if done?.as_int() != Some(1) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// `count` on a cluster: each group's set in its own slot.
    pub(super) async fn cluster_count(&self, groups: &[String]) -> Result<u64, RedisError> {
        let c = self.cluster()?;
        let sets: Vec<String> = groups.iter().map(|g| c.group_set(g)).collect();
        let sets = &sets;
        let result = self
            .pool
            .run(|conn| async move {
                let counts = sets.iter().map(|set| {
                    let mut conn = conn.clone();
                    async move { cmd(&mut conn, &[b"ZCARD", set.as_bytes()]).await }
                });
                let mut total = 0;
                for count in join_all(counts).await {
                    total += int(Some(&count?)).unwrap_or(0);
                }
                Ok(total)
            })
            .await;
        if result.is_err() {
            self.note(&result);
        }
        result
    }
}

/// A batch's keys to delete, by slot: each with the position below which its value goes and
/// its new key mark (a group's members, read before its mark; the batch's own keys, always).
type BySlot = BTreeMap<usize, Vec<(String, u64, u64)>>;

async fn cluster_targets(
    c: &Cluster,
    conn: &mut Link,
    batch: &Invalidation,
) -> Result<BySlot, RedisError> {
    let pos = batch.position;
    let mut targets: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (group, mark) in &batch.groups {
        let key_mark = if *mark >= RETIRED { pos } else { *mark };
        for member in group_members(conn, &c.group_set(group)).await? {
            let entry = targets.entry(member).or_insert((0, 0));
            *entry = (entry.0.max(*mark), entry.1.max(key_mark));
        }
    }
    for key in &batch.keys {
        targets.insert(key.clone(), (ALWAYS, pos));
    }
    let mut by_slot = BySlot::new();
    for (key, (below, mark)) in targets {
        // No family stores a key beginning with `#` (see `apply_args`).
        if !key.starts_with('#') {
            by_slot
                .entry(c.slot(&key))
                .or_default()
                .push((key, below, mark));
        }
    }
    Ok(by_slot)
}

/// Whether a `READ` reply shows its slot holding at least `expected`.
fn slot_holds(read: &Reply, expected: u64) -> bool {
    match read {
        Reply::Array(parts) => int(parts.get(1)).is_some_and(|applied| applied >= expected),
        _ => false,
    }
}

/// Every member of a group's set (ZSCAN: each one present from the first page to the last is
/// seen; one added meanwhile registered after the group's mark).
async fn group_members(conn: &mut Link, set: &str) -> Result<Vec<String>, RedisError> {
    let mut members = Vec::new();
    let mut cursor = b"0".to_vec();
    loop {
        let reply = cmd(
            conn,
            &[b"ZSCAN", set.as_bytes(), &cursor, b"COUNT", b"1000"],
        )
        .await?;
        let Reply::Array(mut parts) = reply else {
            return Err(RedisError::Protocol("ZSCAN did not answer an array".into()));
        };
        let (Some(Reply::Array(entries)), Some(Reply::Bulk(next))) = (parts.pop(), parts.pop())
        else {
            return Err(RedisError::Protocol("ZSCAN answered an odd shape".into()));
        };
        members.extend(entries.into_iter().step_by(2).filter_map(|m| match m {
            Reply::Bulk(m) => String::from_utf8(m).ok(),
            _ => None,
        }));
        if next == b"0" {
            return Ok(members);
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_redis_hash_tags_and_every_slot_has_a_tag() {
        // Redis Cluster's specification: CRC16-XMODEM of "123456789" is 0x31C3.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(
            slot_of(b"foo{}{bar}"),
            usize::from(crc16(b"foo{}{bar}")) % SLOTS
        );
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
        assert_eq!(slot_of(b"foo{bar}{zap}"), slot_of(b"bar"));
        let tags = slot_tags();
        for (slot, tag) in tags.iter().enumerate() {
            assert!(!tag.is_empty() && tag.len() <= 4, "slot {slot}: {tag:?}");
            assert_eq!(slot_of(format!("{{{tag}}}").as_bytes()), slot);
        }
    }

    #[test]
    fn a_keys_bookkeeping_shares_its_slot_whatever_braces_it_holds() {
        let c = Cluster::new("ct:");
        for key in [
            "book:1",
            "title:{x}y",
            "a{}b",
            "{",
            "}{",
            "x{y}{z}",
            "{#}state",
            "",
        ] {
            let slot = slot_of(c.value(key).as_bytes());
            assert_eq!(c.slot(key), slot, "{key}");
            assert_eq!(slot_of(c.meta(key).as_bytes()), slot, "{key}");
            assert_eq!(slot_of(c.slot_state(slot).as_bytes()), slot, "{key}");
        }
        for group in ["t:books", "t:{x}", "f:book:{id}:00ff"] {
            assert_eq!(
                slot_of(c.group_set(group).as_bytes()),
                slot_of(c.group_mark(group).as_bytes())
            );
        }
        assert_eq!(slot_of(c.state.as_bytes()), slot_of(c.stream.as_bytes()));
        assert_eq!(c.stream, "ct:#invalidations");
    }
}
