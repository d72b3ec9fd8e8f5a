# syntax=docker/dockerfile:1
# Clastor server image: a multi-stage cargo build, then a slim runtime with
# only the `clastor` binary. Build from the repository root:
#   docker build -t clastor .
# Run against ZooKeeper:
#   docker run -p 8078:8078 clastor serve --listen 0.0.0.0:8078 --backend zookeeper --zk zookeeper:2181
# or etcd:
#   docker run -p 8078:8078 clastor serve --listen 0.0.0.0:8078 --backend etcd --etcd etcd:2379

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# protoc: the etcd backend's client (etcd-client) compiles etcd's .proto
# files when it builds.
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Manifests and sources of every workspace member (the manifests name the
# benches and tests, so those directories must be present too), and the
# patched zookeeper-client that Cargo.toml's [patch.crates-io] points at.
# scripts/check-docker-build.sh builds from exactly these COPY lines in a
# clean folder (CI runs it), so a missing one fails there, not here.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY vendor vendor
COPY protocol protocol
COPY client client
COPY testkit testkit
COPY src src
COPY benches benches
COPY tests tests
# Cache the registry and the target dir between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin clastor \
    && install -m 0755 target/release/clastor /usr/local/bin/clastor

FROM debian:${DEBIAN_RELEASE}-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin clastor
COPY --from=build /usr/local/bin/clastor /usr/local/bin/clastor
USER clastor
# 8078: the lock protocol; 9078: the HTTP port, when turned on (--http / CLASTOR_HTTP);
# 10078: the gRPC API, when turned on (--grpc-listen / CLASTOR_GRPC_LISTEN).
EXPOSE 8078 9078 10078
# Ready when the backend can grant locks. Needs the HTTP port: `clastor
# healthcheck` asks CLASTOR_HTTP's /readyz (the image has no curl).
HEALTHCHECK --interval=5s --timeout=4s --start-period=10s --retries=3 \
    CMD ["clastor", "healthcheck", "--timeout", "3s"]
ENTRYPOINT ["clastor"]
CMD ["serve", "--listen", "0.0.0.0:8078", "--backend", "zookeeper", "--zk", "zookeeper:2181"]
