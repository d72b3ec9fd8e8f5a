//! Validated lock keys: a resource kind and an id within it.
//!
//! A key carries its hash, computed once when it is made: the engine's lock
//! tables and the memory backend look a key up several times per request,
//! and hashing two strings with SipHash each time was one of the larger
//! costs of an acquire+release. The stored hash is itself a SipHash with a
//! key drawn at random per process, so maps that take it as is
//! ([`KeyMap`], through [`KeyHasher`]) keep SipHash's resistance to
//! hostile names.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::sync::{Arc, OnceLock};

use clastor_protocol::name::{self, NameError};

/// A lock's key: `(kind, id)`, both checked against the naming rules of
/// [`clastor_protocol::name`] so no backend ever sees a hostile name.
/// Cheap to clone (two reference counts).
///
/// Equality and order are those of `(kind, id)`; [`Hash`] feeds the hasher
/// the key's stored hash (see the module docs).
#[derive(Clone)]
pub struct LockKey {
    hash: u64,
    kind: Arc<str>,
    id: Arc<str>,
}

/// The per-process SipHash key of every [`LockKey`]'s stored hash (and of
/// [`KeyHasher`]'s fallback).
fn sip() -> &'static RandomState {
    static STATE: OnceLock<RandomState> = OnceLock::new();
    STATE.get_or_init(RandomState::new)
}

fn hash_of(kind: &str, id: &str) -> u64 {
    sip().hash_one((kind, id))
}

impl LockKey {
    /// Validates and builds a key.
    ///
    /// # Errors
    /// [`NameError`] if either part breaks the naming rules.
    pub fn new(kind: &str, id: &str) -> Result<LockKey, NameError> {
        name::validate("kind", kind)?;
        name::validate("id", id)?;
        Ok(LockKey {
            hash: hash_of(kind, id),
            kind: kind.into(),
            id: id.into(),
        })
    }

    /// The resource kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The shared kind string (for maps keyed by kind).
    pub fn kind_arc(&self) -> &Arc<str> {
        &self.kind
    }

    /// The resource id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl PartialEq for LockKey {
    fn eq(&self, other: &LockKey) -> bool {
        // Equal keys have equal hashes: a differing hash settles it at once.
        self.hash == other.hash && self.kind == other.kind && self.id == other.id
    }
}

impl Eq for LockKey {}

impl Hash for LockKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialOrd for LockKey {
    fn partial_cmp(&self, other: &LockKey) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for LockKey {
    fn cmp(&self, other: &LockKey) -> Ordering {
        (&self.kind, &self.id).cmp(&(&other.kind, &other.id))
    }
}

/// A hash map keyed by [`LockKey`] that uses the key's stored hash as is.
pub(crate) type KeyMap<V> = HashMap<LockKey, V, KeyHashing>;

/// Builds [`KeyHasher`]s (for maps keyed by [`LockKey`]).
pub(crate) type KeyHashing = BuildHasherDefault<KeyHasher>;

/// Passes a [`LockKey`]'s stored hash through. Meant for maps keyed by
/// `LockKey` alone (whose `Hash` writes one `u64`); anything else written to
/// it goes through a keyed SipHash, so it stays correct if misused.
#[derive(Default)]
pub(crate) struct KeyHasher(Written);

#[derive(Default)]
enum Written {
    #[default]
    Nothing,
    /// One `u64`: a key's stored hash, passed through.
    Hash(u64),
    /// Anything else.
    Other(std::hash::DefaultHasher),
}

impl KeyHasher {
    fn other(&mut self) -> &mut std::hash::DefaultHasher {
        if let Written::Nothing | Written::Hash(_) = self.0 {
            let mut h = sip().build_hasher();
            if let Written::Hash(v) = self.0 {
                h.write_u64(v);
            }
            self.0 = Written::Other(h);
        }
        match &mut self.0 {
            Written::Other(h) => h,
            Written::Nothing | Written::Hash(_) => unreachable!("set just above"),
        }
    }
}

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        match &self.0 {
            Written::Nothing => 0,
            Written::Hash(v) => *v,
            Written::Other(h) => h.finish(),
        }
    }

    fn write_u64(&mut self, v: u64) {
        match self.0 {
            Written::Nothing => self.0 = Written::Hash(v),
            Written::Hash(_) | Written::Other(_) => self.other().write_u64(v),
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.other().write(bytes);
    }
}

impl fmt::Debug for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.id)
    }
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.id)
    }
}

/// Validates a kind on its own (for `VERSION`).
///
/// # Errors
/// [`NameError`] if it breaks the naming rules.
pub fn validate_kind(kind: &str) -> Result<Arc<str>, NameError> {
    name::validate("kind", kind)?;
    Ok(kind.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: &str, id: &str) -> LockKey {
        LockKey::new(kind, id).expect("a valid name")
    }

    #[test]
    fn equal_keys_hash_alike_and_find_each_other_in_a_key_map() {
        let mut map: KeyMap<u32> = KeyMap::default();
        map.insert(key("tx", "a"), 1);
        map.insert(key("tx", "b"), 2);
        map.insert(key("t", "xa"), 3);
        assert_eq!(map.get(&key("tx", "a")), Some(&1));
        assert_eq!(map.get(&key("tx", "b")), Some(&2));
        assert_eq!(map.get(&key("t", "xa")), Some(&3));
        assert_eq!(map.get(&key("tx", "c")), None);
        // The parts are hashed apart: ("tx", "a") is not ("t", "xa").
        assert_ne!(key("tx", "a").hash, key("t", "xa").hash);
        assert_eq!(key("tx", "a").hash, key("tx", "a").hash);
    }

    #[test]
    fn order_and_equality_are_those_of_kind_then_id() {
        assert!(key("a", "z") < key("b", "a"));
        assert!(key("a", "a") < key("a", "b"));
        assert_eq!(key("a", "b"), key("a", "b"));
        assert_ne!(key("a", "b"), key("a", "c"));
    }

    #[test]
    fn the_key_hasher_passes_one_u64_through_and_hashes_anything_else() {
        let one = |v: u64| {
            let mut h = KeyHasher::default();
            h.write_u64(v);
            h.finish()
        };
        assert_eq!(one(7), 7);
        let two = |a: u64, b: u64| {
            let mut h = KeyHasher::default();
            h.write_u64(a);
            h.write_u64(b);
            h.finish()
        };
        assert_eq!(two(1, 2), two(1, 2));
        assert_ne!(two(1, 2), two(2, 1));
        let bytes = |b: &[u8]| {
            let mut h = KeyHasher::default();
            h.write(b);
            h.finish()
        };
        assert_eq!(bytes(b"abc"), bytes(b"abc"));
        assert_ne!(bytes(b"abc"), bytes(b"abd"));
    }
}
