//! `GET /metrics`: the figures of the hub (and, in a supervisor, of its
//! services) in the Prometheus text format, every name prefixed `seaport_`.
//! A registry is made for each scrape: the hub's counters are shared atomics
//! and its levels are read as they are encoded, so that costs next to nothing.
//! A supervisor's figures are those of `seaport ps`, asked for once per
//! scrape, one series per instance.

use super::{AdminBody, Sources, full, text};
use crate::supervise::control::{RowState, ServiceRow};
use hyper::{Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

/// The prefix of every metric name.
pub const PREFIX: &str = "seaport";

/// `GET /metrics`.
pub async fn scrape(sources: &Sources) -> Response<AdminBody> {
    let mut registry = Registry::with_prefix(PREFIX);
    if let Some(hub) = &sources.hub {
        hub.register_metrics(&mut registry);
    }
    if let Some(services) = &sources.services {
        match services.rows().await {
            Some(rows) => registry.register_collector(Box::new(Services(rows))),
            None => {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the supervisor has stopped\n",
                );
            }
        }
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

/// The labels of an instance's series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Instance {
    /// `web.1`.
    instance: String,
    /// `web@1.0.0`.
    role: String,
}

/// A supervisor's instances as `ps` gave them, encoded as metrics.
#[derive(Debug)]
struct Services(Vec<ServiceRow>);

impl Services {
    /// Encodes one family of gauges: `value` of each instance that has one.
    fn gauges(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        value: impl Fn(&ServiceRow) -> Option<i64>,
    ) -> std::fmt::Result {
        let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
        for (row, labels) in self.instances() {
            if let Some(value) = value(row) {
                ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    /// The instances (not the rejected files), with their labels.
    fn instances(&self) -> impl Iterator<Item = (&ServiceRow, Instance)> {
        self.0
            .iter()
            .filter(|row| row.state != RowState::Rejected)
            .map(|row| {
                let labels = Instance {
                    instance: row.name.clone(),
                    role: row.role.clone(),
                };
                (row, labels)
            })
    }
}

impl Collector for Services {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        use crate::process::instance::State;
        let flag = |b: bool| Some(i64::from(b));
        self.gauges(
            &mut encoder,
            "service_up",
            "Whether the instance has a process running (starting or ready)",
            None,
            |row| flag(row.state == State::Starting || row.state == State::Ready),
        )?;
        self.gauges(
            &mut encoder,
            "service_ready",
            "Whether the instance is ready (and registered)",
            None,
            |row| flag(row.state == State::Ready),
        )?;
        self.gauges(
            &mut encoder,
            "service_healthy",
            "Whether the last health check passed (instances with checks, while running)",
            None,
            |row| row.health.as_deref().map(|h| i64::from(h == "healthy")),
        )?;
        {
            let mut family = encoder.encode_descriptor(
                "service_restarts",
                "Times the instance's command was started again",
                None,
                MetricType::Counter,
            )?;
            for (row, labels) in self.instances() {
                ConstCounter::new(u64::from(row.restarts))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "service_port_failures",
                "Times no port could be had for the instance (none free in its range, or its fixed port held by another process)",
                None,
                MetricType::Counter,
            )?;
            for (row, labels) in self.instances() {
                ConstCounter::new(u64::from(row.port_failures))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        self.gauges(
            &mut encoder,
            "service_last_exit_status",
            "How the last process ended: its exit code, or 128 + N when killed by signal N",
            None,
            |row| row.last_exit_status.map(i64::from),
        )?;
        self.gauges(
            &mut encoder,
            "service_port",
            "The instance's port",
            None,
            |row| row.port.map(i64::from),
        )?;
        self.gauges(
            &mut encoder,
            "service_uptime",
            "Seconds since the instance's current process started",
            Some(&Unit::Seconds),
            |row| {
                row.uptime_ms
                    .map(|ms| i64::try_from(ms / 1000).unwrap_or(i64::MAX))
            },
        )?;
        let rejected = self
            .0
            .iter()
            .filter(|row| row.state == RowState::Rejected)
            .count();
        let rejected = ConstGauge::new(i64::try_from(rejected).unwrap_or(i64::MAX));
        rejected.encode(encoder.encode_descriptor(
            "service_files_rejected",
            "Service files the supervisor did not load (see `seaport ps`)",
            None,
            rejected.metric_type(),
        )?)?;
        Ok(())
    }
}
