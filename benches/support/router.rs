//! The router scenario: `wrk` (keep-alive connections, `Host: stable`) against
//! three routers in front of the same two HTTP backends, in one run: ours
//! (`seaport route` over our hub), the original README's bouncy router
//! (`bouncy-router.js`: bouncy 3.2.2 and seaport 2.0.9, its own hub built in)
//! and nginx with a static upstream of the two backends and upstream
//! keep-alive, as the ceiling. wrk and nginx come from Debian's packages,
//! installed here when missing.

use super::procs::{HubKind, HubProc, Proc, cpu_ticks, free_port, rss_bytes, wait_accepting};
use super::report::{Figure, Measure, Report, Target, Unit};
use super::{Ctx, Res, wrap};
use serde_json::json;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// What one wrk run against one router gave.
#[derive(Debug, Clone, Copy)]
struct Run {
    rate: f64,
    p99_ms: f64,
    /// Peak RSS of the router during the run, bytes.
    peak_rss: u64,
    /// RSS at the end minus RSS a second into the run, bytes.
    growth: i64,
    /// Responses that were not 2xx/3xx, and socket errors.
    errors: u64,
    /// CPU time (user and system) the router used per request, microseconds.
    cpu_us: f64,
}

/// Which router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Router {
    Ours,
    Bouncy,
    Nginx,
}

/// Runs the scenario. Targets: ours at least 0.8x nginx's requests/s, p99 at
/// most 1.5x nginx's, peak RSS at most 1/10 of bouncy's.
pub fn router(ctx: &Ctx, report: &mut Report) -> Res<()> {
    super::debian::ensure_debian(&[("wrk", "wrk"), ("nginx", "nginx-light")])
        .map_err(|e| format!("the router benchmark: {e}"))?;
    let env = &ctx.env;
    let seconds = if ctx.quick { 2 } else { 10 };
    let backends = [free_port()?, free_port()?];
    let _procs: Vec<Proc> = backends
        .iter()
        .map(|&port| {
            let mut cmd = Command::new(&env.exe);
            cmd.arg("--http-backend").arg(port.to_string());
            Proc::spawn(env, &format!("http-backend-{port}"), cmd, true)
        })
        .collect::<Res<_>>()?;
    for &port in &backends {
        wait_accepting(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(10),
        )?;
    }
    // Ours and nginx are measured in alternating rounds, bouncy once: the
    // figures are each router's median round, so that a burst of load from
    // elsewhere on a shared machine falls on both sides, not on one.
    let rounds = if ctx.quick { 1 } else { 3 };
    let mut runs: Vec<(Router, Run)> = Vec::new();
    for round in 0..rounds {
        let routers: &[Router] = if round == 0 {
            &[Router::Ours, Router::Bouncy, Router::Nginx]
        } else {
            &[Router::Ours, Router::Nginx]
        };
        for &router in routers {
            let run =
                measure(ctx, router, &backends, seconds).map_err(|e| format!("{router:?}: {e}"))?;
            eprintln!("  round {}: {router:?}: {run:?}", round + 1);
            runs.push((router, run));
        }
    }
    let of = |r: Router| median_run(runs.iter().filter(|(x, _)| *x == r).map(|(_, run)| *run));
    let (Some(ours), Some(bouncy), Some(nginx)) =
        (of(Router::Ours), of(Router::Bouncy), of(Router::Nginx))
    else {
        return Err("a router was not measured".into());
    };
    let mut rate = three(
        Figure::new(
            "router",
            format!("router requests/s, wrk -t2 -c50 -d{seconds}s, keep-alive"),
            Unit::PerSec,
        )
        .target(Target::RatioAtLeast(0.8)),
        [ours.rate, bouncy.rate, nginx.rate],
        Against::Nginx,
    );
    rate.notes
        .push("node: the original README's bouncy router (bouncy 3.2.2, seaport 2.0.9)".into());
    if rounds > 1 {
        let rates = |r: Router| -> Vec<f64> {
            runs.iter()
                .filter(|(x, _)| *x == r)
                .map(|(_, run)| run.rate)
                .collect()
        };
        let ratios: Vec<String> = rates(Router::Ours)
            .iter()
            .zip(rates(Router::Nginx))
            .map(|(ours, nginx)| format!("{:.2}x", ours / nginx))
            .collect();
        rate.notes.push(format!(
            "ours and nginx in {rounds} alternating rounds, median shown; ours/nginx by round: {}",
            ratios.join(", ")
        ));
    }
    let p99 = three(
        Figure::new("router", "router latency p99 under that load", Unit::Ms)
            .target(Target::RatioAtMost(1.5)),
        [ours.p99_ms, bouncy.p99_ms, nginx.p99_ms],
        Against::Nginx,
    );
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut rss = three(
        Figure::new("router", "router peak RSS during the run", Unit::MiB)
            .target(Target::RatioAtMost(0.1)),
        [
            mib(ours.peak_rss),
            mib(bouncy.peak_rss),
            mib(nginx.peak_rss),
        ],
        Against::Bouncy,
    );
    let growth = |run: Run| mib(run.growth.unsigned_abs()) * run.growth.signum() as f64;
    rss.notes.push(format!(
        "growth from 1 s into the run to its end: ours {:.1} MiB, bouncy {:.1} MiB, nginx {:.1} MiB (nginx: its master and workers)",
        growth(ours),
        growth(bouncy),
        growth(nginx)
    ));
    for (router, run) in [
        (Router::Ours, ours),
        (Router::Bouncy, bouncy),
        (Router::Nginx, nginx),
    ] {
        rate.raw[format!("{router:?}").to_lowercase()] = json!({
            "rate": run.rate, "p99_ms": run.p99_ms, "peak_rss": run.peak_rss,
            "growth": run.growth, "errors": run.errors, "cpu_us": run.cpu_us,
        });
        if run.errors > 0 {
            rate.notes.push(format!(
                "{router:?}: {} errors (non-2xx/3xx or socket)",
                run.errors
            ));
        }
    }
    let mut cpu = three(
        Figure::new(
            "router",
            "router CPU time per request (user + system)",
            Unit::Us,
        ),
        [ours.cpu_us, bouncy.cpu_us, nginx.cpu_us],
        Against::Nginx,
    );
    cpu.notes.push(
        "less sensitive to other load on the machine than requests/s; nginx: its workers".into(),
    );
    report.push(rate);
    report.push(p99);
    report.push(rss);
    report.push(cpu);
    Ok(())
}

/// One router's rounds taken together: the median rate and p99, the largest
/// RSS and growth, every error.
fn median_run(runs: impl Iterator<Item = Run>) -> Option<Run> {
    let runs: Vec<Run> = runs.collect();
    let median = |mut values: Vec<f64>| -> Option<f64> {
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied()
    };
    Some(Run {
        rate: median(runs.iter().map(|r| r.rate).collect())?,
        p99_ms: median(runs.iter().map(|r| r.p99_ms).collect())?,
        peak_rss: runs.iter().map(|r| r.peak_rss).max()?,
        growth: runs.iter().map(|r| r.growth).max()?,
        errors: runs.iter().map(|r| r.errors).sum(),
        cpu_us: median(runs.iter().map(|r| r.cpu_us).collect())?,
    })
}

/// Which router a figure's ratio divides ours by.
#[derive(Debug, Clone, Copy)]
enum Against {
    Bouncy,
    Nginx,
}

/// `fig` with ours, bouncy's (in the node column) and nginx's values, and
/// the ratio of ours to `against`'s.
fn three(mut fig: Figure, [ours, bouncy, nginx]: [f64; 3], against: Against) -> Figure {
    fig.ours = Some(Measure::exact(ours));
    fig.node = Some(Measure::exact(bouncy));
    fig.nginx = Some(Measure::exact(nginx));
    let (name, theirs) = match against {
        Against::Bouncy => ("ours/bouncy", bouncy),
        Against::Nginx => ("ours/nginx", nginx),
    };
    fig.ratio_of = name;
    fig.ratio = Some(Measure::exact(ours).ratio(Measure::exact(theirs)));
    fig
}

/// Starts `router` in front of `backends`, runs wrk against it, stops it.
fn measure(ctx: &Ctx, router: Router, backends: &[u16; 2], seconds: u64) -> Res<Run> {
    let env = &ctx.env;
    let dir = env.scratch(&format!("router-{router:?}").to_lowercase())?;
    // Kept until the end of the run: the router, and what it needs.
    let mut keep: Vec<Proc> = Vec::new();
    let mut _client = None;
    let (port, pids) = match router {
        Router::Ours => {
            let hub = HubProc::start(env, HubKind::Ours, &[])?;
            _client = Some(register(ctx, hub.addr, backends)?);
            let mut cmd = Command::new(&env.seaport);
            cmd.args(["route", "0", "--host", "127.0.0.1", "--hub"])
                .arg(hub.addr.to_string())
                .args(["--rule", "stable=http@0.0.x"])
                .env("SEAPORT_LOG", "warn");
            let proc = Proc::spawn(env, "route-ours", cmd, true)?;
            let line = proc.line(Duration::from_secs(20))?;
            let port = line
                .strip_prefix("seaport route listening on :")
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| format!("seaport route printed {line:?}"))?;
            let pids = vec![proc.pid()];
            keep.push(proc);
            keep.push(hub.proc);
            (port, pids)
        }
        Router::Bouncy => {
            let (port, hub_port) = (free_port()?, free_port()?);
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/support/bouncy-router.js");
            let mut cmd = Command::new("node");
            cmd.arg(&script)
                .arg(port.to_string())
                .arg(hub_port.to_string())
                .env("NODE_PATH", env.node_dir.join("node_modules"));
            let proc = Proc::spawn(env, "route-bouncy", cmd, true)?;
            let line = proc.line(Duration::from_secs(20))?;
            if line != format!("bouncy router listening on :{port}") {
                return Err(format!("bouncy-router.js printed {line:?}"));
            }
            _client = Some(register(
                ctx,
                SocketAddr::from(([127, 0, 0, 1], hub_port)),
                backends,
            )?);
            let pids = vec![proc.pid()];
            keep.push(proc);
            (port, pids)
        }
        Router::Nginx => {
            let port = free_port()?;
            let conf = dir.join("nginx.conf");
            std::fs::write(&conf, nginx_conf(&dir, port, backends))
                .map_err(wrap(conf.display()))?;
            let mut cmd = Command::new("nginx");
            cmd.arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg(dir.join("error.log"));
            let proc = Proc::spawn(env, "route-nginx", cmd, true)?;
            wait_accepting(
                SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_secs(10),
            )?;
            let master = proc.pid();
            let mut pids = vec![master];
            pids.extend(children_of(master));
            keep.push(proc);
            (port, pids)
        }
    };
    // Routed before timing: the first answers may wait for the hub.
    wait_routed(port)?;
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        let pids = pids.clone();
        std::thread::spawn(move || {
            let total = || pids.iter().filter_map(|&p| rss_bytes(p).ok()).sum::<u64>();
            let mut samples = Vec::new();
            while sampling.load(Ordering::Relaxed) {
                samples.push(total());
                std::thread::sleep(Duration::from_millis(250));
            }
            samples.push(total());
            samples
        })
    };
    let cpu = || pids.iter().filter_map(|&p| cpu_ticks(p).ok()).sum::<u64>();
    let cpu_before = cpu();
    let out = Command::new("wrk")
        .args([
            "-t2",
            "-c50",
            &format!("-d{seconds}s"),
            "--latency",
            "-H",
            "Host: stable",
        ])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .map_err(wrap("run wrk"))?;
    let cpu_ticks_used = cpu().saturating_sub(cpu_before);
    sampling.store(false, Ordering::Relaxed);
    let samples = sampler
        .join()
        .map_err(|_| "the RSS sampler failed".to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let (rate, p99_ms, errors) =
        parse_wrk(&text).ok_or_else(|| format!("cannot read wrk's output: {text}"))?;
    let peak_rss = samples.iter().copied().max().unwrap_or(0);
    let early = samples.get(4).or(samples.first()).copied().unwrap_or(0);
    let last = samples.last().copied().unwrap_or(0);
    drop(keep);
    let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let requests = (rate * seconds as f64).max(1.0);
    Ok(Run {
        rate,
        p99_ms,
        peak_rss,
        growth: last as i64 - early as i64,
        errors,
        cpu_us: cpu_ticks_used as f64 / ticks_per_second * 1e6 / requests,
    })
}

/// Registers the two backends as `http@0.0.0` with the hub at `hub`; the
/// client must be kept for the records to stay.
fn register(ctx: &Ctx, hub: SocketAddr, backends: &[u16; 2]) -> Res<seaport::Client> {
    ctx.rt.block_on(async {
        let client = seaport::Client::connect(vec![hub.to_string()]).map_err(|e| e.to_string())?;
        for &port in backends {
            let reg = seaport::Registration::new("http@0.0.0")
                .port(port)
                .host("127.0.0.1");
            client.register_now(reg).map_err(|e| e.to_string())?;
        }
        tokio::time::timeout(Duration::from_secs(10), client.wait_synced())
            .await
            .map_err(|_| "the hub did not answer".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(client)
    })
}

/// Waits until the router answers `Host: stable` with 200.
fn wait_routed(port: u16) -> Res<()> {
    use std::io::{Read, Write};
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < end {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: stable\r\nConnection: close\r\n\r\n");
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("the router on port {port} never answered 200"))
}

/// nginx in front of the two backends, with upstream keep-alive, workers as
/// many as cores, no access log.
fn nginx_conf(dir: &Path, port: u16, backends: &[u16; 2]) -> String {
    let dir = dir.display();
    format!(
        "daemon off;\nworker_processes auto;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
           fastcgi_temp_path {dir}/fastcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
           upstream backends {{ server 127.0.0.1:{}; server 127.0.0.1:{}; keepalive 64; }}\n\
           server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://backends;\n\
               proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
        backends[0], backends[1]
    )
}

/// The children of `pid` (nginx's workers).
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// wrk's requests/s, p99 in ms, and its error count.
fn parse_wrk(text: &str) -> Option<(f64, f64, u64)> {
    let rate = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))?
        .trim()
        .parse()
        .ok()?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| duration_ms(v.trim()))?;
    let count = |prefix: &str| -> u64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(|rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0)
    };
    Some((
        rate,
        p99,
        count("Non-2xx or 3xx responses:") + count("Socket errors:"),
    ))
}

/// `1.23ms`, `456.00us`, `1.02s` in milliseconds.
fn duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let n: f64 = number.parse().ok()?;
    match unit {
        "us" => Some(n / 1000.0),
        "ms" => Some(n),
        "s" => Some(n * 1000.0),
        "m" => Some(n * 60_000.0),
        _ => None,
    }
}
