//! Opcodes: what a frame asks for (requests, and the responses that echo them)
//! or announces (events pushed by the server).

use std::fmt;

/// The operation a frame carries. Responses echo the opcode of their request.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opcode {
    /// Handshake: negotiate the protocol version and name the client.
    Hello = 0x01,
    /// Liveness and latency probe.
    Ping = 0x02,
    /// Take a lock, waiting up to a timeout.
    Acquire = 0x10,
    /// Give a lock back.
    Release = 0x11,
    /// Extend a lock's lease.
    Renew = 0x12,
    /// List held locks (this connection's, or the whole server's).
    Held = 0x13,
    /// A kind's current version and mode.
    Version = 0x14,
    /// Server, backend and counters.
    Info = 0x15,
    /// Version 2: how long the server still guarantees this connection's
    /// locks (safe-until).
    Confirm = 0x16,
    /// Admin: move a kind to a new version, draining the old one first.
    Rotate = 0x17,
    /// Admin: abort a kind's rotation, back to normal on its current version.
    RotateAbort = 0x18,
    /// Authenticate the connection with a token (every protocol version).
    Auth = 0x19,
    /// Event: a lock this connection held can no longer be guaranteed.
    LockLost = 0x80,
    /// Event: the server is about to close the connection, and why.
    Closing = 0x81,
    /// Event: how a `ROTATE` of this connection is doing (carries the
    /// `ROTATE`'s request id).
    RotateProgress = 0x82,
}

impl Opcode {
    /// Every opcode, in wire order.
    pub const ALL: [Opcode; 15] = [
        Opcode::Hello,
        Opcode::Ping,
        Opcode::Acquire,
        Opcode::Release,
        Opcode::Renew,
        Opcode::Held,
        Opcode::Version,
        Opcode::Info,
        Opcode::Confirm,
        Opcode::Rotate,
        Opcode::RotateAbort,
        Opcode::Auth,
        Opcode::LockLost,
        Opcode::Closing,
        Opcode::RotateProgress,
    ];

    /// The upper-case name used in logs, PROTOCOL.md and the text form.
    pub fn name(self) -> &'static str {
        match self {
            Opcode::Hello => "HELLO",
            Opcode::Ping => "PING",
            Opcode::Acquire => "ACQUIRE",
            Opcode::Release => "RELEASE",
            Opcode::Renew => "RENEW",
            Opcode::Held => "HELD",
            Opcode::Version => "VERSION",
            Opcode::Info => "INFO",
            Opcode::Confirm => "CONFIRM",
            Opcode::Rotate => "ROTATE",
            Opcode::RotateAbort => "ROTATE_ABORT",
            Opcode::Auth => "AUTH",
            Opcode::LockLost => "LOCK_LOST",
            Opcode::Closing => "CLOSING",
            Opcode::RotateProgress => "ROTATE_PROGRESS",
        }
    }

    /// True for opcodes only the server sends, unprompted.
    pub fn is_event(self) -> bool {
        matches!(self, Opcode::LockLost | Opcode::Closing | Opcode::RotateProgress)
    }
}

impl TryFrom<u8> for Opcode {
    /// The unknown value.
    type Error = u8;

    fn try_from(v: u8) -> Result<Self, u8> {
        Ok(match v {
            0x01 => Opcode::Hello,
            0x02 => Opcode::Ping,
            0x10 => Opcode::Acquire,
            0x11 => Opcode::Release,
            0x12 => Opcode::Renew,
            0x13 => Opcode::Held,
            0x14 => Opcode::Version,
            0x15 => Opcode::Info,
            0x16 => Opcode::Confirm,
            0x17 => Opcode::Rotate,
            0x18 => Opcode::RotateAbort,
            0x19 => Opcode::Auth,
            0x80 => Opcode::LockLost,
            0x81 => Opcode::Closing,
            0x82 => Opcode::RotateProgress,
            other => return Err(other),
        })
    }
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_unknown() {
        for op in Opcode::ALL {
            assert_eq!(Opcode::try_from(op as u8), Ok(op));
        }
        assert_eq!(Opcode::try_from(0x00), Err(0x00));
        assert_eq!(Opcode::try_from(0x7f), Err(0x7f));
        assert_eq!(Opcode::try_from(0xff), Err(0xff));
    }
}
