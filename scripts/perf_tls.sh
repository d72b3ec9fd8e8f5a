#!/usr/bin/env bash
# The cost of TLS: acquire+release on two `clastor serve` processes (memory
# backend) that differ only in TLS, measured by one `clastor load` with
# --interleave, so plain and TLS samples alternate in the same loops and see
# the same machine. Certificates come from openssl, made here and removed
# after. perf.sh runs it (appending to its results); alone it prints the
# JSON lines.
#
# Usage: scripts/perf_tls.sh [CLASTOR_BIN] [RESULTS_FILE]
# Env:   DURATION (s, default 3), WARMUP (s, default 1), CLIENTS (default "1 16")
set -euo pipefail
cd "$(dirname "$0")/.."

clastor=${1:-target/release/clastor}
results=${2:-/dev/null}
DURATION=${DURATION:-3}
WARMUP=${WARMUP:-1}
CLIENTS=${CLIENTS:-1 16}

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# A CA and a server certificate for 127.0.0.1 (EC P-256, as most deployments).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj "/CN=clastor perf CA" -keyout "$work/ca-key.pem" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
  -keyout "$work/key.pem" -out "$work/req.pem" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$work/ext"
openssl x509 -req -in "$work/req.pem" -CA "$work/ca.pem" -CAkey "$work/ca-key.pem" -CAcreateserial \
  -days 1 -extfile "$work/ext" -out "$work/cert.pem" 2>/dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
serve() { # port, extra flags
  local port=$1
  shift
  "$clastor" serve --listen "127.0.0.1:$port" "$@" 2>"$work/serve-$port.log" &
  pids+=($!)
  for _ in $(seq 100); do
    grep -q listening "$work/serve-$port.log" && return
    sleep 0.05
  done
  echo "clastor serve on $port did not start:" >&2
  cat "$work/serve-$port.log" >&2
  exit 1
}
plain=$(free_port)
serve "$plain"
tls=$(free_port)
serve "$tls" --tls-cert "$work/cert.pem" --tls-key "$work/key.pem"

for n in $CLIENTS; do
  echo "-- memory, TLS vs plain TCP: $n client(s)" >&2
  "$clastor" load --json --scenario "memory, TLS vs plain TCP (two servers)" \
    --server "127.0.0.1:$plain" --tls-server "127.0.0.1:$tls" --tls-ca "$work/ca.pem" \
    --op acquire-release --clients "$n" --interleave \
    --duration "${DURATION}s" --warmup "${WARMUP}s" | tee -a "$results"
done
