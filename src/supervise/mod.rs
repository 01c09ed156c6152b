//! `seaport supervise`: run every service of a directory, with a built-in hub or
//! remote hubs; reload on request; answer `seaport ps` and friends; stop
//! everything cleanly (a second stop order kills at once).
//!
//! Orders from outside (signals, for the command; messages, for tests), control
//! requests and finished stops are messages read in one `select!` loop, which
//! never waits for a service: stopping one runs in a task of its own, so a
//! reload that replaces a slow service leaves `ps` and signals answered.

pub mod control;
pub mod notify;
pub mod spec;
pub mod validate;

use crate::client::{Client, ClientConfig};
use crate::hub::{Hub, HubConfig, KeyFiles, ListenError};
use crate::process::instance::{Instance, PortChoice, Request, State, Status};
use crate::process::restart::Exit;
use crate::protocol::hub_addr::HubAddr;
use crate::protocol::keys::Fingerprint;
use crate::protocol::keys::KeyError;
use crate::router::routes::{Routes, Rule};
use control::{Call, ControlError, ControlRequest, ControlResponse, RowState, ServiceRow};
use notify::notify;
use spec::{Loaded, Rejected, ServiceSpec};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// How the supervisor runs.
#[derive(Debug, Clone)]
pub struct SuperviseOptions {
    /// The services directory.
    pub dir: PathBuf,
    /// Remote hubs; empty means run a built-in hub.
    pub hubs: Vec<HubAddr>,
    /// Port of the built-in hub.
    pub listen: u16,
    /// Bind address of the built-in hub (default: every interface).
    pub listen_host: Option<IpAddr>,
    /// Hub settings (heartbeat, timeout) for the built-in hub and the clients.
    pub hub_config: HubConfig,
    /// The built-in hub's key files, read at start and on every reload. With
    /// remote hubs, their hub keys, read at start, are what the services'
    /// clients trust.
    pub key_files: KeyFiles,
    /// Whether services fail over to hubs learned from `seaport` records
    /// (a service file's `discover` overrides it).
    pub discover: bool,
    /// Control socket path.
    pub control: PathBuf,
    /// Run the HTTP router on this port too, with the routes of the service
    /// files (`route = [...]`).
    pub route: Option<u16>,
    /// Proxies in front of that router whose forwarded headers it keeps.
    pub trust_forwarded: crate::router::forwarded::TrustedProxies,
}

/// What the supervisor is told from outside: SIGHUP and SIGTERM or SIGINT for
/// the command, messages for a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Read the directory again and apply what changed.
    Reload,
    /// Stop every service and return; a second one kills them at once.
    Stop,
}

/// Why the supervisor could not run.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// The services directory is not a directory.
    #[error("{}: not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// The built-in hub cannot listen.
    #[error("cannot run the built-in hub: {0}")]
    Hub(#[from] ListenError),
    /// The control socket cannot be used.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The router cannot listen or reach the hubs.
    #[error("cannot run the router: {0}")]
    Router(String),
    /// A key file of the built-in hub cannot be used.
    #[error(transparent)]
    Keys(#[from] KeyError),
}

/// A running service: its spec and its instances.
struct Service {
    spec: ServiceSpec,
    instances: Vec<Instance>,
}

/// An instance of a service reloaded in place runs its changed spec.
#[derive(Debug)]
struct Reloaded {
    service: String,
    index: usize,
    spec: crate::process::instance::InstanceSpec,
}

/// An instance on its way down, for `ps`.
struct Leaving {
    name: String,
    role: String,
    status: watch::Receiver<Status>,
    abort: AbortHandle,
    /// Its `stop_timeout`: how long its stop may take before it is killed.
    stop_timeout: Duration,
}

struct Supervisor {
    options: SuperviseOptions,
    default_hubs: Vec<HubAddr>,
    clients: HashMap<(Vec<HubAddr>, Option<Fingerprint>, bool), Client>,
    /// Hub keys the services' clients trust (with remote hubs only).
    trusted: crate::protocol::keys::Authorized,
    services: BTreeMap<String, Service>,
    /// Services being stopped, by name, until their stop finishes.
    leaving: BTreeMap<String, Vec<Leaving>>,
    /// Tasks stopping a service.
    stopping: JoinSet<()>,
    /// The service each stopping task stops, for a task that ends without
    /// saying (it panicked).
    stopping_names: HashMap<tokio::task::Id, String>,
    /// Services to start once their previous instances have stopped.
    waiting: BTreeMap<String, ServiceSpec>,
    /// Rolling reloads under way, by service: cancelled when the service is
    /// stopped, which then stops the old instances still running.
    rolling: HashMap<String, CancellationToken>,
    /// Where reloads in place say which instance runs its new spec.
    reloaded: mpsc::UnboundedSender<Reloaded>,
    /// The files of the directory that were rejected at the last (re)load.
    rejected: Vec<Rejected>,
}

/// Asks a running supervisor for its instances, as `seaport ps` does.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct ServicesView {
    calls: mpsc::Sender<Call>,
}

impl ServicesView {
    /// Every instance, then every rejected file, as `seaport ps --json`
    /// lists them; `None` once the supervisor has stopped.
    pub async fn rows(&self) -> Option<Vec<ServiceRow>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.calls.send((ControlRequest::Ps, tx)).await.ok()?;
        match rx.await.ok()? {
            ControlResponse::Services(rows) => Some(rows),
            _ => None,
        }
    }
}

/// What a supervisor that has started offers to observers.
#[derive(Debug, Clone)]
pub struct Running {
    /// Its built-in hub (none with remote hubs).
    pub hub: Option<crate::hub::HubView>,
    /// Its instances.
    pub services: ServicesView,
}

/// Runs the supervisor until it is ordered to stop, or `orders` closes.
pub async fn run(
    options: SuperviseOptions,
    orders: mpsc::Receiver<Order>,
) -> Result<(), SuperviseError> {
    run_observed(options, orders, None).await
}

/// Like [`run`]; once the built-in hub listens and the control socket is
/// bound, `started` is sent what observers (the admin endpoint) read.
pub async fn run_observed(
    options: SuperviseOptions,
    mut orders: mpsc::Receiver<Order>,
    started: Option<tokio::sync::oneshot::Sender<Running>>,
) -> Result<(), SuperviseError> {
    if !options.dir.is_dir() {
        return Err(SuperviseError::NotADirectory(options.dir.clone()));
    }
    let keys = options.key_files.load()?;
    // The built-in hub's keys; with remote hubs, the hub keys they must prove.
    let (hub, default_hubs, trusted) = if options.hubs.is_empty() {
        keys.log(options.hub_config.owned);
        let mut config = options.hub_config.clone();
        keys.apply_to(&mut config);
        let listener = crate::hub::listen_on(options.listen_host, options.listen).await?;
        let hub = Hub::serve(listener, config);
        let port = hub.local_addr().port();
        // For whoever started the supervisor; a closed stdout stops nothing.
        let _ = crate::human::say(format_args!("seaport listening on :{port}"));
        (
            Some(hub),
            vec![HubAddr::new("127.0.0.1", port)],
            crate::protocol::keys::Authorized::default(),
        )
    } else {
        (None, options.hubs.clone(), keys.hubs)
    };
    let router = match options.route {
        Some(port) => Some(start_router(&options, &default_hubs, port).await?),
        None => None,
    };
    let listener = control::bind(&options.control).await?;
    let (calls_tx, mut calls) = mpsc::channel::<Call>(16);
    if let Some(started) = started {
        let _ = started.send(Running {
            hub: hub.as_ref().map(Hub::view),
            services: ServicesView {
                calls: calls_tx.clone(),
            },
        });
    }
    let control_task = tokio::spawn(control::serve(listener, calls_tx));
    let (reloaded_tx, mut reloaded) = mpsc::unbounded_channel();
    let mut sup = Supervisor {
        options,
        default_hubs,
        clients: HashMap::new(),
        trusted,
        services: BTreeMap::new(),
        leaving: BTreeMap::new(),
        stopping: JoinSet::new(),
        stopping_names: HashMap::new(),
        waiting: BTreeMap::new(),
        rolling: HashMap::new(),
        reloaded: reloaded_tx,
        rejected: Vec::new(),
    };
    let loaded = spec::load_dir(&sup.options.dir);
    report(&loaded);
    sup.rejected = loaded.rejected;
    for spec in loaded.services {
        sup.start(spec);
    }
    if let Some(router) = &router {
        router.set_routes(sup.routes());
    }
    tracing::info!(
        "supervising {} services from {}",
        sup.services.len(),
        sup.options.dir.display()
    );
    notify("READY=1");
    loop {
        tokio::select! {
            order = orders.recv() => match order {
                Some(Order::Reload) => {
                    if let Some(hub) = &hub {
                        sup.options.key_files.reload(hub);
                    }
                    sup.reload();
                    if let Some(router) = &router {
                        router.set_routes(sup.routes());
                    }
                }
                Some(Order::Stop) | None => break,
            },
            Some((request, reply)) = calls.recv() => {
                let _ = reply.send(sup.answer(request));
            }
            Some(stopped) = sup.stopping.join_next_with_id() => sup.stopped(stopped),
            Some(done) = reloaded.recv() => sup.instance_reloaded(done),
        }
    }
    notify("STOPPING=1");
    sup.waiting.clear();
    let names: Vec<String> = sup.services.keys().cloned().collect();
    tracing::info!("stopping {} services", names.len() + sup.leaving.len());
    for name in names {
        sup.begin_stop(&name);
    }
    // systemd kills a stop that outlasts the unit's TimeoutStopSec; the
    // services' own stop timeouts say how long this one may take.
    if let Some(extension) = stop_extension(sup.leaving.values().flatten().map(|l| l.stop_timeout))
    {
        notify(&extension);
    }
    loop {
        tokio::select! {
            next = sup.stopping.join_next_with_id() => match next {
                Some(stopped) => sup.stopped(stopped),
                None => break,
            },
            Some(order) = orders.recv() => if order == Order::Stop {
                sup.kill_now();
            },
            // `ps` shows what is still stopping; nothing else is done now.
            Some((request, reply)) = calls.recv() => {
                let answer = match request {
                    ControlRequest::Ps => ControlResponse::Services(sup.rows()),
                    _ => ControlResponse::Error("the supervisor is stopping".into()),
                };
                let _ = reply.send(answer);
            }
        }
    }
    if let Some(router) = router {
        router.shutdown().await;
    }
    control_task.abort();
    let _ = std::fs::remove_file(&sup.options.control);
    for client in sup.clients.values() {
        client.close();
    }
    if let Some(hub) = hub {
        hub.shutdown().await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Time a stop may take beyond the longest `stop_timeout` of its services:
/// the keepers' kill and reaping, and the hub's and router's shutdown.
const STOP_MARGIN: Duration = Duration::from_secs(5);

/// The notification that gives the stop under way as long as the longest of
/// `stop_timeouts` and [`STOP_MARGIN`] (`EXTEND_TIMEOUT_USEC`, which never
/// shortens the unit's own `TimeoutStopSec`); none without services.
fn stop_extension(stop_timeouts: impl Iterator<Item = Duration>) -> Option<String> {
    let longest = stop_timeouts.max()?;
    let micros = longest.saturating_add(STOP_MARGIN).as_micros();
    Some(format!("EXTEND_TIMEOUT_USEC={micros}"))
}

/// The router of `--route`, on `port`, learning the records from `hubs`.
async fn start_router(
    options: &SuperviseOptions,
    hubs: &[HubAddr],
    port: u16,
) -> Result<crate::router::Router, SuperviseError> {
    use crate::router::{Router, RouterConfig, workers_per_cpu};
    let failed = |e: String| SuperviseError::Router(e);
    let config = ClientConfig {
        heartbeat: options.hub_config.heartbeat,
        timeout: options.hub_config.timeout,
        ..ClientConfig::default()
    };
    let (client, _) =
        Client::connect_to(hubs.to_vec(), config).map_err(|e| failed(e.to_string()))?;
    let listener = crate::hub::listen_on(options.listen_host, port)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let router = Router::serve(
        listener,
        client,
        RouterConfig {
            workers: workers_per_cpu(),
            trusted: options.trust_forwarded.clone(),
            ..RouterConfig::new(Routes::default())
        },
    )
    .map_err(|e| failed(e.to_string()))?;
    let _ = crate::human::say(format_args!(
        "seaport route listening on :{}",
        router.local_addr().port()
    ));
    Ok(router)
}

fn report(loaded: &Loaded) {
    for error in &loaded.errors {
        tracing::error!("{error}");
    }
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
}

impl Supervisor {
    /// One client per distinct list of hubs and key, shared by the services using
    /// them.
    fn client_for(&mut self, spec: &ServiceSpec) -> Result<Client, crate::client::ClientError> {
        let hubs = spec
            .hubs
            .clone()
            .unwrap_or_else(|| self.default_hubs.clone());
        let keypair = spec.key.as_ref().map(|k| k.pair.clone());
        let discover = spec.discover.unwrap_or(self.options.discover);
        let id = (
            hubs.clone(),
            keypair.as_ref().map(|k| k.fingerprint().clone()),
            discover,
        );
        if let Some(client) = self.clients.get(&id) {
            return Ok(client.clone());
        }
        let config = ClientConfig {
            heartbeat: self.options.hub_config.heartbeat,
            timeout: self.options.hub_config.timeout,
            keypair,
            hub_keys: self.trusted.clone(),
            discover,
            ..ClientConfig::default()
        };
        let (client, _) = Client::connect_to(hubs, config)?;
        self.clients.insert(id, client.clone());
        Ok(client)
    }

    /// Starts a service, or, while its previous instances are still stopping,
    /// starts it when they have.
    fn start(&mut self, spec: ServiceSpec) {
        if self.leaving.contains_key(&spec.name) {
            self.waiting.insert(spec.name.clone(), spec);
            return;
        }
        let client = match self.client_for(&spec) {
            Ok(client) => client,
            Err(e) => {
                tracing::error!("{}: cannot connect to its hubs: {e}", spec.name);
                return;
            }
        };
        let instances = spec
            .instances
            .iter()
            .map(|i| Instance::spawn(i.clone(), client.clone()))
            .collect();
        self.services
            .insert(spec.name.clone(), Service { spec, instances });
    }

    /// Stops a service's instances in a task of their own (and the old
    /// instances of a rolling reload of it).
    fn begin_stop(&mut self, name: &str) {
        self.cancel_rollout(name);
        let Some(service) = self.services.remove(name) else {
            return;
        };
        self.add_leaving(name, &service);
        let task = self.stopping.spawn(async move {
            let mut instances = JoinSet::new();
            for instance in service.instances {
                instances.spawn(instance.shutdown());
            }
            while instances.join_next().await.is_some() {}
        });
        self.stopping_names.insert(task.id(), name.to_string());
    }

    /// Cancels the rollout of `name` under way, if any.
    fn cancel_rollout(&mut self, name: &str) {
        if let Some(rollout) = self.rolling.remove(name) {
            rollout.cancel();
        }
    }

    /// A rollout of `name` begins: the one under way is cancelled; the
    /// token cancels this one.
    fn new_rollout(&mut self, name: &str) -> CancellationToken {
        self.cancel_rollout(name);
        let cancel = CancellationToken::new();
        self.rolling.insert(name.to_string(), cancel.clone());
        cancel
    }

    /// Shows `service`'s instances as leaving in `ps`.
    fn add_leaving(&mut self, name: &str, service: &Service) {
        let leaving =
            service
                .instances
                .iter()
                .zip(&service.spec.instances)
                .map(|(instance, spec)| Leaving {
                    name: spec.name.clone(),
                    role: spec.role.clone(),
                    status: instance.watch(),
                    abort: instance.abort_handle(),
                    stop_timeout: spec.run.stop_timeout,
                });
        self.leaving
            .entry(name.to_string())
            .or_default()
            .extend(leaving);
    }

    /// Replaces a running service's instances with those of its changed
    /// file one at a time: each new instance is ready before an old one
    /// stops. New instances take ports of their own from the range, so the
    /// old ones serve meanwhile. If a new one fails, the rollout halts and
    /// the old instances still running go on until the service is stopped
    /// or reloaded again.
    fn roll(&mut self, name: &str, spec: ServiceSpec) {
        let Some(old) = self.services.remove(name) else {
            self.start(spec);
            return;
        };
        let client = match self.client_for(&spec) {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(
                    "{name}: cannot connect to its hubs: {e}; keeping the running version"
                );
                self.services.insert(name.to_string(), old);
                return;
            }
        };
        let instances: Vec<Instance> = spec
            .instances
            .iter()
            .map(|i| Instance::spawn_stopped(i.clone(), client.clone()))
            .collect();
        let handles: Vec<_> = instances.iter().map(Instance::handle).collect();
        let names: Vec<String> = spec.instances.iter().map(|i| i.name.clone()).collect();
        self.add_leaving(name, &old);
        self.services
            .insert(name.to_string(), Service { spec, instances });
        let cancel = self.new_rollout(name);
        let service = name.to_string();
        let task = self.stopping.spawn(async move {
            let mut old = old.instances.into_iter();
            for (instance, mut handle) in names.iter().zip(handles) {
                let ready = tokio::select! {
                    biased;
                    () = cancel.cancelled() => break,
                    ready = handle.start_until_ready() => ready,
                };
                match ready {
                    Ok(()) => {
                        if let Some(instance) = old.next() {
                            instance.shutdown().await;
                        }
                    }
                    Err(why) => {
                        tracing::error!(
                            "{service}: rolling reload halted: {instance} is not ready ({why}); \
                             the old instances still running go on until the service is \
                             stopped or reloaded"
                        );
                        cancel.cancelled().await;
                        break;
                    }
                }
            }
            let mut rest = JoinSet::new();
            for instance in old {
                rest.spawn(instance.shutdown());
            }
            while rest.join_next().await.is_some() {}
            if !cancel.is_cancelled() {
                tracing::info!("{service}: rolling reload done");
            }
        });
        self.stopping_names.insert(task.id(), name.to_string());
    }

    /// A service has stopped: start its new version, if one waits.
    fn stopped(&mut self, stopped: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let id = match &stopped {
            Ok((id, ())) => *id,
            Err(e) => e.id(),
        };
        // A stop task that panicked has stopped what it could all the same.
        let Some(name) = self.stopping_names.remove(&id) else {
            return;
        };
        // Another stop of the same service (the new instances of a halted
        // rolling reload) is still under way.
        if self.stopping_names.values().any(|n| *n == name) {
            return;
        }
        self.leaving.remove(&name);
        self.rolling.remove(&name);
        if let Some(spec) = self.waiting.remove(&name) {
            self.start(spec);
        }
    }

    /// A second stop order: kill every service's processes now.
    fn kill_now(&self) {
        tracing::warn!("second stop order: killing every service now");
        for leaving in self.leaving.values().flatten() {
            leaving.abort.abort();
        }
    }

    /// Starts new files, stops removed ones, restarts changed ones; leaves the
    /// rest alone. A file that became invalid keeps its running version.
    fn reload(&mut self) {
        notify("RELOADING=1");
        tracing::info!("reloading {}", self.options.dir.display());
        let loaded = spec::load_dir(&self.options.dir);
        report(&loaded);
        let Loaded {
            services, rejected, ..
        } = loaded;
        self.rejected = rejected;
        let mut fresh: BTreeMap<String, ServiceSpec> =
            services.into_iter().map(|s| (s.name.clone(), s)).collect();
        let known: Vec<String> = self
            .services
            .keys()
            .chain(self.waiting.keys())
            .cloned()
            .collect();
        for name in known {
            let running = self.services.get(&name).map(|s| &s.spec);
            let waiting = self.waiting.get(&name);
            match fresh.remove(&name) {
                Some(spec) if running == Some(&spec) || waiting == Some(&spec) => {}
                Some(spec) if self.only_routes_changed(&name, &spec) => {
                    tracing::info!("{name}: its routes changed; its processes go on");
                    self.take_service_fields(&name, &spec);
                }
                Some(spec) if self.reloadable_in_place(&name, &spec) => {
                    tracing::info!(
                        "{name}: changed, replacing its processes one at a time on their sockets"
                    );
                    self.reload_in_place(&name, spec);
                }
                Some(spec) if self.rollable(&name, &spec) => {
                    tracing::info!("{name}: changed, replacing its instances one at a time");
                    self.roll(&name, spec);
                }
                Some(spec) => {
                    tracing::info!("{name}: changed, restarting");
                    self.begin_stop(&name);
                    self.start(spec);
                }
                None if self.rejected.iter().any(|r| r.name == name) => {
                    tracing::warn!("{name}: its file is invalid now; keeping the running version");
                }
                None => {
                    tracing::info!("{name}: removed, stopping");
                    self.waiting.remove(&name);
                    self.begin_stop(&name);
                }
            }
        }
        for (name, spec) in fresh {
            tracing::info!("{name}: new, starting");
            self.start(spec);
        }
        notify("READY=1");
    }

    /// The routes of the service files: each `route` host to its service's
    /// role name (every version, so that a rollout keeps being routed). A
    /// host claimed by two services goes to the first (running services by
    /// name, then those waiting to start), and the log says so.
    fn routes(&self) -> Routes {
        let mut taken: HashMap<String, String> = HashMap::new();
        let mut rules = Vec::new();
        let specs = self
            .services
            .values()
            .map(|s| &s.spec)
            .chain(self.waiting.values());
        for spec in specs {
            let Some(role) = spec.instances.first().map(|i| &i.role) else {
                continue;
            };
            let name = crate::registry::record::split_role(role).0;
            for host in &spec.routes {
                let rule = match Rule::new(host, name) {
                    Ok(rule) => rule,
                    Err(e) => {
                        tracing::error!("{}: route {host:?}: {e}", spec.name);
                        continue;
                    }
                };
                if let Some(first) = taken.get(&rule.host) {
                    tracing::error!(
                        "{}: route {:?} is {first}'s already; not routed here",
                        spec.name,
                        rule.host
                    );
                    continue;
                }
                taken.insert(rule.host.clone(), spec.name.clone());
                rules.push(rule);
            }
        }
        Routes::new(rules, None).unwrap_or_else(|e| {
            tracing::error!("the routes cannot be used ({e}); routing nothing");
            Routes::default()
        })
    }

    /// Whether a changed service can keep its instances and have each run the
    /// new file in turn: it runs, nothing of it is stopping, its instances
    /// hold their sockets (`socket = true`, before and after) on the same
    /// ports, and it registers with the same hubs and key.
    fn reloadable_in_place(&self, name: &str, spec: &ServiceSpec) -> bool {
        let Some(running) = self.services.get(name) else {
            return false;
        };
        !self.leaving.contains_key(name)
            && running.spec.hubs == spec.hubs
            && running.spec.key == spec.key
            && running.spec.discover == spec.discover
            && running.spec.instances.len() == spec.instances.len()
            && running
                .spec
                .instances
                .iter()
                .zip(&spec.instances)
                .all(|(old, new)| old.port == new.port && old.run.socket && new.run.socket)
    }

    /// Has each instance of a service run its changed spec, one at a time:
    /// on its held socket, a new process starts before the old one stops,
    /// and must be ready (and healthy) before the next instance's turn. The
    /// service's spec follows instance by instance, so that if one fails,
    /// the next reload tries again from there. A reload of it under way is
    /// cancelled first.
    fn reload_in_place(&mut self, name: &str, spec: ServiceSpec) {
        // The service's own fields are its at once; its instances follow.
        self.take_service_fields(name, &spec);
        let Some(service) = self.services.get(name) else {
            return;
        };
        let handles: Vec<_> = service.instances.iter().map(Instance::handle).collect();
        let cancel = self.new_rollout(name);
        let progress = self.reloaded.clone();
        let service = name.to_string();
        tokio::spawn(async move {
            for (index, (mut handle, spec)) in handles.into_iter().zip(spec.instances).enumerate() {
                let instance = spec.name.clone();
                let done = tokio::select! {
                    biased;
                    () = cancel.cancelled() => return,
                    done = handle.reload_until_ready(spec.clone()) => done,
                };
                if let Err(why) = done {
                    tracing::error!(
                        "{service}: reload halted at {instance} ({why}); it and the instances \
                         after it keep their running version, and the next reload tries again"
                    );
                    return;
                }
                let _ = progress.send(Reloaded {
                    service: service.clone(),
                    index,
                    spec,
                });
            }
            tracing::info!("{service}: reloaded, one instance at a time");
        });
    }

    /// Whether a running service's file changed in its routes only (or was
    /// renamed): nothing its processes see.
    fn only_routes_changed(&self, name: &str, spec: &ServiceSpec) -> bool {
        let Some(running) = self.services.get(name) else {
            return false;
        };
        if self.leaving.contains_key(name) {
            return false;
        }
        let mut same = running.spec.clone();
        same.routes.clone_from(&spec.routes);
        same.file.clone_from(&spec.file);
        same == *spec
    }

    /// A running service takes the fields of `spec` that are the service's
    /// rather than its instances': the hosts routed to it, and its file.
    fn take_service_fields(&mut self, name: &str, spec: &ServiceSpec) {
        if let Some(service) = self.services.get_mut(name) {
            service.spec.routes.clone_from(&spec.routes);
            service.spec.file.clone_from(&spec.file);
        }
    }

    /// An instance runs its changed spec: the service's spec says so.
    fn instance_reloaded(&mut self, reloaded: Reloaded) {
        if let Some(service) = self.services.get_mut(&reloaded.service)
            && let Some(slot) = service.spec.instances.get_mut(reloaded.index)
        {
            *slot = reloaded.spec;
        }
    }

    /// Whether a changed service can be replaced one instance at a time: it
    /// runs, nothing of it is stopping, and its new instances take their
    /// ports from a range (a fixed port is the old instance's until it stops).
    fn rollable(&self, name: &str, spec: &ServiceSpec) -> bool {
        self.services.contains_key(name)
            && !self.leaving.contains_key(name)
            && spec
                .instances
                .iter()
                .all(|i| matches!(i.port, PortChoice::Range(_)))
    }

    fn answer(&mut self, request: ControlRequest) -> ControlResponse {
        let (action, name) = match request {
            ControlRequest::Ps => return ControlResponse::Services(self.rows()),
            ControlRequest::Start { name } => (Request::Start, name),
            ControlRequest::Stop { name } => (Request::Stop, name),
            ControlRequest::Restart { name } => (Request::Restart, name),
        };
        if action == Request::Restart
            && let Some(service) = self.services.get(&name)
            && service.instances.len() > 1
        {
            return ControlResponse::Done(rolling_restart(service));
        }
        // Stopping a service mid-rollout stops its old instances too.
        if action == Request::Stop
            && let Some(rolling) = self.rolling.get(&name)
        {
            rolling.cancel();
        }
        let mut affected = Vec::new();
        for (service_name, service) in &self.services {
            for (instance, spec) in service.instances.iter().zip(&service.spec.instances) {
                if *service_name == name || spec.name == name {
                    instance.request(action.clone());
                    affected.push(spec.name.clone());
                }
            }
        }
        if affected.is_empty() {
            ControlResponse::Error(format!("no service or instance named {name:?}"))
        } else {
            ControlResponse::Done(affected)
        }
    }

    /// Every instance, running or on its way down, then every rejected file.
    fn rows(&self) -> Vec<ServiceRow> {
        let running = self.services.values().flat_map(|service| {
            service
                .instances
                .iter()
                .zip(&service.spec.instances)
                .map(|(instance, spec)| row(&spec.name, &spec.role, &instance.status()))
        });
        let leaving = self
            .leaving
            .values()
            .flatten()
            .map(|l| row(&l.name, &l.role, &l.status.borrow()));
        let rejected = self.rejected.iter().map(|r| ServiceRow {
            name: r.name.clone(),
            role: r.role.clone().unwrap_or_default(),
            state: RowState::Rejected,
            pid: None,
            port: None,
            restarts: 0,
            uptime_ms: None,
            message: Some(r.problems.join("; ")),
            health: None,
            last_exit: None,
            last_exit_status: None,
            port_failures: 0,
        });
        running.chain(leaving).chain(rejected).collect()
    }
}

/// Restarts a service's instances one at a time, each new process ready
/// before the next instance's old one stops, so that the service never stops
/// answering. A failed instance halts it, leaving the rest as they were.
/// Returns the instances' names, in order.
fn rolling_restart(service: &Service) -> Vec<String> {
    let name = service.spec.name.clone();
    let names: Vec<String> = service
        .spec
        .instances
        .iter()
        .map(|i| i.name.clone())
        .collect();
    let handles: Vec<_> = service.instances.iter().map(Instance::handle).collect();
    let order = names.clone();
    tokio::spawn(async move {
        for (instance, mut handle) in order.iter().zip(handles) {
            if let Err(why) = handle.restart_until_ready().await {
                tracing::error!(
                    "{name}: rolling restart halted: {instance} is not ready again ({why}); \
                     the instances after it were left running"
                );
                return;
            }
        }
        tracing::info!("{name}: rolling restart done");
    });
    names
}

/// One line of `ps`.
fn row(name: &str, role: &str, status: &Status) -> ServiceRow {
    let running = matches!(status.state, State::Starting | State::Ready);
    ServiceRow {
        name: name.to_string(),
        role: role.to_string(),
        state: RowState::Instance(status.state),
        pid: status.pid,
        port: status.port,
        restarts: status.restarts,
        uptime_ms: status
            .started
            .filter(|_| running)
            .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)),
        message: status.message.clone(),
        health: status
            .health
            .as_ref()
            .filter(|_| running)
            .map(ToString::to_string),
        last_exit: status.last_exit.map(|exit| exit.to_string()),
        last_exit_status: status.last_exit.and_then(|exit| match exit {
            Exit::Code(code) => Some(code),
            Exit::Signal(signal) => Some(128 + signal),
            Exit::SpawnFailed | Exit::Unhealthy | Exit::NotReady => None,
        }),
        port_failures: status.port_failures,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_is_given_the_longest_stop_timeout_and_the_margin() {
        let timeouts = [
            Duration::from_secs(10),
            Duration::from_secs(90),
            Duration::from_millis(1),
        ];
        assert_eq!(
            stop_extension(timeouts.into_iter()).as_deref(),
            Some("EXTEND_TIMEOUT_USEC=95000000")
        );
        assert_eq!(stop_extension(std::iter::empty()), None);
    }
}
