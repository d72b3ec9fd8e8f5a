//! Resource-name rules, shared by every interface so a bad name is refused the
//! same way everywhere and never reaches a backend path.

use thiserror::Error;

/// Longest kind or id, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Longest trace id, in bytes: a W3C trace-id (32 lower-case hex digits) fits.
pub const MAX_TRACE_ID_LEN: usize = 32;

/// Why a kind or id was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NameError {
    /// Empty string.
    #[error("{what} is empty")]
    Empty {
        /// `kind` or `id`.
        what: &'static str,
    },
    /// Longer than [`MAX_NAME_LEN`] bytes.
    #[error("{what} is {len} bytes long; the limit is {MAX_NAME_LEN}")]
    TooLong {
        /// `kind` or `id`.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// `.` or `..`, which would be path navigation in hierarchical backends.
    #[error("{what} may not be `.` or `..`")]
    Dot {
        /// `kind` or `id`.
        what: &'static str,
    },
    /// A version name longer than [`MAX_VERSION_LEN`] bytes.
    #[error("{what} is {len} bytes long; the limit for a version is {MAX_VERSION_LEN}")]
    VersionTooLong {
        /// `from` or `to`.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// A version name a backend keeps for itself.
    #[error("{what} may not be `version` or `rotation` (reserved)")]
    Reserved {
        /// `from` or `to`.
        what: &'static str,
    },
    /// A character in a version name that some backend cannot store in a
    /// path (see [`is_path_safe`]).
    #[error(
        "{what} contains {ch:?} at byte {at}: version names may not contain U+E000..U+F8FF, \
         U+FFF0..U+FFFF or characters above U+FFFF (ZooKeeper cannot store them in a path)"
    )]
    VersionChar {
        /// `from` or `to`.
        what: &'static str,
        /// The character.
        ch: char,
        /// Its byte offset.
        at: usize,
    },
    /// A trace id longer than [`MAX_TRACE_ID_LEN`] bytes.
    #[error("trace_id is {len} bytes long; the limit is {MAX_TRACE_ID_LEN}")]
    TraceTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A forbidden character: `/`, NUL, whitespace or another control or
    /// non-printable character.
    #[error("{what} contains forbidden character {ch:?} at byte {at}")]
    BadChar {
        /// `kind` or `id`.
        what: &'static str,
        /// The character.
        ch: char,
        /// Its byte offset.
        at: usize,
    },
}

/// Checks a kind or id against the naming rules: 1 to [`MAX_NAME_LEN`] bytes
/// of printable, non-whitespace characters, no `/`, not `.` or `..`.
///
/// Whitespace is refused so that every valid name can be typed in the text
/// form, where words are separated by spaces.
pub fn validate(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { what, len: name.len() });
    }
    if name == "." || name == ".." {
        return Err(NameError::Dot { what });
    }
    // Nearly every name is printable ASCII: one pass over the bytes settles
    // it; anything else is looked at character by character.
    if name.bytes().all(|b| b > b' ' && b < 0x7f && b != b'/') {
        return Ok(());
    }
    if let Some((at, ch)) = name.char_indices().find(|&(_, c)| !allowed(c)) {
        return Err(NameError::BadChar { what, ch, at });
    }
    Ok(())
}

/// Longest version name, in bytes.
pub const MAX_VERSION_LEN: usize = 64;

/// Version names a backend keeps for its own bookkeeping (ZooKeeper: the
/// kind's `version` node and its `rotation` claim).
pub const RESERVED_VERSIONS: [&str; 2] = ["version", "rotation"];

/// Checks a version name (`ROTATE`'s `from` and `to`): the naming rules of
/// [`validate`], at most [`MAX_VERSION_LEN`] bytes, not one of
/// [`RESERVED_VERSIONS`], and only [path-safe](is_path_safe) characters.
///
/// Kinds and ids may hold any valid character (a backend that cannot store
/// one encodes the name); a version name is stored as it is on every
/// backend, and an operator chooses it, so it is held to the characters
/// every backend stores.
pub fn validate_version(what: &'static str, name: &str) -> Result<(), NameError> {
    validate(what, name)?;
    if name.len() > MAX_VERSION_LEN {
        return Err(NameError::VersionTooLong { what, len: name.len() });
    }
    if RESERVED_VERSIONS.contains(&name) {
        return Err(NameError::Reserved { what });
    }
    if let Some((at, ch)) = name.char_indices().find(|&(_, c)| !is_path_safe(c)) {
        return Err(NameError::VersionChar { what, ch, at });
    }
    Ok(())
}

/// Whether ZooKeeper accepts `c` in a path, of the characters a valid name
/// may hold: it refuses the private-use area U+E000..=U+F8FF,
/// U+FFF0..=U+FFFF, and everything above U+FFFF (which Java stores as
/// UTF-16 surrogates, refused with U+D800..=U+DFFF), besides the control
/// characters that no valid name holds (`PathUtils.validatePath`).
pub fn is_path_safe(c: char) -> bool {
    !matches!(c, '\u{E000}'..='\u{F8FF}' | '\u{FFF0}'..='\u{FFFF}' | '\u{10000}'..)
}

/// Checks a trace id (protocol version 3): 1 to [`MAX_TRACE_ID_LEN`] bytes of
/// ASCII letters, digits, `-`, `_`, `.` and `:`, so it can be logged, listed
/// and typed anywhere as one word.
///
/// # Errors
/// [`NameError`] with `what = "trace_id"`: empty, too long (`TooLong` with the
/// trace limit in its message), or a character outside that set.
pub fn validate_trace_id(trace_id: &str) -> Result<(), NameError> {
    const WHAT: &str = "trace_id";
    if trace_id.is_empty() {
        return Err(NameError::Empty { what: WHAT });
    }
    if trace_id.len() > MAX_TRACE_ID_LEN {
        return Err(NameError::TraceTooLong { len: trace_id.len() });
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
    if let Some((at, ch)) = trace_id.char_indices().find(|&(_, c)| !ok(c)) {
        return Err(NameError::BadChar { what: WHAT, ch, at });
    }
    Ok(())
}

fn allowed(c: char) -> bool {
    // Control characters include NUL, DEL and the C1 range; format characters
    // such as zero-width joiners and bidi overrides are refused too, so a name
    // always prints as what it is.
    !(c == '/'
        || c.is_control()
        || c.is_whitespace()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names_follow_the_name_rules_and_more() {
        assert_eq!(validate_version("to", "v2"), Ok(()));
        assert_eq!(validate_version("to", "2026-11-schema"), Ok(()));
        assert!(matches!(validate_version("to", "../x"), Err(NameError::BadChar { .. })));
        assert!(matches!(validate_version("to", ".."), Err(NameError::Dot { .. })));
        assert!(matches!(validate_version("to", ""), Err(NameError::Empty { .. })));
        assert!(matches!(
            validate_version("to", &"v".repeat(65)),
            Err(NameError::VersionTooLong { len: 65, .. })
        ));
        assert_eq!(
            validate_version("to", "version"),
            Err(NameError::Reserved { what: "to" })
        );
        assert_eq!(
            validate_version("to", "rotation"),
            Err(NameError::Reserved { what: "to" })
        );
        assert_eq!(validate_version("to", "版本-2"), Ok(()));
        for (bad, ch) in [("v\u{E000}", '\u{E000}'), ("v\u{FFFD}", '\u{FFFD}'), ("v🙂", '🙂')] {
            assert!(validate("to", bad).is_ok(), "{bad:?} is a valid name");
            assert_eq!(
                validate_version("to", bad),
                Err(NameError::VersionChar { what: "to", ch, at: 1 })
            );
        }
    }

    #[test]
    fn path_safety_follows_zookeepers_ranges() {
        for c in ['a', '%', '日', '\u{D7FF}', '\u{F900}', '\u{FFEF}'] {
            assert!(is_path_safe(c), "{c:?}");
        }
        for c in [
            '\u{E000}',
            '\u{F8FF}',
            '\u{FFF0}',
            '\u{FFFD}',
            '\u{FFFF}',
            '\u{10000}',
            '🙂',
            '\u{10FFFF}',
        ] {
            assert!(!is_path_safe(c), "{c:?}");
        }
    }

    #[test]
    fn the_ascii_shortcut_agrees_with_the_character_rules() {
        for b in 0u8..=0x7f {
            let c = char::from(b);
            let name = format!("a{c}b");
            assert_eq!(validate("id", &name).is_ok(), allowed(c), "{name:?}");
        }
    }

    #[test]
    fn accepts_ordinary_names() {
        for ok in [
            "transaction",
            "tx-123",
            "a",
            "user:42",
            "日本",
            "x.y",
            "...",
            &"a".repeat(MAX_NAME_LEN),
        ] {
            assert_eq!(validate("id", ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn trace_ids() {
        assert_eq!(validate_trace_id("4bf92f3577b34da6a3ce929d0e0e4736"), Ok(()));
        assert_eq!(validate_trace_id("job-7:step_2.a"), Ok(()));
        assert!(validate_trace_id("").is_err());
        assert!(validate_trace_id(&"a".repeat(MAX_TRACE_ID_LEN + 1)).is_err());
        for bad in ["a b", "a/b", "a\0b", "é", "a\nb"] {
            assert!(validate_trace_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn refuses_hostile_names() {
        assert_eq!(validate("id", ""), Err(NameError::Empty { what: "id" }));
        assert_eq!(validate("id", "."), Err(NameError::Dot { what: "id" }));
        assert_eq!(validate("id", ".."), Err(NameError::Dot { what: "id" }));
        assert!(matches!(
            validate("id", "../etc"),
            Err(NameError::BadChar { ch: '/', at: 2, .. })
        ));
        assert!(matches!(validate("id", "a/b"), Err(NameError::BadChar { ch: '/', .. })));
        assert!(matches!(
            validate("id", "a\0b"),
            Err(NameError::BadChar { ch: '\0', .. })
        ));
        assert!(matches!(validate("id", "a b"), Err(NameError::BadChar { ch: ' ', .. })));
        assert!(matches!(validate("id", "a\nb"), Err(NameError::BadChar { .. })));
        assert!(matches!(validate("id", "\u{202E}abc"), Err(NameError::BadChar { .. })));
        assert!(matches!(
            validate("kind", &"a".repeat(MAX_NAME_LEN + 1)),
            Err(NameError::TooLong { .. })
        ));
    }
}
