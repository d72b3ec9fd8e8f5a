//! The tokio-util codec: `LengthDelimitedCodec` with an explicit frame limit,
//! plus the fixed header. Only framing errors are errors of the codec (and so
//! fatal to the connection); bodies are decoded by the caller, message by
//! message, so a bad body costs one error reply and nothing more.

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::constants::{DEFAULT_MAX_FRAME_LEN, HEADER_LEN, LENGTH_PREFIX_LEN, MAX_FRAME_LEN_CEILING, PROTOCOL_VERSION};
use crate::header::Header;
use crate::message::{Event, Request, Response};

/// A fatal framing error: the byte stream can no longer be trusted.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announces more than the configured limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The frame is too short to hold the 8-byte header.
    #[error("frame of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    TooShort(usize),
    /// The header names a protocol version this side does not speak.
    #[error("unsupported protocol version {0} (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u8),
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// One decoded frame: its header and its still-encoded body (a zero-copy slice
/// of the read buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The fixed header.
    pub header: Header,
    /// The body, to be decoded with [`Request::decode`], [`Response::decode`] or
    /// [`Event::decode`] according to the header.
    pub body: Bytes,
}

/// Length-delimited frames with Clastor's header. Encodes requests, responses
/// and events; decodes [`Frame`]s.
#[derive(Debug)]
pub struct ClastorCodec {
    length_delimited: LengthDelimitedCodec,
    max_frame_len: usize,
    /// The inner codec has consumed a length prefix whose frame is not complete
    /// yet, so the buffer now starts with header or body bytes, not a length.
    in_frame: bool,
}

impl ClastorCodec {
    /// A codec that refuses frames longer than `max_frame_len` (clamped to
    /// `HEADER_LEN ..= MAX_FRAME_LEN_CEILING`).
    pub fn new(max_frame_len: usize) -> ClastorCodec {
        let max_frame_len = max_frame_len.clamp(HEADER_LEN, MAX_FRAME_LEN_CEILING);
        let length_delimited = LengthDelimitedCodec::builder()
            .big_endian()
            .length_field_length(4)
            .max_frame_length(max_frame_len)
            .new_codec();
        ClastorCodec {
            length_delimited,
            max_frame_len,
            in_frame: false,
        }
    }

    /// The limit this codec enforces.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }
}

impl Default for ClastorCodec {
    fn default() -> Self {
        ClastorCodec::new(DEFAULT_MAX_FRAME_LEN)
    }
}

impl Decoder for ClastorCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        // Check the announced length ourselves so the error names it. Only at a
        // frame boundary: once the inner codec has taken the prefix of a frame
        // still arriving, the buffer starts with that frame's header instead.
        if !self.in_frame && src.len() >= LENGTH_PREFIX_LEN {
            let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
            if len > self.max_frame_len {
                return Err(FrameError::TooLarge {
                    len,
                    max: self.max_frame_len,
                });
            }
        }
        let before = src.len();
        // The length was checked above, so the inner codec can only fail on I/O.
        let Some(mut frame) = self.length_delimited.decode(src)? else {
            // The inner codec consumes the prefix as soon as it is complete,
            // before the rest of the frame has arrived.
            if src.len() < before {
                self.in_frame = true;
            }
            return Ok(None);
        };
        self.in_frame = false;
        let len = frame.len();
        let Some(header) = Header::read(&mut frame) else {
            return Err(FrameError::TooShort(len));
        };
        if header.version != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion(header.version));
        }
        Ok(Some(Frame {
            header,
            body: frame.freeze(),
        }))
    }
}

impl Encoder<&Response> for ClastorCodec {
    type Error = FrameError;

    fn encode(&mut self, item: &Response, dst: &mut BytesMut) -> Result<(), FrameError> {
        item.encode(dst);
        Ok(())
    }
}

impl Encoder<&Event> for ClastorCodec {
    type Error = FrameError;

    fn encode(&mut self, item: &Event, dst: &mut BytesMut) -> Result<(), FrameError> {
        item.encode(dst);
        Ok(())
    }
}

impl Encoder<(u32, &Request)> for ClastorCodec {
    type Error = FrameError;

    fn encode(&mut self, (request_id, item): (u32, &Request), dst: &mut BytesMut) -> Result<(), FrameError> {
        item.encode(request_id, dst);
        Ok(())
    }
}

/// Splits one complete frame off the front of `buf` without a codec: handy for
/// tests and tools. Returns `None` if `buf` does not start with a whole frame.
pub fn split_frame(buf: &mut BytesMut) -> Option<Frame> {
    if buf.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len < HEADER_LEN || buf.len() < 4 + len {
        return None;
    }
    buf.advance(4);
    let mut frame = buf.split_to(len);
    let header = Header::read(&mut frame)?;
    Some(Frame {
        header,
        body: frame.freeze(),
    })
}
