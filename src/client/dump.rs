//! Reading a hub's records once, as they arrive: what `seaport show` and
//! `query` print. Nothing is kept: each record goes to the caller as soon as
//! its row is read, so a registry of a million records streams through in
//! constant memory.

use crate::protocol::hub_addr::HubAddr;
use crate::protocol::keys::Authorized;
use crate::protocol::wire::Row;
use crate::registry::record::Record;
use crate::transport::End;
use crate::transport::link::{Heard, Link, LinkConfig};
use std::time::Duration;
use thiserror::Error;

/// Why a hub's records could not be read.
#[derive(Debug, Error)]
pub enum DumpError {
    /// No connection.
    #[error("cannot reach the hub at {hub}: {error}")]
    Connect {
        /// The hub.
        hub: String,
        /// What happened.
        error: std::io::Error,
    },
    /// The connection ended before the hub had sent every record.
    #[error("the hub at {hub} stopped before sending every record: {end}")]
    Ended {
        /// The hub.
        hub: String,
        /// How the connection ended.
        end: End,
    },
}

/// Connects to `hub` and passes each of its records, with its owner where the
/// hub says it, to `each`, in the hub's order, until the hub has sent them
/// all. `wait` is how long the hub may stay silent.
pub async fn each_record(
    hub: &HubAddr,
    wait: Duration,
    mut each: impl FnMut(Record),
) -> Result<usize, DumpError> {
    let config = LinkConfig {
        heartbeat: wait.max(Duration::from_millis(100)),
        timeout: wait,
        max_line: crate::protocol::framing::DEFAULT_MAX_LINE,
        keypair: None,
        hub_keys: Authorized::default(),
        max_unsent: crate::transport::link::DEFAULT_MAX_UNSENT,
    };
    let mut link = Link::connect(hub, &config)
        .await
        .map_err(|error| DumpError::Connect {
            hub: hub.to_string(),
            error,
        })?;
    let mut count = 0;
    loop {
        let heard = link.next().await.map_err(|end| DumpError::Ended {
            hub: hub.to_string(),
            end,
        })?;
        match heard {
            Heard::Row(Row::Register { id, meta, ext, .. }) => {
                count += 1;
                each(Record::new(id, meta).with_holder(ext.owner));
            }
            Heard::Row(Row::Synced) => return Ok(count),
            Heard::SendOwn => link.send_own(std::iter::empty::<&[u8]>()),
            _ => {}
        }
    }
}
