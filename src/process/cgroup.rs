//! cgroup v2: one cgroup per started service, below the supervisor's own.
//!
//! Where: the cgroup v2 hierarchy is found in `/proc/self/mountinfo` (usually
//! mounted at `/sys/fs/cgroup`; `/sys/fs/cgroup/unified` on a hybrid layout),
//! and this process's cgroup in the `0::` line of `/proc/self/cgroup`.
//!
//! Layout, minding the rule that a cgroup with controllers for its children
//! holds no processes itself:
//!
//! - Alone in its cgroup `G` (a systemd unit with `Delegate=yes`): the
//!   supervisor moves itself into the leaf `G/supervisor` and starts services in
//!   `G/services/NAME.N`.
//! - Otherwise (a shell's session, a container's root): it leaves itself where
//!   it is and starts services in `G/seaport-PID/NAME.N`, which it removes when
//!   it ends. Such directories left by a supervisor that was killed are emptied
//!   and removed by the next one.
//!
//! Before using a subtree, a probe process is moved into it: a subtree that
//! cannot take processes is not used. Each service process joins its cgroup
//! before it execs (see [`super::keeper`]). A stop is the stop signal to every
//! process of the cgroup, then `cgroup.kill`; the directory is removed once
//! `cgroup.events` says `populated 0`.

use super::keeper::{self, CgroupFiles};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::borrow::Cow;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a cgroup may take to empty after `cgroup.kill` before giving up on
/// removing it.
const EMPTY_WITHIN: Duration = Duration::from_secs(2);

/// Why no cgroup can be used.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup2 file system is mounted.
    #[error("no cgroup v2 hierarchy is mounted")]
    NoMount,
    /// `/proc/self/cgroup` has no `0::` line.
    #[error("this process is in no cgroup v2 cgroup (only cgroup v1)")]
    NoCgroup,
    /// Our cgroup is outside the mounted part of the hierarchy.
    #[error("this process's cgroup {0} is not below the cgroup v2 mount")]
    NotVisible(String),
    /// A file or directory of the hierarchy cannot be used.
    #[error("{}: {source}", path.display())]
    Io {
        /// What.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cgroup v2 mount in `/proc/self/mountinfo`: its mount point and the
/// cgroup it shows as its root.
pub fn find_mount(mountinfo: &str) -> Option<(PathBuf, String)> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split(' ').next()? != "cgroup2" {
            return None;
        }
        let fields: Vec<&str> = before.split(' ').collect();
        let root = unescape(fields.get(3)?);
        let point = unescape(fields.get(4)?);
        Some((PathBuf::from(point), root))
    })
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's cgroup v2 path in `/proc/self/cgroup` (the `0::` line).
pub fn own_cgroup(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::trim_end)
}

/// The directory of cgroup `path`, given the mount point and the cgroup the
/// mount shows as its root; `None` when `path` is not below that root.
pub fn cgroup_dir(mount: &Path, root: &str, path: &str) -> Option<PathBuf> {
    let root = root.trim_end_matches('/');
    let below = path.strip_prefix(root)?;
    if !(below.is_empty() || below.starts_with('/')) || below.split('/').any(|c| c == "..") {
        return None;
    }
    let below = below.trim_start_matches('/');
    Some(if below.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(below)
    })
}

/// Where this process starts its services' cgroups.
#[derive(Debug)]
pub struct Subtree {
    dir: PathBuf,
}

impl Subtree {
    /// Finds this process's cgroup and makes its subtree (see the module
    /// documentation), moving this process into a leaf when it is alone in its
    /// cgroup. Fails when cgroup v2 is not there or not writable.
    pub fn create() -> Result<Subtree, CgroupError> {
        let read = |path: &str| {
            std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
                path: PathBuf::from(path),
                source,
            })
        };
        let (mount, root) =
            find_mount(&read("/proc/self/mountinfo")?).ok_or(CgroupError::NoMount)?;
        let cgroups = read("/proc/self/cgroup")?;
        let path = own_cgroup(&cgroups).ok_or(CgroupError::NoCgroup)?;
        let ours = cgroup_dir(&mount, &root, path)
            .ok_or_else(|| CgroupError::NotVisible(path.to_string()))?;
        let me = std::process::id();
        if path != "/" && members(&ours).is_ok_and(|pids| pids == [me]) {
            let leaf = ours.join("supervisor");
            make_dir(&leaf)?;
            let procs = leaf.join("cgroup.procs");
            std::fs::write(&procs, me.to_string()).map_err(io_error(&procs))?;
            let dir = ours.join("services");
            clear(&dir);
            make_dir(&dir)?;
            return Ok(Subtree { dir });
        }
        remove_stale(&ours);
        let dir = ours.join(format!("seaport-{me}"));
        clear(&dir);
        make_dir(&dir)?;
        let subtree = Subtree { dir };
        if let Err(e) = subtree.probe() {
            clear(&subtree.dir);
            return Err(e);
        }
        Ok(subtree)
    }

    /// Moves a probe process into a cgroup of the subtree.
    fn probe(&self) -> Result<(), CgroupError> {
        let probe = self.dir.join("probe");
        make_dir(&probe)?;
        let procs = probe.join("cgroup.procs");
        let result = c_path(&procs)
            .and_then(|procs| keeper::probe_join(&procs))
            .map_err(io_error(&procs));
        clear(&probe);
        result
    }

    /// The directory the services' cgroups are made in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes a new cgroup for one run of service instance `name`.
    pub fn cgroup(&self, name: &str) -> io::Result<Cgroup> {
        static RUNS: AtomicU64 = AtomicU64::new(1);
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(format!("{}.{run}", dir_name(name)));
        // The subtree may be gone: removed at the end of an earlier run in
        // this process, or by the last keeper of a keeper factory that was
        // killed (which cannot tell that from the supervisor's death). Other
        // services may make it again at the same moment, and a keeper may
        // remove it again while empty: a few tries.
        let mut tries = 3;
        loop {
            match std::fs::create_dir(&dir) {
                Err(e) if e.kind() == io::ErrorKind::NotFound && tries > 0 => {
                    tries -= 1;
                    match std::fs::create_dir(&self.dir) {
                        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                        _ => {}
                    }
                }
                other => break other?,
            }
        }
        Ok(Cgroup { dir })
    }

    /// Empties and removes the subtree (at the end of the process).
    pub fn remove(&self) {
        clear(&self.dir);
    }
}

/// A cgroup name made of `name`: letters, digits, `.`, `-` and `_` only.
fn dir_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    let clean = clean.trim_start_matches('.');
    if clean.is_empty() {
        "service".to_string()
    } else {
        clean.to_string()
    }
}

fn make_dir(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io_error(dir)(e)),
        _ => Ok(()),
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

/// The processes of the cgroup at `dir` (not of those below it).
pub fn members(dir: &Path) -> io::Result<Vec<u32>> {
    let text = std::fs::read_to_string(dir.join("cgroup.procs"))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Whether the cgroup at `dir` is frozen (`cgroup.freeze` took effect).
pub fn frozen(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .is_ok_and(|events| events.lines().any(|l| l.trim() == "frozen 1"))
}

/// Whether the cgroup at `dir` (or one below it) has a process.
fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .is_ok_and(|events| events.lines().any(|l| l.trim() == "populated 1"))
}

/// Kills every process of the cgroup at `dir` and below: `cgroup.kill`, or on
/// kernels before 5.14, SIGKILL to each.
fn kill_all(dir: &Path) {
    if std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    for sub in subdirs(dir) {
        kill_all(&sub);
    }
    for pid in members(dir).unwrap_or_default() {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills what runs in the cgroup at `dir` and below, waits (briefly) until it
/// is empty and removes it with the cgroups below it. For setup and the end of
/// the process, where blocking a moment is fine.
fn clear(dir: &Path) {
    if !dir.exists() {
        return;
    }
    kill_all(dir);
    let end = Instant::now() + EMPTY_WITHIN;
    while populated(dir) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    remove_tree(dir);
}

fn remove_tree(dir: &Path) {
    for sub in subdirs(dir) {
        remove_tree(&sub);
    }
    let _ = std::fs::remove_dir(dir);
}

/// Removes the `seaport-PID` subtrees of supervisors that are gone.
fn remove_stale(ours: &Path) {
    for dir in subdirs(ours) {
        let stale = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("seaport-"))
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        if stale {
            tracing::info!(
                "removing {}, left by a supervisor that is gone",
                dir.display()
            );
            clear(&dir);
        }
    }
}

/// The cgroup of one run of a service.
#[derive(Debug)]
pub struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    /// A cgroup at `dir`, whatever is there (for tests of what fails).
    #[cfg(test)]
    pub(crate) fn at(dir: PathBuf) -> Cgroup {
        Cgroup { dir }
    }

    /// The paths its keeper needs, as C strings.
    pub fn files(&self) -> io::Result<CgroupFiles<'static>> {
        let dir_fd = std::fs::File::open(&self.dir)?.into();
        Ok(CgroupFiles {
            dir_fd,
            procs: Cow::Owned(c_path(&self.dir.join("cgroup.procs"))?),
            kill: Cow::Owned(c_path(&self.dir.join("cgroup.kill"))?),
            dir: Cow::Owned(c_path(&self.dir)?),
            subtree: Cow::Owned(c_path(self.dir.parent().unwrap_or(&self.dir))?),
        })
    }

    /// Sends `signal` to every process in it.
    pub fn signal_all(&self, signal: Signal) {
        for pid in members(&self.dir).unwrap_or_default() {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), signal);
            }
        }
    }

    /// Kills every process in it at once.
    pub fn kill(&self) {
        if self.dir.exists() {
            kill_all(&self.dir);
        }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a process is still in it.
    pub fn populated(&self) -> bool {
        populated(&self.dir)
    }

    /// Kills what is left in it, waits until it is empty and removes it. The
    /// keeper removes it when it ends; this is for a keeper that could not.
    pub async fn remove(&self) {
        if !self.dir.exists() {
            return;
        }
        kill_all(&self.dir);
        let end = tokio::time::Instant::now() + EMPTY_WITHIN;
        while self.populated() && tokio::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Err(e) = std::fs::remove_dir(&self.dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove cgroup {}: {e}", self.dir.display());
        }
    }

    /// Removes it if it is empty, at once (after a failed start).
    pub fn remove_now(&self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_among_v1_mounts() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            find_mount(mountinfo),
            Some((PathBuf::from("/sys/fs/cgroup/unified"), "/".to_string()))
        );
        let spaced = "41 31 0:38 /sub /mnt/my\\040cgroups rw shared:1 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_mount(spaced),
            Some((PathBuf::from("/mnt/my cgroups"), "/sub".to_string()))
        );
        assert_eq!(find_mount("1 2 0:1 / / rw - ext4 /dev/sda rw\n"), None);
    }

    #[test]
    fn reads_the_unified_line_of_proc_self_cgroup() {
        let hybrid = "9:name=systemd:/\n4:memory:/x\n0::/\n";
        assert_eq!(own_cgroup(hybrid), Some("/"));
        let unified = "0::/system.slice/seaport.service\n";
        assert_eq!(own_cgroup(unified), Some("/system.slice/seaport.service"));
        assert_eq!(own_cgroup("4:memory:/x\n"), None);
    }

    #[test]
    fn maps_a_cgroup_path_below_the_mount_root() {
        let mount = Path::new("/sys/fs/cgroup");
        assert_eq!(
            cgroup_dir(mount, "/", "/system.slice/a.service"),
            Some(PathBuf::from("/sys/fs/cgroup/system.slice/a.service"))
        );
        assert_eq!(cgroup_dir(mount, "/", "/"), Some(mount.to_path_buf()));
        assert_eq!(
            cgroup_dir(mount, "/lxc/c1", "/lxc/c1/app"),
            Some(PathBuf::from("/sys/fs/cgroup/app"))
        );
        assert_eq!(cgroup_dir(mount, "/lxc/c1", "/lxc/c10"), None);
        assert_eq!(cgroup_dir(mount, "/", "/../../x"), None);
    }

    #[test]
    fn cgroup_names_are_safe_directory_names() {
        assert_eq!(dir_name("web.2"), "web.2");
        assert_eq!(dir_name("a b/c"), "a_b_c");
        assert_eq!(dir_name(".."), "service");
        assert_eq!(dir_name(""), "service");
    }
}
