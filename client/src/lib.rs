//! Rust client for Clastor, a distributed lock service with fencing tokens
//! and lost-lock notification.
//!
//! ```no_run
//! use std::time::Duration;
//! use clastor_client::Client;
//!
//! # async fn write_to_store(_: &str, _: u64) {}
//! # #[tokio::main]
//! # async fn main() -> Result<(), clastor_client::Error> {
//! let client = Client::connect("127.0.0.1:7070").await?;
//! match client.lock("transaction", "tx-123").wait(Duration::from_secs(5)).acquire().await? {
//!     Some(guard) => {
//!         // Hand the fencing token to every store you write to; a store that
//!         // rejects tokens lower than the highest it has seen keeps stale
//!         // holders out even if this process stalls past its lock.
//!         tokio::select! {
//!             reason = guard.lost() => eprintln!("lost the lock ({reason}), stopping"),
//!             () = write_to_store("tx-123", guard.token()) => {
//!                 // The fenced write is done and stays done: do not turn the
//!                 // release into an error that makes a caller redo it.
//!                 if let Ok(clastor_client::Released::AlreadyGone(reason)) = guard.release().await {
//!                     eprintln!("the lock was already gone ({reason}); the token fenced the write");
//!                 }
//!             }
//!         }
//!     }
//!     None => println!("someone else holds transaction/tx-123"),
//! }
//! # Ok(()) }
//! ```
//!
//! # Design
//!
//! - **Cheap, shared handle.** [`Client`] is `Clone + Send + Sync`; clone it
//!   into every task. Requests from all clones are pipelined over one
//!   connection (or a small pool, [`ClientBuilder::connections`]): each gets a
//!   request id, replies come back in any order, and a blocked acquire never
//!   holds up a ping. Frames queued while another is being written leave in
//!   the same syscall.
//! - **Tasks of one handle wait for each other.** A key another task of the
//!   same handle holds or is acquiring is waited for, in arrival order among
//!   those tasks, instead of failing with `ALREADY_HELD`. Such a waiter
//!   joins the server's queue only when its turn comes, so a process that
//!   queued at the server meanwhile goes first; a task that must keep strict
//!   arrival order with every other process takes its own owner
//!   ([`Client::new_owner`]).
//! - **Locks belong to connections.** The server releases a connection's locks
//!   when it closes, so a [`LockGuard`] stays tied to the connection that
//!   acquired it. If that connection breaks, every guard on it reports
//!   [`LostReason::ConnectionLost`] at once, pending calls fail with
//!   [`Error::ConnectionLost`], and the client reconnects in the background
//!   (with backoff) for new calls. Nothing is retried behind your back: an
//!   acquire is not idempotent.
//! - **Loss is never silent.** [`LockGuard::lost`] resolves when the server
//!   reports the lock lost (lease expired, backend session expired), when the
//!   connection breaks, or when automatic renewal fails — `select!` on it
//!   around the critical section.
//! - **Errors.** One [`Error`] type, `Clone` (a connection failure is handed
//!   to every waiter) and `#[non_exhaustive]`, with an exhaustive mapping from
//!   the protocol's status codes. Contention is an outcome: an acquire that
//!   does not get the lock returns `Ok(None)`. Only a broken frame (or a reply
//!   that contradicts the client's state) closes the connection; a reply whose
//!   body does not decode fails just its request ([`Error::Malformed`],
//!   [`Error::UnknownStatus`]), and an unknown event is ignored. The client
//!   never panics on what it reads, nor on configured durations.
//! - **Cancellation.** Every async method is cancel-safe. Requests are sent
//!   synchronously when first polled; dropping the future afterwards only
//!   stops waiting for the reply, and a lock granted to an acquire nobody waits
//!   for any more is released at once. Dropping a guard releases its lock in
//!   the background.
//! - **Threading.** Each connection runs a reader task (and a writer task that
//!   only steps in when the socket is full) on the Tokio runtime the client was
//!   created on; connect from within a runtime.

mod backoff;
mod client;
mod config;
mod conn;
mod error;
mod event;
mod lock;
mod multi;
mod reply;
#[cfg(feature = "tls")]
mod tls;
mod transport;

pub use clastor_protocol::{
    DrainState, Event, HeldLock, HeldScope, KindLayout, KindMode, LockMode, Request, Response, ResponseBody, RotateOk,
    RotationHolder, RotationPhase, RotationProgress, Status, VersionInfo,
};
pub use client::{Client, ConnectionInfo};
pub use config::{ClientBuilder, ServerAddr};
pub use error::{Error, LostReason};
pub use event::{ClientEvent, EventStream};
pub use lock::{LockGuard, LockRequest, LostWatch, Released, RetryPolicy};
pub use multi::{MultiLockGuard, MultiLockRequest};
#[cfg(feature = "tls")]
pub use tls::TlsConfig;
