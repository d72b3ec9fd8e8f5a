//! Where things live in ZooKeeper, and what lock nodes are called.
//!
//! ```text
//! {root}/{provider}/{kind}/version                 data: "v1\nnormal"
//! {root}/{provider}/{kind}/{version}/{id}/_c_{uuid}-lock-{seq}       mutex layout
//! {root}/{provider}/{kind}/{version}/{id}/_c_{uuid}-__WRIT__{seq}    read-write layout
//! {root}/{provider}/{kind}/{version}/{id}/_c_{uuid}-__READ__{seq}    read-write layout, shared
//! ```
//!
//! Lock nodes use Apache Curator's naming (protected mode: `_c_` + 36-char
//! dashed uuid + `-` + the lock name + 10-digit sequence): a kind in the
//! mutex layout is an `InterProcessMutex` (`lock-`), one in the read-write
//! layout an `InterProcessReadWriteLock` (`__WRIT__`, `__READ__`), so a
//! Curator client on the same path excludes a Clastor one and vice versa.
//! kazoo's `<32 hex>__lock__<seq>` (Lock, WriteLock) and `__rlock__<seq>`
//! (ReadLock) nodes count as contenders too: a kazoo reader must exclude a
//! Clastor writer. Readers (`__READ__`, `__rlock__`) exclude only writers;
//! every other contender is a writer, whatever the layout. Names are built only from validated [`LockKey`](crate::key::LockKey)
//! parts; the few valid names ZooKeeper cannot store (characters above
//! U+FFFF, private use, U+FFF0..) are encoded, see [`segment`].
//!
//! Sequence suffixes are a per-parent int32 that wraps to negative, so they
//! are ordered with serial-number arithmetic (RFC 1982), not as integers.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use clastor_protocol::name::is_path_safe;
use clastor_protocol::{KindLayout, LockMode};
use uuid::Uuid;
use zookeeper_client::{Acl, Acls, CreateMode, CreateOptions, Permission};

pub(super) use crate::backend::version_record::{
    INITIAL_VERSION, decode_previous, decode_version, encode_switched, encode_version, initial_version,
};

/// Name of the per-kind node holding the current version and mode.
pub(super) const VERSION_NODE: &str = "version";
/// Name of the per-kind ephemeral node a rotation's driver holds (its claim).
pub(super) const ROTATION_NODE: &str = "rotation";
const CURATOR_PREFIX: &str = "_c_";
const CURATOR_LOCK: &str = "lock-";
const CURATOR_READ: &str = "__READ__";
const CURATOR_WRITE: &str = "__WRIT__";
const KAZOO_LOCK: &str = "__lock__";
const KAZOO_READ_LOCK: &str = "__rlock__";

/// The lock name a Clastor node gets: Curator's for the kind's layout and
/// the request's mode.
pub(super) fn lock_name(layout: KindLayout, mode: LockMode) -> &'static str {
    match (layout, mode) {
        (KindLayout::Mutex, _) => CURATOR_LOCK,
        (KindLayout::ReadWrite, LockMode::Exclusive) => CURATOR_WRITE,
        (KindLayout::ReadWrite, LockMode::Shared) => CURATOR_READ,
    }
}

/// The ACL of every node a secured backend (`ZkConfig::digest`) creates:
/// everything for the identities its session authenticated as (the digest
/// user: Curator and kazoo clients with the same credentials interoperate),
/// reading for anyone. ZooKeeper checks a delete against the *parent's*
/// ACL, so nobody without the credentials can delete a lock node, create
/// one in a lock directory, or change a version node.
static SECURED: [Acl; 2] = [
    Acl::new_const(Permission::ALL, "auth", ""),
    Acl::new_const(Permission::READ, "world", "anyone"),
];

/// Whether an ACL lets anyone (`world:anyone`) change, create under or
/// delete a node: a node a secured backend did not create (made before
/// `--zk-digest-file`, or by another client) and so still open.
pub(super) fn open_to_anyone(acls: &[Acl]) -> bool {
    acls.iter().any(|a| {
        a.scheme() == "world"
            && a.id() == "anyone"
            && (a.permission().has(Permission::WRITE)
                || a.permission().has(Permission::CREATE)
                || a.permission().has(Permission::DELETE))
    })
}

/// How nodes are created: their types, and their ACL (open to anyone, or
/// [`SECURED`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct NodeOptions {
    acls: Acls<'static>,
    secured: bool,
}

impl NodeOptions {
    /// Open nodes (ZooKeeper's `world:anyone` with every permission), or
    /// secured ones.
    pub(super) fn new(secured: bool) -> NodeOptions {
        NodeOptions {
            acls: if secured {
                Acls::new(&SECURED)
            } else {
                Acls::anyone_all()
            },
            secured,
        }
    }

    /// Whether nodes are created with [`SECURED`].
    pub(super) fn is_secured(self) -> bool {
        self.secured
    }

    /// Lock nodes: ephemeral-sequential, so they go with their session and
    /// sort in arrival order.
    pub(super) fn lock_node(self) -> CreateOptions<'static> {
        CreateMode::EphemeralSequential.with_acls(self.acls)
    }

    /// Version and lock directories: containers, which ZooKeeper reaps when empty.
    pub(super) fn container(self) -> CreateOptions<'static> {
        CreateMode::Container.with_acls(self.acls)
    }

    /// The root, provider and kind nodes and the version node.
    pub(super) fn persistent(self) -> CreateOptions<'static> {
        CreateMode::Persistent.with_acls(self.acls)
    }

    /// A rotation's claim: ephemeral, gone with its driver's session.
    pub(super) fn ephemeral(self) -> CreateOptions<'static> {
        CreateMode::Ephemeral.with_acls(self.acls)
    }
}

/// Paths under one root and provider, and how nodes are made there.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    /// `{root}/{provider}`, normalised (no trailing slash).
    base: String,
    nodes: NodeOptions,
}

impl Layout {
    /// Builds the layout; `root` is an absolute path (`/locks`), `provider` one
    /// path segment.
    ///
    /// # Errors
    /// A message if either is malformed.
    pub(super) fn new(root: &str, provider: &str) -> Result<Layout, String> {
        let root = root.trim_end_matches('/');
        if !root.starts_with('/') || root.contains("//") || root.split('/').any(|s| s == "." || s == "..") {
            return Err(format!("ZooKeeper root {root:?} must be an absolute path like /locks"));
        }
        if provider.is_empty() || provider.contains('/') || provider == "." || provider == ".." {
            return Err(format!("provider {provider:?} must be one non-empty path segment"));
        }
        if provider.chars().any(|c| c.is_control()) || root.chars().any(|c| c.is_control()) {
            return Err("root and provider must not contain control characters".into());
        }
        Ok(Layout {
            base: format!("{root}/{provider}"),
            nodes: NodeOptions::new(false),
        })
    }

    /// The same layout, creating secured nodes ([`SECURED`]) if `secured`.
    pub(super) fn secured(mut self, secured: bool) -> Layout {
        self.nodes = NodeOptions::new(secured);
        self
    }

    /// How nodes are created here.
    pub(super) fn nodes(&self) -> NodeOptions {
        self.nodes
    }

    /// `{root}/{provider}`.
    pub(super) fn base(&self) -> &str {
        &self.base
    }

    /// Every ancestor of the kind nodes, outermost first (`/locks`,
    /// `/locks/provider`); persistent nodes.
    pub(super) fn ancestors(&self) -> Vec<&str> {
        self.base
            .match_indices('/')
            .map(|(i, _)| i)
            .filter(|&i| i > 0)
            .map(|i| &self.base[..i])
            .chain([self.base.as_str()])
            .collect()
    }

    /// `{base}/{kind}`.
    pub(super) fn kind_path(&self, kind: &str) -> String {
        join_path(&[&self.base, &segment(kind)])
    }

    /// `{base}/{kind}/version`.
    pub(super) fn version_path(&self, kind: &str) -> String {
        join_path(&[&self.base, &segment(kind), VERSION_NODE])
    }

    /// `{base}/{kind}/rotation`: the running rotation's claim (ephemeral).
    pub(super) fn rotation_path(&self, kind: &str) -> String {
        join_path(&[&self.base, &segment(kind), ROTATION_NODE])
    }

    /// `{base}/{kind}/{version}`: a container.
    pub(super) fn version_dir(&self, kind: &str, version: &str) -> String {
        join_path(&[&self.base, &segment(kind), &segment(version)])
    }

    /// `{base}/{kind}/{version}/{id}`: a container, the parent of the lock nodes.
    pub(super) fn lock_dir(&self, kind: &str, version: &str, id: &str) -> String {
        join_path(&[&self.base, &segment(kind), &segment(version), &segment(id)])
    }
}

/// A valid kind, version or id as one path segment. Names ZooKeeper stores
/// are used as they are (every ASCII name, and so every Curator or kazoo
/// path a Clastor name can match). A name holding a character ZooKeeper
/// refuses in paths ([`is_path_safe`]) is encoded: a space, which no valid
/// name holds (so no encoded name equals a plain one), then the name with
/// `%` and each refused character percent-encoded as its UTF-8 bytes (so no
/// two names share an encoding). Version names never need it (they are held
/// to path-safe characters). Public as
/// [`path_segment`](crate::backend::zookeeper::path_segment), for tools that
/// look a lock up in ZooKeeper.
pub fn segment(name: &str) -> Cow<'_, str> {
    if name.is_ascii() || name.chars().all(is_path_safe) {
        return Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(1 + name.len() * 3);
    out.push(' ');
    for c in name.chars() {
        if c == '%' || !is_path_safe(c) {
            for b in c.encode_utf8(&mut [0; 4]).bytes() {
                // Writing to a String cannot fail.
                let _ = write!(out, "%{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A fresh protection uuid for one create (Curator's protected mode: how a
/// create whose reply was lost finds its node). It only has to be unique
/// among the creates in a directory, so it is a random base drawn once per
/// process plus a counter, with the version 4 bits set: distinct within the
/// process for 2^62 creates, and as unlikely to meet another process's as
/// two random uuids are — without a `getrandom` system call per acquire.
pub(super) fn fresh_uuid() -> Uuid {
    static BASE: OnceLock<u128> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(|| Uuid::new_v4().as_u128());
    let n = u128::from(NEXT.fetch_add(1, Ordering::Relaxed));
    // The version and variant overwrite bits 62, 63 and 76-79 only: two
    // values less than 2^62 apart differ below bit 62, so stay distinct.
    uuid::Builder::from_random_bytes(base.wrapping_add(n).to_be_bytes()).into_uuid()
}

/// The Curator protected-mode prefix for a create: `{dir}/_c_{uuid}-{lock}`
/// (`lock` from [`lock_name`]); ZooKeeper appends the sequence.
pub(super) fn node_prefix(dir: &str, uuid: &Uuid, lock: &str) -> String {
    let mut buf = Uuid::encode_buffer();
    let mut path = String::with_capacity(dir.len() + 1 + NAME_PREFIX_LEN + lock.len() + SEQ_LEN);
    path.push_str(dir);
    path.push('/');
    push_name_prefix(&mut path, uuid.hyphenated().encode_lower(&mut buf), lock);
    path
}

/// `_c_{uuid}-lock-`: the start of every node name a given create can produce.
#[cfg(test)]
pub(super) fn node_name_prefix(uuid: &Uuid) -> String {
    let mut buf = Uuid::encode_buffer();
    let mut name = String::with_capacity(NAME_PREFIX_LEN + CURATOR_LOCK.len());
    push_name_prefix(&mut name, uuid.hyphenated().encode_lower(&mut buf), CURATOR_LOCK);
    name
}

/// Length of `_c_{uuid}-` (the lock name follows), and of the sequence
/// ZooKeeper appends.
const NAME_PREFIX_LEN: usize = CURATOR_PREFIX.len() + 36 + 1;
const SEQ_LEN: usize = 10;

fn push_name_prefix(out: &mut String, uuid: &str, lock: &str) {
    out.push_str(CURATOR_PREFIX);
    out.push_str(uuid);
    out.push('-');
    out.push_str(lock);
}

/// `parts` joined by `/`, allocated once at its length (`format!` guesses a
/// capacity from its literal pieces and grows several times for a path).
fn join_path(parts: &[&str]) -> String {
    let len = parts.iter().map(|p| p.len()).sum::<usize>() + parts.len().saturating_sub(1);
    let mut path = String::with_capacity(len);
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            path.push('/');
        }
        path.push_str(part);
    }
    path
}

/// The last occurrence of `needle` in `hay` (short needles in short names:
/// a scan beats `str::rfind`'s searcher set-up).
fn rfind_bytes(hay: &str, needle: &str) -> Option<usize> {
    hay.as_bytes()
        .windows(needle.len())
        .rposition(|w| w == needle.as_bytes())
}

/// Whether a child name came from the create tagged with `uuid`.
pub(super) fn is_ours(name: &str, uuid: &Uuid) -> bool {
    name.strip_prefix(CURATOR_PREFIX)
        .and_then(|rest| rest.get(..36))
        .is_some_and(|u| Uuid::parse_str(u).is_ok_and(|u| u == *uuid))
}

/// A contender in a lock directory: a Curator (`…lock-<seq>`,
/// `…__WRIT__<seq>`, `…__READ__<seq>`) or kazoo (`…__lock__<seq>`,
/// `…__rlock__<seq>`) node. Names that are none of these are not contenders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Contender<'a> {
    /// The sequence number ZooKeeper appended (negative after int32 overflow).
    pub(super) seq: i32,
    /// The child name.
    pub(super) name: &'a str,
    /// A reader (`__READ__`, `__rlock__`): it excludes writers only.
    pub(super) shared: bool,
}

impl Contender<'_> {
    /// Parses a child name.
    pub(super) fn parse(name: &str) -> Option<Contender<'_>> {
        let (suffix, marker) = [KAZOO_LOCK, KAZOO_READ_LOCK, CURATOR_LOCK, CURATOR_WRITE, CURATOR_READ]
            .into_iter()
            .filter_map(|marker| rfind_bytes(name, marker).map(|i| (&name[i + marker.len()..], marker)))
            // The marker that ends last is the one the sequence follows.
            .min_by_key(|(suffix, _)| suffix.len())?;
        let shared = marker == CURATOR_READ || marker == KAZOO_READ_LOCK;
        // Sequences are ten digits, or a sign and nine after int32 overflow.
        if suffix.is_empty()
            || !suffix
                .bytes()
                .enumerate()
                .all(|(i, b)| b.is_ascii_digit() || (i == 0 && b == b'-'))
        {
            return None;
        }
        suffix.parse::<i32>().ok().map(|seq| Contender { seq, name, shared })
    }

    /// Whether this contender, ahead of `me` in the queue, keeps `me` from
    /// holding: always, unless both are readers.
    pub(super) fn blocks(&self, me: &Contender<'_>) -> bool {
        !(self.shared && me.shared)
    }
}

/// Whether sequence `a` comes before `b` in serial-number arithmetic: true
/// across the int32 wrap (`i32::MAX` before `i32::MIN`), as long as the two are
/// less than 2^31 apart, which a lock queue always is.
pub(super) fn seq_before(a: i32, b: i32) -> bool {
    a.wrapping_sub(b) < 0
}

/// The contenders among `children`, in lock order (first = holder).
pub(super) fn sorted_contenders(children: &[String]) -> Vec<Contender<'_>> {
    let mut contenders: Vec<Contender<'_>> = children.iter().filter_map(|c| Contender::parse(c)).collect();
    // Serial order is not a total order in general, and `sort_by` wants one:
    // find the serially first sequence, then sort by distance from it, which
    // is total and equals the serial order whenever it is defined.
    let Some(first) = contenders
        .iter()
        .map(|c| c.seq)
        .reduce(|m, s| if seq_before(s, m) { s } else { m })
    else {
        return contenders;
    };
    // Distance from `first` as a wrapping int32 difference read unsigned.
    contenders.sort_by_key(|c| (c.seq.wrapping_sub(first).cast_unsigned(), c.name));
    contenders
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_acls_that_let_anyone_change_a_node_are_open() {
        assert!(open_to_anyone(&Acls::anyone_all()));
        assert!(!open_to_anyone(&SECURED));
        assert!(!open_to_anyone(&Acls::anyone_read()));
        assert!(!open_to_anyone(&Acls::creator_all()));
        let anyone = |p| [Acl::new(p, zookeeper_client::AuthId::anyone())];
        assert!(open_to_anyone(&anyone(Permission::DELETE)));
        assert!(open_to_anyone(&anyone(Permission::CREATE | Permission::READ)));
        assert!(!open_to_anyone(&anyone(Permission::ADMIN | Permission::READ)));
        assert!(NodeOptions::new(true).is_secured() && !NodeOptions::new(false).is_secured());
    }

    #[test]
    fn paths() -> Result<(), String> {
        let l = Layout::new("/locks/", "zk-provider")?;
        assert_eq!(l.base(), "/locks/zk-provider");
        assert_eq!(l.ancestors(), vec!["/locks", "/locks/zk-provider"]);
        assert_eq!(l.version_path("tx"), "/locks/zk-provider/tx/version");
        assert_eq!(l.lock_dir("tx", "v1", "a"), "/locks/zk-provider/tx/v1/a");
        let deep = Layout::new("/a/b", "p")?;
        assert_eq!(deep.ancestors(), vec!["/a", "/a/b", "/a/b/p"]);
        assert!(Layout::new("locks", "p").is_err());
        assert!(Layout::new("/locks", "a/b").is_err());
        assert!(Layout::new("/locks/../x", "p").is_err());
        Ok(())
    }

    #[test]
    fn names_zookeeper_refuses_are_encoded_and_no_two_meet() -> Result<(), String> {
        for plain in ["tx-1", "日本", "a%b", "x.y", "\u{F900}"] {
            assert!(matches!(segment(plain), Cow::Borrowed(p) if p == plain), "{plain:?}");
        }
        assert_eq!(segment("a🙂"), " a%F0%9F%99%82");
        assert_eq!(segment("\u{E000}%"), " %EE%80%80%25");
        assert_eq!(segment("\u{FFFD}"), " %EF%BF%BD");
        // The encoding of a refused character never equals a name that
        // spells it out, nor one with a plain `%` beside a refused one.
        let names = [
            "%EE%80%80",
            "\u{E000}",
            "%\u{E000}",
            "%25\u{E000}",
            "\u{E000}%",
            "a🙂",
            "a%F0%9F%99%82",
        ];
        let encoded: std::collections::HashSet<_> = names.iter().map(|n| segment(n)).collect();
        assert_eq!(encoded.len(), names.len(), "{encoded:?}");
        let l = Layout::new("/locks", "p")?;
        assert_eq!(
            l.lock_dir("k🙂", "v1", "\u{FFFF}"),
            "/locks/p/ k%F0%9F%99%82/v1/ %EF%BF%BF"
        );
        Ok(())
    }

    #[test]
    fn fresh_uuids_are_distinct_version_4_uuids() {
        let uuids: Vec<Uuid> = (0..10_000).map(|_| fresh_uuid()).collect();
        let distinct: std::collections::HashSet<&Uuid> = uuids.iter().collect();
        assert_eq!(distinct.len(), uuids.len());
        assert!(uuids.iter().all(|u| u.get_version_num() == 4));
        assert!(uuids.iter().all(|u| u.get_variant() == uuid::Variant::RFC4122));
        // Parsed back from a node name, each is itself and no other.
        let name = format!("{}0000000001", node_name_prefix(&uuids[1]));
        assert!(is_ours(&name, &uuids[1]));
        assert!(!is_ours(&name, &uuids[0]) && !is_ours(&name, &uuids[2]));
    }

    #[test]
    fn curator_names_and_order() {
        let uuid = fresh_uuid();
        let prefix = node_name_prefix(&uuid);
        assert_eq!(prefix.len(), 3 + 36 + 1 + 5);
        let ours = format!("{prefix}0000000012");
        assert!(is_ours(&ours, &uuid));
        assert!(!is_ours(&ours, &Uuid::new_v4()));
        let children = vec![
            ours.clone(),
            "_c_0b2f0c47-2b8c-4a5a-9d2e-4a8cf5f3e1aa-lock-0000000003".to_owned(),
            "3f2a9c1d8e7b6a5f4e3d2c1b0a998877__lock__0000000007".to_owned(),
            "not-a-lock".to_owned(),
            "lock-".to_owned(),
        ];
        let sorted: Vec<i32> = sorted_contenders(&children).iter().map(|c| c.seq).collect();
        assert_eq!(sorted, vec![3, 7, 12]);
    }

    #[test]
    fn kazoo_read_lock_nodes_are_contenders() {
        let children = vec![
            "3f2a9c1d8e7b6a5f4e3d2c1b0a998877__rlock__0000000004".to_owned(),
            "_c_0b2f0c47-2b8c-4a5a-9d2e-4a8cf5f3e1aa-lock-0000000005".to_owned(),
        ];
        let sorted = sorted_contenders(&children);
        assert_eq!(sorted.len(), 2);
        assert_eq!(sorted[0].name, children[0], "the kazoo reader holds");
    }

    #[test]
    fn read_write_names_parse_and_readers_share() {
        let uuid = fresh_uuid();
        let writer = format!(
            "{}0000000002",
            node_prefix("", &uuid, lock_name(KindLayout::ReadWrite, LockMode::Exclusive)).trim_start_matches('/')
        );
        let reader = format!(
            "{}0000000003",
            node_prefix("", &uuid, lock_name(KindLayout::ReadWrite, LockMode::Shared)).trim_start_matches('/')
        );
        assert!(
            writer.ends_with("-__WRIT__0000000002") && is_ours(&writer, &uuid),
            "{writer}"
        );
        assert!(
            reader.ends_with("-__READ__0000000003") && is_ours(&reader, &uuid),
            "{reader}"
        );
        assert_eq!(lock_name(KindLayout::Mutex, LockMode::Shared), "lock-");
        let children = vec![
            reader.clone(),
            "3f2a9c1d8e7b6a5f4e3d2c1b0a998877__rlock__0000000004".to_owned(),
            writer.clone(),
            "_c_0b2f0c47-2b8c-4a5a-9d2e-4a8cf5f3e1aa-lock-0000000001".to_owned(),
            "3f2a9c1d8e7b6a5f4e3d2c1b0a998877__lock__0000000005".to_owned(),
        ];
        let sorted = sorted_contenders(&children);
        let shape: Vec<(i32, bool)> = sorted.iter().map(|c| (c.seq, c.shared)).collect();
        assert_eq!(shape, [(1, false), (2, false), (3, true), (4, true), (5, false)]);
        let (r3, r4, w5) = (&sorted[2], &sorted[3], &sorted[4]);
        assert!(!r3.blocks(r4), "readers share");
        assert!(
            r3.blocks(w5) && w5.blocks(r4),
            "a reader and a writer exclude each other"
        );
        assert!(sorted[0].blocks(&sorted[1]), "writers exclude each other");
    }

    /// Names as ZooKeeper makes them: `%010d` of the parent's int32 cversion.
    fn curator(seq: i32) -> String {
        format!("_c_0b2f0c47-2b8c-4a5a-9d2e-4a8cf5f3e1aa-lock-{seq:010}")
    }

    #[test]
    fn sequences_are_ordered_across_the_int32_wrap() {
        assert!(seq_before(i32::MAX, i32::MIN));
        assert!(!seq_before(i32::MIN, i32::MAX));
        assert!(seq_before(-1, 0));
        assert!(seq_before(i32::MAX - 1, i32::MAX));
        assert!(seq_before(0, 1) && !seq_before(1, 0) && !seq_before(7, 7));
        assert_eq!(curator(i32::MIN), format!("{}-2147483648", &curator(0)[..45]));
        assert_eq!(Contender::parse(&curator(-5)).map(|c| c.seq), Some(-5));

        let order = [
            i32::MAX - 2,
            i32::MAX - 1,
            i32::MAX,
            i32::MIN,
            i32::MIN + 1,
            i32::MIN + 2,
        ];
        // Every rotation of the listing sorts back into the same wrap-aware order.
        for shift in 0..order.len() {
            let mut names: Vec<String> = order.iter().map(|&s| curator(s)).collect();
            names.rotate_left(shift);
            names.reverse();
            let seqs: Vec<i32> = sorted_contenders(&names).iter().map(|c| c.seq).collect();
            assert_eq!(seqs, order, "shift {shift}");
        }
        // Before the wrap, plain numeric order.
        let names: Vec<String> = [10, 2, 3_000_000, 0].iter().map(|&s| curator(s)).collect();
        let seqs: Vec<i32> = sorted_contenders(&names).iter().map(|c| c.seq).collect();
        assert_eq!(seqs, [0, 2, 10, 3_000_000]);
    }
}
