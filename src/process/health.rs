//! Health checks of a ready service: an HTTP request, a TCP connection or a
//! command, run every `interval` and bounded by `timeout`. An unhealthy
//! instance's record is freed until a check passes again; after `failures`
//! failed checks in a row the instance is restarted.

use crate::process::child::Kept;
use crate::process::factory::Output;
use crate::process::restart::Exit;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpStream;

/// The defaults of a check's settings, as they are written.
pub mod defaults {
    /// Time between two checks.
    pub const INTERVAL: &str = "5s";
    /// How long one check may take.
    pub const TIMEOUT: &str = "2s";
    /// Failed checks in a row before a restart.
    pub const FAILURES: u32 = 3;
}

/// What a check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `GET PATH` on the service's port; a status from 200 to 399 passes.
    Http {
        /// The path, with its query if any (`/healthz`).
        path: String,
    },
    /// A TCP connection to the service's port.
    Tcp,
    /// A command, run with the service's environment and working directory
    /// (and `PORT`); exit status 0 passes.
    Exec {
        /// Program and arguments.
        command: Vec<String>,
    },
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Http { path } => write!(f, "http {path}"),
            Probe::Tcp => f.write_str("tcp"),
            Probe::Exec { command } => write!(f, "exec {}", command.join(" ")),
        }
    }
}

/// A service's health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// What is checked.
    pub probe: Probe,
    /// Time between two checks.
    pub interval: Duration,
    /// How long one check may take before it counts as failed.
    pub timeout: Duration,
    /// Failed checks in a row before the instance is restarted.
    pub failures: u32,
}

/// Where a check runs: the service's port, and for a command, the service's
/// environment and directory.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The service's port.
    pub port: u16,
    /// Extra environment of the service.
    pub env: &'a BTreeMap<String, String>,
    /// Working directory of the service.
    pub cwd: Option<&'a PathBuf>,
}

/// An instance's health, as `seaport ps` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// The last check passed.
    Healthy,
    /// The last `failures` checks failed, the last one for `error`.
    Unhealthy {
        /// Failed checks in a row.
        failures: u32,
        /// Why the last one failed.
        error: String,
    },
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Health::Healthy => f.write_str("healthy"),
            Health::Unhealthy { failures, error } => {
                write!(f, "unhealthy ({failures} in a row: {error})")
            }
        }
    }
}

impl HealthCheck {
    /// Runs the check once; the error says why it failed.
    pub async fn run(&self, target: Target<'_>) -> Result<(), String> {
        let timeout = crate::human::format_duration(self.timeout);
        match tokio::time::timeout(self.timeout, self.probe(target)).await {
            Ok(result) => result,
            Err(_) => Err(format!("{} took longer than {timeout}", self.probe)),
        }
    }

    async fn probe(&self, target: Target<'_>) -> Result<(), String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, target.port));
        match &self.probe {
            Probe::Tcp => TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(|e| format!("cannot connect to port {}: {e}", target.port)),
            Probe::Http { path } => http_get(addr, path).await,
            Probe::Exec { command } => exec(command, target).await,
        }
    }
}

/// `GET path` over a new connection; 200 to 399 passes.
async fn http_get(addr: SocketAddr, path: &str) -> Result<(), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect to port {}: {e}", addr.port()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let driver = tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, "seaport-health")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("GET {path}: {e}"))?;
    let result = match sender.send_request(request).await {
        Ok(response) => {
            let status = response.status();
            // Read the body, so the service is not left writing to nobody.
            let _ = response.into_body().collect().await;
            if (200..400).contains(&status.as_u16()) {
                Ok(())
            } else {
                Err(format!("GET {path} answered {status}"))
            }
        }
        Err(e) => Err(format!("GET {path}: {e}")),
    };
    driver.abort();
    result
}

/// Runs `command` below a keeper of its own; exit status 0 passes. Whatever
/// the command leaves running when it exits (a background job, a `setsid`
/// daemon) is killed then; a command still running when the check times out
/// is killed with everything it started (its future is dropped, and with it
/// the keeper's guard).
async fn exec(command: &[String], target: Target<'_>) -> Result<(), String> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| "empty command".to_string())?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env("PORT", target.port.to_string())
        .envs(target.env)
        .process_group(0);
    if let Some(cwd) = target.cwd {
        cmd.current_dir(cwd);
    }
    for var in super::child::never_inherited() {
        cmd.env_remove(var);
    }
    let mut kept = Kept::spawn(cmd, [Output::Null, Output::Piped])
        .map_err(|e| format!("cannot run {program:?}: {e}"))?;
    let (exit, stderr) = kept.wait().await;
    if exit == Exit::Code(0) {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&stderr);
    let said = said.trim();
    let said = said.lines().last().unwrap_or_default();
    let mut message = format!("{program} {exit}");
    if !said.is_empty() {
        message.push_str(": ");
        message.push_str(said);
    }
    Err(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn check(probe: Probe) -> HealthCheck {
        HealthCheck {
            probe,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            failures: 3,
        }
    }

    /// A server answering every request with `status`, or never answering.
    async fn server(status: Option<u16>) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = conn.read(&mut buf).await;
                    match status {
                        Some(status) => {
                            let reply = format!(
                                "HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                            );
                            let _ = conn.write_all(reply.as_bytes()).await;
                        }
                        None => tokio::time::sleep(Duration::from_secs(5)).await,
                    }
                });
            }
        });
        port
    }

    fn target(port: u16, env: &BTreeMap<String, String>) -> Target<'_> {
        Target {
            port,
            env,
            cwd: None,
        }
    }

    #[tokio::test]
    async fn http_passes_on_2xx_and_3xx_and_fails_otherwise_or_when_slow() {
        let env = BTreeMap::new();
        let http = check(Probe::Http {
            path: "/healthz".into(),
        });
        for (status, passes) in [(200, true), (302, true), (404, false), (503, false)] {
            let port = server(Some(status)).await;
            let result = http.run(target(port, &env)).await;
            assert_eq!(result.is_ok(), passes, "{status}: {result:?}");
            if let Err(e) = result {
                assert!(
                    e.starts_with(&format!("GET /healthz answered {status}")),
                    "{e}"
                );
            }
        }
        let port = server(None).await;
        let err = http.run(target(port, &env)).await.unwrap_err();
        assert_eq!(err, "http /healthz took longer than 500ms");
    }

    #[tokio::test]
    async fn tcp_needs_a_listener() {
        let env = BTreeMap::new();
        let port = server(Some(200)).await;
        assert!(check(Probe::Tcp).run(target(port, &env)).await.is_ok());
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = check(Probe::Tcp)
            .run(target(closed, &env))
            .await
            .unwrap_err();
        assert!(
            err.starts_with(&format!("cannot connect to port {closed}")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn exec_passes_on_status_0_with_the_port_and_environment() {
        let env = BTreeMap::from([("WANT".to_string(), "yes".to_string())]);
        let sh = |script: &str| {
            check(Probe::Exec {
                command: vec!["sh".into(), "-c".into(), script.into()],
            })
        };
        assert!(
            sh("test \"$PORT\" = 4242 && test \"$WANT\" = yes")
                .run(target(4242, &env))
                .await
                .is_ok()
        );
        let err = sh("echo broken >&2; exit 3")
            .run(target(4242, &env))
            .await
            .unwrap_err();
        assert_eq!(err, "sh exited with code 3: broken");
        let err = sh("sleep 5").run(target(4242, &env)).await.unwrap_err();
        assert!(err.ends_with("took longer than 500ms"), "{err}");
    }

    /// True once `pid` is gone (or a zombie about to be reaped).
    fn gone(pid: &str) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
            Err(_) => true,
        }
    }

    /// Polls until `pid` is gone; false if it is still there after 5 s.
    async fn goes(pid: &str) -> bool {
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < end {
            if gone(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn what_an_exec_check_leaves_running_is_killed_daemons_included() {
        let env = BTreeMap::new();
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("daemon.pid");
        let sh = |script: String| {
            check(Probe::Exec {
                command: vec!["sh".into(), "-c".into(), script],
            })
        };
        // A daemon in a session of its own, out of the check's process group.
        let daemon = format!("setsid sleep 1000 & echo $! > {}", pid_file.display());
        sh(daemon.clone()).run(target(4242, &env)).await.unwrap();
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        assert!(goes(pid.trim()).await, "daemon {pid} outlived its check");
        // The same, when the check times out.
        std::fs::remove_file(&pid_file).unwrap();
        let err = sh(format!("{daemon}; sleep 5"))
            .run(target(4242, &env))
            .await
            .unwrap_err();
        assert!(err.ends_with("took longer than 500ms"), "{err}");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        assert!(goes(pid.trim()).await, "daemon {pid} outlived its check");
    }

    #[tokio::test]
    async fn an_exec_check_that_cannot_start_says_why() {
        let env = BTreeMap::new();
        let err = check(Probe::Exec {
            command: vec!["/nonexistent/check".into()],
        })
        .run(target(4242, &env))
        .await
        .unwrap_err();
        assert!(err.contains("/nonexistent/check"), "{err}");
    }

    #[tokio::test]
    async fn a_check_keeps_only_the_end_of_a_long_stderr() {
        let env = BTreeMap::new();
        let err = check(Probe::Exec {
            command: vec![
                "sh".into(),
                "-c".into(),
                "head -c 1000000 /dev/zero | tr '\\0' x >&2; echo >&2; echo last words >&2; exit 1"
                    .into(),
            ],
        })
        .run(target(4242, &env))
        .await
        .unwrap_err();
        assert_eq!(err, "sh exited with code 1: last words");
    }
}
