//! What a session shows of itself: the locks it holds and the acquires it
//! has waiting, for listings (`HELD`, `/api/v1/locks/held`, the status page,
//! `INFO`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clastor_protocol::LockMode;
use tokio::time::Instant;

use super::{Session, SessionState};
use crate::backend::Backend;
use crate::key::LockKey;

/// One held lock, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldInfo {
    /// The holding session's label (a connection's peer address).
    pub holder: Arc<str>,
    /// The name the holding client gave (binary `HELLO`, HTTP `User-Agent`), if any.
    pub client: Option<Arc<str>>,
    /// How long it has been held.
    pub age: Duration,
    /// The trace id it was acquired with, if any.
    pub trace_id: Option<Arc<str>>,
    /// The lock.
    pub key: LockKey,
    /// Its fencing token.
    pub token: u64,
    /// The token is a capability ([`Session::keep_tokens_private`]): a
    /// listing for anyone but the holder must not show it.
    pub token_private: bool,
    /// Version it was taken under.
    pub version: Arc<str>,
    /// Exclusive or shared.
    pub mode: LockMode,
    /// Lease left, if it has one.
    pub lease_remaining: Option<Duration>,
    /// The holding session.
    pub session: u64,
}

/// One acquire waiting for its lock, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitInfo {
    /// The lock.
    pub key: LockKey,
    /// The waiting session.
    pub session: u64,
    /// The waiting session's label.
    pub holder: Arc<str>,
    /// The name the waiting client gave, if any.
    pub client: Option<Arc<str>>,
    /// How long it has been waiting.
    pub waited: Duration,
    /// The trace id it was sent with, if any.
    pub trace_id: Option<Arc<str>>,
}

impl<B: Backend> Session<B> {
    /// The locks this session holds, ordered by key.
    pub fn held(&self) -> Vec<HeldInfo> {
        self.state.held()
    }

    /// How many locks this session holds.
    pub fn held_count(&self) -> usize {
        self.state.held_len()
    }
}

impl<B: Backend> SessionState<B> {
    /// The acquires of this session waiting for their locks.
    pub(crate) fn waiting(&self) -> Vec<WaitInfo> {
        let now = Instant::now();
        let st = self.lock();
        st.pending
            .iter()
            .filter(|(_, p)| p.waits)
            .map(|(key, p)| WaitInfo {
                key: key.clone(),
                session: self.id,
                holder: self.label.clone(),
                client: self.client.get().cloned(),
                waited: now.saturating_duration_since(p.since),
                trace_id: p.trace_id.clone(),
            })
            .collect()
    }

    pub(crate) fn held_len(&self) -> usize {
        self.lock().held.len()
    }

    pub(crate) fn held(&self) -> Vec<HeldInfo> {
        let now = Instant::now();
        let st = self.lock();
        let mut out: Vec<HeldInfo> = st
            .held
            .iter()
            .map(|(key, h)| HeldInfo {
                holder: self.label.clone(),
                client: self.client.get().cloned(),
                age: now.saturating_duration_since(h.granted_at),
                trace_id: h.trace_id.clone(),
                key: key.clone(),
                token: h.token,
                token_private: self.private_tokens.load(Ordering::Relaxed),
                version: h.version.clone(),
                mode: h.mode,
                lease_remaining: h.lease.as_ref().map(|l| l.deadline.saturating_duration_since(now)),
                session: self.id,
            })
            .collect();
        drop(st);
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }
}
