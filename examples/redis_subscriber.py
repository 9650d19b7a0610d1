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
local cache (this one does), as pub/sub does not replay.
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
    rest = url[len("redis://"):] if url.startswith("redis://") else url
    authority, _, db = rest.partition("/")
    password = None
    if "@" in authority:
        credentials, authority = authority.rsplit("@", 1)
        password = credentials.split(":", 1)[-1]
    host, _, port = authority.partition(":")
    return host or "127.0.0.1", int(port or 6379), password


def subscribe(url, channel, on_message, on_connect=lambda: None):
    """Calls on_message(dict) for each message; reconnects (calling on_connect) when cut off."""
    host, port, password = parse_url(url)
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5)
            sock.settimeout(None)
            reader = Reader(sock)
            if password:
                sock.sendall(encode("AUTH", password))
                reader.reply()
            sock.sendall(encode("SUBSCRIBE", channel))
            reader.reply()  # the subscription confirmation
            on_connect()
            while True:
                push = reader.reply()
                if isinstance(push, list) and len(push) == 3 and push[0] == b"message":
                    on_message(json.loads(push[2]))
        except (OSError, ConnectionError) as error:
            print("subscriber: %s; reconnecting" % error, file=sys.stderr)
            time.sleep(0.5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default="cachetail:")
    args = parser.parse_args()
    cache = LocalCache()

    def on_connect():
        cache.entries.clear()  # messages may have been missed while disconnected
        print(json.dumps({"subscribed": True}), flush=True)

    def on_message(message):
        cache.apply(message)
        print(json.dumps(message), flush=True)

    subscribe(args.url, args.prefix + "invalidations", on_message, on_connect)


if __name__ == "__main__":
    main()
