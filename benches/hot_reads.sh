#!/usr/bin/env bash
# Hot reads: GET of a cached key over HTTP/1.1 keep-alive, 64 connections, wrk as the load
# generator, measured beside nginx serving the same bytes as a static file and beside answering
# every request from SQLite (a cachetail whose capture is paused reads the database each time),
# and beside a cachetail keeping its values in Redis (the shared backend).
# Usage: benches/hot_reads.sh [seconds]   (needs wrk, nginx, redis-server: apt-get install -y ...)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-10}"
for tool in wrk nginx python3 redis-server; do
  command -v "$tool" >/dev/null || { echo "hot_reads: $tool is missing (apt-get install -y wrk nginx python3 redis-server)" >&2; exit 2; }
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
    -e "s|^\[cache\]|[cache]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:$redis_server_port/0\"|" config.toml > "$work/redis/config.toml"
RUST_LOG=warn "$bin" run --config "$work/redis/config.toml" >/dev/null 2>&1 & pids+=($!)
wait_http "http://127.0.0.1:$redis_port/healthz"
redis_url="http://127.0.0.1:$redis_port/v1/keys/book:1"
for _ in $(seq 200); do
  curl -sf -D - -o /dev/null "$redis_url" | grep -qi '^x-cache: hit' && break
  python3 -c 'import time; time.sleep(0.05)'
done
curl -sf -D - -o /dev/null "$redis_url" | grep -qi '^x-cache: hit' || { echo "book:1 is not a hit in redis" >&2; exit 1; }
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
cat > "$work/nginx.conf" <<CONF
worker_processes auto;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$nginx_port;
    root $work/nginx;
    location = /book.json { default_type application/json; }
  }
}
CONF
nginx -c "$work/nginx.conf" -g 'daemon off;' & pids+=($!)
wait_http "http://127.0.0.1:$nginx_port/book.json"

run_wrk() { # $1: url → "requests/s p99"
  local out; out=$(wrk -t2 -c64 -d"${seconds}s" --latency "$1")
  local rps p99
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  echo "$rps $p99"
}
read -r cached_rps cached_p99 < <(run_wrk "$key_url")
read -r nginx_rps nginx_p99 < <(run_wrk "http://127.0.0.1:$nginx_port/book.json")
read -r direct_rps direct_p99 < <(run_wrk "http://127.0.0.1:$direct_port/v1/keys/book:1")
read -r redis_rps redis_p99 < <(run_wrk "$redis_url")
ratio_redis=$(python3 -c "print(f'{$redis_rps / $cached_rps:.2f}')")
# The ceiling: Redis's own GET rate on this machine, 64 clients, redis-benchmark.
bench_rps=$(redis-benchmark -p "$redis_server_port" -t get -c 64 -n $((seconds * 40000)) -q 2>/dev/null | tr '\r' '\n' | awk '/requests per second/ {print $2}' | tail -1)
ratio_bench=$(python3 -c "print(f'{$redis_rps / $bench_rps:.2f}')")
ratio=$(python3 -c "print(f'{$cached_rps / $nginx_rps:.2f}')")
ratio_db=$(python3 -c "print(f'{$cached_rps / $direct_rps:.1f}')")
echo
echo "| figure | measured | baseline (same run) | ratio | target |"
echo "|---|---|---|---|---|"
echo "| hot reads: GET of a cached key, 64 keep-alive connections, wrk ${seconds}s | $cached_rps req/s, p99 $cached_p99 | nginx, same bytes as a static file: $nginx_rps req/s, p99 $nginx_p99; each request answered from SQLite: $direct_rps req/s, p99 $direct_p99 | ${ratio}× nginx, ${ratio_db}× SQLite per request | ≥ 1.0× nginx, p99 ≤ 2 ms |"
echo "| hot reads, Redis backend: GET of a key cached in Redis, same load | $redis_rps req/s, p99 $redis_p99 | in-process backend (above): $cached_rps req/s, p99 $cached_p99; bare Redis GETs (redis-benchmark, 64 clients): $bench_rps req/s | ${ratio_redis}× in-process, ${ratio_bench}× bare Redis | state it |"
