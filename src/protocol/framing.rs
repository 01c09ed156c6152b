//! Splitting a byte stream into lines, with a hard limit on line length.
//!
//! [`LineBuffer`] is pure (bytes in, lines out) so that the limit can be tested
//! without sockets; [`LineReader`] drives it from a TCP read half. A line longer than
//! the limit is an error as soon as the limit is passed: it is never buffered whole.
//! An idle reader holds no buffer at all, so thousands of idle connections stay cheap.

use bytes::{Bytes, BytesMut};
use std::io;
use thiserror::Error;
use tokio::net::tcp::OwnedReadHalf;

/// Default longest line, in bytes, newline excluded.
pub const DEFAULT_MAX_LINE: usize = 1024 * 1024;

/// How much to read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Why reading lines stopped.
#[derive(Debug, Error)]
pub enum LineError {
    /// A line grew past the limit without a newline.
    #[error("line longer than {limit} bytes")]
    TooLong {
        /// The limit in force.
        limit: usize,
    },
    /// The socket failed.
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
}

/// Accumulates bytes and hands out complete lines.
#[derive(Debug)]
pub struct LineBuffer {
    buf: BytesMut,
    /// Bytes at the front of `buf` already known to hold no newline.
    scanned: usize,
    max_line: usize,
}

impl LineBuffer {
    /// A buffer refusing lines longer than `max_line` bytes (newline excluded).
    pub fn new(max_line: usize) -> Self {
        LineBuffer {
            buf: BytesMut::new(),
            scanned: 0,
            max_line,
        }
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete line (newline stripped), `None` when more bytes are needed,
    /// or an error when the pending line is already over the limit.
    pub fn next_line(&mut self) -> Result<Option<Bytes>, LineError> {
        match memchr::memchr(b'\n', &self.buf[self.scanned..]) {
            Some(offset) => {
                let end = self.scanned + offset;
                if end > self.max_line {
                    return Err(LineError::TooLong {
                        limit: self.max_line,
                    });
                }
                let mut line = self.buf.split_to(end + 1);
                line.truncate(end);
                self.scanned = 0;
                if self.buf.is_empty() {
                    // Give the memory back: an idle connection should hold no buffer.
                    self.buf = BytesMut::new();
                }
                Ok(Some(line.freeze()))
            }
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() > self.max_line {
                    return Err(LineError::TooLong {
                        limit: self.max_line,
                    });
                }
                Ok(None)
            }
        }
    }

    /// Bytes received after the last complete line.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Frees the buffer when it holds nothing.
    fn release_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }

    fn spare(&mut self) -> &mut BytesMut {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        &mut self.buf
    }
}

/// Reads lines from a TCP read half.
#[derive(Debug)]
pub struct LineReader {
    half: OwnedReadHalf,
    lines: LineBuffer,
}

impl LineReader {
    /// Wraps a read half, refusing lines longer than `max_line`.
    pub fn new(half: OwnedReadHalf, max_line: usize) -> Self {
        LineReader {
            half,
            lines: LineBuffer::new(max_line),
        }
    }

    /// The next complete line already read, without reading more.
    pub fn buffered_line(&mut self) -> Result<Option<Bytes>, LineError> {
        self.lines.next_line()
    }

    /// The next line, or `None` at end of stream. Cancel-safe: dropping the future
    /// loses no bytes.
    pub async fn next_line(&mut self) -> Result<Option<Bytes>, LineError> {
        loop {
            if let Some(line) = self.lines.next_line()? {
                return Ok(Some(line));
            }
            // Wait for readiness before allocating, so idle connections cost nothing.
            self.half.readable().await?;
            match self.half.try_read_buf(self.lines.spare()) {
                Ok(0) => {
                    if self.lines.pending() > 0 {
                        // A last line without newline still counts, as in Node's split.
                        let rest = self.lines.buf.split().freeze();
                        return Ok(Some(rest));
                    }
                    return Ok(None);
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Readiness can be reported with nothing to read (tokio reports
                    // every new socket readable once): give back the chunk reserved
                    // for this read, or each idle connection would keep it.
                    self.lines.release_if_empty();
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_across_chunks() {
        let mut b = LineBuffer::new(100);
        b.extend(b"[\"a\"]\n[\"b");
        assert_eq!(
            b.next_line().ok().flatten().as_deref(),
            Some(&b"[\"a\"]"[..])
        );
        assert!(matches!(b.next_line(), Ok(None)));
        b.extend(b"\"]\n");
        assert_eq!(
            b.next_line().ok().flatten().as_deref(),
            Some(&b"[\"b\"]"[..])
        );
        assert!(matches!(b.next_line(), Ok(None)));
        assert_eq!(b.pending(), 0);
    }

    #[test]
    fn refuses_a_long_line_before_it_ends() {
        let mut b = LineBuffer::new(10);
        b.extend(b"0123456789");
        assert!(matches!(b.next_line(), Ok(None)));
        b.extend(b"x");
        assert!(matches!(
            b.next_line(),
            Err(LineError::TooLong { limit: 10 })
        ));
    }

    #[test]
    fn refuses_a_long_line_that_arrived_whole() {
        let mut b = LineBuffer::new(4);
        b.extend(b"ok\n0123456\nok\n");
        assert_eq!(b.next_line().ok().flatten().as_deref(), Some(&b"ok"[..]));
        assert!(matches!(
            b.next_line(),
            Err(LineError::TooLong { limit: 4 })
        ));
    }

    #[test]
    fn a_line_at_the_limit_is_fine() {
        let mut b = LineBuffer::new(4);
        b.extend(b"0123\n");
        assert_eq!(b.next_line().ok().flatten().as_deref(), Some(&b"0123"[..]));
    }
}
