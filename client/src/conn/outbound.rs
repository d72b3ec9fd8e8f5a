//! The write combiner's state: the frames callers have queued, and who holds
//! the writer role. A caller encodes its frame into `buf` under the
//! connection's mutex; if nobody is writing it takes the role and sends the
//! batch itself (`submit.rs`), and whoever holds the role keeps sending what
//! others appended meanwhile, so a burst leaves in one syscall.

use bytes::BytesMut;

/// How many batches a caller writes inline before handing the rest to the
/// writer task, so one unlucky caller does not carry everyone's traffic.
pub(super) const INLINE_ROUNDS: usize = 4;

/// Write buffers larger than this are not kept for reuse after a burst.
const SPARE_CAPACITY: usize = 64 * 1024;

#[derive(Debug)]
pub(super) struct Outbound {
    /// Frames waiting to be written.
    pub(super) buf: BytesMut,
    /// An empty buffer kept for the next swap with `buf`.
    spare: BytesMut,
    /// Someone (a caller or the writer task) is writing; others only append.
    writing: bool,
    /// A partly written batch handed to the writer task.
    pub(super) stalled: Option<BytesMut>,
}

impl Outbound {
    pub(super) fn new() -> Outbound {
        Outbound {
            buf: BytesMut::with_capacity(4096),
            spare: BytesMut::with_capacity(4096),
            writing: false,
            stalled: None,
        }
    }

    /// Takes the writer role and the frames queued so far, unless someone
    /// already is writing or nothing is queued.
    pub(super) fn start_batch(&mut self) -> Option<BytesMut> {
        if self.writing || self.buf.is_empty() {
            return None;
        }
        self.writing = true;
        let mut chunk = std::mem::take(&mut self.spare);
        std::mem::swap(&mut chunk, &mut self.buf);
        Some(chunk)
    }

    /// The writer sent all of `chunk`: the frames queued meanwhile, to send
    /// next (in `chunk`'s cleared buffer's place), or `None` when there are
    /// none or the connection is `dead` — then the writer role is given up,
    /// and `chunk` kept as the spare unless a burst made it large.
    pub(super) fn next_batch(&mut self, mut chunk: BytesMut, dead: bool) -> Option<BytesMut> {
        chunk.clear();
        if self.buf.is_empty() || dead {
            self.writing = false;
            if chunk.capacity() <= SPARE_CAPACITY {
                self.spare = chunk;
            }
            return None;
        }
        std::mem::swap(&mut chunk, &mut self.buf);
        Some(chunk)
    }
}
