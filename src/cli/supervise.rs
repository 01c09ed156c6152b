//! `seaport supervise`, and `ps` / `start` / `stop` / `restart`, which talk to a
//! running supervisor.

use crate::hub::HubConfig;
use crate::human::{count, format_duration};
use crate::protocol::hub_addr::HubAddr;
use crate::router::forwarded::{ProxyRange, TrustedProxies};
use crate::supervise::control::{
    self, ControlError, ControlRequest, ControlResponse, RowState, ServiceRow,
};
use crate::supervise::{SuperviseOptions, spec};
use clap::Args;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Args)]
pub(super) struct SuperviseArgs {
    /// The services directory: one service per *.toml or *.json file.
    #[arg(default_value = "services.d")]
    dir: PathBuf,
    /// Use this remote hub instead of a built-in one (repeat for failover).
    #[arg(long, value_name = "HOST:PORT")]
    hub: Vec<HubAddr>,
    /// Port of the built-in hub.
    #[arg(long, default_value_t = 9090, value_name = "PORT")]
    listen: u16,
    /// Bind address of the built-in hub (default: every interface).
    #[arg(long, value_name = "ADDR")]
    listen_host: Option<IpAddr>,
    /// Milliseconds between heartbeats.
    #[arg(long, default_value_t = 15000, value_name = "MS")]
    heartbeat: u64,
    /// Control socket for `seaport ps` and friends.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    #[command(flatten)]
    access: super::listen::AccessArgs,
    /// Services use only the hubs given (--hub, or a service's `hub`), not hubs
    /// learned from `seaport` records (a service file's `discover` overrides it).
    #[arg(long)]
    no_discover: bool,
    /// Only validate the directory: print every problem and exit non-zero if any.
    #[arg(long)]
    check: bool,
    /// Also run the HTTP router on PORT (0 picks a free one), sending each
    /// host a service file names in `route = [...]` to that service; prints
    /// `seaport route listening on :PORT`.
    #[arg(long, value_name = "PORT")]
    route: Option<u16>,
    /// Keep the forwarded headers (X-Forwarded-For, X-Real-IP, Forwarded...)
    /// of clients in this range, proxies in front of the router: an address
    /// or CIDR. Repeatable. Other clients' own are replaced.
    #[arg(long, value_name = "RANGE", requires = "route")]
    trust_forwarded: Vec<ProxyRange>,
    /// Serve the admin HTTP endpoint (metrics, JSON API, events, dashboard) on
    /// ADDR:PORT, or on 127.0.0.1:PORT when only a port is given (0 picks a
    /// free one); prints `seaport admin listening on ADDR:PORT`.
    #[arg(long, value_name = "ADDR:PORT", value_parser = crate::admin::parse_addr)]
    admin: Option<std::net::SocketAddr>,
    #[command(flatten)]
    store: super::listen::StoreArgs,
}

#[derive(Debug, Args)]
pub(super) struct ControlArgs {
    /// Control socket of the supervisor (default as `seaport supervise`).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(super) struct PsArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(super) struct ActArgs {
    /// A service (all its instances) or one instance (`web.2`).
    name: String,
    #[command(flatten)]
    control: ControlArgs,
}

pub(super) async fn supervise(args: SuperviseArgs) -> Result<(), String> {
    if args.check {
        return check(&args.dir);
    }
    let heartbeat = super::heartbeat(args.heartbeat)?;
    super::listen::raise_open_files_limit();
    let mut hub_config = HubConfig::with_heartbeat(heartbeat);
    hub_config.owned = args.access.owned();
    if args.store.given() && !args.hub.is_empty() {
        return Err(
            "--store is for the built-in hub; with --hub the services use those hubs instead"
                .into(),
        );
    }
    hub_config.store = args.store.store()?;
    let orders = super::signals::orders()?;
    // Before anything starts; undone when the supervisor ends.
    crate::process::containment::init()?;
    let options = SuperviseOptions {
        dir: args.dir,
        hubs: args.hub,
        listen: args.listen,
        listen_host: args.listen_host,
        hub_config,
        key_files: args.access.key_files(Vec::new()),
        discover: !args.no_discover,
        control: args.control.unwrap_or_else(control::default_path),
        route: args.route,
        trust_forwarded: TrustedProxies::new(args.trust_forwarded),
    };
    let result = match args.admin {
        None => crate::supervise::run(options, orders).await,
        Some(addr) => with_admin(options, orders, addr).await,
    };
    crate::process::containment::shutdown();
    result.map_err(|e| e.to_string())
}

/// Runs the supervisor with the admin endpoint of `--admin` on `addr`,
/// started as soon as the supervisor has its hub and control socket.
async fn with_admin(
    options: SuperviseOptions,
    orders: tokio::sync::mpsc::Receiver<crate::supervise::Order>,
    addr: std::net::SocketAddr,
) -> Result<(), crate::supervise::SuperviseError> {
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let supervisor = crate::supervise::run_observed(options, orders, Some(started_tx));
    let mut supervisor = std::pin::pin!(supervisor);
    let running = tokio::select! {
        result = &mut supervisor => return result,
        running = started => running,
    };
    let admin = match running {
        Ok(running) => {
            let sources = crate::admin::Sources {
                hub: running.hub,
                services: Some(running.services),
            };
            match super::listen::start_admin(addr, sources).await {
                Ok(admin) => {
                    // As the built-in hub's line: a closed stdout stops
                    // no service.
                    let _ = super::say(format_args!(
                        "seaport admin listening on {}",
                        admin.local_addr()
                    ));
                    Some(admin)
                }
                Err(e) => {
                    // The services run; only the window onto them is missing.
                    tracing::error!("{e}");
                    None
                }
            }
        }
        Err(_) => None,
    };
    let result = supervisor.await;
    if let Some(admin) = admin {
        admin.shutdown().await;
    }
    result
}

fn check(dir: &std::path::Path) -> Result<(), String> {
    let loaded = spec::load_dir(dir);
    for error in &loaded.errors {
        eprintln!("{error}");
    }
    for warning in &loaded.warnings {
        eprintln!("warning: {warning}");
    }
    let instances: usize = loaded.services.iter().map(|s| s.instances.len()).sum();
    let problems = count(loaded.errors.len(), "problem", "problems");
    super::say(format_args!(
        "{}: {} ({}) valid, {problems}",
        dir.display(),
        count(loaded.services.len(), "service", "services"),
        count(instances, "instance", "instances"),
    ))?;
    if loaded.errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{} has {problems}", dir.display()))
    }
}

/// Sends `request` to the supervisor at `--control`, or else to the first one
/// that answers of the places a supervisor puts its socket.
async fn call(control: ControlArgs, request: ControlRequest) -> Result<ControlResponse, String> {
    let paths = match control.control {
        Some(path) => vec![path],
        None => control::client_paths(),
    };
    let mut tried = Vec::new();
    for path in &paths {
        match control::call(path, &request).await {
            Ok(ControlResponse::Error(e)) => return Err(e),
            Ok(answer) => return Ok(answer),
            Err(ControlError::NoSupervisor { path, source }) if paths.len() > 1 => {
                tried.push(format!("{} ({source})", path.display()));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(format!(
        "no supervisor answers at {}; is `seaport supervise` running? (--control sets the path)",
        tried.join(", ")
    ))
}

pub(super) async fn ps(args: PsArgs) -> Result<(), String> {
    let ControlResponse::Services(rows) = call(args.control, ControlRequest::Ps).await? else {
        return Err("unexpected answer from the supervisor".into());
    };
    if args.json {
        super::say(serde_json::to_string_pretty(&rows).unwrap_or_default())
    } else {
        super::say(table(&rows).trim_end())
    }
}

/// Formats `ps` rows as aligned columns, then each row's message.
fn table(rows: &[ServiceRow]) -> String {
    let header = [
        "NAME", "STATE", "HEALTH", "PID", "PORT", "RESTARTS", "UPTIME", "ROLE",
    ];
    let dash = || "-".to_string();
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for r in rows {
        lines.push(vec![
            r.name.clone(),
            r.state.to_string(),
            r.health
                .as_deref()
                .map_or_else(dash, |h| h.split(' ').next().unwrap_or(h).to_string()),
            r.pid.map_or_else(dash, |p| p.to_string()),
            r.port.map_or_else(dash, |p| p.to_string()),
            if r.state == RowState::Rejected {
                dash()
            } else {
                r.restarts.to_string()
            },
            r.uptime_ms
                .map_or_else(dash, |ms| format_duration(Duration::from_millis(ms))),
            r.role.clone(),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| lines.iter().map(|l| l[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for line in &lines {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    for r in rows {
        if let Some(message) = &r.message {
            out.push_str(&format!("{}: {message}\n", r.name));
        }
        if let Some(health) = r.health.as_deref().filter(|h| h.starts_with("unhealthy")) {
            out.push_str(&format!("{}: {health}\n", r.name));
        }
    }
    out
}

pub(super) async fn act(args: ActArgs, make: fn(String) -> ControlRequest) -> Result<(), String> {
    let ControlResponse::Done(names) = call(args.control, make(args.name)).await? else {
        return Err("unexpected answer from the supervisor".into());
    };
    super::say(names.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::instance::State;

    #[test]
    fn ps_table_aligns_columns() {
        let rows = vec![
            ServiceRow {
                name: "web.1".into(),
                role: "web@1.0.0".into(),
                state: RowState::Instance(State::Ready),
                pid: Some(42),
                port: Some(20001),
                restarts: 3,
                uptime_ms: Some(303_000),
                message: None,
                health: Some("healthy".into()),
                last_exit: None,
                last_exit_status: None,
                port_failures: 0,
            },
            ServiceRow {
                name: "web.2".into(),
                role: "web@1.0.0".into(),
                state: RowState::Instance(State::Ready),
                pid: Some(43),
                port: Some(20002),
                restarts: 0,
                uptime_ms: Some(2_000),
                message: None,
                health: Some("unhealthy (1 in a row: GET /healthz answered 500)".into()),
                last_exit: None,
                last_exit_status: None,
                port_failures: 0,
            },
            ServiceRow {
                name: "db".into(),
                role: "db@9.0.0".into(),
                state: RowState::Instance(State::Failed),
                pid: None,
                port: None,
                restarts: 10,
                uptime_ms: None,
                message: Some("gave up".into()),
                health: None,
                last_exit: None,
                last_exit_status: None,
                port_failures: 0,
            },
            ServiceRow {
                name: "bad".into(),
                role: String::new(),
                state: RowState::Rejected,
                pid: None,
                port: None,
                restarts: 0,
                uptime_ms: None,
                message: Some("services.d/bad.toml: port: must be ...".into()),
                health: None,
                last_exit: None,
                last_exit_status: None,
                port_failures: 0,
            },
        ];
        assert_eq!(
            table(&rows),
            "NAME   STATE     HEALTH     PID  PORT   RESTARTS  UPTIME  ROLE\n\
             web.1  ready     healthy    42   20001  3         5m3s    web@1.0.0\n\
             web.2  ready     unhealthy  43   20002  0         2s      web@1.0.0\n\
             db     failed    -          -    -      10        -       db@9.0.0\n\
             bad    rejected  -          -    -      -         -\n\
             web.2: unhealthy (1 in a row: GET /healthz answered 500)\n\
             db: gave up\n\
             bad: services.d/bad.toml: port: must be ...\n"
        );
    }
}
