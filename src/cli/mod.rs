//! The `seaport` command line: argument definitions and dispatch. Each command lives
//! in its own module; `main` only calls [`run`].

mod free;
mod inspect;
mod listen;
mod register;
mod route;
mod signals;
mod supervise;

use crate::human::say;
use crate::supervise::control::ControlRequest;
use clap::{Args, Parser, Subcommand};
use std::process::ExitCode;
use std::time::Duration;

/// Service registry, port assignment and process supervision for clusters.
#[derive(Debug, Parser)]
#[command(name = "seaport", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a hub on PORT (0 picks a free port) and print `seaport listening on :PORT`.
    Listen(listen::ListenArgs),
    /// Print every record of the hub at HUB as a JSON array.
    Show(ShowArgs),
    /// Print the records matching PATTERN (`name` or `name@range`), drilling into FIELDs.
    Query(QueryArgs),
    /// Print a line for each register and free event at HUB, until interrupted.
    Watch(WatchArgs),
    /// Free the record ID at HUB (with --key, as an admin or its owner).
    Free(free::FreeArgs),
    /// Run COMMAND on a free port (appended as its last argument and set as PORT),
    /// register it with HUB while it is ready, and restart it when it exits.
    Register(Box<register::RegisterArgs>),
    /// Run every service defined in a directory, with a built-in hub or remote hubs.
    Supervise(supervise::SuperviseArgs),
    /// Route HTTP requests by their Host header to the live records of ROLE@RANGE,
    /// on PORT (0 picks a free port); print `seaport route listening on :PORT`.
    Route(route::RouteArgs),
    /// List the services of the running supervisor.
    Ps(supervise::PsArgs),
    /// Start a stopped or failed service of the running supervisor.
    Start(supervise::ActArgs),
    /// Stop a service of the running supervisor (it stays stopped).
    Stop(supervise::ActArgs),
    /// Restart a service of the running supervisor.
    Restart(supervise::ActArgs),
    /// Print a new RSA keypair as JSON {"public": PEM, "private": PEM} (rsa-json layout).
    Keygen(KeygenArgs),
}

#[derive(Debug, Args)]
struct KeygenArgs {
    /// Key size in bits.
    #[arg(long, default_value_t = 2048)]
    bits: usize,
}

/// Options shared by commands that talk to one hub.
#[derive(Debug, Args)]
struct HubArg {
    /// The hub: HOST:PORT, or PORT for localhost.
    hub: String,
    /// Seconds to wait for the hub to answer (up to an hour).
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS", value_parser = parse_wait)]
    wait: f64,
}

/// `--wait`: a number of seconds from 0 to an hour.
fn parse_wait(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if (0.0..=3600.0).contains(&secs) => Ok(secs),
        _ => Err(format!("expected seconds from 0 to 3600, got {text:?}")),
    }
}

/// The `--heartbeat` of `listen`, `register` and `supervise`, in milliseconds.
fn heartbeat(ms: u64) -> Result<Duration, String> {
    if ms == 0 {
        return Err("--heartbeat must be at least 1 ms".into());
    }
    Ok(Duration::from_millis(ms))
}

impl HubArg {
    /// How long to wait for the hub to answer.
    fn timeout(&self) -> Duration {
        Duration::try_from_secs_f64(self.wait).unwrap_or(Duration::from_secs(5))
    }

    /// The error when the hub did not answer in time.
    fn no_answer(&self) -> String {
        format!(
            "no answer from the hub at {} within {:.1} s (is it running?)",
            self.hub, self.wait
        )
    }
}

#[derive(Debug, Args)]
struct ShowArgs {
    #[command(flatten)]
    hub: HubArg,
    /// Add to each record its owner, as the hub says: `key SHA256:…`, `client`
    /// (a client with a claim) or `connection` (a client that proved nothing).
    #[arg(long)]
    owners: bool,
}

#[derive(Debug, Args)]
struct QueryArgs {
    #[command(flatten)]
    hub: HubArg,
    /// `name` or `name@range` (npm semver rules); all records when omitted.
    pattern: Option<String>,
    /// Keys to drill into in each record, in order (`port`; `limits` `cpu`
    /// for a key inside a metadata object).
    fields: Vec<String>,
}

#[derive(Debug, Args)]
struct WatchArgs {
    /// The hub: HOST:PORT, or PORT for localhost.
    hub: String,
    /// Also print each record as indented JSON.
    #[arg(short, long)]
    verbose: bool,
}

/// How a command failed: the message for stderr and the exit status. Most
/// failures are 1; `seaport register` ends as its command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    message: String,
    code: u8,
}

impl Failure {
    /// A failure with exit status `code` (1 to 255; 0 is taken as 1).
    pub(crate) fn with_code(message: impl Into<String>, code: u8) -> Failure {
        Failure {
            message: message.into(),
            code: code.max(1),
        }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::with_code(message, 1)
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Failure {
        Failure::from(message.to_string())
    }
}

/// Parses the command line, runs the command and returns the process exit code.
pub fn run() -> ExitCode {
    let args = match utf8_args() {
        Ok(args) => args,
        Err(message) => return fail(&Failure::with_code(message, 2)),
    };
    let args = register::rewrite_meta_args(args);
    let cli = Cli::parse_from(args);
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return fail(&Failure::from(format!(
                "cannot start the async runtime: {e}"
            )));
        }
    };
    let result: Result<(), Failure> = runtime.block_on(async {
        let result: Result<(), String> = match cli.command {
            // The launcher's failures carry its command's exit status.
            Command::Register(args) => return register::run(*args).await,
            Command::Listen(args) => listen::run(args).await,
            Command::Show(args) => inspect::show(args.hub, args.owners).await,
            Command::Query(args) => inspect::query(args.hub, args.pattern, args.fields).await,
            Command::Watch(args) => inspect::watch(&args.hub, args.verbose).await,
            Command::Free(args) => free::run(args).await,
            Command::Supervise(args) => supervise::supervise(args).await,
            Command::Route(args) => route::run(args).await,
            Command::Ps(args) => supervise::ps(args).await,
            Command::Start(args) => {
                supervise::act(args, |name| ControlRequest::Start { name }).await
            }
            Command::Stop(args) => supervise::act(args, |name| ControlRequest::Stop { name }).await,
            Command::Keygen(args) => crate::protocol::keys::Keypair::generate(args.bits)
                .and_then(|pair| say(pair.to_json())),
            Command::Restart(args) => {
                supervise::act(args, |name| ControlRequest::Restart { name }).await
            }
        };
        result.map_err(Failure::from)
    });
    // The last log lines and service output, unless our streams are stalled.
    crate::console::flush(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => fail(&failure),
    }
}

/// The command line, each argument as text; one that is not UTF-8 is
/// named instead of taken for another.
fn utf8_args() -> Result<Vec<String>, String> {
    std::env::args_os()
        .enumerate()
        .map(|(n, arg)| {
            arg.into_string().map_err(|arg| {
                format!(
                    "argument {n} is not UTF-8 text: {:?}",
                    arg.to_string_lossy()
                )
            })
        })
        .collect()
}

fn fail(failure: &Failure) -> ExitCode {
    eprintln!("seaport: {}", failure.message);
    ExitCode::from(failure.code)
}

/// Logs go to stderr; `SEAPORT_LOG` (or `RUST_LOG`) sets the filter, `info` by default.
fn init_logging() {
    use std::io::IsTerminal;
    let filter = std::env::var("SEAPORT_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(|| crate::console::LogWriter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}
