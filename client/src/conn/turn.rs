//! The turns a connection's own tasks take at a key, in arrival order: the
//! per-key table of turns, and [`LocalTurn`], one task's turn. The server
//! sees one owner per connection, so the client orders its tasks itself
//! (`Connection::local_turn`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

use super::key::Key;

/// Per key, the turn its own tasks take, in arrival order; an entry lives
/// while someone has or awaits the turn.
#[derive(Debug, Default)]
pub(super) struct LocalTurns {
    turns: Mutex<HashMap<Key, Arc<Semaphore>>>,
}

impl LocalTurns {
    /// The turn at `key`: at once when nobody has or awaits it, else after
    /// those who came first.
    ///
    /// # Errors
    /// Never in practice: the turns' semaphores are never closed.
    ///
    /// # Cancellation safety
    /// Safe: a turn not yet taken is given up.
    pub(super) async fn take(self: &Arc<Self>, key: &str) -> Result<LocalTurn, AcquireError> {
        let turn = {
            let mut turns = self.lock();
            Arc::clone(
                turns
                    .entry(key.to_owned())
                    .or_insert_with(|| Arc::new(Semaphore::new(1))),
            )
        };
        let permit = turn.acquire_owned().await?;
        Ok(LocalTurn {
            turns: Arc::downgrade(self),
            key: key.to_owned(),
            permit: Some(permit),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Arc<Semaphore>>> {
        self.turns.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One task's turn at a key of its connection: from
/// `Connection::local_turn`, given back (to the next task waiting, in
/// arrival order) when dropped.
#[derive(Debug)]
pub(crate) struct LocalTurn {
    /// The connection's table of turns (gone with the connection).
    turns: Weak<LocalTurns>,
    key: Key,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for LocalTurn {
    fn drop(&mut self) {
        drop(self.permit.take());
        if let Some(table) = self.turns.upgrade() {
            let mut turns = table.lock();
            // Nobody else has or awaits it: forget the key.
            if turns.get(&self.key).is_some_and(|t| Arc::strong_count(t) == 1) {
                turns.remove(&self.key);
            }
        }
    }
}
