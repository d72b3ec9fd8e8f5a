#!/usr/bin/env bash
# Server CPU while many connections each hold one lock (safe-until keeps every
# holder confirming): starts `clastor serve` (memory backend) from the given
# binary, holds N locks on N connections for SECS seconds with the
# `hold_many` client example, and prints the server's CPU use over that time.
#
# Usage: scripts/hold_many_cpu.sh [CLASTOR_BIN] [N] [SECS]
#   CLASTOR_BIN defaults to target/release/clastor (build it first).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/clastor}
n=${2:-10000}
secs=${3:-20}
# Each process (server, client) needs a descriptor per connection.
want=$((n + 1024))
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
  echo "open-file limit $hard is below the $want needed for $n connections" >&2
  exit 1
fi
ulimit -n "$want"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin" serve --listen "127.0.0.1:$port" --max-connections $((n + 100)) >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
cargo build --release -q -p clastor-client --example hold_many
ticks() { awk '{ print $14 + $15 }' "/proc/$server/stat"; }
hz=$(getconf CLK_TCK)
{
  read -r line                      # ready
  start=$(ticks); t0=$(date +%s.%N)
  read -r line                      # done
  end=$(ticks); t1=$(date +%s.%N)
  awk -v a="$start" -v b="$end" -v t0="$t0" -v t1="$t1" -v hz="$hz" -v n="$n" \
    'BEGIN { s = t1 - t0; printf "server CPU with %d held locks: %.1f%% of one core over %.1f s\n", n, 100 * (b - a) / hz / s, s }'
} < <(target/release/examples/hold_many "127.0.0.1:$port" "$n" "$secs")
