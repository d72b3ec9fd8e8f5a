//! One TCP connection to a server: the handshake, request submission, the
//! reader task that routes replies and events, keepalive, and teardown.
//!
//! Why it is built this way, and where:
//! - **Writes are combined, not queued to a task** (`outbound.rs`,
//!   `submit.rs`): a caller encodes its frame into a shared buffer under a
//!   short mutex and, if nobody is writing, sends the batch itself; a writer
//!   task (`writer.rs`) steps in only when the socket is full.
//! - **One reader task** (`reader.rs`) completes the matching pending request
//!   (`pending.rs`), registers each grant in the table of held locks
//!   (`held.rs`) before handing it over as a [`PendingGrant`], and routes
//!   events. **Only a broken frame is fatal**, and **teardown happens in one
//!   place**, when the reader stops.
//! - **One grant per key and connection** (`held.rs`), and, among the tasks
//!   sharing the connection, one turn per key in arrival order (`turn.rs`).
//!
//! The files, each importing only files before it: `key`, `turn` ← `grant`
//! (one held grant: token, loss, safe-until) ← `held` ← `pending`;
//! `outbound` ← `connection` ([`Connection`](connection::Connection) and its
//! [`State`](connection::State) under one mutex, the [`Conn`] handle) ←
//! `submit` (sending: requests, releases, the inline write) ← `writer`,
//! `reader`, `keepalive`, `confirm` (the connection's tasks) ← `connect`
//! (the handshake, which builds the connection and spawns its tasks).

mod confirm;
mod connect;
mod connection;
mod grant;
mod held;
mod keepalive;
mod key;
mod outbound;
mod pending;
mod reader;
mod submit;
mod turn;
mod writer;

pub(crate) use connect::connect;
pub(crate) use connection::Conn;
pub(crate) use grant::HeldGrant;
pub(crate) use key::key;
pub(crate) use pending::{HeldUpdate, PendingGrant, Reply};
