//! The Redis floors and peer of `clastor load --redis`: what the same Redis
//! does for a lock without Clastor, measured in the same run.
//!
//! - floor, acquire+release: `SET key val NX PX` then `DEL key`, over one
//!   multiplexed connection as Clastor's backend uses — the least any Redis
//!   lock can pay;
//! - floor, hand-over: one connection `PUBLISH`es on a channel another
//!   connection subscribed to; from the publish to the message's arrival
//!   (a Clastor waiter is woken the same way);
//! - reference, minimal fenced lock: the least a lock with fencing tokens
//!   can send to one Redis — one script taking a token (`INCR`) and the
//!   key (`SET NX PX`) atomically, so tokens rise in grant order, then the
//!   compare-and-delete release — run through the bare relay (`relay.rs`)
//!   as any lock server between clients and Redis would: the bound below
//!   which no server-side fenced Redis lock can go;
//! - peer: the plain Redis lock users pick instead of Clastor, written with
//!   the `redis` crate as its docs and countless blog posts show it:
//!   `SET key token NX PX 30000` to take it, and a compare-and-delete Lua
//!   script (`if GET == token then DEL`) to release it, each worker on its
//!   own key — no fencing, no FIFO, no lost-lock events.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use redis::aio::MultiplexedConnection;

use super::relay::{StepFn, step_fn};
use super::{OpFn, op_fn, timed_op_fn};

/// Prefix of the floors' keys and channels.
const FLOOR_PREFIX: &str = "clastor-load-floor";

/// The compare-and-delete release of the plain lock.
const UNLOCK: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// The minimal fenced lock's acquire: a token and the key in one atomic
/// step, so tokens rise in the order the key is granted; the token is the
/// key's value (what the compare-and-delete release checks), 0 if taken.
const FENCED_LOCK: &str = "local t = redis.call('INCR', KEYS[2]) \
if redis.call('SET', KEYS[1], t, 'NX', 'PX', ARGV[1]) then return t end return 0";

async fn connection(url: &str) -> anyhow::Result<(redis::Client, MultiplexedConnection)> {
    let client = redis::Client::open(url).with_context(|| format!("Redis URL {url}"))?;
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("Redis at {url}"))?;
    Ok((client, conn))
}

/// The acquire+release floor (module docs), one key per worker, as its two
/// steps (`relay.rs`): `SET NX PX`, then `DEL`.
pub(super) async fn pair_steps(url: &str) -> anyhow::Result<(String, StepFn)> {
    let (_, conn) = connection(url).await?;
    let run = std::process::id();
    Ok((
        "floor: Redis SET NX PX + DEL (1 connection)".to_owned(),
        step_fn(move |i, step, _| {
            let mut conn = conn.clone();
            async move {
                let key = format!("{FLOOR_PREFIX}:p{run}-{i}");
                if step == 0 {
                    let set: Option<String> = redis::cmd("SET")
                        .arg(&key)
                        .arg("1")
                        .arg("NX")
                        .arg("PX")
                        .arg(30_000)
                        .query_async(&mut conn)
                        .await?;
                    if set.is_none() {
                        bail!("{key} was taken");
                    }
                } else {
                    let _: i64 = redis::cmd("DEL").arg(&key).query_async(&mut conn).await?;
                }
                Ok(0)
            }
        }),
    ))
}

/// The least a fenced lock sends to Redis (module docs), one key per
/// worker, as its two steps (`relay.rs`): the atomic token-and-key script,
/// whose answer is the token (the slot), then the compare-and-delete of
/// that token. What stays in Redis after a run is the token counter (one
/// key for every run); each pair's key goes with its release.
pub(super) async fn minimal_fenced_steps(url: &str) -> anyhow::Result<StepFn> {
    let (_, conn) = connection(url).await?;
    let run = std::process::id();
    let (lock, unlock) = (
        Arc::new(redis::Script::new(FENCED_LOCK)),
        Arc::new(redis::Script::new(UNLOCK)),
    );
    let counter = format!("{FLOOR_PREFIX}:fenced-token");
    Ok(step_fn(move |i, step, slot| {
        let (mut conn, lock, unlock, counter) = (conn.clone(), lock.clone(), unlock.clone(), counter.clone());
        async move {
            let key = format!("{FLOOR_PREFIX}:fenced{run}-{i}");
            if step == 0 {
                let token: i64 = lock.key(&key).key(&counter).arg(30_000).invoke_async(&mut conn).await?;
                if token <= 0 {
                    bail!("{key} was taken");
                }
                Ok(token)
            } else {
                let released: i64 = unlock.key(&key).arg(slot).invoke_async(&mut conn).await?;
                if released != 1 {
                    bail!("{key} was not ours any more");
                }
                Ok(0)
            }
        }
    }))
}

/// Clastor's own Redis work without its server: the `ACQUIRE` and `REMOVE`
/// scripts its backend runs for an uncontended acquire and release, sent
/// straight from the client over one multiplexed connection as the floor
/// is — what the scripts cost beyond `SET NX PX` + `DEL`. Under a prefix of
/// its own: what stays in Redis after a run is that prefix's token counter
/// (one key for every run) and the run's session key, which expires a day
/// later; each pair's queue and index entry go with its `REMOVE`.
pub(super) async fn clastor_scripts(url: &str) -> anyhow::Result<(String, OpFn)> {
    let (_, mut conn) = connection(url).await?;
    let run = std::process::id();
    let prefix = format!("{FLOOR_PREFIX}-scripts");
    let session_prefix = format!("{prefix}:session:");
    let sid = format!("load{run}");
    let secret = format!("load-{run}");
    let _: () = redis::cmd("SET")
        .arg(format!("{session_prefix}{sid}"))
        .arg(&secret)
        .arg("PX")
        .arg(86_400_000)
        .query_async(&mut conn)
        .await?;
    let (acquire, remove) = clastor::backend::redis::lock_scripts();
    let (acquire, remove) = (
        Arc::new(redis::Script::new(&acquire)),
        Arc::new(redis::Script::new(&remove)),
    );
    let names = Arc::new((prefix, session_prefix, sid, secret));
    Ok((
        "reference: Clastor's ACQUIRE + REMOVE scripts alone".to_owned(),
        op_fn(move |i| {
            let (mut conn, acquire, remove, names) = (conn.clone(), acquire.clone(), remove.clone(), names.clone());
            async move {
                let (prefix, session_prefix, sid, secret) = &*names;
                // Ids of this run's own: runs side by side do not queue
                // behind each other.
                let (kind, version, id) = ("load", "v1", format!("k{run}-{i}"));
                let index = format!("{prefix}/{kind}/{version}");
                let queue = format!("{index}/{id}");
                let member = format!("{sid}:{i}");
                let answer: Vec<i64> = acquire
                    .key(format!("{prefix}/{kind}/version"))
                    .key(format!("{prefix}:token"))
                    .key(&queue)
                    .key(&index)
                    .key(format!("{session_prefix}{sid}"))
                    .arg("")
                    .arg(&member)
                    .arg(session_prefix)
                    .arg(&id)
                    .arg(secret)
                    .invoke_async(&mut conn)
                    .await?;
                if answer.first() != Some(&1) {
                    bail!("Clastor's ACQUIRE script did not grant {queue} at once: {answer:?}");
                }
                let removed: i64 = remove
                    .key(&queue)
                    .key(&index)
                    .arg(&member)
                    .arg(&id)
                    .arg(session_prefix)
                    .invoke_async(&mut conn)
                    .await?;
                if removed != 1 {
                    bail!("Clastor's REMOVE script found no contender in {queue}");
                }
                Ok(())
            }
        }),
    ))
}

/// The hand-over floor (module docs): the subscription is made
/// `queue_time` before the publish, as Clastor's waiter queues before the
/// holder releases.
pub(super) async fn handoff_floor(url: &str, queue_time: Duration) -> anyhow::Result<(String, OpFn)> {
    let (client, conn) = connection(url).await?;
    let run = std::process::id();
    let client = Arc::new(client);
    let op = timed_op_fn(move |i| {
        let (client, mut conn) = (client.clone(), conn.clone());
        async move {
            let channel = format!("{FLOOR_PREFIX}:h{run}-{i}");
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            let mut messages = pubsub.into_on_message();
            tokio::time::sleep(queue_time).await;
            let t0 = Instant::now();
            let publish = {
                let channel = channel.clone();
                tokio::spawn(async move {
                    redis::cmd("PUBLISH")
                        .arg(channel)
                        .arg("r")
                        .query_async::<i64>(&mut conn)
                        .await
                })
            };
            if messages.next().await.is_none() {
                bail!("the subscription ended");
            }
            let latency = t0.elapsed();
            publish.await??;
            Ok(latency)
        }
    });
    Ok(("floor: Redis PUBLISH → subscriber".to_owned(), op))
}

/// The plain Redis lock peer (module docs), over one multiplexed connection.
pub(super) async fn plain_lock_peer(url: &str) -> anyhow::Result<(String, OpFn)> {
    let (_, conn) = connection(url).await?;
    let unlock = Arc::new(redis::Script::new(UNLOCK));
    let run = std::process::id();
    let tokens = Arc::new(AtomicU64::new(0));
    Ok((
        "peer: plain Redis lock (SET NX PX + CAS DEL)".to_owned(),
        op_fn(move |i| {
            let (mut conn, unlock, tokens) = (conn.clone(), unlock.clone(), tokens.clone());
            async move {
                let key = format!("{FLOOR_PREFIX}:lock{run}-{i}");
                let token = format!("{run}-{}", tokens.fetch_add(1, Ordering::Relaxed));
                let set: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(30_000)
                    .query_async(&mut conn)
                    .await?;
                if set.is_none() {
                    bail!("{key} was taken");
                }
                let released: i64 = unlock.key(&key).arg(&token).invoke_async(&mut conn).await?;
                if released != 1 {
                    bail!("{key} was not ours any more");
                }
                Ok(())
            }
        }),
    ))
}
