//! Connections over TCP, one layer above the pure protocol: why a connection
//! ended, how refused rows are logged, accepting under a cap ([`accept`]) and
//! how long an HTTP connection has been silent ([`idle`]), both for the
//! router and the admin endpoint, and the [`link`] that clients and a hub's
//! peer links use to talk to a hub.

pub mod accept;
pub mod idle;
pub mod link;

use crate::protocol::wire::WireError;
use std::fmt;
use std::io;
use std::time::Duration;

/// Why a connection ended.
#[derive(Debug)]
pub enum End {
    /// The other side closed it.
    Closed,
    /// Nothing arrived from the other side for this long.
    TimedOut(Duration),
    /// The other side sent a line longer than this many bytes.
    TooLong(usize),
    /// Reading or writing failed.
    Failed(io::Error),
    /// This side closed it: the owner stopped, or cut the connection off.
    Stopped,
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Closed => f.write_str("closed by the other side"),
            End::TimedOut(t) => write!(f, "nothing received for {} ms", t.as_millis()),
            End::TooLong(limit) => write!(f, "received a line longer than {limit} bytes"),
            End::Failed(e) => write!(f, "{e}"),
            End::Stopped => f.write_str("closed by this side"),
        }
    }
}

/// A Node peer's heartbeat interval, unless it was started with another one.
pub const NODE_HEARTBEAT: Duration = Duration::from_secs(15);

/// The longest heartbeat interval believed: a peer saying it beats less often
/// still gets no more than three of these.
const MAX_HEARTBEAT: Duration = Duration::from_secs(600);

/// How long the other side of a connection may stay silent: our own timeout, but
/// never less than three of its heartbeats. Our hubs and clients say how often
/// they send one (in `helo` and `heartbeat` rows); a peer that says nothing is
/// taken for a Node peer on its default. So short heartbeats on one side never
/// cut off a live peer with long ones, and a connection that sends nothing at
/// all is still dropped, after at most three of the longest heartbeats.
pub fn patience(timeout: Duration, their_heartbeat: Option<Duration>) -> Duration {
    let heartbeat = their_heartbeat.unwrap_or(NODE_HEARTBEAT).min(MAX_HEARTBEAT);
    timeout.max(heartbeat.saturating_mul(3))
}

/// Refused rows logged per connection before the rest are only counted: a peer
/// sending nothing but junk must not flood the log.
const LOGGED_BAD_ROWS: u32 = 10;

/// Logs the rows a connection refuses, naming the other side.
#[derive(Debug)]
pub struct BadRows {
    from: String,
    count: u32,
}

impl BadRows {
    /// A log of refused rows from `from` (an address or a hub).
    pub fn new(from: impl Into<String>) -> Self {
        BadRows {
            from: from.into(),
            count: 0,
        }
    }

    /// Logs a refused line with the reason and the start of the line.
    pub fn log(&mut self, line: &[u8], error: &WireError) {
        self.count = self.count.saturating_add(1);
        if self.count <= LOGGED_BAD_ROWS {
            let excerpt = String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();
            tracing::warn!(from = %self.from, "dropped row: {error}: {excerpt:?}");
        }
        if self.count == LOGGED_BAD_ROWS {
            tracing::warn!(from = %self.from, "further bad rows from here are dropped without logging");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patience_is_three_of_the_other_sides_heartbeats_or_our_timeout() {
        let ms = Duration::from_millis;
        // Short heartbeats here, long ones there: three of theirs.
        assert_eq!(patience(ms(60), Some(ms(15_000))), ms(45_000));
        // A peer that says nothing is a Node peer on its default.
        assert_eq!(patience(ms(60), None), ms(45_000));
        // Our own timeout when it is the longer.
        assert_eq!(patience(ms(90_000), Some(ms(200))), ms(90_000));
        assert_eq!(patience(ms(600), Some(ms(200))), ms(600));
        // A peer cannot buy itself more than three of the longest heartbeats.
        assert_eq!(patience(ms(60), Some(ms(u64::MAX))), ms(1_800_000));
    }
}
