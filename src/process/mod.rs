//! Running one service: its child process group, readiness, output, restart
//! policy, and the instance that ties them to a record.

pub mod child;
pub mod instance;
pub mod output;
pub mod ready;
pub mod restart;
pub mod settings;
