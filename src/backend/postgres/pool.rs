//! The connections: a few pooled `tokio_postgres::Client`s shared by every
//! task (each pipelines the statements sent to it down one connection),
//! their prepared statements, and opening one.
//!
//! A statement sent with a `&str` costs tokio-postgres a round trip to
//! prepare it first; every statement here is prepared once per connection,
//! so an uncontended acquire is one round trip. A connection found closed
//! is replaced when it is next picked.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{Client, Config, Connection, NoTls, Socket, Statement};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::error::{self, BACKOFF, MAX_ATTEMPTS, REQUEST_TIMEOUT};
use super::schema::{SESSION_SETTINGS, Schema};
use crate::backend::BackendError;

/// Where the database is, and how to name it in messages.
#[derive(Debug, Clone)]
pub(super) struct Target {
    pub(super) config: Config,
    /// The URL without its password, for messages and logs.
    pub(super) shown: String,
    pub(super) schema: Schema,
    pub(super) connect_timeout: Duration,
}

/// An open connection: the client and its prepared statements.
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) client: Client,
    pub(super) st: Statements,
}

/// Every prepared statement (their SQL is in `schema.rs`).
#[derive(Debug)]
pub(super) struct Statements {
    pub(super) acquire: Statement,
    pub(super) turn: Statement,
    pub(super) release: Statement,
    pub(super) read_kind: Statement,
    pub(super) set_record: Statement,
    pub(super) count_lock: Statement,
    pub(super) census: Statement,
    pub(super) drop_version: Statement,
    pub(super) claim: Statement,
    pub(super) unclaim: Statement,
    pub(super) reap: Statement,
    pub(super) register: Statement,
    pub(super) heartbeat: Statement,
}

/// Opens a connection (its I/O driven by the returned `Connection`).
///
/// # Errors
/// `Unavailable` naming the database (without its password) if it cannot
/// be reached or refuses us in time.
pub(super) async fn open(target: &Target) -> Result<(Client, Connection<Socket, NoTlsStream>), BackendError> {
    match tokio::time::timeout(target.connect_timeout, target.config.connect(NoTls)).await {
        Ok(Ok(pair)) => Ok(pair),
        Ok(Err(e)) => Err(BackendError::Unavailable(format!(
            "cannot connect to PostgreSQL at {}: {}",
            target.shown,
            e.as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_owned())
        ))),
        Err(_) => Err(BackendError::Unavailable(format!(
            "PostgreSQL at {} did not answer within {:?}",
            target.shown, target.connect_timeout
        ))),
    }
}

/// Opens a connection, drives it on a task of its own, and prepares every
/// statement (pipelined: two round trips' wait).
///
/// # Errors
/// As [`open`]; `Internal` if a statement does not prepare (the schema is
/// not what this version of Clastor installs).
pub(super) async fn connect(target: &Target, role: &'static str) -> Result<Conn, BackendError> {
    let (client, connection) = open(target).await?;
    let shown = target.shown.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(db = %shown, role, error = %e, "PostgreSQL connection ended");
        }
    });
    let sql = target.schema.statements();
    let prepare = |text: &str| {
        let text = text.to_owned();
        let client = &client;
        async move { client.prepare(&text).await }
    };
    let prepared = tokio::time::timeout(target.connect_timeout, async {
        // The settings go first, in the same pipeline: no round trip of their own.
        let ((), acquire, turn, release, read_kind, set_record, count_lock, census) = tokio::try_join!(
            client.batch_execute(SESSION_SETTINGS),
            prepare(&sql.acquire),
            prepare(&sql.turn),
            prepare(&sql.release),
            prepare(&sql.read_kind),
            prepare(&sql.set_record),
            prepare(&sql.count_lock),
            prepare(&sql.census),
        )?;
        let (drop_version, claim, unclaim, reap, register, heartbeat) = tokio::try_join!(
            prepare(&sql.drop_version),
            prepare(&sql.claim),
            prepare(&sql.unclaim),
            prepare(&sql.reap),
            prepare(&sql.register),
            prepare(&sql.heartbeat),
        )?;
        Ok::<_, tokio_postgres::Error>(Statements {
            acquire,
            turn,
            release,
            read_kind,
            set_record,
            count_lock,
            census,
            drop_version,
            claim,
            unclaim,
            reap,
            register,
            heartbeat,
        })
    })
    .await;
    match prepared {
        Ok(Ok(st)) => Ok(Conn { client, st }),
        Ok(Err(e)) if error::transient(&e) => Err(error::backend_error("prepare statements", &e)),
        Ok(Err(e)) => Err(BackendError::Internal(format!(
            "PostgreSQL at {}: cannot prepare Clastor's statements in schema {}: {}",
            target.shown,
            target.schema.name,
            e.as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_owned())
        ))),
        Err(_) => Err(BackendError::Unavailable(format!(
            "PostgreSQL at {} did not prepare statements within {:?}",
            target.shown, target.connect_timeout
        ))),
    }
}

/// The pooled connections.
#[derive(Debug)]
pub(super) struct Pool {
    target: Target,
    slots: Vec<Slot>,
    next: AtomicUsize,
    closed: CancellationToken,
}

#[derive(Debug)]
struct Slot {
    conn: Mutex<Option<Arc<Conn>>>,
    /// Held while the slot reconnects, so one task does it.
    reconnect: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Pool {
    /// Opens `size` connections (at least one).
    ///
    /// # Errors
    /// As [`connect`].
    pub(super) async fn open(target: Target, size: usize) -> Result<Pool, BackendError> {
        let mut slots = Vec::with_capacity(size.max(1));
        for _ in 0..size.max(1) {
            let conn = connect(&target, "pool").await?;
            slots.push(Slot {
                conn: Mutex::new(Some(Arc::new(conn))),
                reconnect: tokio::sync::Mutex::new(()),
            });
        }
        Ok(Pool {
            target,
            slots,
            next: AtomicUsize::new(0),
            closed: CancellationToken::new(),
        })
    }

    pub(super) fn target(&self) -> &Target {
        &self.target
    }

    /// The number of pooled connections.
    pub(super) fn size(&self) -> usize {
        self.slots.len()
    }

    /// How many pooled connections are open now.
    pub(super) fn open_count(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| lock(&s.conn).as_ref().is_some_and(|c| !c.client.is_closed()))
            .count()
    }

    /// A connection, a closed one replaced first: the slots in turn, or
    /// with `affinity` always the same slot for the same value (every
    /// statement of one lock on one connection: they stay in order, and a
    /// lone client keeps one database backend busy instead of waking
    /// several in turn).
    ///
    /// # Errors
    /// [`BackendError::Closed`] after [`Pool::close`]; `Unavailable` if a
    /// closed connection cannot be replaced.
    pub(super) async fn get(&self, affinity: Option<u64>) -> Result<Arc<Conn>, BackendError> {
        if self.closed.is_cancelled() {
            return Err(BackendError::Closed);
        }
        let n = affinity.unwrap_or_else(|| u64::try_from(self.next.fetch_add(1, Ordering::Relaxed)).unwrap_or(0));
        let slot = &self.slots[usize::try_from(n % self.slots.len() as u64).unwrap_or(0)];
        if let Some(c) = lock(&slot.conn).as_ref().filter(|c| !c.client.is_closed()) {
            return Ok(c.clone());
        }
        // Boxed: opening a connection (prepares included) is a future of
        // several KiB, which every statement's future would otherwise carry
        // and copy on every move.
        Box::pin(self.reopen(slot)).await
    }

    /// [`Pool::get`]'s slow path: `slot`'s connection is missing or closed.
    async fn reopen(&self, slot: &Slot) -> Result<Arc<Conn>, BackendError> {
        let _one = slot.reconnect.lock().await;
        if let Some(c) = lock(&slot.conn).as_ref().filter(|c| !c.client.is_closed()) {
            return Ok(c.clone());
        }
        let conn = tokio::select! {
            () = self.closed.cancelled() => return Err(BackendError::Closed),
            c = connect(&self.target, "pool") => Arc::new(c?),
        };
        info!(db = %self.target.shown, "PostgreSQL pool connection reopened");
        *lock(&slot.conn) = Some(conn.clone());
        Ok(conn)
    }

    /// Later [`Pool::get`]s fail with `Closed`; the connections close once
    /// the last statement using them is done.
    pub(super) fn close(&self) {
        self.closed.cancel();
        for s in &self.slots {
            lock(&s.conn).take();
        }
    }

    /// Runs `op` under the retry policy (module docs), on a connection from
    /// the pool per attempt. `what` names the statement in the error.
    ///
    /// # Errors
    /// The last attempt's error, as a [`BackendError`]; [`BackendError::Closed`]
    /// once the pool is closed.
    pub(super) async fn retry<T, F, Fut>(&self, what: &str, op: F) -> Result<T, BackendError>
    where
        F: FnMut(Arc<Conn>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        self.retry_on(None, what, op).await
    }

    /// [`Pool::retry`] on the connection of `affinity` ([`Pool::get`]).
    ///
    /// # Errors
    /// As [`Pool::retry`].
    pub(super) async fn retry_on<T, F, Fut>(
        &self,
        affinity: Option<u64>,
        what: &str,
        mut op: F,
    ) -> Result<T, BackendError>
    where
        F: FnMut(Arc<Conn>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let mut backoff = BACKOFF;
        let mut attempt = 1;
        loop {
            let error = match self.get(affinity).await {
                Err(BackendError::Closed) => return Err(BackendError::Closed),
                Err(e) if attempt < MAX_ATTEMPTS => e.to_string(),
                Err(e) => return Err(e),
                Ok(conn) => match tokio::time::timeout(REQUEST_TIMEOUT, op(conn)).await {
                    Ok(Ok(v)) => return Ok(v),
                    Ok(Err(e)) if error::transient(&e) && attempt < MAX_ATTEMPTS => e.to_string(),
                    Ok(Err(e)) => return Err(error::backend_error(what, &e)),
                    Err(_) if attempt < MAX_ATTEMPTS => format!("no answer within {REQUEST_TIMEOUT:?}"),
                    Err(_) => {
                        return Err(BackendError::Unavailable(format!(
                            "PostgreSQL: {what}: no answer within {REQUEST_TIMEOUT:?}, {MAX_ATTEMPTS} times"
                        )));
                    }
                },
            };
            tracing::debug!(what, attempt, %error, "PostgreSQL statement failed; retrying");
            backoff.sleep().await;
            attempt += 1;
        }
    }

    /// Runs `op` once on a pooled connection, bounded by
    /// [`REQUEST_TIMEOUT`], for statements that must not be blindly re-sent.
    ///
    /// # Errors
    /// Its error, or `Unavailable` on timeout.
    pub(super) async fn once<T, F, Fut>(&self, affinity: Option<u64>, what: &str, op: F) -> Result<T, BackendError>
    where
        F: FnOnce(Arc<Conn>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let conn = self.get(affinity).await?;
        match tokio::time::timeout(REQUEST_TIMEOUT, op(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(error::backend_error(what, &e)),
            Err(_) => Err(BackendError::Unavailable(format!(
                "PostgreSQL: {what}: no answer within {REQUEST_TIMEOUT:?}"
            ))),
        }
    }
}
