//! seaport 2.0.9's own test suite, run unmodified against our hub.
//!
//! The npm package's `test/*.js` files (installed under
//! `tests/node/node_modules/seaport/test`) are copied into a scratch directory
//! laid out as the package is, with `index.js` replaced by
//! `tests/node/standin.js`: `connect` is still the real 2.0.9 client, while
//! `createServer` runs our `seaport listen` (see the stand-in's header). Each file
//! runs under `node` and is judged by its TAP output and exit status. The two
//! files that use 2.0.9's RC4 signed mode ("secure-peer") cannot work with our
//! hub; they are named as not applicable, never run as passing.

use crate::harness::{node_dir, node_ready, seaport_bin};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The test files of seaport 2.0.9, so that a change of the package is noticed.
const SUITE: [&str; 14] = [
    "alloc.js",
    "authorized.js",
    "free.js",
    "free_cases.js",
    "free_port.js",
    "free_server.js",
    "meta.js",
    "meta_service.js",
    "meta_update.js",
    "multi.js",
    "peer.js",
    "rejected.js",
    "service.js",
    "versions.js",
];

/// The files that cannot run against our hub, and why.
const NOT_APPLICABLE: [(&str, &str); 2] = [
    ("authorized.js", "2.0.9's RC4 signed mode"),
    ("rejected.js", "2.0.9's RC4 signed mode"),
];

/// How long one file may run before it fails and its processes are killed.
const FILE_DEADLINE: Duration = Duration::from_secs(30);

/// One `#[test]` per applicable file, so a failure names the file; `APPLICABLE`
/// lists them for the inventory test.
macro_rules! upstream_files {
    ($($test:ident => $file:literal,)*) => {
        const APPLICABLE: &[&str] = &[$($file),*];
        $(
            #[test]
            fn $test() {
                run_upstream_file($file);
            }
        )*
    };
}

upstream_files! {
    upstream_alloc_js => "alloc.js",
    upstream_free_js => "free.js",
    upstream_free_cases_js => "free_cases.js",
    upstream_free_port_js => "free_port.js",
    upstream_free_server_js => "free_server.js",
    upstream_meta_js => "meta.js",
    upstream_meta_service_js => "meta_service.js",
    upstream_meta_update_js => "meta_update.js",
    upstream_multi_js => "multi.js",
    upstream_peer_js => "peer.js",
    upstream_service_js => "service.js",
    upstream_versions_js => "versions.js",
}

/// `tests/node/node_modules/seaport/test`.
fn suite_dir() -> PathBuf {
    node_ready().join("node_modules/seaport/test")
}

#[test]
fn upstream_suite_is_the_14_files_of_seaport_2_0_9() {
    let mut found: Vec<String> = std::fs::read_dir(suite_dir())
        .expect("read the package's test directory")
        .map(|entry| entry.expect("directory entry").file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".js"))
        .collect();
    found.sort();
    assert_eq!(found, SUITE, "the package's test files changed");

    let mut covered: Vec<&str> = APPLICABLE
        .iter()
        .copied()
        .chain(NOT_APPLICABLE.iter().map(|(file, _)| *file))
        .collect();
    covered.sort();
    assert_eq!(
        covered, SUITE,
        "every file is either run or named as not applicable, once"
    );
}

#[test]
fn upstream_authorized_js_and_rejected_js_are_not_applicable_rc4_signed_mode() {
    // A file is excluded because it gives the server and client keys; check that
    // exactly the excluded files do, so an exclusion cannot hide a runnable file.
    let mut signed: Vec<&str> = SUITE
        .iter()
        .copied()
        .filter(|file| {
            let text = std::fs::read_to_string(suite_dir().join(file)).expect("read test file");
            text.contains("/keys/") && text.contains("private")
        })
        .collect();
    signed.sort();
    let excluded: Vec<&str> = NOT_APPLICABLE.iter().map(|(file, _)| *file).collect();
    assert_eq!(
        signed, excluded,
        "the files using 2.0.9's signed mode are exactly the excluded ones"
    );
    for (file, why) in NOT_APPLICABLE {
        println!("seaport 2.0.9 test/{file}: not applicable ({why})");
    }
}

/// How many times a file runs when it fails only because a port it picked at
/// random was taken.
const ATTEMPTS: usize = 5;

/// Runs `test/FILE` of the package against our hub and fails with its TAP output
/// unless every planned assertion passed.
fn run_upstream_file(file: &str) {
    let layout = Layout::new();
    for attempt in 1..=ATTEMPTS {
        let run = run_node(&layout.root, file);
        let problems = judge(&run);
        if problems.is_empty() {
            return;
        }
        // Most files listen on a random port of 10000-60000 (and peer.js binds
        // another), which can still be held by an earlier connection of this
        // test run in TIME_WAIT; seaport 2.0.9 would fail the same way. Such a
        // run says nothing about the hub, so the file runs again, on new ports.
        if attempt < ATTEMPTS && port_clash(&run) {
            println!(
                "seaport 2.0.9's test/{file}: a port it picked was in use; running it again\n{}",
                run.stderr
            );
            continue;
        }
        panic!(
            "seaport 2.0.9's test/{file} failed against our hub ({}), after {:.1?}\n\
             --- stdout (TAP) ---\n{}\n--- stderr ---\n{}",
            problems.join("; "),
            run.took,
            run.stdout,
            run.stderr,
        );
    }
}

/// Whether a failed run could not listen on a port because it was in use: our
/// hub's message for the port the file chose, or Node's for a port of its own.
fn port_clash(run: &Run) -> bool {
    (run.stderr.contains("seaport: cannot listen on")
        && run.stderr.contains("Address already in use"))
        || run.stderr.contains("EADDRINUSE")
}

/// A scratch copy of the package's layout: `test/` from the package and an
/// `index.js` that is the stand-in. Removed on drop.
struct Layout {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Layout {
    fn new() -> Layout {
        let dir = tempfile::Builder::new()
            .prefix("seaport-upstream-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("scratch directory");
        let root = dir.path().to_path_buf();
        copy_dir(&suite_dir(), &root.join("test"));
        let standin = node_dir().join("standin.js");
        let standin = serde_json::to_string(&standin.to_string_lossy()).expect("path as JSON");
        std::fs::write(
            root.join("index.js"),
            format!(
                "// Generated by tests/it/upstream.rs: the package's entry point is our stand-in.\n\
                 module.exports = require({standin});\n"
            ),
        )
        .expect("write index.js");
        Layout { _dir: dir, root }
    }
}

/// Copies the files and directories under `from` into `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create directory");
    for entry in std::fs::read_dir(from).expect("read directory") {
        let entry = entry.expect("directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

/// What one file's run printed and how it ended.
struct Run {
    stdout: String,
    stderr: String,
    /// `None` when the file was killed at the deadline.
    status: Option<ExitStatus>,
    took: Duration,
}

/// Kills the whole process group of a node run (node, the hubs it started, and
/// any child of the test file) when dropped, whatever happened.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.0.id() as i32), Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// Runs `node test/FILE` in `root`, in its own process group, for at most
/// `FILE_DEADLINE`.
fn run_node(root: &Path, file: &str) -> Run {
    let mut cmd = Command::new("node");
    cmd.arg(root.join("test").join(file))
        .current_dir(root)
        .env("NODE_PATH", node_dir().join("node_modules"))
        .env("SEAPORT_BIN", seaport_bin())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if std::env::var_os("SEAPORT_LOG").is_none() {
        cmd.env("SEAPORT_LOG", "warn");
    }
    let start = Instant::now();
    let mut child = cmd.spawn().expect("start node");
    let stdout = read_all(child.stdout.take().expect("piped stdout"));
    let stderr = read_all(child.stderr.take().expect("piped stderr"));
    let mut group = Group(child);
    let status = loop {
        if let Some(status) = group.0.try_wait().expect("try_wait") {
            break Some(status);
        }
        if start.elapsed() > FILE_DEADLINE {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = start.elapsed();
    // Whatever is left of the group (hubs, children of the test file) goes now,
    // which also closes the output pipes they inherited.
    drop(group);
    Run {
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
        status,
        took,
    }
}

/// Reads everything from `pipe` on a background thread.
fn read_all(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// The reasons a run failed, by its TAP output and exit status; empty if it
/// passed.
fn judge(run: &Run) -> Vec<String> {
    let mut problems = Vec::new();
    match run.status {
        None => problems.push(format!("still running after {FILE_DEADLINE:?}, killed")),
        Some(status) if !status.success() => problems.push(format!("node exited with {status}")),
        Some(_) => {}
    }
    let lines: Vec<&str> = run.stdout.lines().map(str::trim_end).collect();
    let not_ok = lines.iter().filter(|l| l.starts_with("not ok")).count();
    if not_ok > 0 {
        problems.push(format!("{not_ok} `not ok`"));
    }
    if let Some(fail) = lines.iter().find(|l| l.starts_with("# fail")) {
        problems.push(format!("`{fail}`"));
    }
    let ok = lines.iter().filter(|l| l.starts_with("ok ")).count();
    let plans: Vec<usize> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("1..")?.parse().ok())
        .collect();
    match plans.as_slice() {
        [] => problems.push(format!("no TAP plan; {ok} `ok`")),
        [planned] if *planned == 0 => problems.push("an empty plan".into()),
        [planned] if *planned != ok => {
            problems.push(format!("planned {planned}, {ok} `ok`"));
        }
        [_] => {}
        _ => problems.push(format!("{} TAP plans", plans.len())),
    }
    problems
}
