//! Version rotation on the wire: the `ROTATE` request, its success body, the
//! `ROTATE_PROGRESS` event that streams while it drains, and the drain state
//! a version 2 `VERSION` reply carries (PROTOCOL.md, "ROTATE").
//!
//! Kept apart from `message.rs`, which holds the lock operations; the
//! enums there refer to these types and call the readers and writers below.

use bytes::{BufMut, BytesMut};

use crate::body_error::BodyError;
use crate::message::KindLayout;
use crate::wire::{Reader, put_string, string_len};

/// Most holders a `ROTATE_PROGRESS` event names; the rest are only counted.
pub const MAX_PROGRESS_HOLDERS: usize = 16;

/// `ROTATE` request body: move `kind` from version `from` to `to`, draining
/// `from` first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotate {
    /// Resource kind.
    pub kind: String,
    /// The version the kind must be at now.
    pub from: String,
    /// The version to move it to.
    pub to: String,
    /// How long to wait for the locks under `from` to go; 0: the server's
    /// default. When it runs out the rotation is aborted back to `from`.
    pub drain_timeout_ms: u32,
    /// Version 4: the layout `to` gets (`None`: the layout `from` has). On
    /// the wire only when `Some` (send it only on a connection that
    /// negotiated version 4).
    pub layout: Option<KindLayout>,
}

impl Rotate {
    pub(crate) fn len(&self) -> usize {
        string_len(&self.kind) + string_len(&self.from) + string_len(&self.to) + 4 + usize::from(self.layout.is_some())
    }

    pub(crate) fn write(&self, dst: &mut BytesMut) {
        put_string(dst, &self.kind);
        put_string(dst, &self.from);
        put_string(dst, &self.to);
        dst.put_u32(self.drain_timeout_ms);
        if let Some(layout) = self.layout {
            dst.put_u8(layout as u8);
        }
    }

    /// Reads the body as a connection of protocol `version` does: the layout
    /// only from version 4 (before, a byte there is trailing, so malformed).
    pub(crate) fn read(r: &mut Reader, version: u8) -> Result<Rotate, BodyError> {
        Ok(Rotate {
            kind: r.string("kind")?,
            from: r.string("from")?,
            to: r.string("to")?,
            drain_timeout_ms: r.u32("drain_timeout_ms")?,
            layout: if version >= 4 && r.has_remaining() {
                Some(r.enum_u8("layout")?)
            } else {
                None
            },
        })
    }
}

/// `ROTATE` success body: the rotation completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotateOk {
    /// The kind's version now (the request's `to`).
    pub version: String,
    /// How long the drain took, in ms (0 when there was nothing to drain).
    pub drain_ms: u32,
    /// Nodes left under the old version that could not be deleted (a foreign
    /// client still creating there); 0 normally.
    pub leftover: u32,
}

impl RotateOk {
    pub(crate) fn len(&self) -> usize {
        string_len(&self.version) + 4 + 4
    }

    pub(crate) fn write(&self, dst: &mut BytesMut) {
        put_string(dst, &self.version);
        dst.put_u32(self.drain_ms);
        dst.put_u32(self.leftover);
    }

    pub(crate) fn read(r: &mut Reader) -> Result<RotateOk, BodyError> {
        Ok(RotateOk {
            version: r.string("version")?,
            drain_ms: r.u32("drain_ms")?,
            leftover: r.u32("leftover")?,
        })
    }
}

/// Where a running rotation is.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RotationPhase {
    /// The kind is draining: new acquires wait, locks under `from` remain.
    Draining = 0,
    /// The kind switched to `to` (acquires proceed there); the old subtree is
    /// being deleted.
    Switched = 1,
}

impl RotationPhase {
    /// Lower-case word used in the text form.
    pub fn name(self) -> &'static str {
        match self {
            RotationPhase::Draining => "draining",
            RotationPhase::Switched => "switched",
        }
    }
}

impl TryFrom<u8> for RotationPhase {
    /// The unknown value.
    type Error = u8;

    fn try_from(v: u8) -> Result<Self, u8> {
        match v {
            0 => Ok(RotationPhase::Draining),
            1 => Ok(RotationPhase::Switched),
            other => Err(other),
        }
    }
}

/// One lock still standing under the version being drained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationHolder {
    /// Resource id.
    pub id: String,
    /// Who holds it, as far as the backend can tell (e.g. `session
    /// 0x10002a3b4c0001 clastor owner=17`, `curator`, `this server`), and how
    /// many wait behind.
    pub holder: String,
}

/// `ROTATE_PROGRESS` event body: how a running rotation is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationProgress {
    /// Resource kind.
    pub kind: String,
    /// The version being drained.
    pub from: String,
    /// The version being moved to.
    pub to: String,
    /// Where the rotation is.
    pub phase: RotationPhase,
    /// Lock nodes (holders and waiters) left under `from`.
    pub remaining: u32,
    /// Time since the rotation started draining, in ms.
    pub elapsed_ms: u32,
    /// Time left before the drain timeout aborts it, in ms.
    pub left_ms: u32,
    /// Up to [`MAX_PROGRESS_HOLDERS`] of the locks still under `from`.
    pub holders: Vec<RotationHolder>,
}

impl RotationProgress {
    pub(crate) fn len(&self) -> usize {
        string_len(&self.kind)
            + string_len(&self.from)
            + string_len(&self.to)
            + 1
            + 4
            + 4
            + 4
            + 2
            + self
                .holders
                .iter()
                .take(MAX_PROGRESS_HOLDERS)
                .map(|h| string_len(&h.id) + string_len(&h.holder))
                .sum::<usize>()
    }

    pub(crate) fn write(&self, dst: &mut BytesMut) {
        put_string(dst, &self.kind);
        put_string(dst, &self.from);
        put_string(dst, &self.to);
        dst.put_u8(self.phase as u8);
        dst.put_u32(self.remaining);
        dst.put_u32(self.elapsed_ms);
        dst.put_u32(self.left_ms);
        let holders = &self.holders[..self.holders.len().min(MAX_PROGRESS_HOLDERS)];
        // At most 16, so the count always fits.
        dst.put_u16(u16::try_from(holders.len()).unwrap_or(0));
        for h in holders {
            put_string(dst, &h.id);
            put_string(dst, &h.holder);
        }
    }

    pub(crate) fn read(r: &mut Reader) -> Result<RotationProgress, BodyError> {
        let kind = r.string("kind")?;
        let from = r.string("from")?;
        let to = r.string("to")?;
        let phase = r.enum_u8("phase")?;
        let remaining = r.u32("remaining")?;
        let elapsed_ms = r.u32("elapsed_ms")?;
        let left_ms = r.u32("left_ms")?;
        // Smallest entry: two empty strings.
        let n = r.count("holders", 4)?;
        let mut holders = Vec::with_capacity(n);
        for _ in 0..n {
            holders.push(RotationHolder {
                id: r.string("id")?,
                holder: r.string("holder")?,
            });
        }
        Ok(RotationProgress {
            kind,
            from,
            to,
            phase,
            remaining,
            elapsed_ms,
            left_ms,
            holders,
        })
    }
}

/// A draining kind's rotation, as a version 2 `VERSION` reply reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainState {
    /// The version the rotation moves to.
    pub to: String,
    /// Lock nodes left under the current version.
    pub remaining: u32,
    /// Time left before the drain timeout, in ms (0: passed; the rotation is
    /// being aborted, or its driver is gone and the next waiting acquire
    /// aborts it).
    pub left_ms: u32,
}

impl DrainState {
    pub(crate) fn len(&self) -> usize {
        string_len(&self.to) + 4 + 4
    }

    pub(crate) fn write(&self, dst: &mut BytesMut) {
        put_string(dst, &self.to);
        dst.put_u32(self.remaining);
        dst.put_u32(self.left_ms);
    }

    pub(crate) fn read(r: &mut Reader) -> Result<DrainState, BodyError> {
        Ok(DrainState {
            to: r.string("to")?,
            remaining: r.u32("remaining")?,
            left_ms: r.u32("left_ms")?,
        })
    }
}
