#!/usr/bin/env python3
"""An app server's local cache, kept fresh by cachetail's invalidation messages.

cachetail (with `[cache] backend = "redis"`) publishes every applied batch of invalidations on
the Redis channel `{prefix}invalidations` as JSON:

    {"position": 1234, "keys": ["book:3", "top-books"], "tags": ["books"],
     "families": ["user:{id}"], "all": false}

- `position`: the outbox position the batch ends at; it only grows.
- `keys`: drop these keys.
- `tags`: drop every entry you cached with one of these tags.
- `families`: drop every entry of these key families (their data may have changed uncaptured,
  or a reload changed their definition).
- `all`: drop everything.

Standard library only. Run it to print the messages, one JSON object per line:

    python3 examples/redis_subscriber.py --url redis://127.0.0.1:6379/0 --prefix cachetail:

While it is disconnected, messages are lost: a subscriber that reconnects must drop its whole
local cache (this one does), as pub/sub does not replay. Each time it (re)connects it prints
`{"subscribed": true, "dropped": N, "cached": {...}}`: how many entries it dropped, and what it
holds after reading the `--keep` keys again (a stand-in for the app's own reads, which fill the
local cache from Redis on a miss).
"""

import argparse
import json
import socket
import sys
import time


def encode(*args):
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class Reader:
    """Reads RESP2 replies from a socket."""

    def __init__(self, sock):
        self.file = sock.makefile("rb")

    def reply(self):
        line = self.file.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind in (b"+", b"-"):
            return rest.decode()
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


def connect(url):
    """A connection to Redis, authenticated (as the URL's user, if any) and on its database."""
    host, port, user, password, db = parse_url(url)
    sock = socket.create_connection((host, port), timeout=5)
    reader = Reader(sock)
    commands = []
    if password is not None:
        commands.append(("AUTH", user, password) if user else ("AUTH", password))
    if db:
        commands.append(("SELECT", db))
    for command in commands:
        sock.sendall(encode(*command))
        reply = reader.reply()
        if reply != "OK":  # an error reply: a wrong password, an unknown or disabled user
            sock.close()
            raise RedisError("%s refused: %s" % (command[0], reply))
    return sock, reader


def read(url, key):
    """GET key on a connection of its own (a subscribed connection cannot read)."""
    sock, reader = connect(url)
    with sock:
        sock.sendall(encode("GET", key))
        value = reader.reply()
    if isinstance(value, str):  # an error reply
        raise RedisError("GET %s refused: %s" % (key, value))
    return value.decode() if value is not None else None


def subscribe(url, channel, on_message, on_connect=lambda: None):
    """Calls on_message(dict) for each message; reconnects (calling on_connect) when cut off."""
    while True:
        try:
            sock, reader = connect(url)
            sock.settimeout(None)
            sock.sendall(encode("SUBSCRIBE", channel))
            confirmation = reader.reply()
            if not (isinstance(confirmation, list) and confirmation[0] == b"subscribe"):
                raise RedisError("SUBSCRIBE refused: %s" % (confirmation,))
            on_connect()
            while True:
                push = reader.reply()
                if isinstance(push, list) and len(push) == 3 and push[0] == b"message":
                    on_message(json.loads(push[2]))
        except (OSError, ConnectionError, RedisError) as error:
            print("subscriber: %s; reconnecting" % error, file=sys.stderr, flush=True)
            time.sleep(0.5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default="cachetail:")
    parser.add_argument("--keep", action="append", default=[], metavar="KEY",
                        help="a key the app reads into its local cache (from Redis) on connecting")
    args = parser.parse_args()
    cache = LocalCache()

    def on_connect():
        # Messages may have been missed while disconnected: drop everything, then read again
        # (after subscribing, so that no invalidation of what is read can be missed).
        dropped = cache.clear()
        for key in args.keep:
            cache.read_through(key, lambda k: read(args.url, args.prefix + k))
        cached = {key: cache.get(key) for key in sorted(cache.entries)}
        print(json.dumps({"subscribed": True, "dropped": dropped, "cached": cached}), flush=True)

    def on_message(message):
        cache.apply(message)
        print(json.dumps(message), flush=True)

    subscribe(args.url, args.prefix + "invalidations", on_message, on_connect)


if __name__ == "__main__":
    main()
