#!/usr/bin/env python3
"""An app server's local cache, kept fresh by cachetail's invalidations, resuming after a gap.

cachetail (with `[cache] backend = "redis"`) appends every applied batch of invalidations to the
Redis Stream `{prefix}#invalidations` (entry field `message`), in the same script that applies
the batch, and publishes the same message on the channel `{prefix}invalidations`. The message
is JSON:

    {"position": 1234, "keys": ["book:3", "top-books"], "tags": ["books"],
     "families": ["user:{id}"], "all": false}

- `position`: the outbox position the batch ends at; it only grows.
- `keys`: drop these keys.
- `tags`: drop every entry you cached with one of these tags.
- `families`: drop every entry of these key families (their data may have changed uncaptured,
  or a reload changed their definition).
- `all`: drop everything.

This subscriber reads the stream (XREAD BLOCK) from the last entry it processed, so a disconnect
or a restart loses nothing: it resumes where it stopped. It drops its whole local cache only
when it cannot know what it missed: the stream was trimmed past its last entry (the stream keeps
the last `[cache] stream_max_len` entries), or the stream is gone or was recreated (Redis lost
its data, or cachetail rebuilt its namespace). Checked on each (re)connect with XINFO STREAM and
XRANGE: its last entry must still be in the stream (the first entry is not after it).

Standard library only. Run it to print the messages, one JSON object per line:

    python3 examples/redis_subscriber.py --url redis://127.0.0.1:6379/0 --prefix cachetail: \
        --state /var/lib/app/local-cache.json

With `--state`, the local cache and the id of the last entry it reflects are written to that
file (atomically, by rename) after each round of entries, and read back on start: a restarted
subscriber resumes too. Without it, it resumes across reconnects only (a restart starts empty).

Each time it (re)connects, once it caught up with the entries that came while it was away
(each printed like the others), it prints `{"subscribed": true, "resumed_from": ID, "dropped":
N, "cached": {...}}`: the entry it resumed after, how many entries it dropped, and what it holds
after reading the `--keep` keys again (a stand-in for the app's own reads, which fill the local
cache from Redis on a miss; it reads them again after each round of entries too). When it drops
its whole local cache it first prints `{"dropped_whole": N, "reason": "..."}`.
"""

import argparse
import json
import os
import socket
import sys
import time


def encode(*args):
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RedisErrorReply(str):
    """An error reply."""


class Reader:
    """Reads RESP2 replies from a socket."""

    def __init__(self, sock):
        self.file = sock.makefile("rb")

    def reply(self):
        line = self.file.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RedisErrorReply(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.file.read(n + 2)
            return data[:-2]
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise ValueError("unexpected reply %r" % line)


class LocalCache:
    """An in-process cache of key -> (value, tags, family), dropped as cachetail says."""

    def __init__(self):
        self.entries = {}

    def put(self, key, value, tags=(), family=None):
        self.entries[key] = (value, set(tags), family)

    def get(self, key):
        entry = self.entries.get(key)
        return entry[0] if entry else None

    def read_through(self, key, load):
        """The cached value of key, or load(key) cached (None: no value anywhere)."""
        entry = self.entries.get(key)
        if entry:
            return entry[0]
        value = load(key)
        if value is not None:
            self.put(key, value)
        return value

    def clear(self):
        """Drops every entry; returns how many there were."""
        dropped = len(self.entries)
        self.entries.clear()
        return dropped

    def apply(self, message):
        if message.get("all"):
            self.entries.clear()
            return
        for key in message.get("keys", []):
            self.entries.pop(key, None)
        tags, families = set(message.get("tags", [])), set(message.get("families", []))
        if tags or families:
            for key, (_, entry_tags, family) in list(self.entries.items()):
                if entry_tags & tags or family in families:
                    del self.entries[key]


def parse_url(url):
    """redis://[[user]:password@]host[:port][/db], as cachetail reads it."""
    rest = url[len("redis://"):] if url.startswith("redis://") else url
    authority, _, db = rest.partition("/")
    user = password = None
    if "@" in authority:
        credentials, authority = authority.rsplit("@", 1)
        if ":" in credentials:
            user, password = credentials.split(":", 1)
            user = user or None
        else:
            user = credentials
    host, _, port = authority.partition(":")
    return host or "127.0.0.1", int(port or 6379), user, password, int(db or 0)


class RedisError(Exception):
    pass


class Redis:
    """One connection to Redis, authenticated (as the URL's user, if any) and on its database."""

    def __init__(self, url):
        host, port, user, password, db = parse_url(url)
        self.sock = socket.create_connection((host, port), timeout=5)
        self.reader = Reader(self.sock)
        try:
            if password is not None:
                self.call(*(("AUTH", user, password) if user else ("AUTH", password)))
            if db:
                self.call("SELECT", db)
        except Exception:
            self.sock.close()
            raise

    def call(self, *args):
        self.sock.sendall(encode(*args))
        reply = self.reader.reply()
        if isinstance(reply, RedisErrorReply):
            raise RedisError("%s refused: %s" % (args[0], reply))
        return reply

    def close(self):
        self.sock.close()


def entry_id(text):
    """A stream entry id ("1700000000000-3") as a tuple that compares in stream order."""
    if isinstance(text, bytes):
        text = text.decode()
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def stream_info(redis, stream):
    """XINFO STREAM as a dict (field -> value), or None if the stream does not exist."""
    try:
        flat = redis.call("XINFO", "STREAM", stream)
    except RedisError as error:
        if "no such key" in str(error):
            return None
        raise
    return {flat[i].decode() if isinstance(flat[i], bytes) else flat[i]: flat[i + 1]
            for i in range(0, len(flat), 2)}


def gap(redis, stream, info, last_id):
    """Why entries after last_id may be lost (None: the stream holds every one after it)."""
    if info is None:
        return "the stream is gone (Redis lost its data, or cachetail rebuilt its namespace)"
    last = entry_id(last_id)
    if entry_id(info["last-generated-id"]) < last:
        return "the stream is older than the last entry processed: it was recreated"
    first = info.get("first-entry")
    if first is None or entry_id(first[0]) > last:
        # Trimming removes the oldest entries: the first one after ours may be among them.
        if entry_id(info["last-generated-id"]) == last:
            return None  # nothing was added since ours
        return "the stream was trimmed past the last entry processed (%s)" % last_id
    # The first entry is at or before ours: ours is there, unless the stream was recreated.
    if last != (0, 0) and not redis.call("XRANGE", stream, last_id, last_id):
        return "the last entry processed (%s) is not in the stream: it was recreated" % last_id
    return None


class Subscriber:
    """The local cache, the last stream entry it reflects, and where both are kept."""

    def __init__(self, args):
        self.args = args
        self.stream = args.prefix + "#invalidations"
        self.cache = LocalCache()
        self.last_id = None  # None: nothing processed yet (a fresh start)
        if args.state and os.path.exists(args.state):
            with open(args.state) as file:
                state = json.load(file)
            self.last_id = state["last_id"]
            for key, (value, tags, family) in state["entries"].items():
                self.cache.put(key, value, tags, family)

    def save(self):
        """Writes the local cache and its entry id at once (a kill leaves the old file or the new)."""
        if not self.args.state:
            return
        entries = {key: [value, sorted(tags), family]
                   for key, (value, tags, family) in self.cache.entries.items()}
        temporary = self.args.state + ".tmp"
        with open(temporary, "w") as file:
            json.dump({"last_id": self.last_id, "entries": entries}, file)
        os.replace(temporary, self.args.state)

    def resume(self, redis):
        """Where to read from after (re)connecting; drops everything if entries were lost."""
        info = stream_info(redis, self.stream)
        newest = info["last-generated-id"].decode() if info else "0-0"
        if self.last_id is None:
            # Nothing cached yet: what Redis holds is at least as fresh as the newest entry.
            self.last_id = newest
            return 0
        reason = gap(redis, self.stream, info, self.last_id)
        if reason is None:
            return 0
        # From the newest entry on, nothing is missed; what was cached before may be stale.
        self.last_id = newest
        dropped = self.cache.clear()
        print(json.dumps({"dropped_whole": dropped, "reason": reason}), flush=True)
        return dropped

    def refill(self, redis):
        """Reads the --keep keys the local cache lacks from Redis (the app's reads on a miss)."""
        for key in self.args.keep:
            if key not in self.cache.entries:
                value = redis.call("GET", self.args.prefix + key)
                if value is not None:
                    self.cache.put(key, value.decode())

    def read(self, redis, block):
        """Applies the next entries (waiting up to --block-ms for one if block); how many."""
        wait = ("BLOCK", self.args.block_ms) if block else ()
        reply = redis.call("XREAD", "COUNT", 1000, *wait, "STREAMS", self.stream, self.last_id)
        applied = 0
        for _, entries in reply or []:
            for entry, fields in entries:
                values = dict(zip(fields[::2], fields[1::2]))
                message = json.loads(values[b"message"])
                self.cache.apply(message)
                self.last_id = entry.decode()
                applied += 1
                print(json.dumps(message), flush=True)
        return applied

    def follow(self, redis):
        """Applies the stream's entries as they come, saving after each round."""
        while True:
            self.read(redis, block=True)
            self.refill(redis)
            self.save()

    def run(self):
        while True:
            redis = None
            try:
                redis = Redis(self.args.url)
                resumed_from = self.last_id
                dropped = self.resume(redis)
                while self.read(redis, block=False):
                    pass  # what came while it was away
                self.refill(redis)
                self.save()
                cached = {key: self.cache.get(key) for key in sorted(self.cache.entries)}
                print(json.dumps({"subscribed": True, "resumed_from": resumed_from,
                                  "dropped": dropped, "cached": cached}), flush=True)
                self.follow(redis)
            except (OSError, ConnectionError, RedisError) as error:
                print("subscriber: %s; reconnecting" % error, file=sys.stderr, flush=True)
                time.sleep(0.5)
            finally:
                if redis:
                    redis.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default="cachetail:")
    parser.add_argument("--keep", action="append", default=[], metavar="KEY",
                        help="a key the app reads into its local cache (from Redis) on a miss")
    parser.add_argument("--state", metavar="FILE",
                        help="keep the local cache and the last entry id here, across restarts")
    parser.add_argument("--block-ms", type=int, default=1000,
                        help="how long one XREAD waits for entries before reading --keep again")
    Subscriber(parser.parse_args()).run()


if __name__ == "__main__":
    main()
