//! The live backends of each route target, as one immutable table that a
//! task rebuilds from the hub's records whenever they change and swaps whole;
//! requests read a snapshot and never wait for it. Choosing a backend is the
//! power of two choices on requests in flight.

use super::proxy::Outgoing;
use super::routes::Routes;
use crate::client::Client;
use hyper::client::conn::http1::SendRequest;
use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};

/// Idle connections kept per backend, at most.
pub const MAX_IDLE: usize = 32;

/// An idle connection older than this is closed rather than used: a backend
/// may close it at any moment after its own keep-alive timeout (Node's is
/// 5 s), and a request sent as it does is lost.
pub const MAX_IDLE_AGE: Duration = Duration::from_secs(4);

/// A backend's failures are logged at most this often.
pub const WARN_EVERY: Duration = Duration::from_secs(5);

/// One backend: a record's address, its requests in flight, and its idle
/// kept-alive connections (closed when the backend leaves the table).
#[derive(Debug)]
pub struct Backend {
    /// The record's id.
    pub id: String,
    /// The record's host.
    pub host: String,
    /// The record's port.
    pub port: u16,
    /// The record's `role@version`: a record registered again as another
    /// (a process replaced on its socket by a new version) is a new
    /// backend, whose connections go to that process only.
    pub registered: String,
    in_flight: AtomicUsize,
    /// Oldest first, each with when it became idle and the worker thread
    /// whose event loop runs it.
    idle: Mutex<Vec<Idle>>,
    /// When a failure was last logged, and how many were not since.
    warned: Mutex<(Option<Instant>, u64)>,
}

impl Backend {
    /// A backend with nothing in flight, for the record `id` registered as
    /// `registered` (its `role@version`) at `host:port`.
    pub fn new(id: &str, host: &str, port: u16, registered: &str) -> Backend {
        Backend {
            id: id.to_string(),
            host: host.to_string(),
            port,
            registered: registered.to_string(),
            in_flight: AtomicUsize::new(0),
            idle: Mutex::new(Vec::new()),
            warned: Mutex::new((None, 0)),
        }
    }

    /// Logs a failure of this backend, at most once per [`WARN_EVERY`]
    /// (with how many were not logged since): a backend that is down under
    /// load must not flood the log.
    pub fn warn(&self, what: std::fmt::Arguments<'_>) {
        let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if warned
            .0
            .is_some_and(|at| now.duration_since(at) < WARN_EVERY)
        {
            warned.1 += 1;
            return;
        }
        let quiet = std::mem::take(&mut warned.1);
        warned.0 = Some(now);
        drop(warned);
        if quiet > 0 {
            tracing::warn!(
                "{}:{}: {what} ({quiet} more since the last warning)",
                self.host,
                self.port
            );
        } else {
            tracing::warn!("{}:{}: {what}", self.host, self.port);
        }
    }

    /// Requests in flight to it now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// An idle connection of this thread's worker, most recently used
    /// first; those idle longer than [`MAX_IDLE_AGE`] are closed.
    pub fn take_idle(&self) -> Option<SendRequest<Outgoing>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        drop_stale(&mut idle, Instant::now());
        let worker = this_worker();
        while let Some(at) = idle.iter().rposition(|i| i.worker == worker) {
            let Idle { sender, .. } = idle.remove(at);
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    /// Keeps a connection whose last response has ended, unless
    /// [`MAX_IDLE`] of this thread's worker are kept already (then it closes).
    pub fn put_idle(&self, sender: SendRequest<Outgoing>) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        drop_stale(&mut idle, now);
        let worker = this_worker();
        let kept = |idle: &[Idle]| idle.iter().filter(|i| i.worker == worker).count();
        if kept(&idle) >= MAX_IDLE {
            idle.retain(|i| !i.sender.is_closed());
        }
        if kept(&idle) < MAX_IDLE {
            idle.push(Idle {
                sender,
                since: now,
                worker,
            });
        }
    }
}

/// An idle connection to a backend.
#[derive(Debug)]
struct Idle {
    sender: SendRequest<Outgoing>,
    since: Instant,
    worker: usize,
}

/// Closes the connections idle longer than [`MAX_IDLE_AGE`] at `now`: a
/// prefix, since `idle` is oldest first.
fn drop_stale(idle: &mut Vec<Idle>, now: Instant) {
    let stale = idle.partition_point(|i| now.duration_since(i.since) > MAX_IDLE_AGE);
    idle.drain(..stale);
}

thread_local! {
    /// The router worker this thread is, from 1 (0: none, the caller's
    /// runtime serves).
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Makes this thread router worker `worker`: the idle connections it takes
/// are those its own event loop runs.
pub fn set_worker(worker: usize) {
    WORKER.with(|w| w.set(worker));
}

fn this_worker() -> usize {
    WORKER.with(std::cell::Cell::get)
}

/// Counts a request in flight to a backend until dropped (when the response
/// body has ended, or the request failed).
#[derive(Debug)]
pub struct InFlight(Arc<Backend>);

impl InFlight {
    /// Counts one more request to `backend`.
    pub fn new(backend: Arc<Backend>) -> InFlight {
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(backend)
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The backends of every route target, by target index.
#[derive(Debug, Default)]
pub struct Table {
    sets: Vec<Vec<Arc<Backend>>>,
}

/// What makes a backend the same one from one table to the next: the
/// record's id, host, port and `role@version`.
type BackendKey = (String, String, u16, String);

impl Table {
    /// The table for `routes` from the records `client` holds now; a
    /// backend already in `previous` (same id, host, port, role and
    /// version) is kept, with its requests in flight and its idle
    /// connections.
    pub fn build(routes: &Routes, client: &Client, previous: &Table) -> Table {
        // One backend per record, whichever targets it serves, so that its
        // load and its connections are counted once.
        let mut known: HashMap<BackendKey, Arc<Backend>> = previous
            .sets
            .iter()
            .flatten()
            .map(|b| {
                let key = (b.id.clone(), b.host.clone(), b.port, b.registered.clone());
                (key, Arc::clone(b))
            })
            .collect();
        let sets = routes
            .targets()
            .iter()
            .map(|pattern| {
                let mut set: Vec<Arc<Backend>> = client
                    .query_pattern(pattern)
                    .iter()
                    .filter_map(|record| {
                        let registered = format!(
                            "{}@{}",
                            record.role().unwrap_or_default(),
                            record.version().unwrap_or_default()
                        );
                        let key = (
                            record.id().to_string(),
                            record.host()?.to_string(),
                            record.port()?,
                            registered,
                        );
                        let backend =
                            known
                                .entry(key)
                                .or_insert_with_key(|(id, host, port, registered)| {
                                    Arc::new(Backend::new(id, host, *port, registered))
                                });
                        Some(Arc::clone(backend))
                    })
                    .collect();
                set.sort_by(|a, b| a.id.cmp(&b.id));
                set
            })
            .collect();
        Table { sets }
    }

    /// The backends of target `index`.
    pub fn backends(&self, index: usize) -> &[Arc<Backend>] {
        self.sets.get(index).map_or(&[], Vec::as_slice)
    }
}

/// Chooses among `backends` but those `tried`: two at random, the one with
/// fewer requests in flight (power of two choices); `None` if none is left.
pub fn pick(
    backends: &[Arc<Backend>],
    tried: &[String],
    rng: &mut impl Rng,
) -> Option<Arc<Backend>> {
    let left = || backends.iter().filter(|b| !tried.contains(&b.id));
    let n = left().count();
    let (a, b) = match n {
        0 => return None,
        1 => return left().next().cloned(),
        n => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            (left().nth(a)?, left().nth(b)?)
        }
    };
    Some(Arc::clone(if b.in_flight() < a.in_flight() {
        b
    } else {
        a
    }))
}

/// The routes and the backends of their targets, taken together: requests
/// read one snapshot, so a target index always means the same in both.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Where requests go.
    pub routes: Arc<Routes>,
    /// The backends of each target of `routes`.
    pub table: Table,
}

/// Keeps `snapshot` following the hub and the routes: rebuilt from
/// `client`'s records after every change of either (changes that come
/// together are taken together). Ends when the client's events end or the
/// routes' sender is gone.
pub async fn follow(
    client: Client,
    mut routes: watch::Receiver<Arc<Routes>>,
    snapshot: watch::Sender<Arc<Snapshot>>,
) {
    let mut events = client.events();
    loop {
        let current = routes.borrow_and_update().clone();
        let table = Table::build(&current, &client, &snapshot.borrow().table);
        snapshot.send_replace(Arc::new(Snapshot {
            routes: current,
            table,
        }));
        // Any event may change the records: a register or free, a dump
        // ended, a hub lost.
        tokio::select! {
            event = events.recv() => {
                if let Err(broadcast::error::RecvError::Closed) = event {
                    return;
                }
            }
            changed = routes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        // Take what else came with it before rebuilding.
        while let Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) = events.try_recv() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn backends(loads: &[usize]) -> Vec<Arc<Backend>> {
        loads
            .iter()
            .enumerate()
            .map(|(i, &load)| {
                let b = Arc::new(Backend::new(
                    &format!("b{i}"),
                    "127.0.0.1",
                    1000 + i as u16,
                    "web@1.0.0",
                ));
                b.in_flight.store(load, Ordering::Relaxed);
                b
            })
            .collect()
    }

    #[test]
    fn of_two_the_less_loaded_wins_and_tried_ones_are_skipped() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let set = backends(&[5, 0]);
        for _ in 0..20 {
            assert_eq!(pick(&set, &[], &mut rng).unwrap().id, "b1");
        }
        assert_eq!(pick(&set, &["b1".into()], &mut rng).unwrap().id, "b0");
        assert!(pick(&set, &["b0".into(), "b1".into()], &mut rng).is_none());
        assert!(pick(&[], &[], &mut rng).is_none());
    }

    #[test]
    fn load_spreads_over_equal_backends() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let set = backends(&[0, 0, 0, 0]);
        let mut held = Vec::new();
        for _ in 0..40 {
            held.push(InFlight::new(pick(&set, &[], &mut rng).unwrap()));
        }
        let loads: Vec<usize> = set.iter().map(|b| b.in_flight()).collect();
        assert!(loads.iter().all(|&l| (6..=14).contains(&l)), "{loads:?}");
        drop(held);
        assert!(set.iter().all(|b| b.in_flight() == 0));
    }
}
