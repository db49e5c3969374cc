//! Logs and traces: build the subscriber (pretty or JSON, OTLP export when configured), then
//! install it. Tests build nothing and install nothing.

use std::str::FromStr;

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, Registry};

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable, for a terminal.
    #[default]
    Pretty,
    /// One JSON object per line, for a log pipeline.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pretty" => Ok(Self::Pretty),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?}; use pretty or json")),
        }
    }
}

/// Keeps the trace exporter alive; flushes it when dropped.
#[must_use = "dropping the guard stops trace export"]
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("trace exporter shutdown: {e}");
        }
    }
}

/// The OpenTelemetry variable that turns trace export on: where the OTLP collector listens.
pub const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Whether traces are exported, given [`OTLP_ENDPOINT`]'s value: set and not empty (an empty
/// value is unset, as the OpenTelemetry specification says, so that a deployment can pass the
/// variable through whether or not a collector runs).
fn exports_traces(endpoint: Option<std::ffi::OsString>) -> bool {
    endpoint.is_some_and(|value| !value.is_empty())
}

/// The subscriber keel logs through: `filter` (an `EnvFilter` directive such as `info`), the
/// chosen format, and an OpenTelemetry layer when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
pub fn subscriber(
    format: LogFormat,
    filter: &str,
    service_name: &str,
) -> anyhow::Result<(
    impl tracing::Subscriber + Send + Sync + 'static,
    TelemetryGuard,
)> {
    let filter = EnvFilter::try_new(filter)
        .map_err(|e| anyhow::anyhow!("invalid log filter {filter:?}: {e}"))?;
    let fmt = match format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
    };
    let mut guard = TelemetryGuard::default();
    let otel = if exports_traces(std::env::var_os(OTLP_ENDPOINT)) {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| anyhow::anyhow!("OTLP exporter: {e}"))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service_name.to_owned())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("keel");
        guard.provider = Some(provider);
        Some(tracing_opentelemetry::layer().with_tracer(tracer))
    } else {
        None
    };
    let subscriber = Registry::default().with(filter).with(fmt).with(otel);
    Ok((subscriber, guard))
}

/// Makes `subscriber` the process-wide default and W3C trace context the propagator.
pub fn install(subscriber: impl tracing::Subscriber + Send + Sync + 'static) -> anyhow::Result<()> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    tracing::subscriber::set_global_default(subscriber)
        .map_err(|e| anyhow::anyhow!("a tracing subscriber is already installed: {e}"))
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Makes `span` a child of the trace named by the request's `traceparent`, if any.
pub fn set_remote_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    });
    let _ = span.set_parent(parent);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_collector_address_exports_nothing_as_an_unset_one() {
        assert!(!exports_traces(None));
        assert!(!exports_traces(Some("".into())));
        assert!(exports_traces(Some("http://otel-collector:4317".into())));
    }
}
