//! `seaport register HUB NAME@VERSION [OPTIONS] -- COMMAND [ARGS...]`: run one
//! command on a free port, register it while it is ready, restart it when it exits.

use super::Failure;
use crate::client::{Client, ClientConfig};
use crate::process::instance::{Instance, InstanceSpec, PortChoice, State};
use crate::process::restart::Exit;
use crate::process::settings::RunOptions;
use crate::protocol::hub_addr::HubAddr;
use crate::protocol::wire::Meta;
use crate::registry::ports::PortRange;
use clap::Args;
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Args)]
pub(super) struct RegisterArgs {
    /// The hub: HOST:PORT, or PORT for localhost; several separated by commas
    /// (the client fails over between them, and to hubs they announce).
    #[arg(value_parser = parse_hubs)]
    hub: Hubs,
    /// The service as name@version.
    role: String,
    /// Use this port instead of choosing one.
    #[arg(long, conflicts_with = "range", value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,
    /// Choose the port from this range (default 10000-65535).
    #[arg(long, value_name = "A-B")]
    range: Option<PortRange>,
    /// Metadata for the record as a JSON object; `--meta.KEY=VALUE` sets one key
    /// (VALUE is parsed as JSON when it is JSON, else taken as a string).
    #[arg(long, value_name = "JSON")]
    meta: Option<String>,
    /// One `--meta.KEY=VALUE`, rewritten by the argument pre-parser.
    #[arg(long = "meta-entry", hide = true, value_name = "KEY=VALUE")]
    meta_entries: Vec<String>,
    /// Keypair file (rsa-json or PEM) for hubs that take writes only from
    /// authorized keys.
    #[arg(long, value_name = "FILE")]
    key: Option<std::path::PathBuf>,
    /// Hub keys (files or directories of public keys, repeatable): a hub must
    /// prove it holds one before anything is sent to it, and only `seaport`
    /// records written with one are failover targets.
    #[arg(long = "hub-key", value_name = "FILE|DIR")]
    hub_key: Vec<std::path::PathBuf>,
    /// Use only the hubs given, not hubs learned from `seaport` records.
    #[arg(long)]
    no_discover: bool,
    #[command(flatten)]
    run: RunOptions,
    /// Milliseconds between heartbeats to the hub.
    #[arg(long, default_value_t = 15000, value_name = "MS")]
    heartbeat: u64,
    /// The command to run; the port is appended as its last argument and set as PORT.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// Runs the launcher. It ends as its command did when the command is not
/// started again: with its exit code, or 128+N for signal N (127 when it could
/// not be started at all); with 1 when seaport itself failed; with 0 when it
/// was told to stop.
pub(super) async fn run(args: RegisterArgs) -> Result<(), Failure> {
    // SIGHUP, a terminal going away, stops the launcher as SIGTERM does.
    let mut orders = super::signals::orders()?;
    // Refused before anything runs: a service nobody can find is no service.
    crate::registry::record::check_role(&args.role).map_err(|e| format!("role: {e}"))?;
    let meta = build_meta(args.meta.as_deref(), &args.meta_entries)?;
    let run = args.run.resolve().map_err(|problems| {
        problems
            .iter()
            .map(|p| format!("{}: {}", p.flag(), p.message))
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    let heartbeat = super::heartbeat(args.heartbeat)?;
    let port = match (args.port, args.range) {
        (Some(port), _) => PortChoice::Fixed(port),
        (None, Some(range)) => PortChoice::Range(range),
        (None, None) => PortChoice::Range(PortRange::default()),
    };
    let spec = InstanceSpec {
        name: crate::registry::record::split_role(&args.role)
            .0
            .to_string(),
        role: args.role,
        meta,
        command: args.command,
        env: BTreeMap::new(),
        cwd: None,
        port,
        run,
        prefix_output: false,
        health: None,
    };
    let keypair = match &args.key {
        Some(path) => Some(std::sync::Arc::new(
            crate::protocol::keys::Keypair::load(path).map_err(|e| e.to_string())?,
        )),
        None => None,
    };
    let hub_keys =
        crate::protocol::keys::Authorized::load(&args.hub_key).map_err(|e| e.to_string())?;
    let config = ClientConfig {
        heartbeat,
        timeout: heartbeat * 3,
        keypair,
        hub_keys,
        discover: !args.no_discover,
        ..ClientConfig::default()
    };
    // From here on, what containment set up is undone on the way out.
    crate::process::containment::init()?;
    let (client, _) = match Client::connect_to(args.hub.0, config) {
        Ok(client) => client,
        Err(e) => {
            crate::process::containment::shutdown();
            return Err(e.to_string().into());
        }
    };
    let name = spec.name.clone();
    let instance = Instance::spawn(spec, client.clone());
    let mut status = instance.watch();
    let ended = loop {
        tokio::select! {
            _ = orders.recv() => break None,
            changed = status.changed() => {
                if changed.is_err() {
                    break Some(State::Stopped);
                }
                let state = status.borrow().state;
                if matches!(state, State::Stopped | State::Failed) {
                    break Some(state);
                }
            }
        }
    };
    let (message, last_exit) = {
        let status = status.borrow();
        let message = status.message.as_ref().map(|m| format!("{name}: {m}"));
        (message, status.last_exit)
    };
    let abort = instance.abort_handle();
    tokio::select! {
        () = instance.shutdown() => {}
        Some(_) = orders.recv() => abort.abort(),
    }
    client.close();
    crate::process::containment::shutdown();
    let code = last_exit.map_or(1, exit_code);
    match ended {
        // Gave up, or seaport failed (no port, a refused record).
        Some(State::Failed) => Err(Failure::with_code(
            message.unwrap_or_else(|| "the service failed".into()),
            code,
        )),
        // Not restarted by policy: the launcher ends as the command did.
        Some(State::Stopped) if last_exit.is_some_and(|e| !e.success()) => Err(Failure::with_code(
            message.unwrap_or_else(|| "the command failed".into()),
            code,
        )),
        _ => Ok(()),
    }
}

/// The exit status that says how a command ended, as a shell's `$?` does.
fn exit_code(exit: Exit) -> u8 {
    match exit {
        Exit::Code(code) => u8::try_from(code).unwrap_or(1),
        Exit::Signal(signal) => u8::try_from(128 + signal).unwrap_or(1),
        Exit::SpawnFailed => 127,
        Exit::Unhealthy | Exit::NotReady => 1,
    }
}

/// One or more hub addresses.
#[derive(Debug, Clone)]
pub(super) struct Hubs(Vec<HubAddr>);

fn parse_hubs(text: &str) -> Result<Hubs, String> {
    text.split(',')
        .map(|h| h.parse::<HubAddr>().map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()
        .map(Hubs)
}

/// Builds record metadata from `--meta JSON` and `--meta.KEY=VALUE` entries
/// (dotted keys nest: `--meta.a.b=1` gives `{"a":{"b":1}}`).
fn build_meta(json: Option<&str>, entries: &[String]) -> Result<Meta, String> {
    let mut meta = match json {
        None => Meta::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(format!("--meta must be a JSON object, got {text}")),
            Err(e) => return Err(format!("--meta is not valid JSON: {e}")),
        },
    };
    for entry in entries {
        let (key, value) = entry
            .split_once('=')
            .ok_or_else(|| format!("--meta.{entry}: expected --meta.KEY=VALUE"))?;
        let value = serde_json::from_str::<Value>(value)
            .unwrap_or_else(|_| Value::String(value.to_string()));
        let path: Vec<&str> = key.split('.').collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(format!("--meta.{key}: empty key"));
        }
        insert_path(&mut meta, &path, value);
    }
    Ok(meta)
}

fn insert_path(meta: &mut Meta, path: &[&str], value: Value) {
    match path {
        [] => {}
        [last] => {
            meta.insert((*last).to_string(), value);
        }
        [first, rest @ ..] => {
            let slot = meta
                .entry((*first).to_string())
                .or_insert_with(|| Value::Object(Meta::new()));
            if !slot.is_object() {
                *slot = Value::Object(Meta::new());
            }
            if let Value::Object(inner) = slot {
                insert_path(inner, rest, value);
            }
        }
    }
}

/// Rewrites `--meta.KEY=VALUE` and `--meta.KEY VALUE` (before `--`) into the hidden
/// `--meta-entry KEY=VALUE` option, since option names cannot be patterns in clap.
pub(super) fn rewrite_meta_args(args: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut iter = args.into_iter().peekable();
    while let Some(arg) = iter.next() {
        if arg == "--" {
            out.push(arg);
            out.extend(iter.by_ref());
            break;
        }
        match arg.strip_prefix("--meta.") {
            Some(rest) if rest.contains('=') => {
                out.push("--meta-entry".into());
                out.push(rest.to_string());
            }
            // `--meta.KEY VALUE`; without a value (the end, or another
            // option or `--` next) it is a flag, `true`, as the Node
            // package's option parser reads it.
            Some(key) => {
                let value = match iter.peek() {
                    Some(next) if !is_option(next) => iter.next().unwrap_or_default(),
                    _ => "true".to_string(),
                };
                out.push("--meta-entry".into());
                out.push(format!("{key}={value}"));
            }
            None => out.push(arg),
        }
    }
    out
}

/// An option or the `--` separator, not a value: `-x`, `--name`, but not `-5`.
fn is_option(arg: &str) -> bool {
    arg.starts_with('-') && arg.parse::<f64>().is_err()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn exit_statuses_read_as_a_shell_reads_them() {
        assert_eq!(exit_code(Exit::Code(3)), 3);
        assert_eq!(exit_code(Exit::Signal(9)), 137);
        assert_eq!(exit_code(Exit::Signal(15)), 143);
        assert_eq!(exit_code(Exit::SpawnFailed), 127);
        assert_eq!(exit_code(Exit::Code(-1)), 1);
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn a_meta_option_without_a_value_is_a_flag_and_leaves_the_separator() {
        assert_eq!(
            rewrite_meta_args(s(&["register", "--meta.fast", "--", "cmd"])),
            s(&["register", "--meta-entry", "fast=true", "--", "cmd"])
        );
        assert_eq!(
            rewrite_meta_args(s(&["--meta.fast", "--port", "8080", "--meta.n", "-5"])),
            s(&[
                "--meta-entry",
                "fast=true",
                "--port",
                "8080",
                "--meta-entry",
                "n=-5"
            ])
        );
        assert_eq!(
            rewrite_meta_args(s(&["--meta.last"])),
            s(&["--meta-entry", "last=true"])
        );
    }

    #[test]
    fn rewrites_meta_options_before_the_command_only() {
        assert_eq!(
            rewrite_meta_args(s(&[
                "register",
                "--meta.zone=eu",
                "--meta.n",
                "3",
                "--",
                "cmd",
                "--meta.x=1"
            ])),
            s(&[
                "register",
                "--meta-entry",
                "zone=eu",
                "--meta-entry",
                "n=3",
                "--",
                "cmd",
                "--meta.x=1"
            ])
        );
    }

    #[test]
    fn builds_nested_metadata_with_json_values() {
        let meta = build_meta(
            Some(r#"{"a":1}"#),
            &s(&["zone=eu", "weight=5", "flags.fast=true", "list=[1,2]"]),
        )
        .unwrap();
        assert_eq!(
            Value::Object(meta),
            json!({"a":1,"zone":"eu","weight":5,"flags":{"fast":true},"list":[1,2]})
        );
        assert!(build_meta(Some("[1]"), &[]).is_err());
        assert!(build_meta(None, &s(&["novalue"])).is_err());
    }
}
