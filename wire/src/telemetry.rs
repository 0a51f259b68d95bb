//! Logging, and tracing with OpenTelemetry: `--otlp-endpoint URL` on a
//! node, a gateway or a mirror exports spans over OTLP/gRPC, and W3C
//! `traceparent` carries the trace across processes in gRPC metadata.
//!
//! One client write makes one trace:
//!
//! ```text
//!  gateway.route (gateway)
//!   └ etcdserver.request (member)            traceparent in the forwarded call
//!      └ raft.propose                        traceparent in the raft entry
//!         └ raft.commit (the member applying it, on the raft thread)
//!            └ apply                          traceparent on the WatchResponse
//!               └ mirror.apply (mirror)       traceparent in Mirror.Apply
//!                  └ etcdserver.request (secondary member) → raft.propose → ...
//! ```
//!
//! Off by default, and then it costs a branch: every span is made under the
//! target [`TARGET`], which no layer enables without an endpoint, so a span
//! macro is a disabled callsite, and [`inject`] and [`traceparent`] return
//! at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The target of every span meant for OpenTelemetry (and of nothing else).
pub const TARGET: &str = "meridian::otel";
/// The W3C header, as gRPC metadata and inside raft entries.
pub const TRACEPARENT: &str = "traceparent";
/// How long finished spans wait before export: short, so a trace is
/// complete in the collector soon after the write.
const EXPORT_DELAY: Duration = Duration::from_millis(200);

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Is a tracer installed (`--otlp-endpoint` given)?
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Keeps the exporter alive; on drop, exports what is left.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// The exporter's gRPC channel lives on this runtime, apart from the
    /// process's own (which may not exist yet, or be shutting down).
    _runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Logs to stderr at `level` (`RUST_LOG` overrides it), and with an OTLP
/// endpoint also exports spans as `service` (with `meridian.region` when
/// given).
///
/// # Errors
///
/// An endpoint that is not a URL.
pub fn init(
    service: &str,
    region: Option<&str>,
    otlp_endpoint: Option<&str>,
    level: &str,
) -> Result<Telemetry, String> {
    let quiet = "raft=warn,h2=warn,hyper=warn,tower=warn,opentelemetry_sdk=warn,opentelemetry-otlp=warn";
    let logs = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(format!("{level},{quiet}")));
    let logs = logs.add_directive(format!("{TARGET}=off").parse().expect("a valid directive"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(logs);
    let Some(endpoint) = otlp_endpoint.filter(|e| !e.is_empty()) else {
        tracing_subscriber::registry().with(fmt).init();
        return Ok(Telemetry { provider: None, _runtime: None });
    };
    let endpoint = crate::url::Url::parse_endpoint(endpoint)
        .map_err(|e| format!("invalid --otlp-endpoint {endpoint:?}: {e}"))?
        .to_string();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp")
        .enable_all()
        .build()
        .map_err(|e| format!("otlp runtime: {e}"))?;
    let exporter = {
        let _in = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("otlp exporter for {endpoint}: {e}"))?
    };
    let batch = BatchSpanProcessor::builder(exporter)
        .with_batch_config(BatchConfigBuilder::default().with_scheduled_delay(EXPORT_DELAY).build())
        .build();
    let mut resource = Resource::builder().with_service_name(service.to_string());
    if let Some(r) = region {
        resource = resource.with_attribute(KeyValue::new("meridian.region", r.to_string()));
    }
    let provider = SdkTracerProvider::builder().with_span_processor(batch).with_resource(resource.build()).build();
    let tracer = provider.tracer("meridian");
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(Targets::new().with_target(TARGET, tracing::Level::TRACE));
    tracing_subscriber::registry().with(fmt).with(spans).init();
    ENABLED.store(true, Ordering::Relaxed);
    tracing::info!(%endpoint, service, "exporting traces over OTLP");
    Ok(Telemetry { provider: Some(provider), _runtime: Some(runtime) })
}

struct Meta<'a>(&'a MetadataMap);

impl Extractor for Meta<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetaMut<'a>(&'a mut MetadataMap);

impl Injector for MetaMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value.as_str())) {
            self.0.insert(k, v);
        }
    }
}

/// Makes `span` a child of the trace the caller sent in `meta`, if any.
pub fn follow(span: &tracing::Span, meta: &MetadataMap) {
    if enabled() && meta.contains_key(TRACEPARENT) {
        let cx = TraceContextPropagator::new().extract(&Meta(meta));
        let _ = span.set_parent(cx);
    }
}

/// A member's span for one client call, `rpc` like `KV/Put`: a child of
/// the caller's trace when the call carried one. A disabled span when
/// tracing is off.
pub fn request_span(rpc: &'static str, meta: &MetadataMap) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(target: TARGET, "etcdserver.request", rpc);
    follow(&span, meta);
    span
}

/// A gateway's span for one client call; the region that serves it is
/// recorded as `region` once chosen.
pub fn route_span(rpc: &'static str, meta: &MetadataMap) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(target: TARGET, "gateway.route", rpc, region = tracing::field::Empty);
    follow(&span, meta);
    span
}

/// Is the current span one of ours (a traced call is in progress)?
pub fn in_trace() -> bool {
    enabled() && tracing::Span::current().metadata().is_some_and(|m| m.target() == TARGET)
}

/// Puts the current span's trace into an outgoing call's metadata.
pub fn inject(meta: &mut MetadataMap) {
    if enabled() {
        let cx = tracing::Span::current().context();
        TraceContextPropagator::new().inject_context(&cx, &mut MetaMut(meta));
    }
}

/// `span`'s trace as a `traceparent` value ("" when tracing is off or the
/// span is not recorded), to carry where metadata cannot go: a raft entry,
/// a watch event.
pub fn traceparent(span: &tracing::Span) -> String {
    if !enabled() {
        return String::new();
    }
    let mut out = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut out);
    out.remove(TRACEPARENT).unwrap_or_default()
}

/// Makes `span` a child of a trace carried as a `traceparent` value.
pub fn follow_traceparent(span: &tracing::Span, traceparent: &str) {
    if enabled() && !traceparent.is_empty() {
        let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]);
        let cx: Context = TraceContextPropagator::new().extract(&carrier);
        let _ = span.set_parent(cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_nothing_is_carried() {
        assert!(!enabled());
        let span = tracing::info_span!(target: TARGET, "x");
        assert_eq!(traceparent(&span), "");
        let mut meta = MetadataMap::new();
        inject(&mut meta);
        assert!(meta.is_empty());
    }
}
