//! One running service: start the command with its port, register the record when
//! the service is ready, free it the moment the process exits, restart by the
//! policy, and obey start/stop/restart commands. Used by `seaport register` (one
//! instance) and `seaport supervise` (many).
//!
//! The record keeps one id and one port for the instance's whole life, so a
//! restarted service comes back exactly where it was.

use crate::client::{Client, PortLease, Registration};
use crate::console::Stream;
use crate::human::format_duration;
use crate::process::activation::{self, HeldSocket};
use crate::process::child::{Launch, Running, Tree};
use crate::process::health::{Health, HealthCheck, Target};
use crate::process::output::relay;
use crate::process::ready::{Listening, wait_ready};
use crate::process::restart::{Decision, Exit, Restarts};
use crate::process::settings::RunSettings;
use crate::protocol::wire::Meta;
use crate::registry::ports;
use crate::registry::ports::PortRange;
use crate::registry::record::new_id;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long to wait for a hub's records before choosing a port without them.
const PORT_WAIT: Duration = Duration::from_secs(5);

/// Where the port comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortChoice {
    /// This port.
    Fixed(u16),
    /// A free port from this range.
    Range(PortRange),
}

/// Everything needed to run one instance of a service.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceSpec {
    /// Name in logs, output prefixes and `seaport ps` (`web` or `web.2`).
    pub name: String,
    /// `name@version` to register.
    pub role: String,
    /// User metadata for the record.
    pub meta: Meta,
    /// Program and arguments (the port is appended).
    pub command: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// Port or range.
    pub port: PortChoice,
    /// Readiness, restarts and stopping.
    pub run: RunSettings,
    /// Prefix each output line with the name (else output is inherited as is).
    pub prefix_output: bool,
    /// The health check, if the service has one.
    pub health: Option<HealthCheck>,
}

/// An instance's state, as `seaport ps` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Started, not ready yet.
    Starting,
    /// Ready and registered.
    Ready,
    /// Waiting to restart.
    Backoff,
    /// Being stopped: its record is freed, its processes have their stop
    /// signal and time.
    Stopping,
    /// Not running, by request or by policy.
    Stopped,
    /// Gave up, or could not get a port.
    Failed,
}

impl State {
    /// Every state.
    pub const ALL: [State; 6] = [
        State::Starting,
        State::Ready,
        State::Backoff,
        State::Stopping,
        State::Stopped,
        State::Failed,
    ];

    /// Its name, in `ps` tables and JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Backoff => "backoff",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Failed => "failed",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot of an instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// Current state.
    pub state: State,
    /// The process id while one runs.
    pub pid: Option<u32>,
    /// The service port, once chosen.
    pub port: Option<u16>,
    /// How many times the command was started again.
    pub restarts: u32,
    /// How many times no port could be had for it (none free in its range,
    /// or its fixed port held by another process).
    pub port_failures: u32,
    /// When the current process started.
    pub started: Option<Instant>,
    /// Why it failed or stopped, if it did.
    pub message: Option<String>,
    /// How the last process ended.
    pub last_exit: Option<Exit>,
    /// The last health check's verdict, for a service with checks.
    pub health: Option<Health>,
    /// How many requests the instance has taken and carried through (to a
    /// ready, stopped or failed instance).
    pub answered: u64,
    /// Why the last request could not be carried out (a replacement that
    /// failed, the old process going on), if it could not.
    pub unmet: Option<String>,
}

/// A request to an instance.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Start if stopped or failed.
    Start,
    /// Stop (and stay stopped).
    Stop,
    /// Stop if running, then start with a fresh backoff.
    Restart,
    /// Run this spec (the instance's changed file; the same port) instead:
    /// with a held socket, a new process replaces the running one before it
    /// stops (as a restart does), else a restart; a stopped instance takes
    /// it for its next start.
    Reload(Box<InstanceSpec>),
}

/// A handle on a running instance task.
#[derive(Debug)]
pub struct Instance {
    requests: mpsc::UnboundedSender<Request>,
    /// How many requests were sent, by this and every [`Handle`].
    sent: Arc<Mutex<u64>>,
    status: watch::Receiver<Status>,
    task: JoinHandle<()>,
}

impl Instance {
    /// Starts the instance's task; it registers through `client`.
    pub fn spawn(spec: InstanceSpec, client: Client) -> Instance {
        Instance::spawn_as(spec, client, true)
    }

    /// Takes the instance's port (chosen, checked, bound with a held socket)
    /// but starts nothing until a [`Request::Start`].
    pub fn spawn_stopped(spec: InstanceSpec, client: Client) -> Instance {
        Instance::spawn_as(spec, client, false)
    }

    fn spawn_as(spec: InstanceSpec, client: Client, start: bool) -> Instance {
        let (requests, rx) = mpsc::unbounded_channel();
        let (status_tx, status) = watch::channel(Status {
            state: if start {
                State::Starting
            } else {
                State::Stopped
            },
            pid: None,
            port: None,
            restarts: 0,
            port_failures: 0,
            started: None,
            message: None,
            last_exit: None,
            health: None,
            answered: 0,
            unmet: None,
        });
        let task = tokio::spawn(run(
            spec,
            client,
            Requests { rx, taken: 0 },
            status_tx,
            start,
        ));
        Instance {
            requests,
            sent: Arc::default(),
            status,
            task,
        }
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver of status changes.
    pub fn watch(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Sends a request; ignored if the instance has shut down.
    pub fn request(&self, request: Request) {
        let _ = send_counted(&self.requests, &self.sent, request);
    }

    /// Stops the process (stop signal, then SIGKILL after the timeout), frees the
    /// record and ends the task. [`Handle`]s do not keep it going.
    pub async fn shutdown(self) {
        self.request(Request::Stop);
        drop(self.requests);
        let _ = self.task.await;
    }

    /// A handle to request and watch the instance from another task, for
    /// as long as the instance lives.
    pub fn handle(&self) -> Handle {
        Handle {
            requests: self.requests.downgrade(),
            sent: self.sent.clone(),
            status: self.status.clone(),
        }
    }

    /// A handle that ends the task at once, killing every process of the
    /// service (for a second interrupt, when waiting for a graceful stop is not
    /// wanted).
    pub fn abort_handle(&self) -> tokio::task::AbortHandle {
        self.task.abort_handle()
    }
}

/// Requests and status of an instance, for a task of its own (a rolling
/// restart).
#[derive(Debug, Clone)]
pub struct Handle {
    requests: mpsc::WeakUnboundedSender<Request>,
    sent: Arc<Mutex<u64>>,
    status: watch::Receiver<Status>,
}

/// Sends `request` and counts it, as one step, so that the count is its
/// place among the instance's requests; `None` if the instance is gone.
fn send_counted(
    requests: &mpsc::UnboundedSender<Request>,
    sent: &Mutex<u64>,
    request: Request,
) -> Option<u64> {
    let mut sent = sent
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    requests.send(request).ok()?;
    *sent += 1;
    Some(*sent)
}

impl Handle {
    /// Restarts the instance and waits until the restart is carried
    /// through: `Ok` once a new process is ready, else why not (it failed,
    /// was stopped, or the new process did not take over).
    pub async fn restart_until_ready(&mut self) -> Result<(), String> {
        self.until_ready(Request::Restart).await
    }

    /// Runs `spec` (the instance's changed file; same port) instead, and
    /// waits until that is carried through, as [`Handle::restart_until_ready`]
    /// does.
    pub async fn reload_until_ready(&mut self, spec: InstanceSpec) -> Result<(), String> {
        self.until_ready(Request::Reload(Box::new(spec))).await
    }

    /// Starts the instance and waits until it is ready, as
    /// [`Handle::restart_until_ready`] does.
    pub async fn start_until_ready(&mut self) -> Result<(), String> {
        self.until_ready(Request::Start).await
    }

    async fn until_ready(&mut self, request: Request) -> Result<(), String> {
        let gone = || "the instance is gone".to_string();
        let requests = self.requests.upgrade().ok_or_else(gone)?;
        // Requests are taken in order: ours is answered once this many are.
        let mine = send_counted(&requests, &self.sent, request).ok_or_else(gone)?;
        drop(requests);
        loop {
            {
                let status = self.status.borrow_and_update();
                if status.answered >= mine {
                    return match (status.state, &status.unmet) {
                        (State::Ready, None) => Ok(()),
                        (State::Backoff, None) => Err(status.last_exit.map_or_else(
                            || "it is restarting".to_string(),
                            |exit| format!("it {exit} and is restarting"),
                        )),
                        (_, Some(why)) => Err(why.clone()),
                        (state, None) => Err(status
                            .message
                            .clone()
                            .unwrap_or_else(|| format!("it is {state}"))),
                    };
                }
            }
            self.status.changed().await.map_err(|_| gone())?;
        }
    }
}

/// The instance's end of its requests: counts what it takes, so that the
/// status can say how many are answered.
struct Requests {
    rx: mpsc::UnboundedReceiver<Request>,
    taken: u64,
}

impl Requests {
    async fn recv(&mut self) -> Option<Request> {
        let request = self.rx.recv().await;
        if request.is_some() {
            self.taken += 1;
        }
        request
    }
}

/// Where the instance is in its life.
enum Phase {
    Starting(Running),
    Ready(Running),
    /// A new process started on the held socket while the old one serves,
    /// until the new one is ready.
    Replacing {
        old: Running,
        new: Box<Running>,
    },
    Backoff(Instant),
    Stopped,
    Failed,
}

struct Runner {
    spec: InstanceSpec,
    client: Client,
    status: watch::Sender<Status>,
    restarts: Restarts,
    id: String,
    port: Port,
    starts: u32,
    /// When the next health check of a ready instance is due.
    check_due: Instant,
    /// Failed health checks in a row.
    check_failures: u32,
    /// Whether a failed health check freed the record.
    freed_unhealthy: bool,
    /// When the process running now became ready; `None` until it does.
    /// Only time served counts toward a stable run.
    ready_at: Option<Instant>,
    /// Why the instance was stopped to be started again (its health), for
    /// `ps` once it is.
    restarted_for: Option<String>,
    /// While a reloaded spec's new process replaces the old one: the old
    /// spec, taken back if the replacement fails, and whose stop settings
    /// stop the old process.
    previous: Option<InstanceSpec>,
    /// A reload that came while a replacement was under way, run after it.
    pending: Option<InstanceSpec>,
    /// Whether the request being answered failed (`Status::unmet` is its).
    unmet_fresh: bool,
}

/// The instance's port, and what keeps it the instance's.
#[derive(Debug)]
struct Port {
    number: u16,
    /// Keeps a port chosen from a range from the client's other choices.
    _lease: Option<PortLease>,
    /// The listening socket, when the supervisor holds it.
    socket: Option<HeldSocket>,
}

impl Port {
    fn fixed(number: u16) -> Port {
        Port {
            number,
            _lease: None,
            socket: None,
        }
    }

    fn leased(lease: PortLease) -> Port {
        Port {
            number: lease.port(),
            _lease: Some(lease),
            socket: None,
        }
    }

    /// Makes sure the port is the instance's before a start: binds and holds
    /// it with `socket`, else checks that nobody listens on it (nor, for a
    /// port from a range, holds it at all). A port from a range that turns
    /// out taken is exchanged for another; a fixed one is an error naming who
    /// holds it.
    fn secure(&mut self, socket: bool, choice: &PortChoice, client: &Client) -> Result<(), String> {
        let fixed = matches!(choice, PortChoice::Fixed(_));
        loop {
            let taken = if self.socket.is_some() {
                return Ok(());
            } else if socket {
                match HeldSocket::bind(self.number) {
                    Ok(held) => {
                        self.socket = Some(held);
                        return Ok(());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => e.to_string(),
                    Err(e) => return Err(e.to_string()),
                }
            } else {
                match activation::check_free(self.number) {
                    // Nothing listens there, but a socket that does not
                    // listen (a connection whose own port it is) would
                    // still make the service's bind fail, at every restart:
                    // a port from a range moves. A fixed one is left to the
                    // service, which may bind what this process cannot (a
                    // port below 1024, one address of the machine), and
                    // whose restarts try again.
                    Ok(()) if fixed || ports::bindable(self.number) => return Ok(()),
                    Ok(()) => format!(
                        "port {} is in use by a socket that is not listening \
                         (a connection's own port)",
                        self.number
                    ),
                    Err(held) => format!("port {} is {held}", self.number),
                }
            };
            *self = match choice {
                PortChoice::Fixed(_) => return Err(format!("{taken}; not starting")),
                PortChoice::Range(range) => {
                    let next = client
                        .lease_port(*range)
                        .map_err(|e| format!("{taken}, and no other port is free: {e}"))?;
                    tracing::warn!("{taken}; moving to port {}", next.port());
                    Port::leased(next)
                }
            };
        }
    }

    /// How readiness is seen: on the held socket (with `replacing`, the
    /// processes sharing it, paused while probing), else on the port.
    fn listening<'a>(&'a self, tree: &'a Tree, replacing: Option<&'a Tree>) -> Listening<'a> {
        match (&self.socket, replacing) {
            (Some(socket), Some(old)) => Listening::Replacing { socket, old },
            (Some(socket), None) => Listening::Held(socket),
            (None, _) => Listening::Own {
                port: self.number,
                tree,
            },
        }
    }
}

/// The instance's port: chosen from its range, or its fixed one, and made
/// its own (checked free, or bound and held).
async fn claim_port(spec: &InstanceSpec, client: &Client) -> Result<Port, String> {
    let mut port = match spec.port {
        PortChoice::Fixed(port) => Port::fixed(port),
        PortChoice::Range(range) => client
            .choose_port(range, PORT_WAIT)
            .await
            .map(Port::leased)
            .map_err(|e| format!("cannot choose a port: {e}"))?,
    };
    port.secure(spec.run.socket, &spec.port, client)?;
    Ok(port)
}

async fn run(
    mut spec: InstanceSpec,
    client: Client,
    mut requests: Requests,
    status: watch::Sender<Status>,
    mut start: bool,
) {
    let port = loop {
        let e = match claim_port(&spec, &client).await {
            Ok(port) => break port,
            Err(e) => e,
        };
        tracing::error!("{}: {e}", spec.name);
        status.send_modify(|s| {
            s.state = State::Failed;
            s.message = Some(e);
            s.port_failures += 1;
            s.answered = requests.taken;
        });
        // Nothing can run without a port: it is tried again when the
        // instance is asked to start (or given a changed file); every
        // other request is answered with the failure.
        loop {
            match requests.recv().await {
                None => return,
                Some(Request::Start | Request::Restart) => {
                    start = true;
                    break;
                }
                Some(Request::Reload(changed)) => {
                    spec = *changed;
                    break;
                }
                Some(Request::Stop) => {
                    start = false;
                    status.send_modify(|s| s.answered = requests.taken);
                }
            }
        }
    };
    status.send_modify(|s| s.port = Some(port.number));
    let mut runner = Runner {
        restarts: Restarts::new(spec.run.restart, spec.run.backoff),
        spec,
        client,
        status,
        id: new_id(),
        port,
        starts: 0,
        check_due: Instant::now(),
        check_failures: 0,
        freed_unhealthy: false,
        ready_at: None,
        restarted_for: None,
        previous: None,
        pending: None,
        unmet_fresh: false,
    };
    let mut phase = if start {
        runner.start()
    } else {
        Phase::Stopped
    };
    loop {
        // A reload that waited for a replacement to end.
        phase = match phase {
            Phase::Ready(child) => match runner.pending.take() {
                Some(spec) => runner.reload(spec, child).await,
                None => Phase::Ready(child),
            },
            phase => phase,
        };
        // At rest, every request taken so far is answered.
        if matches!(
            phase,
            Phase::Ready(_) | Phase::Backoff(_) | Phase::Stopped | Phase::Failed
        ) {
            runner.answer(requests.taken);
        }
        phase = match phase {
            Phase::Starting(mut child) => {
                let tree = child.tree();
                let listening = runner.port.listening(&tree, None);
                let ready = runner.ready_and_healthy(listening, None);
                tokio::select! {
                    healthy = ready => match healthy {
                        Ok(()) => {
                            runner.ready_at = Some(Instant::now());
                            runner.healthy();
                            runner.announce(&child);
                            Phase::Ready(child)
                        }
                        Err((exit, why)) => runner.restart_unhealthy(exit, &why, child).await,
                    },
                    exit = child.wait() => runner.after_exit(exit, &child),
                    request = requests.recv() => match request {
                        Some(Request::Reload(spec)) => runner.reload(*spec, child).await,
                        request => runner.on_request(request, child).await,
                    },
                }
            }
            Phase::Ready(mut child) => tokio::select! {
                exit = child.wait() => runner.after_exit(exit, &child),
                request = requests.recv() => match request {
                    Some(Request::Restart) if runner.port.socket.is_some() => runner.replace(child),
                    Some(Request::Reload(spec)) => runner.reload(*spec, child).await,
                    request => runner.on_request(request, child).await,
                },
                reason = runner.client.rejected(&runner.id) => runner.refused(reason, child).await,
                result = runner.next_check() => runner.checked(result, child).await,
            },
            Phase::Replacing { mut old, mut new } => {
                let tree = new.tree();
                let old_tree = old.tree();
                let listening = runner.port.listening(&tree, Some(&old_tree));
                let ready = runner.ready_and_healthy(listening, Some(&old_tree));
                tokio::select! {
                    healthy = ready => match healthy {
                        Ok(()) => runner.replaced(old, *new).await,
                        Err((_, why)) => {
                            runner.stop_process(&mut new).await;
                            runner.kept(&old, format!("the new process is not serving: {why}"));
                            Phase::Ready(old)
                        }
                    },
                    exit = new.wait() => {
                        runner.status.send_modify(|s| s.last_exit = Some(exit));
                        runner.kept(&old, format!("the new process {exit} before it was ready"));
                        Phase::Ready(old)
                    }
                    exit = old.wait() => {
                        tracing::warn!(
                            "{}: pid {} {exit} while being replaced",
                            runner.spec.name,
                            old.pid()
                        );
                        runner.client.free(&runner.id);
                        runner.status.send_modify(|s| s.last_exit = Some(exit));
                        // The new process, of the new spec, is all there is.
                        runner.previous = None;
                        runner.ready_at = None;
                        Phase::Starting(*new)
                    }
                    request = requests.recv() => match request {
                        Some(Request::Reload(spec)) => {
                            // Run once this replacement has ended.
                            runner.pending = Some(*spec);
                            Phase::Replacing { old, new }
                        }
                        Some(Request::Start | Request::Restart) => Phase::Replacing { old, new },
                        Some(Request::Stop) | None => {
                            runner.client.free(&runner.id);
                            runner.status.send_modify(|s| s.state = State::Stopping);
                            let old_run = runner.previous.take().map_or(runner.spec.run, |p| p.run);
                            tokio::join!(
                                runner.stop_process_as(&mut old, &old_run),
                                runner.stop_process(&mut new)
                            );
                            if let Some(spec) = runner.pending.take() {
                                runner.adopt(spec);
                            }
                            runner.settle(State::Stopped, None)
                        }
                    },
                }
            }
            Phase::Backoff(until) => tokio::select! {
                () = tokio::time::sleep_until(until) => runner.start(),
                request = requests.recv() => match request {
                    Some(request @ (Request::Start | Request::Restart | Request::Reload(_))) => {
                        if let Request::Reload(spec) = request {
                            runner.adopt(*spec);
                        }
                        runner.restarts.reset();
                        runner.start()
                    }
                    Some(Request::Stop) | None => runner.settle(State::Stopped, None),
                },
            },
            Phase::Stopped | Phase::Failed => match requests.recv().await {
                Some(Request::Reload(spec)) => {
                    // Taken for the next start; a stopped instance stays
                    // stopped, a failed one tries the new file.
                    runner.adopt(*spec);
                    let failed = runner.status.borrow().state == State::Failed;
                    if failed {
                        runner.restarts.reset();
                        runner.start()
                    } else {
                        Phase::Stopped
                    }
                }
                Some(Request::Start | Request::Restart) => {
                    runner.restarts.reset();
                    runner.start()
                }
                Some(Request::Stop) => continue_as(&runner),
                None => return,
            },
        };
    }
}

/// Stays in the current resting state.
fn continue_as(runner: &Runner) -> Phase {
    match runner.status.borrow().state {
        State::Failed => Phase::Failed,
        _ => Phase::Stopped,
    }
}

impl Runner {
    /// Starts the process; a spawn failure counts as a quick exit.
    fn start(&mut self) -> Phase {
        self.ready_at = None;
        let moved = self.port.number;
        if let Err(message) = self.port.secure(false, &self.spec.port, &self.client) {
            tracing::error!("{}: {message}", self.spec.name);
            self.status.send_modify(|s| s.port_failures += 1);
            return self.settle(State::Failed, Some(message));
        }
        if self.port.number != moved {
            let port = self.port.number;
            self.status.send_modify(|s| s.port = Some(port));
        }
        match self.spawn() {
            Some(child) => Phase::Starting(child),
            None => self.decide(Exit::SpawnFailed, Duration::ZERO, None),
        }
    }

    /// Starts a process of the service (counted as a start), with its output
    /// relayed; `None` if it could not be started, which is logged.
    fn spawn(&mut self) -> Option<Running> {
        let spec = &self.spec;
        let launch = Launch {
            name: &spec.name,
            command: &spec.command,
            port: self.port.number,
            socket: self.port.socket.as_ref(),
            env: &spec.env,
            cwd: spec.cwd.as_deref(),
            capture: spec.prefix_output,
        };
        let restarts = self.starts;
        self.starts += 1;
        match Running::spawn(&launch) {
            Ok(mut child) => {
                if spec.prefix_output {
                    let prefix = format!("{} | ", spec.name);
                    if let Some(out) = child.stdout() {
                        tokio::spawn(relay(out, Stream::Stdout, prefix.clone()));
                    }
                    if let Some(err) = child.stderr() {
                        tokio::spawn(relay(err, Stream::Stderr, prefix));
                    }
                }
                tracing::info!(
                    "{}: started pid {} on port {}",
                    spec.name,
                    child.pid(),
                    self.port.number
                );
                let started = child.started();
                let pid = child.pid();
                let restarted_for = self.restarted_for.take();
                self.status.send_modify(|s| {
                    s.state = State::Starting;
                    s.pid = Some(pid);
                    s.restarts = restarts;
                    s.started = Some(started);
                    s.message = restarted_for.map(|why| format!("restarted: {why}"));
                    s.unmet = None;
                });
                Some(child)
            }
            Err(e) => {
                let program = spec.command.first().map(String::as_str).unwrap_or("");
                // The file's checks found its cwd; one removed since would
                // otherwise read as a missing program.
                match spec.cwd.as_deref().filter(|dir| !dir.is_dir()) {
                    Some(dir) => tracing::error!(
                        "{}: cannot start {program:?}: its cwd {} is no longer a directory",
                        spec.name,
                        dir.display()
                    ),
                    None => tracing::error!("{}: cannot start {program:?}: {e}", spec.name),
                }
                None
            }
        }
    }

    /// With a held socket: starts a new process on it while `old` serves; the
    /// old one is stopped once the new one is ready. The record stays.
    fn replace(&mut self, old: Running) -> Phase {
        match self.spawn() {
            Some(new) => {
                tracing::info!(
                    "{}: replacing pid {} with pid {} on the held socket",
                    self.spec.name,
                    old.pid(),
                    new.pid()
                );
                Phase::Replacing {
                    old,
                    new: Box::new(new),
                }
            }
            None => {
                self.kept(&old, "the new process could not be started".into());
                Phase::Ready(old)
            }
        }
    }

    /// Runs `spec` from the next process on (the port stays); returns the
    /// spec it replaces.
    fn adopt(&mut self, spec: InstanceSpec) -> InstanceSpec {
        tracing::info!("{}: its file changed; taking the new version", spec.name);
        self.restarts = Restarts::new(spec.run.restart, spec.run.backoff);
        std::mem::replace(&mut self.spec, spec)
    }

    /// Runs a changed spec in place of the running process: with a held
    /// socket, a new process replaces it before it stops (the old spec kept
    /// to go back to); else it stops (by its own spec's settings) and the new
    /// one starts.
    async fn reload(&mut self, spec: InstanceSpec, mut child: Running) -> Phase {
        if self.port.socket.is_some() && matches!(self.status.borrow().state, State::Ready) {
            self.previous = Some(self.adopt(spec));
            return self.replace(child);
        }
        self.stop_child(&mut child).await;
        self.adopt(spec);
        self.restarts.reset();
        self.start()
    }

    /// Answers every request taken so far (`taken`): with the failure just
    /// met, if one was, else without.
    fn answer(&mut self, taken: u64) {
        let fresh = std::mem::take(&mut self.unmet_fresh);
        self.status.send_if_modified(|s| {
            let changed = s.answered != taken || (!fresh && s.unmet.is_some());
            s.answered = taken;
            if !fresh {
                s.unmet = None;
            }
            changed
        });
    }

    /// A replacement failed: the old process goes on (with its spec), the
    /// log says why, and the request is answered with it.
    fn kept(&mut self, old: &Running, why: String) {
        self.unmet_fresh = true;
        if let Some(previous) = self.previous.take() {
            self.restarts = Restarts::new(previous.run.restart, previous.run.backoff);
            self.spec = previous;
        }
        let (pid, started) = (old.pid(), old.started());
        let unmet = format!("{why}; pid {pid} goes on");
        tracing::warn!("{}: {unmet}", self.spec.name);
        self.status.send_modify(|s| {
            s.state = State::Ready;
            s.pid = Some(pid);
            s.started = Some(started);
            s.health = self.spec.health.as_ref().map(|_| Health::Healthy);
            s.unmet = Some(unmet);
        });
    }

    /// The new process is ready: the old one stops, the new one serves.
    async fn replaced(&mut self, mut old: Running, new: Running) -> Phase {
        tracing::info!(
            "{}: pid {} ready after {}; stopping pid {}",
            self.spec.name,
            new.pid(),
            format_duration(new.started().elapsed()),
            old.pid()
        );
        // A record freed for its health comes back with the healthy process,
        // and a reloaded spec's record (role, metadata) replaces the old.
        let previous = self.previous.take();
        let freed = self.freed_unhealthy;
        self.ready_at = Some(Instant::now());
        self.healthy();
        if freed || previous.is_some() {
            self.announce(&new);
        } else {
            self.status.send_modify(|s| s.state = State::Ready);
        }
        // By its own spec's stop signal and timeout.
        let old_run = previous.map_or(self.spec.run, |p| p.run);
        self.stop_process_as(&mut old, &old_run).await;
        self.restarts.reset();
        Phase::Ready(new)
    }

    /// Registers the record: the service is ready.
    fn announce(&self, child: &Running) {
        let reg = Registration::new(self.spec.role.clone())
            .meta(serde_json::Value::Object(self.spec.meta.clone()))
            .port(self.port.number)
            .id(self.id.clone());
        match self.client.register_now(reg) {
            Ok(record) if self.client.is_synced() => tracing::info!(
                "{}: ready after {}, registered {} [{}]",
                self.spec.name,
                format_duration(child.started().elapsed()),
                record.name(),
                record.id()
            ),
            Ok(record) => tracing::warn!(
                "{}: ready after {}; no hub connected: {} [{}] is registered once one answers",
                self.spec.name,
                format_duration(child.started().elapsed()),
                record.name(),
                record.id()
            ),
            Err(e) => tracing::error!("{}: cannot register: {e}", self.spec.name),
        }
        self.status.send_modify(|s| s.state = State::Ready);
    }

    /// Where a health check looks.
    fn target(&self) -> Target<'_> {
        Target {
            port: self.port.number,
            env: &self.spec.env,
            cwd: self.spec.cwd.as_ref(),
        }
    }

    /// Returns once the process is ready by the spec's rule, then whether
    /// it is healthy ([`Runner::wait_healthy`]); not ready and healthy
    /// within the start timeout is a failure too. A failure says how the
    /// process is to be counted as ended, and why.
    async fn ready_and_healthy(
        &self,
        listening: Listening<'_>,
        replacing: Option<&Tree>,
    ) -> Result<(), (Exit, String)> {
        let ready = async {
            wait_ready(self.spec.run.ready, listening, &self.spec.name).await;
            self.wait_healthy(replacing)
                .await
                .map_err(|why| (Exit::Unhealthy, why))
        };
        match self.spec.run.start_timeout {
            Some(limit) => tokio::time::timeout(limit, ready)
                .await
                .unwrap_or_else(|_| {
                    Err((
                        Exit::NotReady,
                        format!(
                            "not ready within its start timeout ({})",
                            format_duration(limit)
                        ),
                    ))
                }),
            None => ready.await,
        }
    }

    /// For a service with a health check, once it is ready: checks until one
    /// passes; fails after `failures` failed checks in a row.
    /// With `replacing` (the process sharing the held socket), that one is
    /// paused during each check, so that only the new process can answer.
    async fn wait_healthy(&self, replacing: Option<&Tree>) -> Result<(), String> {
        let Some(check) = &self.spec.health else {
            return Ok(());
        };
        let mut failures = 0;
        loop {
            let result = {
                let _paused = match replacing {
                    Some(old) => Some(old.pause().await),
                    None => None,
                };
                check.run(self.target()).await
            };
            match result {
                Ok(()) => {
                    self.status
                        .send_modify(|s| s.health = Some(Health::Healthy));
                    return Ok(());
                }
                Err(error) => {
                    failures += 1;
                    let health = Health::Unhealthy {
                        failures,
                        error: error.clone(),
                    };
                    self.status.send_modify(|s| s.health = Some(health));
                    if failures >= check.failures {
                        return Err(format!(
                            "{failures} failed health checks in a row, the last: {error}"
                        ));
                    }
                    tracing::warn!("{}: health check failed: {error}", self.spec.name);
                    tokio::time::sleep(check.interval).await;
                }
            }
        }
    }

    /// A check passed on a new process: the periodic checks start over.
    fn healthy(&mut self) {
        if let Some(check) = &self.spec.health {
            self.check_due = Instant::now() + check.interval;
        }
        self.check_failures = 0;
        self.freed_unhealthy = false;
    }

    /// The next periodic health check's result, when it is due (never
    /// without a check).
    async fn next_check(&self) -> Result<(), String> {
        match &self.spec.health {
            Some(check) => {
                tokio::time::sleep_until(self.check_due).await;
                check.run(self.target()).await
            }
            None => std::future::pending().await,
        }
    }

    /// A periodic health check's result: an unhealthy instance's record is
    /// freed, a recovered one's registered again, and after `failures` in a
    /// row the instance is restarted.
    async fn checked(&mut self, result: Result<(), String>, child: Running) -> Phase {
        let Some(check) = self.spec.health.clone() else {
            return Phase::Ready(child);
        };
        self.check_due = Instant::now() + check.interval;
        let name = &self.spec.name;
        match result {
            Ok(()) => {
                self.check_failures = 0;
                self.status
                    .send_modify(|s| s.health = Some(Health::Healthy));
                if self.freed_unhealthy {
                    self.freed_unhealthy = false;
                    tracing::info!("{name}: healthy again");
                    self.announce(&child);
                }
                Phase::Ready(child)
            }
            Err(error) => {
                self.check_failures += 1;
                let failures = self.check_failures;
                self.status.send_modify(|s| {
                    s.health = Some(Health::Unhealthy {
                        failures,
                        error: error.clone(),
                    });
                });
                if failures >= check.failures {
                    let why =
                        format!("{failures} failed health checks in a row, the last: {error}");
                    return self.restart_unhealthy(Exit::Unhealthy, &why, child).await;
                }
                if self.freed_unhealthy {
                    tracing::warn!("{name}: health check failed again: {error}");
                } else {
                    tracing::warn!(
                        "{name}: health check failed: {error}; its record is freed until one passes"
                    );
                    self.client.free(&self.id);
                    self.freed_unhealthy = true;
                }
                Phase::Ready(child)
            }
        }
    }

    /// Stops an instance that is not healthy, or not ready in time (`exit`
    /// says which); the restart policy says what follows, as after an exit.
    async fn restart_unhealthy(&mut self, exit: Exit, why: &str, mut child: Running) -> Phase {
        tracing::error!("{}: {why}; stopping it", self.spec.name);
        let uptime = child.started().elapsed();
        // Up to now: the stop's own time is not service.
        let served = self.take_served();
        self.stop_child(&mut child).await;
        self.check_failures = 0;
        self.freed_unhealthy = false;
        // The next start shows why in `ps`.
        self.restarted_for = Some(why.to_string());
        let phase = self.decide(exit, uptime, served);
        if !matches!(phase, Phase::Starting(_) | Phase::Backoff(_)) {
            self.restarted_for = None;
        }
        phase
    }

    /// The process exited on its own: free the record and decide what follows.
    fn after_exit(&mut self, exit: Exit, child: &Running) -> Phase {
        self.client.free(&self.id);
        let served = self.take_served();
        self.decide(exit, child.started().elapsed(), served)
    }

    /// How long the process running now has been ready (`None`: it never
    /// became ready), for the exit being decided; the next run starts unready.
    fn take_served(&mut self) -> Option<Duration> {
        self.ready_at.take().map(|at| at.elapsed())
    }

    /// What follows an exit `uptime` after the start, of a process that
    /// `served` that long after it became ready (`None`: it never did). A
    /// restart, even at once, goes through [`Phase::Backoff`]: starting
    /// from here would call back into this on a spawn failure, without
    /// end when every failure restarts at once.
    fn decide(&mut self, exit: Exit, uptime: Duration, served: Option<Duration>) -> Phase {
        let name = &self.spec.name;
        let ran = format_duration(uptime);
        self.status.send_modify(|s| s.last_exit = Some(exit));
        match self.restarts.on_exit(exit, served, rand::random::<f64>()) {
            Decision::Restart(delay) => {
                let when = if delay.is_zero() {
                    "now".to_string()
                } else {
                    format!("in {}", format_duration(delay))
                };
                tracing::warn!("{name}: {exit} after {ran}; restarting {when}");
                self.status.send_modify(|s| {
                    s.state = State::Backoff;
                    s.pid = None;
                });
                Phase::Backoff(Instant::now() + delay)
            }
            Decision::Stop => {
                let message = format!("{exit} after {ran}; not restarting (restart policy)");
                tracing::info!("{name}: {message}");
                self.settle(State::Stopped, Some(message))
            }
            Decision::GiveUp(why) => {
                tracing::error!("{name}: {why}");
                self.settle(State::Failed, Some(why))
            }
        }
    }

    /// A request while the process runs.
    async fn on_request(&mut self, request: Option<Request>, mut child: Running) -> Phase {
        match request {
            Some(Request::Start) => {
                // Already running; keep waiting in the same phase.
                match self.status.borrow().state {
                    State::Ready => Phase::Ready(child),
                    _ => Phase::Starting(child),
                }
            }
            Some(Request::Restart | Request::Reload(_)) => {
                self.stop_child(&mut child).await;
                self.restarts.reset();
                self.start()
            }
            Some(Request::Stop) | None => {
                self.stop_child(&mut child).await;
                self.settle(State::Stopped, None)
            }
        }
    }

    /// The hub refused the record: running a service nobody can find would be a
    /// lie, so stop it and say why, instead of retrying forever.
    async fn refused(&mut self, reason: String, mut child: Running) -> Phase {
        let message = format!("the hub refused the registration: {reason}");
        tracing::error!("{}: {message}", self.spec.name);
        self.stop_child(&mut child).await;
        self.settle(State::Failed, Some(message))
    }

    /// Frees the record first (nobody should be sent to a dying service), then
    /// stops every process of the service.
    async fn stop_child(&self, child: &mut Running) {
        self.client.free(&self.id);
        self.status.send_modify(|s| s.state = State::Stopping);
        self.stop_process(child).await;
    }

    /// Stops every process of `child`: the stop signal, then SIGKILL after
    /// the stop timeout.
    async fn stop_process(&self, child: &mut Running) {
        let run = self.spec.run;
        self.stop_process_as(child, &run).await;
    }

    /// Stops every process of `child` by `run`'s stop signal and timeout.
    async fn stop_process_as(&self, child: &mut Running, run: &RunSettings) {
        let name = &self.spec.name;
        tracing::info!(
            "{name}: stopping pid {} with {}",
            child.pid(),
            run.stop_signal
        );
        let exit = child.stop(run.stop_signal, run.stop_timeout).await;
        tracing::info!("{name}: stopped ({exit})");
    }

    fn settle(&self, state: State, message: Option<String>) -> Phase {
        self.status.send_modify(|s| {
            s.state = state;
            s.pid = None;
            s.message = message;
        });
        match state {
            State::Failed => Phase::Failed,
            _ => Phase::Stopped,
        }
    }
}
