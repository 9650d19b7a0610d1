#!/usr/bin/env bash
# Hot reads: GET of a cached key over HTTP/1.1 keep-alive, 64 connections, wrk as the load
# generator, measured beside nginx serving the same bytes as a static file (its best static
# config: sendfile, tcp_nopush, open_file_cache, long keep-alive, a worker per core, no access
# log) and beside answering every request from SQLite (a cachetail whose capture is paused reads
# the database each time; each request names a random one of the 1,000 books, since concurrent
# bypass reads of one key share a query); and a cachetail keeping its values in Redis (the shared backend),
# beside Redis's own GET rate (redis-benchmark GETting an existing key of the cached value's size).
# The runs alternate (cachetail, nginx, cachetail on Redis, redis-benchmark, SQLite; again, ...)
# for ROUNDS rounds, so the machine's noise hits each alike; it prints medians and ranges.
# Usage: benches/hot_reads.sh [SECONDS per run, default 10] [ROUNDS, default 5]
#   (needs wrk, nginx, redis-server, redis-tools: apt-get install -y wrk nginx redis-server redis-tools)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-10}"
rounds="${2:-5}"
for tool in wrk nginx python3 curl redis-server redis-cli redis-benchmark; do
  command -v "$tool" >/dev/null || { echo "hot_reads: $tool is missing (apt-get install -y wrk nginx python3 curl redis-server redis-tools)" >&2; exit 2; }
done
cargo build --release --quiet
bin="$PWD/target/release/cachetail"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 200); do curl -sf "$1" >/dev/null 2>&1 && return 0; python3 -c 'import time; time.sleep(0.05)'; done; echo "no answer from $1" >&2; exit 1; }

make_db() { # $1: directory
  python3 - "$1/catalog.db" <<'PY'
import sqlite3, sys
con = sqlite3.connect(sys.argv[1])
con.executescript(open("examples/catalog.sql").read())
con.executemany("INSERT INTO books (id, title, author) VALUES (?, ?, 'A')", [(i, f"Book {i}") for i in range(1, 1001)])
con.executemany("INSERT INTO users (id, name) VALUES (?, ?)", [(i, f"u{i}") for i in range(1, 101)])
con.executemany("INSERT INTO reviews (book_id, user_id, rating) VALUES (?, ?, ?)", [(i % 1000 + 1, i % 100 + 1, i % 5 + 1) for i in range(100000)])
con.commit()
PY
}

start_daemon() { # $1: directory, $2: port
  sed "s/listen = \"127.0.0.1:8080\"/listen = \"127.0.0.1:$2\"/" config.toml > "$1/config.toml"
  RUST_LOG=warn "$bin" run --config "$1/config.toml" >/dev/null 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$2/healthz"
}

mkdir -p "$work/cached" "$work/direct" "$work/nginx" "$work/redis"
make_db "$work/cached"; cp "$work/cached/catalog.db" "$work/direct/"; cp "$work/cached/catalog.db" "$work/redis/"
cache_port=$(free_port); start_daemon "$work/cached" "$cache_port"

redis_server_port=$(free_port)
redis-server --port "$redis_server_port" --bind 127.0.0.1 --save '' --appendonly no >/dev/null & pids+=($!)
for _ in $(seq 200); do redis-cli -p "$redis_server_port" ping >/dev/null 2>&1 && break; python3 -c 'import time; time.sleep(0.05)'; done
redis_port=$(free_port)
sed -e "s/listen = \"127.0.0.1:8080\"/listen = \"127.0.0.1:$redis_port\"/" \
    -e "s|^\[cache\]|[cache]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:$redis_server_port/0\"\nprefix = \"cachetail:\"|" config.toml > "$work/redis/config.toml"
RUST_LOG=warn "$bin" run --config "$work/redis/config.toml" >/dev/null 2>&1 & pids+=($!)
wait_http "http://127.0.0.1:$redis_port/healthz"
redis_url="http://127.0.0.1:$redis_port/v1/keys/book:1"
for _ in $(seq 200); do
  curl -sf -D - -o /dev/null "$redis_url" | grep -qi '^x-cache: hit' && break
  python3 -c 'import time; time.sleep(0.05)'
done
curl -sf -D - -o /dev/null "$redis_url" | grep -qi '^x-cache: hit' || { echo "book:1 is not a hit in redis" >&2; exit 1; }
# redis-benchmark's baseline GETs an existing key holding as many bytes as cachetail keeps in
# Redis for book:1 (the value a cachetail read fetches).
value_bytes=$(redis-cli -p "$redis_server_port" STRLEN "cachetail:book:1")
[ "${value_bytes:-0}" -gt 0 ] || { echo "cachetail:book:1 is not in redis" >&2; exit 1; }
python3 -c "import sys; sys.stdout.write('x' * $value_bytes)" | redis-cli -p "$redis_server_port" -x SET bench:value >/dev/null
[ "$(redis-cli -p "$redis_server_port" STRLEN bench:value)" = "$value_bytes" ] || { echo "bench:value was not set" >&2; exit 1; }

direct_port=$(free_port)
sed "s/listen = \"127.0.0.1:8080\"/listen = \"127.0.0.1:$direct_port\"/" config.toml > "$work/direct/config.toml"
"$bin" install --config "$work/direct/config.toml" >/dev/null
"$bin" pause --config "$work/direct/config.toml" >/dev/null
RUST_LOG=warn "$bin" run --config "$work/direct/config.toml" >/dev/null 2>&1 & pids+=($!)
wait_http "http://127.0.0.1:$direct_port/healthz"

key_url="http://127.0.0.1:$cache_port/v1/keys/book:1"
curl -sf "$key_url" > "$work/nginx/book.json"
curl -sf -D - -o /dev/null "$key_url" | grep -qi '^x-cache: hit' || { echo "book:1 is not a hit" >&2; exit 1; }
curl -sf -D - -o /dev/null "http://127.0.0.1:$direct_port/v1/keys/book:1" | grep -qi '^x-cache: bypass' || { echo "the direct daemon is not paused" >&2; exit 1; }

chmod -R a+rX "$work"
nginx_port=$(free_port)
cores=$(nproc)
# nginx's best static config: a worker per core (each with its own listening socket), sendfile,
# tcp_nopush/tcp_nodelay, open file descriptors cached, keep-alive connections never closed by
# count, no access log.
cat > "$work/nginx.conf" <<CONF
worker_processes $cores;
worker_rlimit_nofile 65536;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; multi_accept on; use epoll; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  open_file_cache max=1000 inactive=60s;
  open_file_cache_valid 60s;
  open_file_cache_min_uses 1;
  open_file_cache_errors on;
  keepalive_timeout 65s;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$nginx_port reuseport backlog=4096;
    root $work/nginx;
    location = /book.json { default_type application/json; }
  }
}
CONF
nginx -c "$work/nginx.conf" -g 'daemon off;' & pids+=($!)
wait_http "http://127.0.0.1:$nginx_port/book.json"
cmp -s "$work/nginx/book.json" <(curl -sf "http://127.0.0.1:$nginx_port/book.json") || { echo "nginx does not serve the same bytes" >&2; exit 1; }

results="$work/results"
# Each request a random book: concurrent bypass reads of one key would share a query.
cat > "$work/random_book.lua" <<'LUA'
init = function(args) math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16)) end
request = function() return wrk.format("GET", "/v1/keys/book:" .. math.random(1, 1000)) end
LUA
run_wrk() { # $1: name, $2: url, [$3: a wrk script] → a line "name requests/s p99" in $results
  local out; out=$(wrk -t2 -c64 -d"${seconds}s" --latency ${3:+-s "$3"} "$2")
  local rps p99
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  [ -n "$rps" ] && [ -n "$p99" ] || { echo "wrk gave no figures for $1: $out" >&2; exit 1; }
  if grep -q 'Non-2xx' <<<"$out"; then echo "wrk: $1 answered non-2xx: $out" >&2; exit 1; fi
  echo "$1 $rps $p99" >> "$results"
}
run_redis_benchmark() { # a line "redis-get requests/s p99" in $results (Redis's own GET rate, 64 clients)
  local out; out=$(redis-benchmark -p "$redis_server_port" -c 64 -n $((seconds * 40000)) -q GET bench:value 2>/dev/null | tr '\r' '\n' | grep 'requests per second' | tail -1)
  local rps; rps=$(awk '{for (i = 1; i < NF; i++) if ($(i + 1) == "requests") print $i}' <<<"$out")
  [ -n "$rps" ] || { echo "redis-benchmark gave no figure: $out" >&2; exit 1; }
  echo "redis-get $rps -" >> "$results"
}
for round in $(seq "$rounds"); do
  echo "hot reads: round $round of $rounds (${seconds}s runs)" >&2
  run_wrk cachetail "$key_url"
  run_wrk nginx "http://127.0.0.1:$nginx_port/book.json"
  run_wrk cachetail-redis "$redis_url"
  run_redis_benchmark
  run_wrk sqlite "http://127.0.0.1:$direct_port/v1/keys/book:1" "$work/random_book.lua"
done

python3 - "$results" "$seconds" "$rounds" "$cores" "$value_bytes" <<'PY'
import statistics, sys
path, seconds, rounds, cores, value_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
def millis(p99):  # wrk: 812.00us, 3.95ms, 1.02s
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if p99.endswith(unit):
            return float(p99[: -len(unit)]) * scale
    raise ValueError(p99)
runs = {}
for line in open(path):
    name, rps, p99 = line.split()
    runs.setdefault(name, []).append((float(rps), None if p99 == "-" else millis(p99)))
def spread(values, show):
    values = sorted(values)
    if len(values) == 1:
        return show(values[0])
    return f"{show(statistics.median(values))} ({show(values[0])}–{show(values[-1])})"
def k(x): return f"{x / 1000:.1f}k"
def rate(name): return spread([r for r, _ in runs[name]], k) + " req/s"
def p99(name): return "p99 " + spread([p for _, p in runs[name]], lambda x: f"{x:.2f} ms")
def ratio(a, b):  # per round, then median and range
    return spread([x[0] / y[0] for x, y in zip(runs[a], runs[b])], lambda x: f"{x:.2f}×")

for name, text in (("cachetail", "cachetail"), ("nginx", "nginx"), ("cachetail-redis", "cachetail on Redis"), ("redis-get", "redis-benchmark GET"), ("sqlite", "SQLite per request")):
    print(f"hot reads {text}: " + " ".join(f"{r:.0f}" for r, _ in runs[name]) + " req/s", file=sys.stderr)
how = f"median (range) of {rounds} alternating rounds of {seconds}s" if rounds > 1 else f"one {seconds}s run"
print()
print("| figure | measured | baseline (same run) | ratio | target |")
print("|---|---|---|---|---|")
print(f"| hot reads: GET of a cached key, 64 keep-alive connections, wrk, {how} | {rate('cachetail')}, {p99('cachetail')} "
      f"| nginx, same bytes as a static file, its best static config ({cores} workers, sendfile, open_file_cache): {rate('nginx')}, {p99('nginx')}; "
      f"each request answered from SQLite: {rate('sqlite')}, {p99('sqlite')} "
      f"| {ratio('cachetail', 'nginx')} nginx, {ratio('cachetail', 'sqlite')} SQLite per request | ≥ 1.5× nginx, p99 ≤ nginx's p99 |")
print(f"| hot reads, Redis backend: GET of a key cached in Redis, same load, {how} | {rate('cachetail-redis')}, {p99('cachetail-redis')} "
      f"| in-process backend (above): {rate('cachetail')}; bare Redis GETs of an existing {value_bytes}-byte value (redis-benchmark, 64 clients): {rate('redis-get')} "
      f"| {ratio('cachetail-redis', 'cachetail')} in-process, {ratio('cachetail-redis', 'redis-get')} bare Redis | state it |")
PY
