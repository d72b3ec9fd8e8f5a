//! Hooks for whoever watches the engine from outside (the HTTP port's
//! metrics): told of every grant, refusal and end of a hold, with the times
//! a counter cannot reconstruct (how long an acquire waited, how long a lock
//! was held). The engine itself stays free of any metrics library.

use std::fmt::Debug;
use std::time::Duration;

use clastor_protocol::LostReason;

use crate::key::LockKey;

/// How a hold ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldEnd {
    /// Released by its owner (`RELEASE`).
    Released,
    /// Released because its owner's session closed (connection gone, shutdown).
    Closed,
    /// Lost: lease ran out, backend gave the grant up, node deleted.
    Lost(LostReason),
}

/// Receives engine events. Called synchronously on the engine's hot paths
/// (never with a session's table locked): keep it short and never block.
pub trait EngineObserver: Send + Sync + Debug + 'static {
    /// `key` was granted after waiting `waited`.
    fn granted(&self, key: &LockKey, waited: Duration);
    /// An acquire of `key` was not granted within its wait (`waited`).
    fn not_granted(&self, key: &LockKey, waited: Duration);
    /// A hold of `key` ended after `held`.
    fn ended(&self, key: &LockKey, held: Duration, how: HoldEnd);

    /// A rotation of `kind` driven through this engine started draining.
    fn rotation_started(&self, kind: &str) {
        let _ = kind;
    }

    /// A rotation of `kind` driven through this engine ended: `completed`,
    /// `refused`, `aborted` or `failed`; `drained` if it had started
    /// draining (a refused one never did).
    fn rotation_ended(&self, kind: &str, outcome: &'static str, drained: bool) {
        let _ = (kind, outcome, drained);
    }
}
