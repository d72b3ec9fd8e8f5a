#!/usr/bin/env bash
# Runs Clastor's whole test suite on a fresh Debian machine: installs what the
# tests need (ZooKeeper from Debian's package, with its Java runtime; etcd; Redis) when
# it is missing, then runs every test of the workspace. Tests that need
# ZooKeeper, etcd, PostgreSQL or Redis start their own on free loopback ports
# and stop it afterwards.
#
# Usage: scripts/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# ZooKeeper for the backend tests; Apache Curator (with the JDK's javac) and
# kazoo for the interoperation tests against real foreign lock clients;
# chromium for the status page test (tests/status_page.rs, headless);
# etcd-server for the etcd backend tests and etcd-client (etcdctl) for the
# interoperation tests against it; protoc builds the etcd-client crate's gRPC
# stubs; postgresql (15, Debian 12's) for the PostgreSQL backend tests, which
# run its binaries from /usr/lib/postgresql/15/bin (no cluster or service is
# started by the package's scripts here: the tests initdb their own);
# redis-server for the Redis backend tests and redis-tools (redis-cli) for
# removing a contender by hand in them; python3-grpcio and python3-grpc-tools
# (Debian's, for /usr/bin/python3) for the gRPC tests' Python client, which
# generates its stubs from proto/clastor/v1/lock.proto.
if [ ! -f /usr/share/java/zookeeper.jar ] || [ ! -f /usr/share/java/curator-recipes.jar ] \
  || ! command -v java >/dev/null 2>&1 || ! command -v javac >/dev/null 2>&1 \
  || ! /usr/bin/python3 -c 'import kazoo' >/dev/null 2>&1 \
  || ! command -v chromium >/dev/null 2>&1 \
  || ! command -v etcd >/dev/null 2>&1 || ! command -v etcdctl >/dev/null 2>&1 \
  || ! command -v protoc >/dev/null 2>&1 \
  || [ ! -x /usr/lib/postgresql/15/bin/postgres ] \
  || ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1 \
  || ! /usr/bin/python3 -c 'import grpc, grpc_tools' >/dev/null 2>&1; then
  echo "== installing ZooKeeper, Apache Curator, kazoo, chromium, etcd, protoc, PostgreSQL, Redis and Python gRPC (Debian packages) for the tests"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq \
    zookeeper libcurator-recipes-java default-jdk-headless python3-kazoo chromium \
    etcd-server etcd-client protobuf-compiler postgresql redis-server redis-tools \
    python3-grpcio python3-grpc-tools >/dev/null
fi

echo "== cargo test (workspace)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole workspace (cargo prints one per test binary,
# the last of which may well be an empty doc-test run).
sum() { grep -E '^test result:' "$log" | grep -oE "[0-9]+ $1" | awk '{ s += $1 } END { print s + 0 }'; }
echo "tests: $(sum passed) passed, $(sum failed) failed"
exit "$status"
