//! The PostgreSQL floors and peer of `clastor load --pg`: what the same
//! database does for a lock without Clastor, measured in the same run.
//!
//! - floor, acquire+release: one `INSERT … RETURNING` and one `DELETE` on
//!   a plain table (no function, no lock, no index but its key), over as
//!   many connections as the server's pool — what any row-based lock must
//!   pay at least;
//! - floor, hand-over: one connection `NOTIFY`s, another `LISTEN`s; from
//!   the send to the wake-up;
//! - reference: Clastor's own `acquire()` and `release()` functions called
//!   straight from here (its SQL, without its server), next to the floor
//!   and the floor through a bare relay (`relay.rs`);
//! - peer: `pg_advisory_lock` then `pg_advisory_unlock` on a connection of
//!   the worker's own, as a user picking advisory locks instead of Clastor
//!   would run them (and with what they do not give: no fencing token, no
//!   safe-until, a lock that vanishes with its connection unannounced).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use tokio_postgres::{AsyncMessage, Client, NoTls, Statement};

use super::relay::{StepFn, step_fn};
use super::{OpFn, op_fn, timed_op_fn};

/// Schema of the floors' table.
const FLOOR_SCHEMA: &str = "clastor_load_floor";

/// A connection driven on a task of its own.
async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("PostgreSQL at {}", clastor::backend::postgres::redact(url)))?;
    tokio::spawn(connection);
    Ok(client)
}

/// The acquire+release floor (module docs) over `connections` clients, as
/// its two steps (`relay.rs`): `INSERT … RETURNING id`, then `DELETE` of
/// that id.
pub(super) async fn pair_steps(url: &str, connections: usize) -> anyhow::Result<(String, StepFn)> {
    let setup = connect(url).await?;
    setup
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {FLOOR_SCHEMA};
             CREATE TABLE IF NOT EXISTS {FLOOR_SCHEMA}.rows (id bigserial PRIMARY KEY, name text NOT NULL)"
        ))
        .await?;
    let mut pool: Vec<(Client, Statement, Statement)> = Vec::with_capacity(connections.max(1));
    for _ in 0..connections.max(1) {
        let c = connect(url).await?;
        let insert = c
            .prepare(&format!(
                "INSERT INTO {FLOOR_SCHEMA}.rows (name) VALUES ($1) RETURNING id"
            ))
            .await?;
        let delete = c
            .prepare(&format!("DELETE FROM {FLOOR_SCHEMA}.rows WHERE id = $1"))
            .await?;
        pool.push((c, insert, delete));
    }
    let pool = Arc::new(pool);
    let name = format!("floor: PostgreSQL INSERT RETURNING + DELETE ({} conns)", pool.len());
    Ok((
        name,
        step_fn(move |i, step, id| {
            let pool = pool.clone();
            async move {
                let (c, insert, delete) = &pool[i % pool.len()];
                if step == 0 {
                    let name = format!("k{i}");
                    Ok(c.query_one(insert, &[&name]).await?.try_get(0)?)
                } else {
                    c.execute(delete, &[&id]).await?;
                    Ok(id)
                }
            }
        }),
    ))
}

/// The schema `clastor load --pg` installs Clastor's tables in (the backend's
/// default).
const CLASTOR_SCHEMA: &str = "clastor";

/// Clastor's own acquire and release statements (`src/backend/postgres/schema.rs`:
/// `{schema}.acquire`, `{schema}.release`), prepared and sent straight to
/// the database, a connection per worker: what Clastor's SQL costs the
/// database without Clastor's server in front of it. The rows belong to a
/// server row of their own, registered here with a day's TTL (the
/// backend's reaper deletes it once it has expired).
pub(super) async fn clastor_sql(url: &str, workers: usize) -> anyhow::Result<(String, OpFn)> {
    let s = CLASTOR_SCHEMA;
    let setup = connect(url).await?;
    let server: i64 = setup
        .query_one(
            &format!(
                "INSERT INTO {s}.servers (name, ttl_ms, expires_at)
                 VALUES ('clastor load: direct SQL', 86400000, now() + interval '1 day') RETURNING id"
            ),
            &[],
        )
        .await
        .context("register a server row for the direct-SQL reference (is Clastor's schema installed?)")?
        .try_get(0)?;
    let mut conns = Vec::with_capacity(workers.max(1));
    for _ in 0..workers.max(1) {
        let c = connect(url).await?;
        // As the server's own connections are set up.
        c.batch_execute(clastor::backend::postgres::SESSION_SETTINGS).await?;
        let acquire = c
            .prepare(&format!(
                "SELECT * FROM {s}.acquire($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            ))
            .await?;
        let release = c.prepare(&format!("SELECT {s}.release($1, $2)")).await?;
        conns.push((c, acquire, release));
    }
    let conns = Arc::new(conns);
    let tags = Arc::new(std::sync::atomic::AtomicI64::new(1));
    Ok((
        format!("reference: Clastor's acquire() + release() SQL alone ({s} schema)"),
        op_fn(move |i| {
            let (conns, tags) = (conns.clone(), tags.clone());
            async move {
                let (c, acquire, release) = &conns[i % conns.len()];
                let tag = tags.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let (kind, version, id, owner) = ("load-sql", "v1", format!("k{i}"), "clastor load");
                let (rev, try_once, shared) = (0i64, false, false);
                let row = c
                    .query_one(
                        acquire,
                        &[&kind, &version, &id, &server, &tag, &owner, &rev, &try_once, &shared],
                    )
                    .await?;
                let (seq, head): (Option<i64>, Option<i64>) = (row.try_get(0)?, row.try_get(1)?);
                if seq.is_none() || seq != head {
                    bail!("Clastor's acquire() did not grant {kind}/{id} at once (seq {seq:?}, head {head:?})");
                }
                let released: bool = c.query_one(release, &[&server, &tag]).await?.try_get(0)?;
                if !released {
                    bail!("Clastor's release() found no row");
                }
                Ok(())
            }
        }),
    ))
}

/// The hand-over floor (module docs): the listener waits `queue_time`
/// before the notification is sent, as Clastor's waiter queues before the
/// holder releases.
pub(super) async fn handoff_floor(url: &str, queue_time: Duration) -> anyhow::Result<(String, OpFn)> {
    let sender = Arc::new(connect(url).await?);
    let (listener, mut connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("PostgreSQL at {}", clastor::backend::postgres::redact(url)))?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notification(n) = m
                && tx.send(n.payload().to_owned()).is_err()
            {
                return;
            }
        }
    });
    let run = std::process::id();
    let channel = format!("clastor_load_{run}");
    listener.batch_execute(&format!("LISTEN {channel}")).await?;
    let notify = sender.prepare("SELECT pg_notify($1, $2)").await?;
    // One listener: samples go one at a time, whatever the worker count.
    let shared = Arc::new((listener, tokio::sync::Mutex::new(rx), notify, channel));
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let op = timed_op_fn(move |i| {
        let (shared, sender) = (shared.clone(), sender.clone());
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async move {
            let (_listener, rx, notify, channel) = &*shared;
            let mut rx = rx.lock().await;
            let payload = format!("h{i}-{n}");
            tokio::time::sleep(queue_time).await;
            let t0 = Instant::now();
            let sent = {
                let (sender, notify, channel, payload) =
                    (sender.clone(), notify.clone(), channel.clone(), payload.clone());
                tokio::spawn(async move { sender.query_one(&notify, &[&channel, &payload]).await })
            };
            loop {
                match rx.recv().await {
                    Some(p) if p == payload => break,
                    Some(_) => {}
                    None => bail!("the LISTEN connection ended"),
                }
            }
            let latency = t0.elapsed();
            sent.await??;
            Ok(latency)
        }
    });
    Ok(("floor: PostgreSQL NOTIFY → LISTEN wake-up".to_owned(), op))
}

/// The `pg_advisory_lock` peer (module docs): a connection per worker,
/// `pg_advisory_lock(k)` then `pg_advisory_unlock(k)` of the worker's own
/// key.
pub(super) async fn advisory_peer(url: &str, workers: usize) -> anyhow::Result<(String, OpFn)> {
    let mut conns = Vec::with_capacity(workers.max(1));
    for _ in 0..workers.max(1) {
        let c = connect(url).await?;
        let lock = c.prepare("SELECT pg_advisory_lock($1)").await?;
        let unlock = c.prepare("SELECT pg_advisory_unlock($1)").await?;
        conns.push((c, lock, unlock));
    }
    let conns = Arc::new(conns);
    let base = i64::from(std::process::id()) << 20;
    Ok((
        "peer: pg_advisory_lock + pg_advisory_unlock".to_owned(),
        op_fn(move |i| {
            let conns = conns.clone();
            async move {
                let (c, lock, unlock) = &conns[i % conns.len()];
                let key = base + i64::try_from(i).unwrap_or(0);
                c.query_one(lock, &[&key]).await?;
                let released: bool = c.query_one(unlock, &[&key]).await?.try_get(0)?;
                if !released {
                    bail!("pg_advisory_unlock found nothing to unlock");
                }
                Ok(())
            }
        }),
    ))
}
