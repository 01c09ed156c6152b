//! `GET /metrics`: the figures of the hub (and, in a supervisor, of its
//! services) in the Prometheus text format, every name prefixed `seaport_`.
//! A registry is made for each scrape: the hub's counters are shared atomics
//! and its levels are read as they are encoded, so that costs next to nothing.

use super::{AdminBody, Sources, full, text};
use hyper::{Response, StatusCode};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;

/// The prefix of every metric name.
pub const PREFIX: &str = "seaport";

/// `GET /metrics`.
pub async fn scrape(sources: &Sources) -> Response<AdminBody> {
    let mut registry = Registry::with_prefix(PREFIX);
    if let Some(hub) = &sources.hub {
        hub.register_metrics(&mut registry);
    }
    let mut body = String::new();
    match prometheus_text::encode(&mut body, &registry) {
        Ok(()) => full(StatusCode::OK, prometheus_text::CONTENT_TYPE, body),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the metrics: {e}\n"),
        ),
    }
}
