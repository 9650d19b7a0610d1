#!/usr/bin/env bash
# The whole benchmark suite, one command: every figure beside its same-run baseline, then hot
# reads against nginx (needs wrk and nginx: apt-get install -y wrk nginx). Prints the tables.
#   bash benches/run.sh           the figures (a few minutes)
#   bash benches/run.sh --quick   the smoke version CI runs
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--quick" ]; then
  cargo run --release --quiet -- bench --quick --dir target/bench-data
  bash benches/hot_reads.sh 2
else
  cargo run --release --quiet -- bench --dir target/bench-data
  bash benches/hot_reads.sh 10
fi
