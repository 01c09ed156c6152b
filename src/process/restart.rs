//! When to restart a service that exited: the policy and the backoff, as a pure
//! state machine that tests can drive without processes or clocks.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Whether an exited service is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestartPolicy {
    /// Always (the default), as the Node launcher does.
    #[default]
    Always,
    /// Only after a non-zero exit or a signal.
    OnFailure,
    /// Never: an exit leaves the service stopped.
    Never,
}

impl FromStr for RestartPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(RestartPolicy::Always),
            "on-failure" => Ok(RestartPolicy::OnFailure),
            "never" => Ok(RestartPolicy::Never),
            _ => Err(format!(
                "invalid restart policy {s:?} (expected always, on-failure or never)"
            )),
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal number.
    Signal(i32),
    /// Could not be started at all.
    SpawnFailed,
    /// Stopped for failing its health checks.
    Unhealthy,
    /// Stopped for not becoming ready within its start timeout.
    NotReady,
}

impl Exit {
    /// Whether this counts as success (exit code 0).
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(code) => write!(f, "exited with code {code}"),
            Exit::Signal(sig) => match nix::sys::signal::Signal::try_from(*sig) {
                Ok(name) => write!(f, "killed by {name}"),
                Err(_) => write!(f, "killed by signal {sig}"),
            },
            Exit::SpawnFailed => write!(f, "could not be started"),
            Exit::Unhealthy => write!(f, "stopped for failing its health checks"),
            Exit::NotReady => write!(f, "stopped for not becoming ready in time"),
        }
    }
}

/// Backoff settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the second quick restart in a row; doubles each time after.
    /// The first restart after a stable run happens at once.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
    /// A run that served (was ready) at least this long is stable: the
    /// failure count starts again.
    pub stable_after: Duration,
    /// Give up at this many quick exits in a row (0: never give up).
    pub give_up_after: u32,
}

/// What to do after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start again after this delay.
    Restart(Duration),
    /// Leave it stopped: the policy says so.
    Stop,
    /// Too many quick failures: leave it failed, with the reason.
    GiveUp(String),
}

/// Counts quick exits in a row and turns each exit into a [`Decision`].
#[derive(Debug, Clone)]
pub struct Restarts {
    policy: RestartPolicy,
    backoff: Backoff,
    quick_exits: u32,
}

impl Restarts {
    /// A fresh counter.
    pub fn new(policy: RestartPolicy, backoff: Backoff) -> Self {
        Restarts {
            policy,
            backoff,
            quick_exits: 0,
        }
    }

    /// Quick exits in a row so far.
    pub fn quick_exits(&self) -> u32 {
        self.quick_exits
    }

    /// Forgets past failures (a manual start or restart).
    pub fn reset(&mut self) {
        self.quick_exits = 0;
    }

    /// Decides what follows an exit of a run that served for `served` (how
    /// long it was ready; `None` if it never became ready, which is always a
    /// quick exit, however long it took to fail). `jitter` in [0, 1) spreads
    /// delays by up to +25% so that many services failing together do not
    /// restart in lockstep.
    pub fn on_exit(&mut self, exit: Exit, served: Option<Duration>, jitter: f64) -> Decision {
        let wanted = match self.policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !exit.success(),
            RestartPolicy::Never => false,
        };
        if !wanted {
            return Decision::Stop;
        }
        if served.is_some_and(|served| served >= self.backoff.stable_after) {
            self.quick_exits = 0;
        }
        self.quick_exits += 1;
        let limit = self.backoff.give_up_after;
        if limit > 0 && self.quick_exits >= limit {
            return Decision::GiveUp(format!(
                "{exit}: {} quick exits in a row, none after {} ready; giving up",
                self.quick_exits,
                crate::human::format_duration(self.backoff.stable_after)
            ));
        }
        Decision::Restart(self.delay(jitter))
    }

    fn delay(&self, jitter: f64) -> Duration {
        if self.quick_exits <= 1 {
            return Duration::ZERO;
        }
        let doublings = (self.quick_exits - 2).min(20);
        let base = self.backoff.initial.saturating_mul(1 << doublings);
        let spread = base.mul_f64(jitter.clamp(0.0, 1.0) * 0.25);
        base.saturating_add(spread).min(self.backoff.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICK: Option<Duration> = Some(Duration::from_millis(50));
    const LONG: Option<Duration> = Some(Duration::from_secs(60));

    /// The backoff these tests assume (the defaults, see `settings`).
    fn backoff() -> Backoff {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            stable_after: Duration::from_secs(10),
            give_up_after: 10,
        }
    }

    fn restarts(policy: RestartPolicy) -> Restarts {
        Restarts::new(policy, backoff())
    }

    #[test]
    fn first_restart_is_immediate_then_doubles_up_to_the_cap() {
        let mut r = restarts(RestartPolicy::Always);
        let delays: Vec<Decision> = (0..9)
            .map(|_| r.on_exit(Exit::Code(1), QUICK, 0.0))
            .collect();
        let ms = |d: u64| Decision::Restart(Duration::from_millis(d));
        let expected: Vec<Decision> = [0, 100, 200, 400, 800, 1600, 3200, 6400, 12800]
            .into_iter()
            .map(ms)
            .collect();
        assert_eq!(delays, expected);
        let mut r = Restarts::new(
            RestartPolicy::Always,
            Backoff {
                give_up_after: 0,
                ..backoff()
            },
        );
        for _ in 0..30 {
            r.on_exit(Exit::Code(1), QUICK, 0.0);
        }
        assert_eq!(
            r.on_exit(Exit::Code(1), QUICK, 0.99),
            Decision::Restart(Duration::from_secs(30))
        );
    }

    #[test]
    fn the_longest_delays_saturate_instead_of_overflowing() {
        let mut r = Restarts::new(
            RestartPolicy::Always,
            Backoff {
                initial: Duration::MAX,
                max: Duration::MAX,
                give_up_after: 0,
                ..backoff()
            },
        );
        r.on_exit(Exit::Code(1), QUICK, 1.0);
        assert_eq!(
            r.on_exit(Exit::Code(1), QUICK, 1.0),
            Decision::Restart(Duration::MAX)
        );
    }

    #[test]
    fn jitter_adds_at_most_a_quarter() {
        let mut r = restarts(RestartPolicy::Always);
        r.on_exit(Exit::Code(1), QUICK, 0.5);
        assert_eq!(
            r.on_exit(Exit::Code(1), QUICK, 0.5),
            Decision::Restart(Duration::from_micros(112_500))
        );
    }

    #[test]
    fn a_stable_run_resets_the_backoff() {
        let mut r = restarts(RestartPolicy::Always);
        for _ in 0..5 {
            r.on_exit(Exit::Code(1), QUICK, 0.0);
        }
        assert_eq!(
            r.on_exit(Exit::Code(1), LONG, 0.0),
            Decision::Restart(Duration::ZERO)
        );
        assert_eq!(r.quick_exits(), 1);
    }

    #[test]
    fn gives_up_after_too_many_quick_exits_with_a_reason() {
        let mut r = Restarts::new(
            RestartPolicy::Always,
            Backoff {
                give_up_after: 3,
                ..backoff()
            },
        );
        for _ in 0..2 {
            assert!(matches!(
                r.on_exit(Exit::Code(2), QUICK, 0.0),
                Decision::Restart(_)
            ));
        }
        let Decision::GiveUp(why) = r.on_exit(Exit::Code(2), QUICK, 0.0) else {
            panic!("expected to give up at the third quick exit");
        };
        assert_eq!(
            why,
            "exited with code 2: 3 quick exits in a row, none after 10s ready; giving up"
        );
    }

    #[test]
    fn a_run_that_never_became_ready_is_a_quick_exit_however_long_it_took() {
        let mut r = Restarts::new(
            RestartPolicy::Always,
            Backoff {
                stable_after: Duration::ZERO,
                give_up_after: 3,
                ..backoff()
            },
        );
        assert_eq!(
            r.on_exit(Exit::SpawnFailed, None, 0.0),
            Decision::Restart(Duration::ZERO)
        );
        assert_eq!(
            r.on_exit(Exit::NotReady, None, 0.0),
            Decision::Restart(Duration::from_millis(100))
        );
        assert!(matches!(
            r.on_exit(Exit::SpawnFailed, None, 0.0),
            Decision::GiveUp(_)
        ));
        // Any run that served is stable when `stable_after` is zero.
        let mut r = Restarts::new(
            RestartPolicy::Always,
            Backoff {
                stable_after: Duration::ZERO,
                ..backoff()
            },
        );
        for _ in 0..3 {
            r.on_exit(Exit::Code(1), Some(Duration::ZERO), 0.0);
        }
        assert_eq!(r.quick_exits(), 1);
    }

    #[test]
    fn policies() {
        let mut on_failure = restarts(RestartPolicy::OnFailure);
        assert_eq!(
            on_failure.on_exit(Exit::Code(0), QUICK, 0.0),
            Decision::Stop
        );
        assert!(matches!(
            on_failure.on_exit(Exit::Code(3), QUICK, 0.0),
            Decision::Restart(_)
        ));
        assert!(matches!(
            on_failure.on_exit(Exit::Signal(9), QUICK, 0.0),
            Decision::Restart(_)
        ));
        let mut never = restarts(RestartPolicy::Never);
        assert_eq!(never.on_exit(Exit::Code(1), QUICK, 0.0), Decision::Stop);
        let mut always = restarts(RestartPolicy::Always);
        assert!(matches!(
            always.on_exit(Exit::Code(0), QUICK, 0.0),
            Decision::Restart(_)
        ));
        assert_eq!("on-failure".parse(), Ok(RestartPolicy::OnFailure));
        assert!("sometimes".parse::<RestartPolicy>().is_err());
    }

    #[test]
    fn exits_describe_themselves() {
        assert_eq!(Exit::Code(3).to_string(), "exited with code 3");
        assert_eq!(Exit::Signal(9).to_string(), "killed by SIGKILL");
    }
}
