//! ZooKeeper backend latency against the floor: a raw `create` +
//! `delete` of an ephemeral-sequential node on one session, versus the
//! backend's uncontended `acquire` + `release` (pipelined create / version
//! read / listing, then one delete) on the same ZooKeeper, plus the same
//! pair with 16 lock/unlock loops in flight over the session pool.
//!
//! The ZooKeeper comes from `clastor-testkit` (Debian's package) with
//! `forceSync=yes`, like a production server. Before criterion's runs, a
//! plain pass prints p50/p99 of each pair so the numbers can be compared
//! with DESIGN.md's floors directly.
//!
//! Needs `[[bench]] name = "zookeeper" harness = false` in Cargo.toml.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use clastor::LockKey;
use clastor::backend::zookeeper::{ZkConfig, ZooKeeperBackend};
use clastor::backend::{AcquireRequest, Backend, LostNotifier};
use clastor_protocol::LockMode;
use clastor_testkit::ZooKeeper;
use criterion::{Criterion, criterion_group, criterion_main};
use hdrhistogram::Histogram;
use zookeeper_client::{Acls, Client, CreateMode};

struct Setup {
    _zk: ZooKeeper,
    rt: tokio::runtime::Runtime,
    raw: Client,
    backend: Arc<ZooKeeperBackend>,
}

fn setup() -> Setup {
    let zk = ZooKeeper::builder().force_sync(true).start().expect("start ZooKeeper");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (raw, backend) = rt.block_on(async {
        let raw = Client::connect(&zk.connect_string()).await.unwrap();
        raw.mkdir("/bench/raw", &CreateMode::Persistent.with_acls(Acls::anyone_all()))
            .await
            .unwrap();
        let backend = ZooKeeperBackend::connect(ZkConfig {
            hosts: zk.connect_string(),
            provider: "bench".into(),
            ..ZkConfig::default()
        })
        .await
        .unwrap();
        (raw, Arc::new(backend))
    });
    Setup {
        _zk: zk,
        rt,
        raw,
        backend,
    }
}

async fn raw_pair(raw: &Client) {
    let options = CreateMode::EphemeralSequential.with_acls(Acls::anyone_all());
    let (_, seq) = raw.create("/bench/raw/lock-", b"", &options).await.unwrap();
    raw.delete(&format!("/bench/raw/lock-{seq}"), None).await.unwrap();
}

async fn backend_pair(backend: &ZooKeeperBackend, key: &LockKey) {
    let req = AcquireRequest {
        key,
        wait: Duration::ZERO,
        mode: LockMode::Exclusive,
        owner: 1,
        on_lost: LostNotifier::noop(),
    };
    let grant = backend.acquire(req).await.unwrap().expect("uncontended");
    backend.release(grant.guard).await.unwrap();
}

fn report(name: &str, h: &Histogram<u64>) {
    println!(
        "{name:<40} p50 {:>6} µs  p99 {:>6} µs  (n={})",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.len()
    );
}

/// Plain latency pass: p50/p99 of each pair, one at a time.
fn percentiles(s: &Setup) {
    let key = LockKey::new("bench", "p50").unwrap();
    s.rt.block_on(async {
        for _ in 0..200 {
            raw_pair(&s.raw).await;
            backend_pair(&s.backend, &key).await;
        }
        let mut raw = Histogram::<u64>::new(3).unwrap();
        let mut ours = Histogram::<u64>::new(3).unwrap();
        for _ in 0..2_000 {
            let t = Instant::now();
            raw_pair(&s.raw).await;
            raw.saturating_record(t.elapsed().as_micros() as u64);
            let t = Instant::now();
            backend_pair(&s.backend, &key).await;
            ours.saturating_record(t.elapsed().as_micros() as u64);
        }
        report("raw create+delete (one session)", &raw);
        report("backend acquire+release (uncontended)", &ours);
    });
}

fn benches(c: &mut Criterion) {
    let s = setup();
    percentiles(&s);
    let key = LockKey::new("bench", "criterion").unwrap();
    let keys: Vec<LockKey> = (0..16)
        .map(|i| LockKey::new("bench", &format!("par-{i}")).unwrap())
        .collect();
    let mut group = c.benchmark_group("zookeeper");
    group.sample_size(50).measurement_time(Duration::from_secs(10));
    group.bench_function("raw_create_delete", |b| b.to_async(&s.rt).iter(|| raw_pair(&s.raw)));
    group.bench_function("backend_acquire_release", |b| {
        b.to_async(&s.rt).iter(|| backend_pair(&s.backend, &key))
    });
    // 16 independent keys in flight: throughput of the pool (time is per 16 pairs).
    group.bench_function("backend_acquire_release_x16", |b| {
        b.to_async(&s.rt).iter(|| async {
            futures_util::future::join_all(keys.iter().map(|k| backend_pair(&s.backend, k))).await;
        })
    });
    group.finish();
    s.rt.block_on(s.backend.shutdown());
}

criterion_group!(zookeeper, benches);
criterion_main!(zookeeper);
