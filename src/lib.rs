//! Clastor: a distributed lock service with fencing tokens and lost-lock events.
//!
//! This crate is the server and the lock engine. Layers point one way:
//!
//! ```text
//! server (TCP, binary + text) → engine (sessions, leases, limits) → Backend trait ← backends
//! ```
//!
//! - [`backend`]: where locks live. [`backend::memory::MemoryBackend`] for
//!   development and embedding, `backend::zookeeper` for production (feature
//!   `zookeeper`, on by default).
//! - [`Engine`] / [`Session`]: backend-independent lock semantics, usable
//!   in-process ("library mode") with the same tokens and events as over the wire.
//! - [`server`]: the TCP server speaking `clastor-protocol`, and (feature
//!   `http`, on by default) the operators' HTTP port: Prometheus metrics,
//!   health checks, a REST API and a live status page
//!   ([`server::ServerConfig`]'s `http`).
//!
//! Errors: [`LockError`] for lock operations, with one mapping to wire status
//! codes ([`LockError::status`]); backends fail with [`backend::BackendError`].
//! Contention is an outcome (`Ok(None)`), not an error.
//!
//! Cancellation: every async operation is cancel-safe; dropping an acquire
//! withdraws its wait and leaves nothing behind.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), clastor::LockError> {
//! use std::time::Duration;
//! use clastor::{AcquireOptions, Engine, EngineConfig, LockKey, backend::memory::MemoryBackend};
//!
//! let engine = Engine::new(MemoryBackend::new(), EngineConfig::default());
//! let (session, _lost) = engine.open_session("example");
//! let key = LockKey::new("transaction", "tx-123")?;
//! let granted = session.acquire(&key, AcquireOptions::wait(Duration::from_secs(1))).await?;
//! let token = granted.expect("uncontended").token;
//! // ... write to the store with `token` as the fencing token ...
//! assert!(session.release(&key).await?);
//! # let _ = token;
//! # Ok(()) }
//! ```

pub mod backend;
// Only the network backends retry.
#[cfg(any(feature = "zookeeper", feature = "etcd", feature = "postgres", feature = "redis"))]
mod backoff;
mod engine;
mod error;
mod key;
pub mod server;

pub use engine::{
    AcquireOptions, DEFAULT_DRAIN_TIMEOUT, Engine, EngineConfig, EngineObserver, Granted, HeldInfo, HoldEnd, LostEvent,
    LostEvents, Session, SessionInfo, WaitInfo,
};
pub use error::LockError;
pub use key::{LockKey, validate_kind};
