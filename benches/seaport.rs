//! `cargo bench --bench seaport`: the same load against our hub and the Node hub
//! (npm seaport 2.0.9), and our supervisor against Node's launcher and supervisord,
//! in one run; one table row per figure with both values, their ratio and the
//! target. Results also go to `target/bench/seaport.json` and `seaport.md`.
//!
//! ```text
//! cargo bench --bench seaport                    # everything (about 7 minutes)
//! cargo bench --bench seaport -- --quick         # a small version of everything (20-40 s)
//! cargo bench --bench seaport -- --only latency  # one scenario (repeatable, or a,b)
//! cargo bench --bench seaport -- --list          # the scenarios
//! cargo bench --bench seaport -- --only storm --sizes 2000x3 --ours-only
//! cargo test                                     # runs the quick mode too, as CI does
//! ```
//!
//! Hubs are driven over TCP with raw protocol lines only, so any hub can be
//! measured: `SEAPORT_BENCH_BIN=/path/to/seaport` swaps our binary. See
//! `docs/performance.md` for what each scenario measures and why it is fair.
//!
//! Without `--bench` on its command line (which `cargo bench` passes), the binary
//! runs the quick mode: that is how `cargo test --bench seaport` keeps it from
//! rotting. Timing targets are reported, never asserted; the exit status is
//! non-zero only when a scenario could not run.

#![allow(missing_docs)]

mod support;

use serde_json::json;
use std::time::{Duration, Instant};
use support::report::{Report, machine};
use support::{Ctx, Res, hubs, procs, router, store, supervisors};

type Scenario = fn(&Ctx, &mut Report) -> Res<()>;

/// Every scenario: `--only` name, what it measures, the function.
const SCENARIOS: &[(&str, &str, Scenario)] = &[
    (
        "throughput",
        "registration throughput: C connections x R records until a watcher has all",
        hubs::throughput,
    ),
    (
        "latency",
        "propagation latency register -> watcher, p50/p99, at 10/100/1,000 clients",
        hubs::latency,
    ),
    (
        "free",
        "free propagation when 1,000 clients drop at once",
        hubs::free,
    ),
    (
        "memory",
        "hub RSS at 10,000 idle connections and at 100,000 records",
        hubs::memory,
    ),
    (
        "storm",
        "a storm of N connections x 3 records, then all leave: peak RSS, RSS after, time to free",
        hubs::storm,
    ),
    (
        "signed",
        "signed mode registration rate against the open mode (our hub only)",
        hubs::signed,
    ),
    (
        "scale",
        "scale out on etcd: raw etcd, hubs over etcd and a mesh: rate, p99 propagation, RSS",
        store::scale,
    ),
    (
        "restart",
        "restart latency: child killed -> new child running and its record back",
        supervisors::restart,
    ),
    (
        "restart-gap",
        "refused connections and the longest gap while a service restarts on request, with and without socket = true",
        supervisors::restart_gap,
    ),
    (
        "router",
        "HTTP router: wrk against ours, the seed's bouncy router and nginx, same two backends",
        router::router,
    ),
    (
        "supervisor-idle",
        "supervisor CPU over an idle minute and RSS, with 50 services",
        supervisors::idle,
    ),
    (
        "supervisor-rss",
        "supervisor RSS with 500 services",
        supervisors::rss,
    ),
];

struct Options {
    quick: bool,
    only: Vec<String>,
    json: Option<std::path::PathBuf>,
    supervisord: bool,
    sizes: Option<Vec<(usize, usize)>>,
    ours_only: bool,
}

const USAGE: &str = "usage: cargo bench --bench seaport -- [--quick] [--only NAME[,NAME]]... \
[--list] [--json PATH] [--no-supervisord] [--sizes CxR,...] [--ours-only]";

fn parse(args: &[String]) -> Result<Option<Options>, String> {
    let mut opts = Options {
        // `cargo bench` passes --bench; anything else (cargo test) gets the quick mode.
        quick: !args.iter().any(|a| a == "--bench"),
        only: Vec::new(),
        json: None,
        supervisord: true,
        sizes: None,
        ours_only: false,
    };
    // A test runner asking for the test list (`--list --format terse`, as
    // cargo-nextest does): the quick mode is one test, named `quick`, and it
    // is not among the ignored ones (`--ignored`), which would skip it.
    if args.iter().any(|a| a == "--list") && args.iter().any(|a| a == "--format") {
        if !args.iter().any(|a| a == "--ignored") {
            println!("quick: test");
        }
        return Ok(None);
    }
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--bench" => {}
            "--quick" => opts.quick = true,
            "--only" => {
                let names = it.next().ok_or("--only needs a scenario name")?;
                opts.only
                    .extend(names.split(',').map(|s| s.trim().to_string()));
            }
            "--json" => opts.json = Some(it.next().ok_or("--json needs a path")?.into()),
            "--no-supervisord" => opts.supervisord = false,
            "--ours-only" => opts.ours_only = true,
            "--sizes" => {
                let text = it.next().ok_or("--sizes needs CxR[,CxR...]")?;
                let sizes = text
                    .split(',')
                    .map(|s| {
                        let (c, r) = s.split_once('x')?;
                        Some((c.trim().parse().ok()?, r.trim().parse().ok()?))
                    })
                    .collect::<Option<Vec<(usize, usize)>>>()
                    .ok_or_else(|| {
                        format!("--sizes {text:?}: expected CxR[,CxR...], e.g. 10x1000")
                    })?;
                opts.sizes = Some(sizes);
            }
            "--list" => {
                for (name, what, _) in SCENARIOS {
                    println!("{name:<16} {what}");
                }
                return Ok(None);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            // libtest-style flags cargo may pass along (e.g. --nocapture): ignored.
            other if other.starts_with("--") => {}
            // The name a test runner gives the quick mode when it runs it.
            "quick" => opts.quick = true,
            // A bare word, as `cargo bench -- latency` would give: a filter.
            other => opts.only.push(other.to_string()),
        }
    }
    for name in &opts.only {
        if !SCENARIOS.iter().any(|(n, _, _)| n == name) {
            let names: Vec<&str> = SCENARIOS.iter().map(|(n, _, _)| *n).collect();
            return Err(format!(
                "unknown scenario {name:?}; the scenarios are {}",
                names.join(", ")
            ));
        }
    }
    Ok(Some(opts))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        support::child::main(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("--http-backend") {
        support::http_backend::main(&args[1..]);
    }
    let opts = match parse(&args) {
        Ok(Some(opts)) => opts,
        Ok(None) => return,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    // A safety net far above the sum of every scenario's own deadlines.
    procs::watchdog(Duration::from_secs(if opts.quick { 300 } else { 3600 }));
    let code = match run(&opts) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("benchmark cannot run: {e}");
            2
        }
    };
    procs::kill_all();
    std::process::exit(code);
}

/// Runs the selected scenarios; `Ok(false)` if any of them failed.
fn run(opts: &Options) -> Res<bool> {
    let nofile = procs::raise_nofile();
    let env = procs::Env::detect(opts.supervisord)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    procs::exit_cleanly_on_signals(&rt);
    let ctx = Ctx {
        env,
        rt,
        quick: opts.quick,
        sizes: opts.sizes.clone(),
        hubs: if opts.ours_only {
            &[procs::HubKind::Ours]
        } else {
            &procs::HubKind::BOTH
        },
    };
    let machine = machine();
    let mode = if opts.quick { "quick" } else { "full" };
    let command = if opts.quick {
        "cargo bench --bench seaport -- --quick".to_string()
    } else {
        "cargo bench --bench seaport".to_string()
    } + &opts
        .only
        .iter()
        .map(|o| format!(" --only {o}"))
        .collect::<String>();
    println!(
        "seaport benchmark ({mode} mode) on {} x {}, {} GiB; load {}; open files {nofile}",
        machine["nproc"], machine["cpu"], machine["memory_gib"], machine["loadavg"]
    );
    println!(
        "ours: {}\nnode: {} with seaport 2.0.9 ({})\nsupervisord: {}\n",
        ctx.env.seaport.display(),
        ctx.env.node_version,
        ctx.env.node_cli.display(),
        ctx.env
            .supervisord_version
            .as_deref()
            .unwrap_or("not available")
    );
    let started = Instant::now();
    let mut report = Report::default();
    report.print_header();
    for (name, _, scenario) in SCENARIOS {
        if !opts.only.is_empty() && !opts.only.iter().any(|o| o == name) {
            continue;
        }
        let began = Instant::now();
        eprintln!("[{name}] ...");
        let figures = report.figures.len();
        let mut result = scenario(&ctx, &mut report);
        // CI runs the quick mode on busy shared machines: a scenario that could
        // not run (a process that did not start in time) gets one more try, so
        // that only a failure that repeats fails the run.
        if let Err(e) = &result
            && ctx.quick
        {
            eprintln!("[{name}] could not run ({e}); trying once more");
            report.figures.truncate(figures);
            result = scenario(&ctx, &mut report);
        }
        if let Err(e) = result {
            report.error(name, e);
        }
        eprintln!("[{name}] {:.1}s", began.elapsed().as_secs_f64());
    }
    let elapsed = started.elapsed();
    println!(
        "\n{} figures in {:.1}s",
        report.figures.len(),
        elapsed.as_secs_f64()
    );

    let stem = if opts.quick {
        "seaport-quick"
    } else {
        "seaport"
    };
    let json_path = opts
        .json
        .clone()
        .unwrap_or_else(|| ctx.env.work.join(format!("{stem}.json")));
    let doc = json!({
        "mode": mode,
        "command": command,
        "machine": machine,
        "loadavg_after": support::report::loadavg(),
        "seconds": elapsed.as_secs_f64(),
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "versions": {
            "seaport": env!("CARGO_PKG_VERSION"),
            "node": ctx.env.node_version,
            "node_seaport": "2.0.9",
            "supervisord": ctx.env.supervisord_version,
        },
        "figures": report.figures.iter().map(|f| f.to_json()).collect::<Vec<_>>(),
        "errors": report.errors.iter().map(|(s, e)| json!({"scenario": s, "error": e})).collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    std::fs::write(&json_path, text).map_err(|e| format!("{}: {e}", json_path.display()))?;
    let md_path = json_path.with_extension("md");
    let md = format!(
        "Machine: {} CPUs ({}), {} GiB memory, Linux {}; load average {} before, {} after.\n\
         Command: `{command}` ({:.0} s).\n\n{}",
        machine["nproc"],
        machine["cpu"].as_str().unwrap_or("?"),
        machine["memory_gib"],
        machine["kernel"].as_str().unwrap_or("?"),
        machine["loadavg"].as_str().unwrap_or("?"),
        support::report::loadavg(),
        elapsed.as_secs_f64(),
        report.markdown()
    );
    std::fs::write(&md_path, md).map_err(|e| format!("{}: {e}", md_path.display()))?;
    println!("results: {} and {}", json_path.display(), md_path.display());
    if !report.errors.is_empty() {
        println!("{} scenario(s) failed", report.errors.len());
    }
    Ok(report.errors.is_empty())
}
