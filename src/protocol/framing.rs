//! Splitting a byte stream into lines, with a hard limit on line length.
//!
//! [`LineBuffer`] is pure (bytes in, lines out) so that the limit can be tested
//! without sockets; [`LineReader`] drives it from a TCP read half. A line longer than
//! the limit is an error as soon as the limit is passed: it is never buffered whole.
//! A hub ends such a connection; a client, which must not be knocked off by one
//! row, has the line skipped instead (read up to its newline and dropped) and
//! goes on with the next. An idle reader holds no buffer at all, so thousands of
//! idle connections stay cheap.

use bytes::{Bytes, BytesMut};
use std::io;
use thiserror::Error;
use tokio::net::tcp::OwnedReadHalf;

/// Default longest line, in bytes, newline excluded.
pub const DEFAULT_MAX_LINE: usize = 1024 * 1024;

/// How much to read from the socket at a time.
pub(crate) const READ_CHUNK: usize = 16 * 1024;

/// Why reading lines stopped.
#[derive(Debug, Error)]
pub enum LineError {
    /// A line grew past the limit without a newline.
    #[error("line longer than {limit} bytes")]
    TooLong {
        /// The limit in force.
        limit: usize,
    },
    /// A line longer than the limit was read to its end and dropped; the
    /// lines after it follow (only for a skipping buffer).
    #[error("skipped a line of {len} bytes, longer than the limit of {limit}")]
    Skipped {
        /// The line's length.
        len: usize,
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
    /// Skip lines over the limit rather than stop.
    skips: bool,
    /// Skipping a long line: the bytes of it dropped so far.
    skipping: Option<usize>,
}

impl LineBuffer {
    /// A buffer refusing lines longer than `max_line` bytes (newline excluded).
    pub fn new(max_line: usize) -> Self {
        LineBuffer {
            buf: BytesMut::new(),
            scanned: 0,
            max_line,
            skips: false,
            skipping: None,
        }
    }

    /// A buffer that skips lines longer than `max_line` bytes, reporting each.
    pub fn skipping(max_line: usize) -> Self {
        LineBuffer {
            skips: true,
            ..LineBuffer::new(max_line)
        }
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete line (newline stripped), `None` when more bytes are needed,
    /// or an error when the pending line is already over the limit.
    pub fn next_line(&mut self) -> Result<Option<Bytes>, LineError> {
        if let Some(dropped) = self.skipping {
            return self.skip(dropped);
        }
        match memchr::memchr(b'\n', &self.buf[self.scanned..]) {
            Some(offset) => {
                let end = self.scanned + offset;
                if end > self.max_line {
                    if self.skips {
                        return self.skip(0);
                    }
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
                    if self.skips {
                        return self.skip(0);
                    }
                    return Err(LineError::TooLong {
                        limit: self.max_line,
                    });
                }
                Ok(None)
            }
        }
    }

    /// Drops the long line being read up to its newline, `dropped` bytes of it
    /// already gone; reports it once the newline is found.
    fn skip(&mut self, dropped: usize) -> Result<Option<Bytes>, LineError> {
        self.scanned = 0;
        match memchr::memchr(b'\n', &self.buf) {
            Some(offset) => {
                let _ = self.buf.split_to(offset + 1);
                self.skipping = None;
                self.release_if_empty();
                Err(LineError::Skipped {
                    len: dropped + offset,
                    limit: self.max_line,
                })
            }
            None => {
                self.skipping = Some(dropped + self.buf.len());
                self.buf.clear();
                self.release_if_empty();
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

/// Whether bytes wait in the socket under `half`, whatever the runtime's
/// readiness for it says (a peek without waiting).
fn waiting_in_socket(half: &OwnedReadHalf) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    let stream: &tokio::net::TcpStream = half.as_ref();
    matches!(socket2::SockRef::from(stream).peek(&mut byte), Ok(n) if n > 0)
}

/// Reads lines from a TCP read half.
#[derive(Debug)]
pub struct LineReader {
    half: OwnedReadHalf,
    lines: LineBuffer,
    /// Bytes arrived since a line was last taken (or [`LineReader::received`]
    /// last said so).
    arrived: bool,
}

impl LineReader {
    /// Wraps a read half, refusing lines longer than `max_line`.
    pub fn new(half: OwnedReadHalf, max_line: usize) -> Self {
        LineReader {
            half,
            lines: LineBuffer::new(max_line),
            arrived: false,
        }
    }

    /// Wraps a read half, skipping lines longer than `max_line`.
    pub fn skipping(half: OwnedReadHalf, max_line: usize) -> Self {
        LineReader {
            half,
            lines: LineBuffer::skipping(max_line),
            arrived: false,
        }
    }

    /// Whether bytes have arrived since a line was last taken or this last
    /// said so: bytes waiting in the socket (read now, without waiting), or
    /// a part of a line read meanwhile. A part of a line that stays a part
    /// counts once, so a peer cannot seem alive by never ending a line.
    pub fn received(&mut self) -> bool {
        match self.half.try_read_buf(self.lines.spare()) {
            Ok(n) if n > 0 => self.arrived = true,
            Ok(_) => {}
            Err(_) => {
                self.lines.release_if_empty();
                // The runtime reads at most 1,024 sockets' readiness per
                // turn, so in a storm of connections it may not know yet
                // what the socket has: the socket itself is asked.
                if waiting_in_socket(&self.half) {
                    self.arrived = true;
                }
            }
        }
        std::mem::take(&mut self.arrived)
    }

    /// Bytes read and not yet taken as lines.
    pub fn pending(&self) -> usize {
        self.lines.pending()
    }

    /// The next complete line already read, without reading more. A line
    /// taken is news of everything read with it.
    pub fn buffered_line(&mut self) -> Result<Option<Bytes>, LineError> {
        let line = self.lines.next_line()?;
        if line.is_some() {
            self.arrived = false;
        }
        Ok(line)
    }

    /// The next line, or `None` at end of stream. Cancel-safe: dropping the future
    /// loses no bytes.
    pub async fn next_line(&mut self) -> Result<Option<Bytes>, LineError> {
        loop {
            if let Some(line) = self.buffered_line()? {
                return Ok(Some(line));
            }
            // Wait for readiness before allocating, so idle connections cost nothing.
            self.half.readable().await?;
            match self.half.try_read_buf(self.lines.spare()) {
                Ok(0) => {
                    if self.lines.pending() > 0 && self.lines.skipping.is_none() {
                        // A last line without newline still counts, as in Node's split.
                        let rest = self.lines.buf.split().freeze();
                        return Ok(Some(rest));
                    }
                    return Ok(None);
                }
                Ok(_) => self.arrived = true,
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

    #[tokio::test(flavor = "current_thread")]
    async fn bytes_count_as_received_before_the_runtime_sees_them() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (client, (server, _)) = (client.expect("connect"), accepted.expect("accept"));
        let (half, _write) = server.into_split();
        let mut reader = LineReader::new(half, 1024);
        assert!(!reader.received(), "nothing was sent");
        // Sent, and in the socket; with no await since, the runtime has not
        // looked at the socket again.
        client.try_write(b"[\"heartbeat\"]\n").expect("write");
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(reader.received());
    }

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
    fn a_skipping_buffer_drops_long_lines_and_goes_on() {
        let mut b = LineBuffer::skipping(4);
        b.extend(b"ok\n0123456789");
        assert_eq!(b.next_line().ok().flatten().as_deref(), Some(&b"ok"[..]));
        assert!(matches!(b.next_line(), Ok(None)));
        assert_eq!(b.pending(), 0, "the long line is not kept");
        b.extend(b"abc\nnext\n");
        assert!(matches!(
            b.next_line(),
            Err(LineError::Skipped { len: 13, limit: 4 })
        ));
        assert_eq!(b.next_line().ok().flatten().as_deref(), Some(&b"next"[..]));
        // A long line that arrives whole.
        b.extend(b"0123456789\nok\n");
        assert!(matches!(
            b.next_line(),
            Err(LineError::Skipped { len: 10, .. })
        ));
        assert_eq!(b.next_line().ok().flatten().as_deref(), Some(&b"ok"[..]));
    }

    #[test]
    fn a_line_at_the_limit_is_fine() {
        let mut b = LineBuffer::new(4);
        b.extend(b"0123\n");
        assert_eq!(b.next_line().ok().flatten().as_deref(), Some(&b"0123"[..]));
    }
}
