#!/usr/bin/env bash
# Builds the `clastor` binary the way the Dockerfile's build stage does, from
# exactly the files its COPY lines bring in, in a clean folder: a source the
# Dockerfile forgets to copy (vendor/ once was) fails here. CI runs it, since
# no Docker engine runs on the CI machine; where one does, `docker build .`
# is the same check.
#
# Usage: scripts/check-docker-build.sh   (CARGO_TARGET_DIR is honoured; by
# default the build's artifacts go to target/docker-check, kept between runs)
set -euo pipefail
cd "$(dirname "$0")/.."
top=$(pwd)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The build stage: from its FROM up to the next FROM, continuation lines
# joined.
stage=$(sed -e ':a' -e '/\\$/N; s/\\\n//; ta' Dockerfile \
  | awk '/^FROM .* AS build/ { on = 1; next } /^FROM / { on = 0 } on')
[ -n "$stage" ] || { echo "no 'FROM ... AS build' stage in Dockerfile" >&2; exit 1; }
# The cargo command of its RUN line, without the BuildKit cache mounts.
build=$(printf '%s\n' "$stage" | grep -oE 'cargo build [^&]*' | head -n 1 | sed 's/ *$//' | tr -s ' ')
[ -n "$build" ] || { echo "no cargo build in the Dockerfile's build stage" >&2; exit 1; }

# The host has protoc; the image's build stage must install its own, or
# etcd-client's build script fails there (and nowhere here).
if ! printf '%s\n' "$stage" | grep -qE '^RUN .*apt-get install .*protobuf-compiler'; then
  echo "the Dockerfile's build stage does not install protobuf-compiler (etcd-client needs protoc)" >&2
  exit 1
fi

copies=0
while read -r _ args; do
  # COPY SRC... DEST (no --from in the build stage; flags are refused).
  case "$args" in --*) echo "unsupported COPY flag: $args" >&2; exit 1 ;; esac
  read -r -a words <<<"$args"
  dest=${words[${#words[@]} - 1]}
  for src in "${words[@]:0:${#words[@]}-1}"; do
    if [ ! -e "$src" ]; then
      echo "Dockerfile copies $src, which does not exist" >&2
      exit 1
    fi
    case "$dest" in
      */|.) mkdir -p "$work/$dest"; cp -a "$src" "$work/$dest" ;;
      *) mkdir -p "$work/$(dirname "$dest")"; cp -a "$src" "$work/$dest" ;;
    esac
    copies=$((copies + 1))
  done
done < <(printf '%s\n' "$stage" | grep -E '^COPY ')
# What .dockerignore keeps out of the build context stays out here too.
rm -rf "$work/target" "$work"/target-* "$work/.git"

echo "== docker build stage, in a clean folder ($copies sources): $build"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$top/target/docker-check}
(cd "$work" && eval "$build")
"$CARGO_TARGET_DIR/release/clastor" --version
