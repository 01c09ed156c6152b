//! The benchmark's parts: one module per concern, one per scenario family.
//!
//! - [`procs`]: processes under test (hubs, launchers, supervisors), killed on drop,
//!   and what `/proc` says about them (RSS, CPU time).
//! - [`child`]: the service the launchers and supervisors run (this very binary
//!   in `--child` mode), and the rendezvous that reports each start.
//! - [`load`]: raw-protocol load generation over TCP: pre-serialised rows, fleets of
//!   connections, watchers that count or time what a hub forwards.
//! - [`hubs`]: the hub scenarios (throughput, latency, free, memory, signed).
//! - [`store`]: the scale scenario: raw etcd, our hubs over etcd, a mesh.
//! - [`supervisors`]: the supervisor scenarios (restart latency, idle CPU, RSS).
//! - [`router`]: the router scenario (wrk against ours, bouncy and nginx), and
//!   [`http_backend`], the backend behind them (this binary in
//!   `--http-backend` mode).
//! - [`report`]: figures, targets, the table, JSON and Markdown output.

pub mod child;
/// Debian's programs, installed when missing (shared with the tests).
#[path = "../../tests/support/debian.rs"]
pub mod debian;
/// Real etcd members on loopback (shared with the tests), for the scale
/// scenario (the tests use more of it than the benchmark does).
#[allow(dead_code)]
#[path = "../../tests/support/etcd.rs"]
pub mod etcd;
pub mod http_backend;
pub mod hubs;
pub mod load;
pub mod procs;
pub mod report;
pub mod router;
pub mod store;
pub mod supervisors;

/// Errors are messages: a benchmark reports them and goes on with the next scenario.
pub type Res<T> = Result<T, String>;

/// Formats an error with its context.
pub fn wrap<E: std::fmt::Display>(what: impl std::fmt::Display) -> impl FnOnce(E) -> String {
    move |e| format!("{what}: {e}")
}

/// What every scenario gets.
pub struct Ctx {
    /// Binaries and paths.
    pub env: procs::Env,
    /// The load generator's runtime.
    pub rt: tokio::runtime::Runtime,
    /// The small version of every scenario.
    pub quick: bool,
    /// `--sizes CxR,...`: the sizes of the throughput, storm and scale scenarios instead
    /// of their defaults.
    pub sizes: Option<Vec<(usize, usize)>>,
    /// The hubs to measure: both unless `--ours-only` (for profiling runs).
    pub hubs: &'static [procs::HubKind],
}

impl Ctx {
    /// A deadline: `quick` seconds in quick mode, `full` otherwise.
    pub fn limit(&self, quick: u64, full: u64) -> std::time::Duration {
        std::time::Duration::from_secs(if self.quick { quick } else { full })
    }
}
