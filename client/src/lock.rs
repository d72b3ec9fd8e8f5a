//! The lock API: a request builder, and the guard that owns a grant, knows
//! its fencing token, learns of its loss, renews its lease and releases it.
//!
//! The files, each importing only files before it: `millis` (waits and
//! leases on the wire) ← `renew` (a renewal, the renewal task) ← `guard`
//! ([`LockGuard`], [`Released`], [`LostWatch`]) ← `request`
//! ([`LockRequest`], [`RetryPolicy`], the acquire).

mod guard;
mod millis;
mod renew;
mod request;

pub use guard::{LockGuard, LostWatch, Released};
pub use request::{LockRequest, RetryPolicy};
