//! Passing a child's output through line by line with a prefix, as Procfile runners
//! do (`web.1 | listening`). Bytes that are not UTF-8 pass through unchanged; a
//! very long line is passed on in pieces rather than buffered without end.

use crate::console::{self, Stream};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest piece of a line held before it is written anyway.
const MAX_PENDING: usize = 16 * 1024;

/// Copies `from` to `stream` until end of stream, prefixing every line. It
/// never waits for our own stream: a line it does not take is dropped (see
/// [`console`]), and the child goes on.
pub async fn relay(mut from: impl AsyncRead + Unpin, stream: Stream, prefix: String) {
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = match from.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&chunk[..n]);
        let mut start = 0;
        while let Some(offset) = memchr::memchr(b'\n', &pending[start..]) {
            let end = start + offset + 1;
            console::line(stream, prefixed(&prefix, &pending[start..end]));
            start = end;
        }
        pending.drain(..start);
        if pending.len() >= MAX_PENDING {
            pending.push(b'\n');
            console::line(stream, prefixed(&prefix, &pending));
            pending.clear();
        }
    }
    if !pending.is_empty() {
        pending.push(b'\n');
        console::line(stream, prefixed(&prefix, &pending));
    }
}

/// `prefix` followed by `line`, as one line to write.
fn prefixed(prefix: &str, line: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(prefix.len() + line.len());
    buf.extend_from_slice(prefix.as_bytes());
    buf.extend_from_slice(line);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_each_line() {
        assert_eq!(prefixed("web | ", b"hello\n"), b"web | hello\n");
        assert_eq!(prefixed("web | ", b"\xff raw\n"), b"web | \xff raw\n");
    }
}
