#!/usr/bin/env bash
# The whole benchmark suite, one command: every figure beside its same-run baseline, then hot
# reads against nginx and Redis, alternating (needs wrk, nginx, redis-server, redis-tools:
# apt-get install -y wrk nginx redis-server redis-tools). Prints the tables.
#   bash benches/run.sh           the figures (about 10 minutes)
#   bash benches/run.sh --quick   the smoke version CI runs (about a minute once built)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--quick" ]; then
  cargo run --release --quiet -- bench --quick --dir target/bench-data
  bash benches/hot_reads.sh 1 2
else
  cargo run --release --quiet -- bench --dir target/bench-data
  bash benches/hot_reads.sh 6 5
fi
