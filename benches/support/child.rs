//! The supervised service: this benchmark binary run as `seaport-bench --child RV
//! PORT`. Every launcher under test (ours, Node's, supervisord) runs the same
//! program, so only the launchers differ.
//!
//! The child binds `127.0.0.1:PORT` (or, when it is passed a listening socket by
//! systemd's socket-activation convention, takes that one, with the `listenfd`
//! crate as a Rust service would), then
//! reports `PID\n` to the bench's rendezvous port RV (0: no report), and accepts
//! and closes connections until it is killed. A Rust binary starts in about a
//! millisecond, so restart latency measures the launcher, not the service.
//!
//! It cannot outlive the benchmark: it exits when its parent changes (the
//! launcher died and it was re-parented) and after [`MAX_LIFETIME`] in any case.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// A child never lives longer than this, whatever happens to the benchmark.
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// Runs the child service; never returns.
pub fn main(args: &[String]) -> ! {
    let parent = std::os::unix::process::parent_id();
    let (Some(rv), Some(port)) = (
        args.first().and_then(|a| a.parse::<u16>().ok()),
        args.last().and_then(|a| a.parse::<u16>().ok()),
    ) else {
        eprintln!("usage: seaport-bench --child RENDEZVOUS_PORT PORT");
        std::process::exit(2);
    };
    let passed = listenfd::ListenFd::from_env()
        .take_tcp_listener(0)
        .ok()
        .flatten();
    let listener = match passed.map_or_else(|| TcpListener::bind(("127.0.0.1", port)), Ok) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bench child: cannot bind 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        }
    };
    // Kept for the child's life (the bench reads only the first line).
    let _report = (rv != 0)
        .then(|| {
            let mut s = TcpStream::connect(("127.0.0.1", rv)).ok()?;
            writeln!(s, "{} {port}", std::process::id()).ok()?;
            Some(s)
        })
        .flatten();
    thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    let born = Instant::now();
    loop {
        thread::sleep(Duration::from_secs(1));
        if std::os::unix::process::parent_id() != parent || born.elapsed() > MAX_LIFETIME {
            std::process::exit(0);
        }
    }
}

/// One child start as the rendezvous saw it.
#[derive(Debug, Clone, Copy)]
pub struct Start {
    /// The child's pid.
    pub pid: u32,
    /// Its port.
    pub port: u16,
    /// When its report arrived.
    pub at: Instant,
}

/// The bench's end of the rendezvous: a loopback listener whose accepted
/// connections each report one child start.
pub struct Rendezvous {
    port: u16,
    starts: mpsc::Receiver<Start>,
}

impl Rendezvous {
    /// Listens on an ephemeral loopback port; a thread turns reports into [`Start`]s.
    pub fn start() -> super::Res<Rendezvous> {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(super::wrap("bind the rendezvous"))?;
        let port = listener
            .local_addr()
            .map_err(super::wrap("rendezvous address"))?
            .port();
        let (tx, starts) = mpsc::channel();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let tx = tx.clone();
                // One short-lived thread per start: a report is one line.
                thread::spawn(move || {
                    use std::io::BufRead;
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut line = String::new();
                    let mut reader = std::io::BufReader::new(&conn);
                    if reader.read_line(&mut line).is_err() {
                        return;
                    }
                    let at = Instant::now();
                    let mut words = line.split_whitespace();
                    let pid = words.next().and_then(|w| w.parse().ok());
                    let port = words.next().and_then(|w| w.parse().ok());
                    if let (Some(pid), Some(port)) = (pid, port) {
                        let _ = tx.send(Start { pid, port, at });
                    }
                });
            }
        });
        Ok(Rendezvous { port, starts })
    }

    /// The port children report to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The next start, or `None` if none comes before `deadline`.
    pub fn next_before(&self, deadline: Instant) -> Option<Start> {
        let left = deadline.checked_duration_since(Instant::now())?;
        self.starts.recv_timeout(left).ok()
    }

    /// Forgets every start reported so far.
    pub fn drain(&self) -> Vec<Start> {
        self.starts.try_iter().collect()
    }
}
