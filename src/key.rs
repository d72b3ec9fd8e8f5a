//! Validated lock keys: a resource kind and an id within it.

use std::fmt;
use std::sync::Arc;

use clastor_protocol::name::{self, NameError};

/// A lock's key: `(kind, id)`, both checked against the naming rules of
/// [`clastor_protocol::name`] so no backend ever sees a hostile name.
/// Cheap to clone (two reference counts).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockKey {
    kind: Arc<str>,
    id: Arc<str>,
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
