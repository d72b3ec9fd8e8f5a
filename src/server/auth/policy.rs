//! The auth file: principals, their credentials and their grants, parsed
//! and checked as a whole (a file with one bad entry is refused whole, so a
//! reload never half-applies).
//!
//! ```toml
//! [[principal]]
//! name = "billing"
//! token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! [principal.grants]
//! transaction = ["acquire", "read"]
//! "*" = ["read"]
//!
//! [[principal]]
//! name = "ops"
//! cert = "ops.clastor.internal"     # an mTLS client certificate's CN or DNS name
//! [principal.grants]
//! "*" = ["acquire", "shared", "read", "rotate", "admin"]
//! ```
//!
//! The file holds no secret: a token is stored as the hex SHA-256 of its
//! bytes (`clastor auth hash-token`). Tokens are matched by comparing the
//! offered token's digest with every principal's in constant time, with no
//! early exit, so neither which principal nor how much matched shows in the
//! time an `AUTH` takes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use clastor_protocol::name;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};

use super::{AuthError, Permission};

/// Longest principal name.
const MAX_PRINCIPAL_LEN: usize = 64;

/// What the file says, before it is checked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    #[serde(default, rename = "principal")]
    principals: Vec<PrincipalSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalSpec {
    name: String,
    #[serde(default)]
    token_sha256: Option<String>,
    #[serde(default)]
    cert: Option<String>,
    #[serde(default)]
    grants: BTreeMap<String, Vec<Permission>>,
}

/// A set of permissions (bit per [`Permission`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Perms(u8);

impl Perms {
    fn with(self, p: Permission) -> Perms {
        Perms(self.0 | (1 << p as u8))
    }

    fn has(self, p: Permission) -> bool {
        self.0 & (1 << p as u8) != 0
    }
}

/// One principal, checked. No `Debug`: its digest stays out of any log.
struct Principal {
    name: Arc<str>,
    /// SHA-256 of its token, if it has one.
    digest: Option<[u8; 32]>,
    /// Per exact kind name.
    kinds: HashMap<String, Perms>,
    /// For every kind (`"*"`).
    any: Perms,
}

/// A checked auth file: who may do what.
pub(crate) struct AuthPolicy {
    principals: Vec<Principal>,
    by_name: HashMap<Arc<str>, usize>,
    by_cert: HashMap<String, usize>,
}

impl std::fmt::Debug for AuthPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: digests never reach a log, even through `?`.
        f.debug_struct("AuthPolicy")
            .field("principals", &self.by_name.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// SHA-256 of a token, as the file stores it.
pub(crate) fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Lower-case hex of a digest.
pub(crate) fn to_hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl AuthPolicy {
    /// Parses and checks the file's text.
    ///
    /// # Errors
    /// [`AuthError::Invalid`] with the line of a syntax error (never the
    /// line itself) or the rule an entry breaks.
    pub(crate) fn parse(text: &str) -> Result<AuthPolicy, AuthError> {
        let spec: FileSpec = toml::from_str(text).map_err(|e| {
            // Only the position and the parser's words: the file's lines
            // (digests) stay out of logs.
            let line = e
                .span()
                .map_or(0, |s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            AuthError::Invalid(format!("line {line}: {}", e.message().trim()))
        })?;
        let mut policy = AuthPolicy {
            principals: Vec::with_capacity(spec.principals.len()),
            by_name: HashMap::new(),
            by_cert: HashMap::new(),
        };
        let mut digests: HashMap<[u8; 32], ()> = HashMap::new();
        for p in spec.principals {
            let bad = |why: String| AuthError::Invalid(format!("principal {:?}: {why}", p.name));
            if p.name.is_empty()
                || p.name.len() > MAX_PRINCIPAL_LEN
                || !p.name.chars().all(|c| c.is_ascii_graphic() && c != '/')
            {
                return Err(bad(format!(
                    "a name is 1 to {MAX_PRINCIPAL_LEN} printable ASCII characters without spaces or '/'"
                )));
            }
            if p.token_sha256.is_none() && p.cert.is_none() {
                return Err(bad("needs token_sha256, cert, or both".into()));
            }
            let digest = match &p.token_sha256 {
                Some(hex) => {
                    let d = from_hex(&hex.to_ascii_lowercase())
                        .ok_or_else(|| bad("token_sha256 must be 64 hex digits (clastor auth hash-token)".into()))?;
                    if digests.insert(d, ()).is_some() {
                        return Err(bad("another principal has the same token".into()));
                    }
                    Some(d)
                }
                None => None,
            };
            let mut kinds = HashMap::new();
            let mut any = Perms::default();
            for (pattern, perms) in &p.grants {
                let set = perms.iter().fold(Perms::default(), |s, &p| s.with(p));
                if pattern == "*" {
                    any = set;
                    continue;
                }
                name::validate("kind", pattern).map_err(|e| bad(format!("grant {pattern:?}: {e}")))?;
                if set.has(Permission::Admin) {
                    return Err(bad(format!(
                        "grant {pattern:?}: admin is server-wide; grant it under \"*\""
                    )));
                }
                kinds.insert(pattern.clone(), set);
            }
            let name: Arc<str> = p.name.as_str().into();
            let index = policy.principals.len();
            if policy.by_name.insert(name.clone(), index).is_some() {
                return Err(bad("the name is used twice".into()));
            }
            if let Some(cert) = &p.cert {
                if cert.is_empty() {
                    return Err(bad("cert must name a certificate's CN or DNS name".into()));
                }
                if policy.by_cert.insert(cert.clone(), index).is_some() {
                    return Err(bad(format!("another principal has cert {cert:?}")));
                }
            }
            policy.principals.push(Principal {
                name,
                digest,
                kinds,
                any,
            });
        }
        Ok(policy)
    }

    /// How many principals the file names.
    pub(crate) fn len(&self) -> usize {
        self.principals.len()
    }

    /// The principal whose token this is. Every principal's digest is
    /// compared, in constant time and with no early exit.
    pub(crate) fn authenticate(&self, token: &str) -> Option<Arc<str>> {
        let offered = digest(token);
        let mut found = Choice::from(0);
        let mut index = 0u32;
        for (i, p) in self.principals.iter().enumerate() {
            let Some(d) = &p.digest else { continue };
            let matched = d.ct_eq(&offered);
            index.conditional_assign(&u32::try_from(i).unwrap_or(u32::MAX), matched);
            found |= matched;
        }
        bool::from(found)
            .then(|| self.principals.get(index as usize).map(|p| p.name.clone()))
            .flatten()
    }

    /// The principal an mTLS certificate name maps to.
    pub(crate) fn principal_for_cert(&self, cert_name: &str) -> Option<Arc<str>> {
        self.by_cert.get(cert_name).map(|&i| self.principals[i].name.clone())
    }

    /// Whether `principal` may do `perm` (on `kind`, for the per-kind ones).
    /// A principal the file no longer names may do nothing. `acquire`
    /// includes `shared`.
    pub(crate) fn allows(&self, principal: &str, perm: Permission, kind: Option<&str>) -> bool {
        let Some(p) = self.by_name.get(principal).map(|&i| &self.principals[i]) else {
            return false;
        };
        let set = match kind.and_then(|k| p.kinds.get(k)) {
            Some(exact) => Perms(exact.0 | p.any.0),
            None => p.any,
        };
        set.has(perm) || (perm == Permission::Shared && set.has(Permission::Acquire))
    }

    /// Whether the principal is still in the file.
    pub(crate) fn knows(&self, principal: &str) -> bool {
        self.by_name.contains_key(principal)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn file(entries: &str) -> Result<AuthPolicy, AuthError> {
        AuthPolicy::parse(entries)
    }

    #[test]
    fn tokens_map_to_principals_and_grants_apply_per_kind() {
        let text = format!(
            r#"
[[principal]]
name = "billing"
token_sha256 = "{}"
[principal.grants]
transaction = ["acquire"]
"*" = ["read"]

[[principal]]
name = "ops"
token_sha256 = "{}"
cert = "ops.example"
[principal.grants]
"*" = ["admin", "rotate"]
"#,
            to_hex(&digest("b-token")),
            to_hex(&digest("o-token")).to_uppercase()
        );
        let p = file(&text).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p.authenticate("b-token").as_deref(), Some("billing"));
        assert_eq!(p.authenticate("o-token").as_deref(), Some("ops"));
        assert_eq!(p.authenticate("nope"), None);
        assert_eq!(p.authenticate(""), None);
        assert_eq!(p.principal_for_cert("ops.example").as_deref(), Some("ops"));
        assert!(!format!("{p:?}").contains(&to_hex(&digest("b-token"))), "{p:?}");
        assert_eq!(p.principal_for_cert("billing"), None);
        assert!(p.allows("billing", Permission::Acquire, Some("transaction")));
        assert!(p.allows("billing", Permission::Shared, Some("transaction")));
        assert!(!p.allows("billing", Permission::Acquire, Some("user")));
        assert!(p.allows("billing", Permission::Read, Some("user")));
        assert!(!p.allows("billing", Permission::Admin, None));
        assert!(p.allows("ops", Permission::Admin, None));
        assert!(!p.allows("ops", Permission::Acquire, Some("transaction")));
        assert!(!p.allows("ghost", Permission::Read, Some("transaction")));
    }

    #[test]
    fn bad_files_are_refused_whole_without_echoing_lines() {
        let digest = to_hex(&digest("t"));
        for (text, why) in [
            ("[[principal]]\nname = \"a\"\n", "needs token_sha256"),
            ("[[principal]]\nname = \"a\"\ntoken_sha256 = \"abc\"\n", "64 hex"),
            ("[[principal]]\nname = \"\"\ncert = \"x\"\n", "a name is"),
            (
                "[[principal]]\nname = \"a\"\ncert = \"x\"\n[principal.grants]\nuser = [\"admin\"]\n",
                "server-wide",
            ),
            (
                "[[principal]]\nname = \"a\"\ncert = \"x\"\n[principal.grants]\nuser = [\"fly\"]\n",
                "line",
            ),
            ("[[principal]]\nname = \"a\"\ncert = \"x\"\ncolour = 1\n", "line 4"),
        ] {
            let err = file(text).unwrap_err().to_string();
            assert!(err.contains(why), "{text:?}: {err}");
        }
        let twice = format!(
            "[[principal]]\nname = \"a\"\ntoken_sha256 = \"{digest}\"\n[[principal]]\nname = \"b\"\ntoken_sha256 = \"{digest}\"\n"
        );
        let err = file(&twice).unwrap_err().to_string();
        assert!(err.contains("same token"), "{err}");
        assert!(!err.contains(&digest), "{err}");
        let broken = format!("[[principal]]\nname = \"a\"\ntoken_sha256 = \"{digest}\n");
        let err = file(&broken).unwrap_err().to_string();
        assert!(!err.contains(&digest), "{err}");
    }
}
