//! Signals become orders in one place: SIGTERM and SIGINT ask to stop, SIGHUP to
//! reload. The commands read the orders in their `select!` loops with
//! everything else.

use crate::supervise::Order;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

/// Watches SIGTERM, SIGINT and SIGHUP from now on and sends the orders they
/// give; the receiver closes only when the process does.
pub(super) fn orders() -> Result<mpsc::Receiver<Order>, String> {
    let watch = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| format!("cannot watch {name}: {e}"))
    };
    let mut term = watch(SignalKind::terminate(), "SIGTERM")?;
    let mut int = watch(SignalKind::interrupt(), "SIGINT")?;
    let mut hup = watch(SignalKind::hangup(), "SIGHUP")?;
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let order = tokio::select! {
                Some(()) = term.recv() => Order::Stop,
                Some(()) = int.recv() => Order::Stop,
                Some(()) = hup.recv() => Order::Reload,
                else => return,
            };
            if tx.send(order).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}
