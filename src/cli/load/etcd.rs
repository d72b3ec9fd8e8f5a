//! The etcd floors and peers of `clastor load --etcd`: what the same etcd
//! does for a lock without Clastor, measured in the same run.
//!
//! - floor, acquire+release: a transaction putting a key with a lease and
//!   reading the lock's first contender (the shape of Clastor's acquire),
//!   then a delete — what any etcd lock recipe must pay;
//! - floor, hand-over: one client deletes a key another client watches;
//!   from the delete to the watch event;
//! - peer: etcd's own lock service (`v3lock`, what `etcdctl lock` offers as
//!   a server-side `concurrency.Mutex`): `Lock` then `Unlock`, each worker
//!   on its own lease, as a user picking it instead of Clastor would run it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, LockOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    WatchOptions,
};

use super::relay::{StepFn, step_fn};
use super::{OpFn, op_fn, timed_op_fn};

/// Prefix of the floors' keys.
const FLOOR_PREFIX: &str = "/clastor-load-floor";

/// `n` clients (one HTTP/2 channel each) to `endpoints`.
async fn clients(endpoints: &[String], n: usize) -> anyhow::Result<Vec<Client>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let c = Client::connect(
            endpoints,
            Some(ConnectOptions::new().with_connect_timeout(Duration::from_secs(5))),
        )
        .await
        .with_context(|| format!("etcd at {}", endpoints.join(",")))?;
        out.push(c);
    }
    Ok(out)
}

/// A lease of `ttl` seconds, kept alive until the process ends.
async fn kept_lease(client: &Client, ttl: i64) -> anyhow::Result<i64> {
    let mut leases = client.lease_client();
    let id = leases.grant(ttl, None).await?.id();
    let (mut keeper, mut stream) = leases.keep_alive(id).await?;
    tokio::spawn(async move {
        let every = Duration::from_secs(u64::try_from(ttl).unwrap_or(10) / 3 + 1);
        loop {
            tokio::time::sleep(every).await;
            if keeper.keep_alive().await.is_err() || !matches!(stream.message().await, Ok(Some(_))) {
                return;
            }
        }
    });
    Ok(id)
}

/// The acquire+release floor (module docs), one key per worker, over as
/// many channels as `leases`, as its two steps (`relay.rs`): the
/// transaction, then the delete.
pub(super) async fn pair_steps(endpoints: &[String], channels: usize) -> anyhow::Result<(String, StepFn)> {
    let clients = clients(endpoints, channels.max(1)).await?;
    let mut leases = Vec::with_capacity(clients.len());
    for c in &clients {
        leases.push(kept_lease(c, 30).await?);
    }
    let shared = Arc::new((clients, leases));
    let run = std::process::id();
    let name = format!("floor: etcd txn(put+get)+delete ({} channels)", shared.0.len());
    Ok((
        name,
        step_fn(move |i, step, _| {
            let shared = shared.clone();
            async move {
                let (clients, leases) = &*shared;
                let k = i % clients.len();
                let mut kv = clients[k].kv_client();
                let dir = format!("{FLOOR_PREFIX}/p{run}-c{i}/");
                let key = format!("{dir}{:x}", leases[k]);
                if step == 0 {
                    let txn = Txn::new().and_then([
                        TxnOp::put(key.as_str(), "", Some(PutOptions::new().with_lease(leases[k]))),
                        TxnOp::get(
                            dir.as_str(),
                            Some(
                                GetOptions::new()
                                    .with_prefix()
                                    .with_sort(SortTarget::Create, SortOrder::Ascend)
                                    .with_limit(1)
                                    .with_keys_only(),
                            ),
                        ),
                    ]);
                    kv.txn(txn).await?;
                } else {
                    kv.delete(key, None).await?;
                }
                Ok(0)
            }
        }),
    ))
}

/// The hand-over floor (module docs): the watch is set `queue_time` before
/// the delete, as Clastor's waiter queues before the holder releases.
pub(super) async fn handoff_floor(endpoints: &[String], queue_time: Duration) -> anyhow::Result<(String, OpFn)> {
    let clients = Arc::new(clients(endpoints, 2).await?);
    let run = std::process::id();
    let op = timed_op_fn(move |i| {
        let clients = clients.clone();
        async move {
            let key = format!("{FLOOR_PREFIX}/h{run}-{i}");
            let put = clients[0].kv_client().put(key.as_str(), "", None).await?;
            let rev = put.header().map_or(0, |h| h.revision());
            let mut watch = clients[1]
                .watch_client()
                .watch(key.as_str(), Some(WatchOptions::new().with_start_revision(rev + 1)))
                .await?;
            tokio::time::sleep(queue_time).await;
            let t0 = Instant::now();
            let delete = {
                let mut kv = clients[0].kv_client();
                let key = key.clone();
                tokio::spawn(async move { kv.delete(key, None).await })
            };
            loop {
                match watch.message().await? {
                    Some(resp) if resp.events().iter().any(|e| e.event_type() == EventType::Delete) => break,
                    Some(_) => {}
                    None => bail!("watch ended"),
                }
            }
            let latency = t0.elapsed();
            delete.await??;
            Ok(latency)
        }
    });
    Ok(("floor: etcd delete → watch event".to_owned(), op))
}

/// The `v3lock` peer (module docs): one lease per worker, `Lock` then
/// `Unlock` of the worker's own name.
pub(super) async fn v3lock_peer(endpoints: &[String], workers: usize) -> anyhow::Result<(String, OpFn)> {
    let client = clients(endpoints, 1).await?.remove(0);
    let mut leases = Vec::with_capacity(workers);
    for _ in 0..workers.max(1) {
        leases.push(kept_lease(&client, 30).await?);
    }
    let shared = Arc::new((client, leases));
    let run = std::process::id();
    Ok((
        "peer: etcd v3lock Lock+Unlock".to_owned(),
        op_fn(move |i| {
            let shared = shared.clone();
            async move {
                let (client, leases) = &*shared;
                let mut locks = client.lock_client();
                let name = format!("{FLOOR_PREFIX}/v3lock-{run}-{i}");
                let lease = leases[i % leases.len()];
                let held = locks.lock(name, Some(LockOptions::new().with_lease(lease))).await?;
                locks.unlock(held.key().to_vec()).await?;
                Ok(())
            }
        }),
    ))
}
