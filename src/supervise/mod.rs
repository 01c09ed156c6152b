//! `seaport supervise`: run every service of a directory, with a built-in hub or
//! remote hubs; reload on SIGHUP; answer `seaport ps` and friends; stop everything
//! cleanly on SIGTERM or SIGINT (a second one kills at once).
//!
//! Signals and control requests become messages read in one `select!` loop; the
//! instances do the process work in their own tasks.

pub mod control;
pub mod notify;
pub mod spec;

use crate::client::{Client, ClientConfig};
use crate::hub::{Hub, HubConfig};
use crate::process::instance::{Instance, Request, State};
use crate::protocol::hub_addr::HubAddr;
use crate::protocol::keys::Fingerprint;
use control::{Call, ControlRequest, ControlResponse, ServiceRow};
use notify::notify;
use spec::{Loaded, ServiceSpec};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

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
    /// Control socket path.
    pub control: PathBuf,
}

/// A running service: its spec and its instances.
struct Service {
    spec: ServiceSpec,
    instances: Vec<Instance>,
}

struct Supervisor {
    options: SuperviseOptions,
    default_hubs: Vec<HubAddr>,
    clients: HashMap<(Vec<HubAddr>, Option<Fingerprint>), Client>,
    services: BTreeMap<String, Service>,
}

/// Runs the supervisor until SIGTERM or SIGINT.
pub async fn run(options: SuperviseOptions) -> Result<(), String> {
    let watch = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| format!("cannot watch {name}: {e}"))
    };
    let mut term = watch(SignalKind::terminate(), "SIGTERM")?;
    let mut int = watch(SignalKind::interrupt(), "SIGINT")?;
    let mut hup = watch(SignalKind::hangup(), "SIGHUP")?;

    if !options.dir.is_dir() {
        return Err(format!("{}: not a directory", options.dir.display()));
    }
    let (hub, default_hubs) = if options.hubs.is_empty() {
        let hub = start_hub(&options).await?;
        let port = hub.local_addr().port();
        println!("seaport listening on :{port}");
        (Some(hub), vec![HubAddr::new("127.0.0.1", port)])
    } else {
        (None, options.hubs.clone())
    };
    let listener = control::bind(&options.control).await?;
    let (calls_tx, mut calls) = mpsc::channel::<Call>(16);
    let control_task = tokio::spawn(control::serve(listener, calls_tx));

    let mut sup = Supervisor {
        options,
        default_hubs,
        clients: HashMap::new(),
        services: BTreeMap::new(),
    };
    let loaded = spec::load_dir(&sup.options.dir);
    report(&loaded);
    for spec in loaded.services {
        sup.start(spec);
    }
    tracing::info!(
        "supervising {} services from {}",
        sup.services.len(),
        sup.options.dir.display()
    );
    notify("READY=1");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => sup.reload().await,
            Some((request, reply)) = calls.recv() => {
                let _ = reply.send(sup.answer(request));
            }
        }
    }
    notify("STOPPING=1");
    tracing::info!("stopping {} services", sup.services.len());
    let aborts: Vec<AbortHandle> = sup
        .services
        .values()
        .flat_map(|s| s.instances.iter().map(Instance::abort_handle))
        .collect();
    let mut stopping = JoinSet::new();
    for (_, service) in std::mem::take(&mut sup.services) {
        for instance in service.instances {
            stopping.spawn(instance.shutdown());
        }
    }
    loop {
        tokio::select! {
            next = stopping.join_next() => if next.is_none() { break },
            _ = term.recv() => { kill_now(&aborts); }
            _ = int.recv() => { kill_now(&aborts); }
        }
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

/// A second interrupt: kill every process group now.
fn kill_now(aborts: &[AbortHandle]) {
    tracing::warn!("second signal: killing every service now");
    for abort in aborts {
        abort.abort();
    }
}

async fn start_hub(options: &SuperviseOptions) -> Result<Hub, String> {
    let listener = crate::hub::listen_on(options.listen_host, options.listen)
        .await
        .map_err(|e| format!("cannot run the built-in hub: {e}"))?;
    Ok(Hub::serve(listener, options.hub_config.clone()))
}

fn report(loaded: &Loaded) {
    for error in &loaded.errors {
        tracing::error!("{error}");
    }
}

impl Supervisor {
    /// One client per distinct list of hubs and key, shared by the services using
    /// them.
    fn client_for(&mut self, spec: &ServiceSpec) -> Result<Client, String> {
        let hubs = spec
            .hubs
            .clone()
            .unwrap_or_else(|| self.default_hubs.clone());
        let keypair = spec.key.as_ref().map(|k| k.pair.clone());
        let id = (
            hubs.clone(),
            keypair.as_ref().map(|k| k.fingerprint().clone()),
        );
        if let Some(client) = self.clients.get(&id) {
            return Ok(client.clone());
        }
        let config = ClientConfig {
            heartbeat: self.options.hub_config.heartbeat,
            timeout: self.options.hub_config.timeout,
            keypair,
            ..ClientConfig::default()
        };
        let (client, _) = Client::connect_to(hubs, config).map_err(|e| e.to_string())?;
        self.clients.insert(id, client.clone());
        Ok(client)
    }

    fn start(&mut self, spec: ServiceSpec) {
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

    async fn stop(&mut self, name: &str) {
        if let Some(service) = self.services.remove(name) {
            let mut stopping = JoinSet::new();
            for instance in service.instances {
                stopping.spawn(instance.shutdown());
            }
            while stopping.join_next().await.is_some() {}
        }
    }

    /// Starts new files, stops removed ones, restarts changed ones; leaves the
    /// rest alone. A file that became invalid keeps its running version.
    async fn reload(&mut self) {
        notify("RELOADING=1");
        tracing::info!("reloading {}", self.options.dir.display());
        let loaded = spec::load_dir(&self.options.dir);
        report(&loaded);
        let mut fresh: BTreeMap<String, ServiceSpec> = loaded
            .services
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        let running: Vec<String> = self.services.keys().cloned().collect();
        for name in running {
            match fresh.remove(&name) {
                Some(spec) if self.services.get(&name).is_some_and(|s| s.spec == spec) => {}
                Some(spec) => {
                    tracing::info!("{name}: changed, restarting");
                    self.stop(&name).await;
                    self.start(spec);
                }
                None if loaded.failed.contains(&name) => {
                    tracing::warn!("{name}: its file is invalid now; keeping the running version");
                }
                None => {
                    tracing::info!("{name}: removed, stopping");
                    self.stop(&name).await;
                }
            }
        }
        for (name, spec) in fresh {
            tracing::info!("{name}: new, starting");
            self.start(spec);
        }
        notify("READY=1");
    }

    fn answer(&mut self, request: ControlRequest) -> ControlResponse {
        let (action, name) = match request {
            ControlRequest::Ps => return ControlResponse::Services(self.rows()),
            ControlRequest::Start { name } => (Request::Start, name),
            ControlRequest::Stop { name } => (Request::Stop, name),
            ControlRequest::Restart { name } => (Request::Restart, name),
        };
        let mut affected = Vec::new();
        for (service_name, service) in &self.services {
            for (instance, spec) in service.instances.iter().zip(&service.spec.instances) {
                if *service_name == name || spec.name == name {
                    instance.request(action);
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

    fn rows(&self) -> Vec<ServiceRow> {
        let mut rows = Vec::new();
        for service in self.services.values() {
            for (instance, spec) in service.instances.iter().zip(&service.spec.instances) {
                let status = instance.status();
                let running = matches!(status.state, State::Starting | State::Ready);
                rows.push(ServiceRow {
                    name: spec.name.clone(),
                    role: spec.role.clone(),
                    state: state_name(status.state).to_string(),
                    pid: status.pid,
                    port: status.port,
                    restarts: status.restarts,
                    uptime_ms: status
                        .started
                        .filter(|_| running)
                        .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)),
                    message: status.message,
                });
            }
        }
        rows
    }
}

fn state_name(state: State) -> &'static str {
    match state {
        State::Starting => "starting",
        State::Ready => "ready",
        State::Backoff => "backoff",
        State::Stopped => "stopped",
        State::Failed => "failed",
    }
}
