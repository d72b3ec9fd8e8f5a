//! The two things every other file of the backend leans on and that lean on
//! nothing of it: the type of an awaited watch on one of our lock nodes, and
//! how background work (a delete after a cancelled acquire, a view's
//! clean-up) is started. A leaf, so `views`, `session` and `nodes` can all
//! use them without importing each other in a cycle.

use std::future::Future;
use std::pin::Pin;

use tracing::warn;
use zookeeper_client::WatchedEvent;

/// A one-shot ZooKeeper watch on one of our lock nodes, being awaited.
pub(super) type OwnWatch = Pin<Box<dyn Future<Output = WatchedEvent> + Send>>;

/// Runs `f` in the background on the current runtime, if there is one (a
/// guard dropped outside any runtime relies on the session closing instead).
pub(super) fn spawn_background(f: impl Future<Output = ()> + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(f);
        }
        Err(_) => warn!("no tokio runtime for ZooKeeper background work; lock nodes go when their session closes"),
    }
}
