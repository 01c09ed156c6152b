//! `seaport show`, `query` and `watch`: look inside a hub. Output matches the Node
//! CLI: JSON arrays with 2-space indentation, and one line per event.

use super::HubArg;
use crate::client::dump::{DumpError, each_record};
use crate::client::{Client, ClientConfig, Event};
use crate::protocol::hub_addr::{HubAddr, HubAddrError};
use crate::registry::pattern::Pattern;
use crate::registry::record::Record;
use crate::transport::End;
use serde_json::Value;
use std::io::Write;
use tokio::sync::broadcast::error::RecvError;

pub(super) async fn show(hub: HubArg, owners: bool) -> Result<(), String> {
    print_records(&hub, &Pattern::all(), |record| {
        if !owners {
            return Value::Object(record.into_meta());
        }
        let owner = record.holder().map(ToString::to_string);
        let mut meta = record.into_meta();
        meta.insert("owner".into(), owner.map_or(Value::Null, Value::String));
        Value::Object(meta)
    })
    .await
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
    print_records(&hub, &pattern, |r| {
        drill(Value::Object(r.into_meta()), &fields)
    })
    .await
}

/// Prints the hub's records that match `pattern`, each as `shown` makes it,
/// as one JSON array with 2-space indentation (as the Node CLI does), one
/// record at a time as they arrive.
async fn print_records(
    hub: &HubArg,
    pattern: &Pattern,
    shown: impl Fn(Record) -> Value,
) -> Result<(), String> {
    let addr: HubAddr = hub.hub.parse().map_err(|e: HubAddrError| e.to_string())?;
    let mut out = ArrayWriter::new(std::io::stdout().lock());
    let read = each_record(&addr, hub.timeout(), |record| {
        if pattern.matches(&record) {
            out.push(&shown(record));
        }
    })
    .await;
    match read {
        Ok(_) => out
            .finish()
            .map_err(|e| format!("cannot write the records: {e}")),
        Err(DumpError::Ended {
            end: End::TimedOut(_),
            ..
        }) => Err(hub.no_answer()),
        Err(e @ DumpError::Connect { .. }) => Err(format!("{e} (is it running?)")),
        Err(e) => Err(e.to_string()),
    }
}

/// A pretty-printed JSON array written an element at a time, exactly as
/// `serde_json::to_string_pretty` prints the whole array.
struct ArrayWriter<W: Write> {
    out: std::io::BufWriter<W>,
    count: usize,
    failed: Option<std::io::Error>,
}

impl<W: Write> ArrayWriter<W> {
    fn new(out: W) -> Self {
        ArrayWriter {
            out: std::io::BufWriter::with_capacity(256 * 1024, out),
            count: 0,
            failed: None,
        }
    }

    fn push(&mut self, value: &Value) {
        if self.failed.is_some() {
            return;
        }
        let opening: &[u8] = if self.count == 0 { b"[\n  " } else { b",\n  " };
        let formatter = serde_json::ser::PrettyFormatter::with_indent(b"  ");
        let written = self.out.write_all(opening).and_then(|()| {
            // Nested one level inside the array.
            let mut indented = Indented(&mut self.out);
            let mut ser = serde_json::Serializer::with_formatter(&mut indented, formatter);
            serde::Serialize::serialize(value, &mut ser).map_err(std::io::Error::other)
        });
        self.count += 1;
        if let Err(e) = written {
            self.failed = Some(e);
        }
    }

    fn finish(mut self) -> std::io::Result<()> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let closing: &[u8] = if self.count == 0 { b"[]\n" } else { b"\n]\n" };
        self.out.write_all(closing)?;
        self.out.flush()
    }
}

/// Indents every line after the first by two spaces.
struct Indented<'a, W: Write>(&'a mut W);

impl<W: Write> Write for Indented<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut rest = buf;
        while let Some(i) = memchr::memchr(b'\n', rest) {
            self.0.write_all(&rest[..=i])?;
            self.0.write_all(b"  ")?;
            rest = &rest[i + 1..];
        }
        self.0.write_all(rest)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
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
    // One future for the whole watch: a Ctrl-C that comes while an event is
    // printed is not lost.
    let mut interrupted = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = &mut interrupted => break,
        };
        let printed = match event {
            Ok(Event::Register(ref record)) => print_event("REGISTER", record, verbose),
            Ok(Event::Free(ref record)) => print_event("FREE", record, verbose),
            _ => Ok(()),
        };
        // The reader is gone (`seaport watch | head`): the watch is over.
        if printed.is_err() {
            break;
        }
        match event {
            Ok(Event::Register(_) | Event::Free(_)) => {}
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

fn print_event(kind: &str, record: &Record, verbose: bool) -> std::io::Result<()> {
    let port = record.port().map(|p| p.to_string()).unwrap_or_default();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{kind} {} {}:{port} [{}]",
        record.name(),
        record.host().unwrap_or(""),
        record.id()
    )?;
    if verbose {
        let json = pretty(&Value::Object(record.meta().clone()));
        for line in json.lines() {
            writeln!(out, "  {line}")?;
        }
    }
    out.flush()
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
