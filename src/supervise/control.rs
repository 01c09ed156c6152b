//! The supervisor's control socket: `seaport ps`, `start`, `stop` and `restart`
//! talk to a running supervisor over a Unix socket, one JSON line each way.

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

/// One line of `seaport ps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRow {
    /// Instance name.
    pub name: String,
    /// `name@version`.
    pub role: String,
    /// starting, ready, backoff, stopped or failed.
    pub state: String,
    /// Process id, while running.
    pub pid: Option<u32>,
    /// Service port.
    pub port: Option<u16>,
    /// Times restarted.
    pub restarts: u32,
    /// Milliseconds since the current process started.
    pub uptime_ms: Option<u64>,
    /// Why it failed.
    pub message: Option<String>,
}

/// The supervisor's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlResponse {
    /// The instances, for `ps`.
    Services(Vec<ServiceRow>),
    /// The instances a start/stop/restart applied to.
    Done(Vec<String>),
    /// What went wrong.
    Error(String),
}

/// A request with the way back to its caller.
pub type Call = (ControlRequest, oneshot::Sender<ControlResponse>);

/// Where the control socket lives unless `--control` says otherwise:
/// `$SEAPORT_CONTROL`, systemd's `$RUNTIME_DIRECTORY`, `$XDG_RUNTIME_DIR/seaport`,
/// `/run/seaport` for root, else `/tmp/seaport-UID`.
pub fn default_path() -> PathBuf {
    if let Some(path) = std::env::var_os("SEAPORT_CONTROL") {
        return PathBuf::from(path);
    }
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") {
        // systemd may list several directories separated by ':'; ours is the first.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        if !first.is_empty() {
            return Path::new(&first).join("control.sock");
        }
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&dir).join("seaport").join("control.sock");
    }
    let uid = nix::unistd::getuid();
    if uid.is_root() {
        PathBuf::from("/run/seaport/control.sock")
    } else {
        PathBuf::from(format!("/tmp/seaport-{uid}/control.sock"))
    }
}

/// Binds the control socket, replacing a stale one but refusing to steal the
/// socket of a supervisor that still answers.
pub async fn bind(path: &Path) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(format!(
                "another supervisor is running (its control socket {} answers); stop it or use --control",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale {}: {e}", path.display()))?;
    }
    UnixListener::bind(path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))
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
pub async fn call(path: &Path, request: &ControlRequest) -> Result<ControlResponse, String> {
    let stream = UnixStream::connect(path).await.map_err(|e| {
        format!(
            "no supervisor answers at {} ({e}); is `seaport supervise` running? (--control sets the path)",
            path.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    write
        .write_all(&line)
        .await
        .map_err(|e| format!("cannot send to the supervisor: {e}"))?;
    let mut answer = String::new();
    BufReader::new(read)
        .read_line(&mut answer)
        .await
        .map_err(|e| format!("cannot read the supervisor's answer: {e}"))?;
    serde_json::from_str(&answer).map_err(|e| format!("bad answer from the supervisor: {e}"))
}
