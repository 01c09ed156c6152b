//! Running one service: its processes (kept together below a keeper, in a
//! cgroup where there are cgroups), readiness, output, restart policy, and the
//! instance that ties them to a record.

pub mod activation;
pub mod cgroup;
pub mod child;
pub mod containment;
pub mod factory;
pub mod health;
pub mod instance;
pub mod keeper;
pub mod listeners;
pub mod output;
pub mod program;
pub mod ready;
pub mod reaper;
pub mod restart;
pub mod settings;
