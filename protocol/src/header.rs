//! The fixed 8-byte header that follows every frame's length prefix.

use bytes::{Buf, BufMut};

use crate::constants::HEADER_LEN;

/// Header flag bits (`u16`, big-endian on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(pub u16);

impl Flags {
    /// No flags: a request from the client.
    pub const REQUEST: Flags = Flags(0);
    /// Set on every response from the server.
    pub const RESPONSE: Flags = Flags(0x0001);
    /// Set on every event pushed by the server (request id 0).
    pub const EVENT: Flags = Flags(0x0002);

    /// Whether all bits of `other` are set.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }
}

/// `version u8 | opcode u8 | flags u16 | request_id u32`.
///
/// The opcode is kept raw so that an unknown opcode can still be answered with
/// its own request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// Protocol version the frame is written in.
    pub version: u8,
    /// Raw opcode; see [`crate::Opcode`].
    pub opcode: u8,
    /// Flag bits; see [`Flags`].
    pub flags: Flags,
    /// Chosen by the client, echoed by the server; 0 is reserved for events.
    pub request_id: u32,
}

impl Header {
    pub(crate) fn write(&self, buf: &mut impl BufMut) {
        buf.put_u8(self.version);
        buf.put_u8(self.opcode);
        buf.put_u16(self.flags.0);
        buf.put_u32(self.request_id);
    }

    /// Reads a header; `None` if fewer than [`HEADER_LEN`] bytes are given.
    pub(crate) fn read(buf: &mut impl Buf) -> Option<Header> {
        if buf.remaining() < HEADER_LEN {
            return None;
        }
        Some(Header {
            version: buf.get_u8(),
            opcode: buf.get_u8(),
            flags: Flags(buf.get_u16()),
            request_id: buf.get_u32(),
        })
    }
}
