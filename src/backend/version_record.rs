//! A kind's version record, as every remote backend stores it (the data of
//! ZooKeeper's `{kind}/version` node, the value of etcd's and Redis'
//! `{kind}/version` key, the `record` column of PostgreSQL's `kinds` row):
//! `"{version}\n{mode}"`, then `key=value` lines — the rotation's target and
//! deadline while draining (`to_layout=` for a target in the read-write
//! layout), `prev=` after a switch. A kind in the read-write layout writes
//! its mode as `normal+read_write` (or `draining+read_write`): a server from
//! before layouts reads that as an unknown mode and refuses to acquire,
//! rather than take the kind for a mutex it would share with writers whose
//! nodes it cannot see. The mutex layout writes the mode alone.
//!
//! One format for every store, so an operator reads the same text whichever
//! backend holds it, and one parser, so the rules (valid names, unknown
//! keys ignored for newer writers) are written once.

use std::sync::Arc;

use clastor_protocol::{KindLayout, KindMode};

use crate::backend::{KindVersion, RotationTarget};

/// The version every kind starts with.
pub(crate) const INITIAL_VERSION: &str = "v1";

/// Encodes the version node's data: `"{version}\n{mode}"`, and while
/// draining `"\nto={to}\ndeadline_ms={unix ms}"`.
pub(crate) fn encode_version(v: &KindVersion) -> Vec<u8> {
    let mut out = format!("{}\n{}", v.version, v.mode.name());
    if v.layout != KindLayout::Mutex {
        out.push_str(&format!("+{}", v.layout.name()));
    }
    if let (KindMode::Draining, Some(r)) = (v.mode, &v.rotation) {
        out.push_str(&format!("\nto={}\ndeadline_ms={}", r.to, r.deadline_unix_ms));
        if r.layout != KindLayout::Mutex {
            out.push_str(&format!("\nto_layout={}", r.layout.name()));
        }
    }
    out.into_bytes()
}

/// The record a completed rotation from `from` leaves: normal on `to` in
/// `layout`, with `prev={from}` so the same rotation sent again is known to
/// be done.
pub(crate) fn encode_switched(to: &str, from: &str, layout: KindLayout) -> Vec<u8> {
    let mut data = encode_version(&KindVersion::normal(to).with_layout(layout));
    data.extend_from_slice(format!("\nprev={from}").as_bytes());
    data
}

/// The data of a kind's version node when it is first created.
pub(crate) fn initial_version() -> KindVersion {
    KindVersion::normal(INITIAL_VERSION)
}

/// Decodes the version node's data. A missing mode line means normal; lines
/// after it are `key=value` pairs (unknown keys are ignored, for newer
/// writers). A draining kind without `to` (marked by another tool) has no
/// rotation target: nothing here aborts it on its own.
///
/// # Errors
/// A message if the data is not UTF-8, a version name is invalid, or the
/// mode is unknown.
pub(crate) fn decode_version(data: &[u8]) -> Result<KindVersion, String> {
    let text = std::str::from_utf8(data).map_err(|_| "version node data is not UTF-8".to_owned())?;
    let mut lines = text.lines();
    let version = lines.next().unwrap_or("").trim();
    if !valid_version_name(version) {
        return Err(format!("version node names an invalid version {version:?}"));
    }
    let parse_layout =
        |v: &str| KindLayout::from_name(v).ok_or_else(|| format!("version node names an unknown layout {v:?}"));
    let mode_line = lines.next().map(str::trim).unwrap_or("");
    let (mode, layout) = match mode_line.split_once('+') {
        Some((mode, layout)) => (mode, parse_layout(layout)?),
        None => (mode_line, KindLayout::Mutex),
    };
    let mode = match mode {
        "" | "normal" => KindMode::Normal,
        "draining" => KindMode::Draining,
        other => return Err(format!("version node has an unknown mode {other:?}")),
    };
    let (mut to, mut deadline) = (None, None);
    let mut to_layout = KindLayout::Mutex;
    for line in lines {
        match line.trim().split_once('=') {
            Some(("to_layout", v)) => to_layout = parse_layout(v)?,
            Some(("to", v)) if valid_version_name(v) => to = Some(Arc::from(v)),
            Some(("to", v)) => return Err(format!("version node names an invalid target {v:?}")),
            Some(("deadline_ms", v)) => {
                deadline = Some(
                    v.parse::<u64>()
                        .map_err(|_| format!("version node has a bad deadline {v:?}"))?,
                );
            }
            _ => {}
        }
    }
    let rotation = match (mode, to) {
        (KindMode::Draining, Some(to)) => Some(RotationTarget {
            to,
            deadline_unix_ms: deadline.unwrap_or(u64::MAX),
            layout: to_layout,
        }),
        _ => None,
    };
    Ok(KindVersion {
        version: Arc::from(version),
        mode,
        rotation,
        layout,
    })
}

/// The version a completed rotation switched away from (`prev=` in a normal
/// kind's data), if the data says.
pub(crate) fn decode_previous(data: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(data).ok()?;
    text.lines()
        .skip(2)
        .find_map(|l| l.trim().strip_prefix("prev=").map(str::to_owned))
}

/// A version name follows the protocol's rules for them (one path segment,
/// not the name of a kind's bookkeeping node).
pub(crate) fn valid_version_name(version: &str) -> bool {
    clastor_protocol::name::validate_version("version", version).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_data_round_trip() -> Result<(), String> {
        let v = initial_version();
        assert_eq!(encode_version(&v), b"v1\nnormal");
        assert_eq!(decode_version(&encode_version(&v))?, v);
        assert_eq!(decode_version(b"v2\ndraining")?.mode, KindMode::Draining);
        assert_eq!(decode_version(b"v3")?.mode, KindMode::Normal);
        assert!(decode_version(b"").is_err());
        assert!(decode_version(b"a/b\nnormal").is_err());
        assert!(decode_version(b"v1\nweird").is_err());
        let draining = KindVersion {
            version: Arc::from("v1"),
            mode: KindMode::Draining,
            rotation: Some(RotationTarget {
                to: Arc::from("v2"),
                deadline_unix_ms: 1_767_000_000_000,
                layout: KindLayout::Mutex,
            }),
            layout: KindLayout::Mutex,
        };
        assert_eq!(
            encode_version(&draining),
            b"v1\ndraining\nto=v2\ndeadline_ms=1767000000000"
        );
        assert_eq!(decode_version(&encode_version(&draining))?, draining);
        assert_eq!(decode_version(b"v1\ndraining\nwho=ops")?.rotation, None);
        assert!(decode_version(b"v1\ndraining\nto=a/b").is_err());
        assert!(decode_version(b"rotation\nnormal").is_err());
        assert_eq!(decode_version(b"v2\nnormal\nprev=v1")?, KindVersion::normal("v2"));
        assert_eq!(decode_previous(b"v2\nnormal\nprev=v1").as_deref(), Some("v1"));
        assert_eq!(decode_previous(b"v2\nnormal"), None);
        assert_eq!(encode_switched("v2", "v1", KindLayout::Mutex), b"v2\nnormal\nprev=v1");
        Ok(())
    }

    fn rw_at(version: &str) -> KindVersion {
        KindVersion::normal(version).with_layout(KindLayout::ReadWrite)
    }

    #[test]
    fn layouts_round_trip_default_to_mutex_and_fail_closed_for_older_servers() -> Result<(), String> {
        let rw = rw_at("v2");
        assert_eq!(encode_version(&rw), b"v2\nnormal+read_write");
        assert_eq!(decode_version(&encode_version(&rw))?, rw);
        let to_rw = KindVersion::draining("v1", "v2", std::time::Duration::from_secs(5))
            .with_layouts(KindLayout::Mutex, KindLayout::ReadWrite);
        let data = String::from_utf8(encode_version(&to_rw)).map_err(|e| e.to_string())?;
        assert!(
            data.starts_with("v1\ndraining\n") && data.ends_with("\nto_layout=read_write"),
            "{data}"
        );
        assert_eq!(decode_version(data.as_bytes())?, to_rw);
        let from_rw = KindVersion::draining("v2", "v3", std::time::Duration::from_secs(5))
            .with_layouts(KindLayout::ReadWrite, KindLayout::ReadWrite);
        let data = encode_version(&from_rw);
        assert!(data.starts_with(b"v2\ndraining+read_write\nto=v3"));
        assert_eq!(decode_version(&data)?, from_rw);
        assert_eq!(decode_version(&data)?.aborted(), rw);
        let switched = encode_switched("v2", "v1", KindLayout::ReadWrite);
        assert_eq!(switched, b"v2\nnormal+read_write\nprev=v1");
        assert_eq!(decode_version(&switched)?, rw);
        assert_eq!(decode_previous(&switched).as_deref(), Some("v1"));
        assert_eq!(decode_version(b"v1\nnormal")?.layout, KindLayout::Mutex);
        assert!(decode_version(b"v1\nnormal+sideways").is_err());
        // A server from before layouts reads the mode line alone: one it
        // does not know, so it refuses the kind instead of granting in it.
        let mode_line = |d: &[u8]| String::from_utf8_lossy(d).lines().nth(1).unwrap_or("").to_owned();
        for data in [encode_version(&rw), switched, encode_version(&from_rw)] {
            assert!(!["", "normal", "draining"].contains(&mode_line(&data).as_str()));
        }
        Ok(())
    }
}
