#!/usr/bin/env bash
# The cost of TLS: acquire+release on two in-process servers (memory
# backend, `clastor load --tls-cert`) that differ only in TLS, measured with
# --interleave, so plain and TLS samples alternate in the same loops and see
# the same machine. (Against servers of your own: `clastor load --server
# PLAIN --tls-server TLS --tls-ca CA.pem --interleave`.) Certificates come from openssl, made here and removed
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
trap 'rm -rf "$work"' EXIT

# A CA and a server certificate for 127.0.0.1 (EC P-256, as most deployments).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj "/CN=clastor perf CA" -keyout "$work/ca-key.pem" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
  -keyout "$work/key.pem" -out "$work/req.pem" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$work/ext"
openssl x509 -req -in "$work/req.pem" -CA "$work/ca.pem" -CAkey "$work/ca-key.pem" -CAcreateserial \
  -days 1 -extfile "$work/ext" -out "$work/cert.pem" 2>/dev/null

for n in $CLIENTS; do
  echo "-- memory, TLS vs plain TCP: $n client(s)" >&2
  "$clastor" load --json --scenario "memory, TLS vs plain TCP" \
    --tls-cert "$work/cert.pem" --tls-key "$work/key.pem" --tls-ca "$work/ca.pem" \
    --op acquire-release --clients "$n" --interleave \
    --duration "${DURATION}s" --warmup "${WARMUP}s" | tee -a "$results"
done
