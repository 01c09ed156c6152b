//! Programs from Debian's packages that the tests and the benchmark run
//! (`promtool`, `chromium`, `wrk`, `nginx`): installed with `apt-get` when
//! missing, as the test setup installs the npm packages. Shared by the
//! integration tests and the benchmark (each includes this file).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Makes sure each `(program, package)` is installed: installs the packages
/// of the missing programs with `apt-get` (after `apt-get update`), once,
/// under a file lock so that parallel test processes do not run apt at
/// once. An error, naming what is missing, when a program still is.
pub fn ensure_debian(tools: &[(&str, &str)]) -> Result<(), String> {
    if tools.iter().all(|(program, _)| on_path(program)) {
        return Ok(());
    }
    let lock_path = std::env::temp_dir().join("seaport-tests-apt.lock");
    let file = std::fs::File::create(&lock_path)
        .map_err(|e| format!("cannot create {}: {e}", lock_path.display()))?;
    let _held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("cannot lock {}: {e}", lock_path.display()))?;
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(program, _)| !on_path(program))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "installing {} from Debian's packages ...",
        missing.join(", ")
    );
    let _ = Command::new("apt-get").args(["update", "-qq"]).status();
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map_err(|e| format!("cannot run apt-get: {e}"))?;
    match tools.iter().find(|(program, _)| !on_path(program)) {
        None if status.success() => Ok(()),
        _ => Err(format!(
            "{} needed: `apt-get install {}` failed ({status})",
            tools
                .iter()
                .map(|(program, _)| *program)
                .collect::<Vec<_>>()
                .join(" and "),
            missing.join(" ")
        )),
    }
}

/// Where `program` is: on `PATH`, or in `/usr/sbin` (nginx).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    });
    on_path.or_else(|| {
        let sbin = Path::new("/usr/sbin").join(program);
        sbin.is_file().then_some(sbin)
    })
}

fn on_path(program: &str) -> bool {
    find_program(program).is_some()
}
