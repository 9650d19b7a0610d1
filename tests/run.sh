#!/usr/bin/env bash
# The README's test command: installs what the test suite needs and is missing (on Debian or
# Ubuntu, with apt-get; only what is missing, so on a machine that has it all it installs
# nothing), then runs the whole suite. Arguments go to `cargo test`:
#
#   bash tests/run.sh                      # everything
#   bash tests/run.sh --test e2e -- feed   # the e2e tests whose name contains "feed"
#
# What the tests use: the sqlite3 shell and python3 (with its sqlite3 module) as separate
# writer processes, redis-server and redis-cli (the Redis tests start their own server, one over
# TLS with a CA and certificates made by the openssl CLI), redis-sentinel (the Sentinel test
# starts a primary, a replica and three sentinels; without the command it runs
# `redis-server --sentinel`),
# Debian's chromium and chromedriver (the dashboard's browser test), and python3's
# prometheus-client (the /metrics test parses with the Prometheus project's parser).
set -euo pipefail
cd "$(dirname "$0")/.."

# apt-get as root, or through sudo when there is one.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "tests/run.sh: $* needs root (run as root, or install sudo)" >&2
    return 1
  fi
}

apt_updated=false
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  if [ "$apt_updated" = false ]; then
    as_root apt-get update -qq
    apt_updated=true
  fi
  as_root apt-get install -y -qq "$@"
}

missing=()
command -v sqlite3 >/dev/null 2>&1 || missing+=(sqlite3)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v openssl >/dev/null 2>&1 || missing+=(openssl) # the TLS test's CA and certificates
# The dashboard's browser test: Chromium, driven over WebDriver by chromedriver. Debian packages
# them as chromium and chromium-driver; Ubuntu as chromium-browser and chromium-chromedriver
# (snaps behind /usr/bin/chromium-browser and /usr/bin/chromedriver).
if [ ! -x /usr/bin/chromium ] && [ ! -x /usr/bin/chromium-browser ]; then
  if grep -qi '^ID=ubuntu' /etc/os-release 2>/dev/null; then
    missing+=(chromium-browser)
  else
    missing+=(chromium)
  fi
fi
if [ ! -x /usr/bin/chromedriver ]; then
  if grep -qi '^ID=ubuntu' /etc/os-release 2>/dev/null; then
    missing+=(chromium-chromedriver)
  else
    missing+=(chromium-driver)
  fi
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "tests/run.sh: installing ${missing[*]}"
  apt_install "${missing[@]}"
fi
# Debian and Ubuntu package redis-sentinel apart from redis-server; where there is no such
# package, `redis-server --sentinel` (which the test falls back to) does the same.
if ! command -v redis-sentinel >/dev/null 2>&1; then
  echo "tests/run.sh: installing redis-sentinel"
  apt_install redis-sentinel || echo "tests/run.sh: no redis-sentinel package; the Sentinel test runs redis-server --sentinel"
fi

python3 -c 'import sqlite3' # the tests' writer processes use the standard sqlite3 module
if ! python3 -c 'import prometheus_client' 2>/dev/null; then
  echo "tests/run.sh: installing python3's prometheus-client"
  python3 -m pip install --quiet prometheus-client 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages prometheus-client 2>/dev/null \
    || apt_install python3-prometheus-client
fi
python3 -c 'import prometheus_client'

exec cargo test --locked "$@"
