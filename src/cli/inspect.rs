//! `seaport show`, `query` and `watch`: look inside a hub. Output matches the Node
//! CLI: JSON arrays with 2-space indentation, and one line per event.

use super::HubArg;
use crate::client::{Client, ClientConfig, Event};
use crate::registry::pattern::Pattern;
use crate::registry::record::Record;
use serde_json::Value;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

/// Connects and waits for the hub's initial dump.
async fn synced_client(hub: &HubArg) -> Result<Client, String> {
    let client = Client::connect([&hub.hub]).map_err(|e| e.to_string())?;
    let wait = Duration::try_from_secs_f64(hub.wait).unwrap_or(Duration::from_secs(5));
    match tokio::time::timeout(wait, client.wait_synced()).await {
        Ok(Ok(())) => Ok(client),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no answer from the hub at {} within {:.1} s (is it running?)",
            hub.hub, hub.wait
        )),
    }
}

pub(super) async fn show(hub: HubArg, owners: bool) -> Result<(), String> {
    if !owners {
        return query(hub, None, Vec::new()).await;
    }
    let client = synced_client(&hub).await?;
    let records = client.query_pattern(&Pattern::all());
    client.close();
    let values: Vec<Value> = records
        .into_iter()
        .map(|record| {
            let owner = record.holder().map(ToString::to_string);
            let mut meta = record.into_meta();
            meta.insert("owner".into(), owner.map_or(Value::Null, Value::String));
            Value::Object(meta)
        })
        .collect();
    println!("{}", pretty(&Value::Array(values)));
    Ok(())
}

pub(super) async fn query(
    hub: HubArg,
    pattern: Option<String>,
    fields: Vec<String>,
) -> Result<(), String> {
    let pattern = match pattern.as_deref() {
        Some(p) => Pattern::parse(p).map_err(|e| e.to_string())?,
        None => Pattern::all(),
    };
    let client = synced_client(&hub).await?;
    let records = client.query_pattern(&pattern);
    client.close();
    let values: Vec<Value> = records
        .into_iter()
        .map(|r| drill(Value::Object(r.into_meta()), &fields))
        .collect();
    println!("{}", pretty(&Value::Array(values)));
    Ok(())
}

/// Follows `fields` into `value`; a missing step gives `null`, as in the Node CLI.
fn drill(mut value: Value, fields: &[String]) -> Value {
    for field in fields {
        value = match value {
            Value::Object(mut map) => map.remove(field).unwrap_or(Value::Null),
            Value::Array(mut items) => match field.parse::<usize>() {
                Ok(i) if i < items.len() => items.swap_remove(i),
                _ => Value::Null,
            },
            _ => Value::Null,
        };
        if value.is_null() {
            break;
        }
    }
    value
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".into())
}

pub(super) async fn watch(hub: &str, verbose: bool) -> Result<(), String> {
    let (client, mut events) =
        Client::connect_with_events([hub], ClientConfig::default()).map_err(|e| e.to_string())?;
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = tokio::signal::ctrl_c() => break,
        };
        match event {
            Ok(Event::Register(record)) => print_event("REGISTER", &record, verbose),
            Ok(Event::Free(record)) => print_event("FREE", &record, verbose),
            Ok(Event::Connect(addr)) => eprintln!("seaport: connected to {addr}"),
            Ok(Event::Disconnect(addr)) => {
                eprintln!("seaport: lost the hub at {addr}, reconnecting")
            }
            Ok(Event::Synced | Event::Rejected { .. }) => {}
            Err(RecvError::Lagged(n)) => eprintln!("seaport: missed {n} events (output too slow)"),
            Err(RecvError::Closed) => break,
        }
    }
    client.close();
    Ok(())
}

fn print_event(kind: &str, record: &Record, verbose: bool) {
    let port = record.port().map(|p| p.to_string()).unwrap_or_default();
    println!(
        "{kind} {} {}:{port} [{}]",
        record.name(),
        record.host().unwrap_or(""),
        record.id()
    );
    if verbose {
        let json = pretty(&Value::Object(record.meta().clone()));
        for line in json.lines() {
            println!("  {line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn drills_like_the_node_cli() {
        let rec = json!({"port": 80, "meta": {"zone": "eu"}, "list": [1, 2]});
        let f = |fs: &[&str]| {
            drill(
                rec.clone(),
                &fs.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(f(&["port"]), json!(80));
        assert_eq!(f(&["meta", "zone"]), json!("eu"));
        assert_eq!(f(&["missing", "deeper"]), Value::Null);
        assert_eq!(f(&["list", "1"]), json!(2));
        assert_eq!(f(&[]), rec);
    }
}
