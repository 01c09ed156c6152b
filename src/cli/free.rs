//! `seaport free HUB ID [--key FILE]`: remove a record by hand. On a hub that
//! keeps records to their owners, only the owner or an admin key may; the
//! owner of a live service puts its record back.

use super::HubArg;
use crate::client::{Client, ClientConfig, Event};
use crate::protocol::hub_addr::{HubAddr, HubAddrError};
use crate::protocol::keys::Keypair;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::broadcast::error::TryRecvError;

#[derive(Debug, Args)]
pub(super) struct FreeArgs {
    #[command(flatten)]
    hub: HubArg,
    /// The id of the record to free.
    id: String,
    /// Keypair file (rsa-json or PEM): an admin key of the hub, or the owner's.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
}

pub(super) async fn run(args: FreeArgs) -> Result<(), String> {
    let keypair = match &args.key {
        Some(path) => Some(Arc::new(Keypair::load(path).map_err(|e| e.to_string())?)),
        None => None,
    };
    let config = ClientConfig {
        keypair,
        ..ClientConfig::default()
    };
    let wait = args.hub.timeout();
    let addr: HubAddr = args
        .hub
        .hub
        .parse()
        .map_err(|e: HubAddrError| e.to_string())?;
    // A hub that cannot be reached is said at once, with the reason, rather
    // than waited for (the client would only retry).
    match tokio::time::timeout(wait, TcpStream::connect((addr.host.as_str(), addr.port))).await {
        Ok(Ok(_probe)) => {}
        Ok(Err(e)) => return Err(format!("cannot reach the hub at {addr}: {e}")),
        Err(_) => return Err(args.hub.no_answer()),
    }
    let client = Client::connect_with([&args.hub.hub], config).map_err(|e| e.to_string())?;
    let hub = &addr;
    match tokio::time::timeout(wait, client.wait_synced()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(args.hub.no_answer()),
    }
    // Events from here on only: the dump's records are not news, and on a
    // large registry they would crowd the refusal out of the channel.
    let mut events = client.events();
    let id = &args.id;
    if client.free(id).is_none() {
        client.close();
        return Err(format!("the hub at {hub} holds no record {id}"));
    }
    let confirmed = client.confirm(wait).await;
    let next_event = || loop {
        match events.try_recv() {
            Ok(event) => return Some(event),
            Err(TryRecvError::Lagged(_)) => {}
            Err(_) => return None,
        }
    };
    let refused = std::iter::from_fn(next_event).find_map(|event| match event {
        Event::Rejected {
            id: Some(rejected),
            reason,
            ..
        } if rejected == *id => Some(reason),
        _ => None,
    });
    client.close();
    match (refused, confirmed) {
        (Some(reason), _) => Err(format!("the hub refused to free {id}: {reason}")),
        (None, true) => super::say(format_args!("freed {id}")),
        // A Node hub answers nothing, neither yes nor no.
        (None, false) => super::say(format_args!(
            "sent the free of {id} (the hub does not confirm)"
        )),
    }
}
