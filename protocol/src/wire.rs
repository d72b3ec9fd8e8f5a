//! Bounds-checked primitive readers and writers shared by every message.
//!
//! Readers never trust a length field beyond the bytes actually present, so a
//! hostile length can neither panic nor make us allocate more than the frame.

use bytes::{Buf, BufMut, Bytes};

use crate::body_error::BodyError;

/// Reads primitives off a frame body, failing with [`BodyError::Truncated`]
/// instead of panicking when the body is short.
pub(crate) struct Reader {
    buf: Bytes,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Self {
        Self { buf }
    }

    fn need(&self, n: usize, field: &'static str) -> Result<(), BodyError> {
        if self.buf.remaining() < n {
            Err(BodyError::Truncated { field })
        } else {
            Ok(())
        }
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, BodyError> {
        self.need(1, field)?;
        Ok(self.buf.get_u8())
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, BodyError> {
        self.need(2, field)?;
        Ok(self.buf.get_u16())
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, BodyError> {
        self.need(4, field)?;
        Ok(self.buf.get_u32())
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, BodyError> {
        self.need(8, field)?;
        Ok(self.buf.get_u64())
    }

    /// A `u8` enum: the value converted by the type's `TryFrom<u8>`, or
    /// [`BodyError::BadEnum`] naming the field and the unknown value. Every
    /// wire enum is decoded through here, so they all fail the same way.
    pub(crate) fn enum_u8<T: TryFrom<u8, Error = u8>>(&mut self, field: &'static str) -> Result<T, BodyError> {
        T::try_from(self.u8(field)?).map_err(|value| BodyError::BadEnum {
            field,
            value: value.into(),
        })
    }

    /// A `bool`: `0` or `1`; any other value is [`BodyError::BadEnum`].
    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool, BodyError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(BodyError::BadEnum {
                field,
                value: value.into(),
            }),
        }
    }

    /// A `u16` length followed by that many bytes of UTF-8.
    pub(crate) fn string(&mut self, field: &'static str) -> Result<String, BodyError> {
        let len = usize::from(self.u16(field)?);
        self.need(len, field)?;
        let raw = self.buf.split_to(len);
        String::from_utf8(raw.to_vec()).map_err(|_| BodyError::NotUtf8 { field })
    }

    /// A `u16` count of items, checked against the bytes left so a forged count
    /// cannot make the caller preallocate a huge vector.
    pub(crate) fn count(&mut self, field: &'static str, min_item_len: usize) -> Result<usize, BodyError> {
        let n = usize::from(self.u16(field)?);
        self.need(n.saturating_mul(min_item_len), field)?;
        Ok(n)
    }

    /// A trailing `u32` that only some peers send (fields added by protocol
    /// version 2 at the end of a body): `None` unless four more bytes are
    /// there. Fewer are left for [`Reader::finish`] to refuse as trailing.
    pub(crate) fn optional_u32(&mut self, field: &'static str) -> Result<Option<u32>, BodyError> {
        if self.buf.remaining() >= 4 {
            self.u32(field).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A trailing string that only some peers send (fields added by protocol
    /// version 3 at the end of a body): `None` if the body ended, or if the
    /// string is empty.
    pub(crate) fn optional_string(&mut self, field: &'static str) -> Result<Option<String>, BodyError> {
        if self.buf.has_remaining() {
            Ok(Some(self.string(field)?).filter(|s| !s.is_empty()))
        } else {
            Ok(None)
        }
    }

    /// How many bytes are left.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.remaining()
    }

    /// Whether any bytes are left.
    pub(crate) fn has_remaining(&self) -> bool {
        self.buf.has_remaining()
    }

    /// Fails if bytes are left over: a body longer than its message is malformed.
    pub(crate) fn finish(self) -> Result<(), BodyError> {
        if self.buf.has_remaining() {
            Err(BodyError::TrailingBytes {
                len: self.buf.remaining(),
            })
        } else {
            Ok(())
        }
    }
}

/// Encoded size of a string field, as [`put_string`] writes it (truncated to
/// `u16::MAX` bytes), so the length prefix always matches the bytes written.
pub(crate) fn string_len(s: &str) -> usize {
    2 + truncate(s, usize::from(u16::MAX)).len()
}

/// Writes a string field. Strings longer than `u16::MAX` are truncated at a
/// char boundary: only server-generated text (messages, info values) can be that
/// long, and a truncated message beats a panic.
pub(crate) fn put_string(buf: &mut impl BufMut, s: &str) {
    let s = truncate(s, usize::from(u16::MAX));
    // `truncate` bounds the length, so the cast cannot lose bits.
    buf.put_u16(s.len() as u16);
    buf.put_slice(s.as_bytes());
}

pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
