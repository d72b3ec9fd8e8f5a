#!/usr/bin/env bash
# Regenerates PERFORMANCE.md and its charts (docs/perf/*.svg) from one run on
# this machine: the memory backend, then a standalone ZooKeeper 3.8 (Debian's
# package, forceSync on, started here on a free loopback port and stopped by
# pid), Clastor next to the floors `clastor load` measures in the same run and
# next to Apache Curator's InterProcessMutex and kazoo's Lock on the same
# ZooKeeper. The latency-critical ZooKeeper scenarios run ROUNDS times,
# interleaved (Clastor, floor, Curator, kazoo, then again; Clastor and its
# floor alternate sample by sample, `--interleave`), and the report gives the
# range over rounds. Then a single-member etcd 3.4 (Debian's package, fsync
# on), Clastor's etcd backend next to raw etcd transactions and etcd's own
# lock service (v3lock), in rounds the same way; then a PostgreSQL 15
# (Debian's package, fsync on, run as the postgres user) next to a raw
# INSERT+DELETE and pg_advisory_lock; then a Redis 7 (Debian's package, no
# persistence) next to SET NX PX + DEL and a plain Redis lock. Last, the
# cost of TLS (scripts/perf_tls.sh: a plain and a TLS server, interleaved).
#
# Usage: scripts/perf.sh            (about 25 minutes)
#        ROUNDS=1 DURATION=2 scripts/perf.sh   (quicker, noisier)
# Needs: zookeeper, libcurator-recipes-java, default-jdk-headless,
# python3-kazoo, etcd-server, postgresql, redis-server (scripts/test.sh
# installs them).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-3}
WARMUP=${WARMUP:-1}
SWEEP=${SWEEP:-1,16,64,256}
OUT=${OUT:-target/perf}
JAVA=/usr/share/java

mkdir -p "$OUT" docs/perf
results="$OUT/results.jsonl"
: >"$results"
work=$(mktemp -d)
zk_pid=
etcd_pid=
pg_pid=
redis_pid=
cleanup() {
  if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; fi
  if [ -n "$pg_pid" ]; then kill -INT "$pg_pid" 2>/dev/null || true; wait "$pg_pid" 2>/dev/null || true; fi
  if [ -n "$zk_pid" ]; then kill "$zk_pid" 2>/dev/null || true; wait "$zk_pid" 2>/dev/null || true; fi
  if [ -n "$etcd_pid" ]; then kill "$etcd_pid" 2>/dev/null || true; wait "$etcd_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# The tree the binary is built from, before anything here changes it (the
# report is written after the charts).
echo "{\"meta\":\"commit\",\"value\":\"$(git describe --always --dirty)\"}" >>"$results"
echo "== build"
cargo build --release --locked --bin clastor
clastor=target/release/clastor

# Machine load while measuring, so the report can say whether it was busy.
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
echo "{\"meta\":\"load_start\",\"value\":\"$(loadavg)\"}" >>"$results"

load() { # scenario, then clastor load arguments
  local scenario=$1
  shift
  echo "-- $scenario: clastor load $*" >&2
  "$clastor" load --json --scenario "$scenario" --duration "${DURATION}s" --warmup "${WARMUP}s" "$@" | tee -a "$results"
}

echo "== memory backend"
load "memory, uncontended, depth 1" --op acquire-release --sweep "$SWEEP"
load "memory, uncontended, depth 32" --op acquire-release --raw --depth 32 --sweep "$SWEEP"
load "memory, contended, depth 1" --op acquire-release --keys shared --sweep "$SWEEP"
load "memory, contended, depth 32" --op acquire-release --keys shared --raw --depth 32 --sweep "$SWEEP"
load "memory, ping, depth 1" --op ping --sweep "$SWEEP"
load "memory, ping, depth 32" --op ping --raw --depth 32 --sweep "$SWEEP"
"$clastor" load --json --scenario "memory footprint" --op idle --count 10000 | tee -a "$results"
"$clastor" load --json --scenario "memory footprint" --op hold --count 100000 | tee -a "$results"

echo "== ZooKeeper"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/data"
cat >"$work/zoo.cfg" <<CFG
tickTime=2000
dataDir=$work/data
clientPort=$port
clientPortAddress=127.0.0.1
admin.enableServer=false
4lw.commands.whitelist=*
forceSync=yes
maxClientCnxns=0
CFG
java -cp "$JAVA/zookeeper.jar:$JAVA/slf4j-simple.jar" -Dzookeeper.jmx.log4j.disable=true \
  -Dorg.slf4j.simpleLogger.defaultLogLevel=warn \
  org.apache.zookeeper.server.quorum.QuorumPeerMain "$work/zoo.cfg" >"$work/zk.log" 2>&1 &
zk_pid=$!
zk=127.0.0.1:$port
srvr() { (exec 3<>"/dev/tcp/127.0.0.1/$port" && printf srvr >&3 && cat <&3) 2>/dev/null; }
for _ in $(seq 150); do
  if srvr | grep -q Mode; then break; fi
  sleep 0.2
done
srvr | grep -q Mode || { echo "ZooKeeper did not start:"; tail -20 "$work/zk.log"; exit 1; }
zk_version=$(srvr | head -1 | sed 's/.*version: //; s/,.*//; s/-.*//')
echo "{\"meta\":\"zookeeper\",\"value\":\"$zk_version (standalone, forceSync=yes)\"}" >>"$results"

javac -d "$work" -cp "$JAVA/curator-recipes.jar:$JAVA/curator-framework.jar:$JAVA/curator-client.jar:$JAVA/zookeeper.jar" \
  scripts/peers/CuratorBench.java
curator_cp="$work:$JAVA/curator-recipes.jar:$JAVA/curator-framework.jar:$JAVA/curator-client.jar:$JAVA/zookeeper.jar:$JAVA/zookeeper-jute.jar:$JAVA/guava.jar:$JAVA/slf4j-api.jar:$JAVA/slf4j-nop.jar"
curator() { java -cp "$curator_cp" CuratorBench "$zk" "$1" "$DURATION" "$WARMUP" "$2" | tee -a "$results"; }
kazoo() { /usr/bin/python3 scripts/peers/kazoo_bench.py "$zk" "$1" "$DURATION" "$WARMUP" "$2" | tee -a "$results"; }
curator_version=$(basename "$(ls "$JAVA"/curator-recipes-*.jar | head -1)" .jar)
echo "{\"meta\":\"curator\",\"value\":\"${curator_version#curator-recipes-}\"}" >>"$results"
echo "{\"meta\":\"kazoo\",\"value\":\"$(/usr/bin/python3 -c 'import kazoo.version as v; print(v.__version__)')\"}" >>"$results"

for round in $(seq "$ROUNDS"); do
  echo "== ZooKeeper round $round/$ROUNDS"
  load "zookeeper, uncontended" --zk "$zk" --op acquire-release --clients 1 --interleave
  # The same with directory views off (a listing on every acquire): the views' share.
  load "zookeeper, uncontended, views off" --zk "$zk" --op acquire-release --clients 1 --interleave --zk-watched-dirs 0
  # Back to back (Clastor's samples, then the floor's), as the peers run: the
  # like-for-like comparison with Curator and kazoo, whose loops run alone.
  load "zookeeper, uncontended, back to back" --zk "$zk" --op acquire-release --clients 1
  curator uncontended "zookeeper, uncontended"
  kazoo uncontended "zookeeper, uncontended"
  load "zookeeper, hand-over" --zk "$zk" --op handoff --clients 2 --interleave
  curator handoff "zookeeper, hand-over"
  kazoo handoff "zookeeper, hand-over"
  load "zookeeper, 64 connections, distinct keys" --zk "$zk" --op acquire-release --clients 64
done
load "zookeeper, uncontended, depth 1" --zk "$zk" --op acquire-release --sweep "$SWEEP"
load "zookeeper, uncontended, depth 32" --zk "$zk" --op acquire-release --depth 32 --sweep 1,16,64
load "zookeeper, contended, depth 1" --zk "$zk" --op acquire-release --keys shared --sweep "$SWEEP"
kill "$zk_pid" 2>/dev/null || true
wait "$zk_pid" 2>/dev/null || true
zk_pid=

echo "== etcd"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
client_port=$(free_port)
peer_port=$(free_port)
etcd --name perf --data-dir "$work/etcd" \
  --listen-client-urls "http://127.0.0.1:$client_port" --advertise-client-urls "http://127.0.0.1:$client_port" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "perf=http://127.0.0.1:$peer_port" >"$work/etcd.log" 2>&1 &
etcd_pid=$!
etcd_ep=127.0.0.1:$client_port
for _ in $(seq 150); do
  if ETCDCTL_API=3 etcdctl --endpoints "$etcd_ep" endpoint health >/dev/null 2>&1; then break; fi
  sleep 0.2
done
ETCDCTL_API=3 etcdctl --endpoints "$etcd_ep" endpoint health >/dev/null 2>&1 \
  || { echo "etcd did not start:"; tail -20 "$work/etcd.log"; exit 1; }
echo "{\"meta\":\"etcd\",\"value\":\"$(etcd --version | head -1 | sed 's/etcd Version: //') (one member, fsync on)\"}" >>"$results"
for round in $(seq "$ROUNDS"); do
  echo "== etcd round $round/$ROUNDS"
  load "etcd, uncontended" --etcd "$etcd_ep" --op acquire-release --clients 1 --interleave
  load "etcd, uncontended, back to back" --etcd "$etcd_ep" --op acquire-release --clients 1
  load "etcd, hand-over" --etcd "$etcd_ep" --op handoff --clients 2 --interleave
  load "etcd, 16 connections, distinct keys" --etcd "$etcd_ep" --op acquire-release --clients 16
done
kill "$etcd_pid" 2>/dev/null || true
wait "$etcd_pid" 2>/dev/null || true
etcd_pid=

echo "== PostgreSQL"
pgbin=/usr/lib/postgresql/15/bin
pg_port=$(free_port)
mkdir -p "$work/pg/data" "$work/pg/sock"
chmod 755 "$work" # the postgres user must reach its data dir inside (mktemp makes it 0700)
as_pg() { if [ "$(id -u)" = 0 ]; then setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown -R postgres:postgres "$work/pg"
as_pg "$pgbin/initdb" -D "$work/pg/data" -U postgres --auth=trust -E UTF8 --locale=C >"$work/pg.log" 2>&1
# Started without a shell function in between, so $! is postgres itself
# (setpriv execs it) and the clean-up's signal reaches it.
pg_cmd=("$pgbin/postgres" -D "$work/pg/data" -p "$pg_port" -k "$work/pg/sock" -c listen_addresses=127.0.0.1 -c max_connections=200)
if [ "$(id -u)" = 0 ]; then
  setpriv --reuid=postgres --regid=postgres --init-groups -- "${pg_cmd[@]}" >>"$work/pg.log" 2>&1 &
else
  "${pg_cmd[@]}" >>"$work/pg.log" 2>&1 &
fi
pg_pid=$!
for _ in $(seq 150); do
  if "$pgbin/pg_isready" -q -h 127.0.0.1 -p "$pg_port"; then break; fi
  sleep 0.2
done
"$pgbin/pg_isready" -q -h 127.0.0.1 -p "$pg_port" || { echo "PostgreSQL did not start:"; tail -20 "$work/pg.log"; exit 1; }
pg_url="postgres://postgres@127.0.0.1:$pg_port/postgres"
echo "{\"meta\":\"postgres\",\"value\":\"$("$pgbin/postgres" --version | sed 's/postgres (PostgreSQL) //') (fsync on)\"}" >>"$results"
for round in $(seq "$ROUNDS"); do
  echo "== PostgreSQL round $round/$ROUNDS"
  load "postgres, uncontended" --pg "$pg_url" --op acquire-release --clients 1 --interleave
  load "postgres, uncontended, back to back" --pg "$pg_url" --op acquire-release --clients 1
  load "postgres, hand-over" --pg "$pg_url" --op handoff --clients 2 --interleave
  load "postgres, 16 connections, distinct keys" --pg "$pg_url" --op acquire-release --clients 16
done
kill -INT "$pg_pid" 2>/dev/null || true
wait "$pg_pid" 2>/dev/null || true
pg_pid=

echo "== Redis"
redis_port=$(free_port)
mkdir -p "$work/redis"
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work/redis" >"$work/redis.log" 2>&1 &
redis_pid=$!
for _ in $(seq 150); do
  if redis-cli -p "$redis_port" ping 2>/dev/null | grep -q PONG; then break; fi
  sleep 0.2
done
redis-cli -p "$redis_port" ping 2>/dev/null | grep -q PONG || { echo "Redis did not start:"; tail -20 "$work/redis.log"; exit 1; }
redis_url="redis://127.0.0.1:$redis_port"
echo "{\"meta\":\"redis\",\"value\":\"$(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/') (no persistence)\"}" >>"$results"
for round in $(seq "$ROUNDS"); do
  echo "== Redis round $round/$ROUNDS"
  load "redis, uncontended" --redis "$redis_url" --op acquire-release --clients 1 --interleave
  load "redis, uncontended, back to back" --redis "$redis_url" --op acquire-release --clients 1
  load "redis, hand-over" --redis "$redis_url" --op handoff --clients 2 --interleave
  load "redis, 16 connections, distinct keys" --redis "$redis_url" --op acquire-release --clients 16
done

echo "== TLS"
scripts/perf_tls.sh "$clastor" "$results"
echo "{\"meta\":\"load_end\",\"value\":\"$(loadavg)\"}" >>"$results"

echo "== report"
rm -f docs/perf/*.svg
"$clastor" load --chart-from "$results" --chart-dir docs/perf >/dev/null
/usr/bin/python3 scripts/perf_report.py "$results" >PERFORMANCE.md
echo "PERFORMANCE.md and docs/perf/*.svg written; raw results in $results"
