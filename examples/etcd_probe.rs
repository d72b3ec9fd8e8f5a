#![allow(clippy::unwrap_used, missing_docs)]
use std::time::{Duration, Instant};
use clastor::backend::{AcquireRequest, Backend, LostNotifier};
use clastor::backend::etcd::{EtcdBackend, EtcdConfig};
use clastor::LockKey;
use clastor_protocol::LockMode;

#[tokio::main]
async fn main() {
    let ep = std::env::args().nth(1).unwrap();
    let b = EtcdBackend::connect(EtcdConfig { endpoints: vec![ep], ..EtcdConfig::default() }).await.unwrap();
    let mut acq = vec![]; let mut rel = vec![];
    for i in 0..1500 {
        let key = LockKey::new("probe", &format!("k{}", i % 4)).unwrap();
        let t = Instant::now();
        let g = b.acquire(AcquireRequest { key: &key, wait: Duration::from_secs(5), mode: LockMode::Exclusive, owner: 1, on_lost: LostNotifier::noop() }).await.unwrap().unwrap();
        acq.push(t.elapsed().as_micros());
        let t = Instant::now();
        b.release(g.guard).await.unwrap();
        rel.push(t.elapsed().as_micros());
    }
    for (n, mut v) in [("acquire", acq), ("release", rel)] {
        v.sort();
        println!("{n}: p50 {} p90 {}", v[v.len()/2], v[v.len()*9/10]);
    }
}
