//! The supervisor's control socket: `seaport ps`, `start`, `stop` and `restart`
//! talk to a running supervisor over a Unix socket, one JSON line each way.

use crate::process::instance::State;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

/// Longest request accepted on the control socket.
const MAX_REQUEST: u64 = 64 * 1024;

/// A request to the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum ControlRequest {
    /// List every instance.
    Ps,
    /// Start the named service (all its instances) or instance.
    Start {
        /// `web` or `web.2`.
        name: String,
    },
    /// Stop the named service or instance.
    Stop {
        /// `web` or `web.2`.
        name: String,
    },
    /// Restart the named service or instance.
    Restart {
        /// `web` or `web.2`.
        name: String,
    },
}

/// What a line of `seaport ps` is in: an instance's state, or `rejected` for a
/// service file the supervisor did not load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowState {
    /// An instance in this state.
    Instance(State),
    /// A service file that was rejected (the message says why).
    Rejected,
}

impl RowState {
    /// Its name, in `ps` tables and JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            RowState::Instance(state) => state.as_str(),
            RowState::Rejected => "rejected",
        }
    }
}

impl PartialEq<State> for RowState {
    fn eq(&self, other: &State) -> bool {
        *self == RowState::Instance(*other)
    }
}

impl std::fmt::Display for RowState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for RowState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RowState {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        if name == "rejected" {
            return Ok(RowState::Rejected);
        }
        State::ALL
            .into_iter()
            .find(|state| state.as_str() == name)
            .map(RowState::Instance)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown state {name:?}")))
    }
}

/// One line of `seaport ps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRow {
    /// Instance name, or for a rejected file the service's.
    pub name: String,
    /// `name@version` (empty for a rejected file without a readable role).
    pub role: String,
    /// starting, ready, backoff, stopping, stopped or failed; or rejected.
    pub state: RowState,
    /// Process id, while running.
    pub pid: Option<u32>,
    /// Service port.
    pub port: Option<u16>,
    /// Times restarted.
    pub restarts: u32,
    /// Milliseconds since the current process started.
    pub uptime_ms: Option<u64>,
    /// Why it failed, stopped by its restart policy, or was rejected.
    pub message: Option<String>,
    /// The last health check's verdict (`healthy`, or `unhealthy (...)` with
    /// why), for a service with a health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// How the last process ended (`exited with code 1`, `killed by
    /// SIGKILL`, ...), once one has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// The last process's exit status as a shell gives it: its code, or
    /// 128 plus N when killed by signal N (none when it could not be started
    /// or was stopped for failing its health checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit_status: Option<i32>,
    /// How many times no port could be had for the instance.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub port_failures: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The supervisor's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlResponse {
    /// The instances, then the rejected files, for `ps`.
    Services(Vec<ServiceRow>),
    /// The instances a start/stop/restart applied to.
    Done(Vec<String>),
    /// What went wrong.
    Error(String),
}

/// What went wrong on the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A supervisor already answers on the socket.
    #[error(
        "another supervisor is running (its control socket {} answers); stop it or use --control",
        .0.display()
    )]
    InUse(PathBuf),
    /// The socket (or its directory) cannot be made.
    #[error("cannot use the control socket {}: {source}", path.display())]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Nothing answers at the path.
    #[error(
        "no supervisor answers at {} ({source}); is `seaport supervise` running? (--control sets the path)",
        path.display()
    )]
    NoSupervisor {
        /// The socket path.
        path: PathBuf,
        /// Why the connection failed.
        source: std::io::Error,
    },
    /// The supervisor's answer did not arrive or does not parse.
    #[error("bad answer from the supervisor at {}: {reason}", path.display())]
    BadAnswer {
        /// The socket path.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// A request with the way back to its caller.
pub type Call = (ControlRequest, oneshot::Sender<ControlResponse>);

/// The control socket of the system's supervisor (the systemd unit's).
pub const SYSTEM_PATH: &str = "/run/seaport/control.sock";

/// Where a supervisor puts its control socket unless `--control` says
/// otherwise: the first of [`client_paths`].
pub fn default_path() -> PathBuf {
    let mut paths = client_paths();
    paths.swap_remove(0)
}

/// Where `seaport ps` and friends look for a supervisor, in order, unless
/// `--control` says where: `$SEAPORT_CONTROL` alone when it is set; else systemd's
/// `$RUNTIME_DIRECTORY`, `$XDG_RUNTIME_DIR/seaport`, `/tmp/seaport-UID` (not
/// for root), and last the system's supervisor in `/run/seaport`, which is
/// where root's supervisor goes without a runtime directory.
pub fn client_paths() -> Vec<PathBuf> {
    // Named explicitly: that one, and no other.
    if let Some(path) = std::env::var_os("SEAPORT_CONTROL") {
        return vec![PathBuf::from(path)];
    }
    let mut paths = Vec::new();
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") {
        // systemd may list several directories separated by ':'; ours is the first.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        if !first.is_empty() {
            paths.push(Path::new(&first).join("control.sock"));
        }
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        paths.push(Path::new(&dir).join("seaport").join("control.sock"));
    }
    let uid = nix::unistd::getuid();
    if !uid.is_root() {
        paths.push(PathBuf::from(format!("/tmp/seaport-{uid}/control.sock")));
    }
    paths.push(PathBuf::from(SYSTEM_PATH));
    paths.dedup();
    paths
}

/// Binds the control socket, replacing a stale one but refusing to steal the
/// socket of a supervisor that still answers.
pub async fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let socket = |source| ControlError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(socket)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ControlError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(socket)?;
    }
    UnixListener::bind(path).map_err(socket)
}

/// Accepts control connections and forwards each request to the supervisor.
pub async fn serve(listener: UnixListener, calls: mpsc::Sender<Call>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tokio::spawn(answer(stream, calls.clone()));
    }
}

async fn answer(stream: UnixStream, calls: mpsc::Sender<Call>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    let response = match reader.read_line(&mut line).await {
        Err(e) => ControlResponse::Error(format!("cannot read request: {e}")),
        Ok(_) => match serde_json::from_str::<ControlRequest>(&line) {
            Err(e) => ControlResponse::Error(format!("bad request: {e}")),
            Ok(request) => {
                let (tx, rx) = oneshot::channel();
                if calls.send((request, tx)).await.is_err() {
                    ControlResponse::Error("the supervisor is stopping".into())
                } else {
                    rx.await
                        .unwrap_or_else(|_| ControlResponse::Error("no answer".into()))
                }
            }
        },
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    let _ = write.write_all(&out).await;
}

/// Sends one request to the supervisor at `path` and returns its answer.
pub async fn call(path: &Path, request: &ControlRequest) -> Result<ControlResponse, ControlError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::NoSupervisor {
            path: path.to_path_buf(),
            source,
        })?;
    let bad = |reason: String| ControlError::BadAnswer {
        path: path.to_path_buf(),
        reason,
    };
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).map_err(|e| bad(e.to_string()))?;
    line.push(b'\n');
    write
        .write_all(&line)
        .await
        .map_err(|e| bad(format!("cannot send the request: {e}")))?;
    let mut answer = String::new();
    BufReader::new(read)
        .read_line(&mut answer)
        .await
        .map_err(|e| bad(e.to_string()))?;
    serde_json::from_str(&answer).map_err(|e| bad(e.to_string()))
}
