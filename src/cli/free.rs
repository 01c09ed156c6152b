//! `seaport free HUB ID [--key FILE]`: remove a record by hand. On a hub that
//! keeps records to their owners, only the owner or an admin key may; the
//! owner of a live service puts its record back.

use crate::client::{Client, ClientConfig, Event};
use crate::protocol::keys::Keypair;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Args)]
pub(super) struct FreeArgs {
    /// The hub: HOST:PORT, or PORT for localhost.
    hub: String,
    /// The id of the record to free.
    id: String,
    /// Keypair file (rsa-json or PEM): an admin key of the hub, or the owner's.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Seconds to wait for the hub to answer.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    wait: f64,
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
    let (client, mut events) =
        Client::connect_with_events([&args.hub], config).map_err(|e| e.to_string())?;
    let wait = Duration::try_from_secs_f64(args.wait).unwrap_or(Duration::from_secs(5));
    let hub = &args.hub;
    match tokio::time::timeout(wait, client.wait_synced()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => {
            return Err(format!(
                "no answer from the hub at {hub} within {:.1} s (is it running?)",
                args.wait
            ));
        }
    }
    let id = &args.id;
    if client.free(id).is_none() {
        client.close();
        return Err(format!("the hub at {hub} holds no record {id}"));
    }
    let confirmed = client.confirm(wait).await;
    let refused = std::iter::from_fn(|| events.try_recv().ok()).find_map(|event| match event {
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
        (None, true) => {
            println!("freed {id}");
            Ok(())
        }
        // A Node hub answers nothing, neither yes nor no.
        (None, false) => {
            println!("sent the free of {id} (the hub does not confirm)");
            Ok(())
        }
    }
}
