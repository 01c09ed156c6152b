//! How a service's processes are kept together, so that every process a service
//! starts stops with it: on stop, restart, reload and supervisor exit, and when
//! the supervisor itself is killed with SIGKILL. One setting per process, chosen
//! when the first service starts (or when the `seaport` command starts).
//!
//! Every service runs below a keeper ([`super::keeper`]): a child subreaper
//! that adopts whatever the service orphans (double forks, `setsid` daemons),
//! kills what is left when the service's first process exits, and kills
//! everything when the supervisor dies. On top of that:
//!
//! | setting | what a stop reaches | if the supervisor is SIGKILLed |
//! |---|---|---|
//! | cgroup v2, writable (root, or a systemd unit with `Delegate=yes`) | every process of the service's cgroup (`cgroup.procs`, then `cgroup.kill`): nothing can leave it | the keepers get their parent-death signal and write `cgroup.kill` |
//! | no writable cgroup v2, or `SEAPORT_CGROUP=off`: subreaper only | every descendant of the keeper (from `/proc`); as a subreaper, nothing can leave that tree | the keepers kill their trees, round after round as orphans come back to them |
//!
//! What neither can catch: a process that moves itself to another cgroup (it
//! needs the rights to), and, without a cgroup, one forked in the instant between
//! reading `/proc` and signalling (it still gets SIGKILL when the stop timeout
//! ends, as everything left does). Without a cgroup a keeper finds its children
//! in `/proc/thread-self/children`; on a kernel built without it
//! (`CONFIG_PROC_CHILDREN`, which common distributions enable) a keeper whose
//! supervisor died can kill only its command's process group. If a keeper is itself killed with SIGKILL by
//! someone else, its service's first process dies with it; in a cgroup the rest
//! is killed with the cgroup, and without one the rest is adopted by the
//! supervisor (a subreaper) and killed when the supervisor ends.
//!
//! The `seaport` command (and only it: a library user's process is left as it
//! is) also makes itself a child subreaper when it has no cgroup, and, as PID 1
//! (a container's entrypoint) or as a subreaper, reaps every zombie it adopts.
//!
//! `SEAPORT_CGROUP` chooses: `auto` (the default: a cgroup when one can be
//! made), `off` (never; the subreaper only), `on` (a cgroup or fail).

use super::cgroup::{Cgroup, CgroupError, Subtree};
use std::str::FromStr;
use std::sync::OnceLock;

/// The environment variable that chooses whether cgroups are used.
pub const CGROUP_VAR: &str = "SEAPORT_CGROUP";

/// What [`CGROUP_VAR`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CgroupSetting {
    /// A cgroup when one can be made, else the subreaper only.
    #[default]
    Auto,
    /// The subreaper only.
    Off,
    /// A cgroup, or the command fails.
    Required,
}

impl FromStr for CgroupSetting {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(CgroupSetting::Auto),
            "off" | "no" | "0" | "false" => Ok(CgroupSetting::Off),
            "on" | "yes" | "1" | "true" => Ok(CgroupSetting::Required),
            _ => Err(format!("{CGROUP_VAR}={text:?}: expected auto, off or on")),
        }
    }
}

/// How this process contains its services.
#[derive(Debug)]
pub struct Containment {
    subtree: Option<Subtree>,
}

static CONTAINMENT: OnceLock<Result<Containment, String>> = OnceLock::new();

fn setup() -> Result<Containment, String> {
    let setting = match std::env::var(CGROUP_VAR) {
        Ok(text) => text.parse()?,
        Err(_) => CgroupSetting::Auto,
    };
    if setting == CgroupSetting::Off {
        return Ok(Containment { subtree: None });
    }
    match Subtree::create() {
        Ok(subtree) => {
            tracing::info!(
                "each service runs in a cgroup of its own below {}",
                subtree.dir().display()
            );
            Ok(Containment {
                subtree: Some(subtree),
            })
        }
        Err(e) if setting == CgroupSetting::Required => {
            Err(format!("{CGROUP_VAR}=on, but no cgroup can be made: {e}"))
        }
        Err(e) => {
            let reason = match &e {
                CgroupError::NoMount | CgroupError::NoCgroup => e.to_string(),
                _ => format!("cgroup v2 is not writable here ({e})"),
            };
            tracing::info!("{reason}: services are contained by their keepers only");
            Ok(Containment { subtree: None })
        }
    }
}

/// This process's containment, set up on first use. With an invalid
/// `SEAPORT_CGROUP`, or `on` and no cgroup, services still run, contained by
/// their keepers (the `seaport` command refuses to start instead: see [`init`]).
pub fn get() -> &'static Containment {
    static FALLBACK: OnceLock<Containment> = OnceLock::new();
    match CONTAINMENT.get_or_init(setup) {
        Ok(containment) => containment,
        Err(_) => FALLBACK.get_or_init(|| Containment { subtree: None }),
    }
}

/// Sets up containment for the `seaport` command, before it starts anything:
/// fails when `SEAPORT_CGROUP` is invalid, or `on` with no cgroup. Without a
/// cgroup the process becomes a child subreaper; as a subreaper or PID 1 it
/// reaps the zombies it adopts. Call it from within the runtime.
pub fn init() -> Result<(), String> {
    let containment = CONTAINMENT
        .get_or_init(setup)
        .as_ref()
        .map_err(Clone::clone)?;
    let pid1 = std::process::id() == 1;
    if containment.subtree.is_none() {
        nix::sys::prctl::set_child_subreaper(true)
            .map_err(|e| format!("cannot become a child subreaper: {e}"))?;
    }
    if pid1 || containment.subtree.is_none() {
        super::reaper::start().map_err(|e| format!("cannot watch SIGCHLD: {e}"))?;
        if pid1 {
            tracing::info!("running as PID 1: every orphan is reaped");
        }
    }
    Ok(())
}

impl Containment {
    /// A new cgroup for one run of the instance `name`; `None` without cgroups,
    /// or (with a warning) when it cannot be made: the keeper still holds the
    /// process tree.
    pub fn cgroup_for(&self, name: &str) -> Option<Cgroup> {
        let subtree = self.subtree.as_ref()?;
        match subtree.cgroup(name) {
            Ok(cgroup) => Some(cgroup),
            Err(e) => {
                tracing::warn!(
                    "{name}: cannot make a cgroup in {}: {e}; starting it without one",
                    subtree.dir().display()
                );
                None
            }
        }
    }
}

/// At the end of the `seaport` command, once every service has stopped: kills
/// whatever a subreaper still holds that no keeper does, and removes the
/// cgroup subtree.
pub fn shutdown() {
    let Some(Ok(containment)) = CONTAINMENT.get() else {
        return;
    };
    match &containment.subtree {
        Some(subtree) => subtree.remove(),
        None => super::reaper::kill_adopted(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_reads_as_people_write_it() {
        assert_eq!("".parse(), Ok(CgroupSetting::Auto));
        assert_eq!("auto".parse(), Ok(CgroupSetting::Auto));
        assert_eq!("OFF".parse(), Ok(CgroupSetting::Off));
        assert_eq!("on".parse(), Ok(CgroupSetting::Required));
        assert!("sometimes".parse::<CgroupSetting>().is_err());
    }
}
