//! How a connection names a lock in its tables (held locks, turns, pending
//! releases): `kind/id` in one string.

/// Identifies a lock within a connection: `kind/id` (names cannot contain `/`).
pub(crate) type Key = String;

pub(crate) fn key(kind: &str, id: &str) -> Key {
    let mut k = String::with_capacity(kind.len() + 1 + id.len());
    k.push_str(kind);
    k.push('/');
    k.push_str(id);
    k
}
