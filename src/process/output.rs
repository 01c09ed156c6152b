//! Passing a child's output through line by line with a prefix, as Procfile runners
//! do (`web.1 | listening`). Bytes that are not UTF-8 pass through unchanged; a
//! very long line is passed on in pieces rather than buffered without end.

use std::io::Write;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest piece of a line held before it is written anyway.
const MAX_PENDING: usize = 16 * 1024;

/// Which of our streams to write to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// Our stdout.
    Stdout,
    /// Our stderr.
    Stderr,
}

/// Copies `from` to `sink` until end of stream, prefixing every line.
pub async fn relay(mut from: impl AsyncRead + Unpin, sink: Sink, prefix: String) {
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
            write_line(sink, &prefix, &pending[start..end]);
            start = end;
        }
        pending.drain(..start);
        if pending.len() >= MAX_PENDING {
            pending.push(b'\n');
            write_line(sink, &prefix, &pending);
            pending.clear();
        }
    }
    if !pending.is_empty() {
        pending.push(b'\n');
        write_line(sink, &prefix, &pending);
    }
}

fn write_line(sink: Sink, prefix: &str, line: &[u8]) {
    // One locked write per line keeps lines of different children from interleaving.
    let result = match sink {
        Sink::Stdout => write_prefixed(&mut std::io::stdout().lock(), prefix, line),
        Sink::Stderr => write_prefixed(&mut std::io::stderr().lock(), prefix, line),
    };
    // A closed stdout (say, a pipe to `head`) must not stop the supervisor.
    let _ = result;
}

fn write_prefixed(out: &mut impl Write, prefix: &str, line: &[u8]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(prefix.len() + line.len());
    buf.extend_from_slice(prefix.as_bytes());
    buf.extend_from_slice(line);
    out.write_all(&buf)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_each_line() {
        let mut out = Vec::new();
        write_prefixed(&mut out, "web | ", b"hello\n").unwrap();
        write_prefixed(&mut out, "web | ", b"\xff raw\n").unwrap();
        assert_eq!(out, b"web | hello\nweb | \xff raw\n");
    }
}
