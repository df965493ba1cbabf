//! OpenTelemetry traces: each message's way through the engine, as children of the trace
//! its producer wrote into the row (`headers.traceparent`, W3C Trace Context), carried on to
//! consumers in the published message's own `traceparent`.
//!
//! Per attempt, one span of kind *producer*, `publish <exchange>`, from the claim to the
//! outcome, with children `claim` (claim → publish written), `confirm` (publish → the
//! broker's answer) and, when the row moves to `dead_letters`, `dead letter`. The published
//! message carries the `publish` span's context, so a consumer's span (the inbox's `process
//! <queue>`) continues the same trace.
//!
//! The engine only makes spans when `telemetry.traces` is on; they go to the global tracer
//! provider, which the binary installs from the config and the standard `OTEL_*` variables
//! ([`Traces::install`]); an embedding application may install its own instead. Export is
//! batched on the SDK's own thread with a bounded queue: a slow or dead collector drops
//! spans, it never slows or stalls delivery.

use std::time::{Duration, SystemTime};

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use opentelemetry::{
    global,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{Span, SpanKind, Status, TraceContextExt, Tracer},
    Context, KeyValue,
};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};

use crate::config::{OtlpProtocol, TelemetryConfig};
use crate::message::OutboxMessage;

/// The instrumentation scope of every span Courier makes.
const SCOPE: &str = "courier";

/// How long shutting the exporter down may take: spans not exported by then are dropped.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(3);

/// One delivery attempt's spans (see the module documentation).
#[derive(Debug)]
pub(crate) struct MessageTrace {
    /// The `publish` span, as the context its children and the published message carry.
    publish: Context,
    claimed_at: SystemTime,
    /// The `confirm` span, from the publish written to the broker's answer.
    confirm: Option<Context>,
}

impl MessageTrace {
    /// Starts the attempt's `publish` span now, as a child of the producer's trace when the
    /// row names one.
    pub(crate) fn claimed(m: &OutboxMessage, attempt: u32) -> MessageTrace {
        let tracer = global::tracer(SCOPE);
        let parent = TraceContextPropagator::new().extract(&RowHeaders(&m.headers));
        let span = tracer
            .span_builder(format!("publish {}", m.exchange))
            .with_kind(SpanKind::Producer)
            .with_attributes([
                KeyValue::new("messaging.system", "rabbitmq"),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("messaging.destination.name", m.exchange.clone()),
                KeyValue::new(
                    "messaging.rabbitmq.destination.routing_key",
                    m.routing_key.clone(),
                ),
                KeyValue::new("messaging.message.id", m.id.to_string()),
                KeyValue::new("messaging.message.body.size", m.payload.len() as i64),
                KeyValue::new("courier.attempt", i64::from(attempt)),
            ])
            .start_with_context(&tracer, &parent);
        MessageTrace {
            publish: parent.with_span(span),
            claimed_at: SystemTime::now(),
            confirm: None,
        }
    }

    /// The publish is being written: the `claim` span ends, `confirm` starts, and the
    /// message's headers carry the `publish` span's context (replacing the producer's).
    pub(crate) fn publishing(&mut self, headers: &mut FieldTable) {
        let tracer = global::tracer(SCOPE);
        let now = SystemTime::now();
        let mut claim = tracer
            .span_builder("claim")
            .with_start_time(self.claimed_at)
            .start_with_context(&tracer, &self.publish);
        claim.end_with_timestamp(now);
        let confirm = tracer
            .span_builder("confirm")
            .with_start_time(now)
            .start_with_context(&tracer, &self.publish);
        self.confirm = Some(self.publish.with_span(confirm));
        TraceContextPropagator::new().inject_context(&self.publish, &mut AmqpHeaders(headers));
    }

    /// The broker confirmed the message.
    pub(crate) fn confirmed(self) {
        if let Some(confirm) = &self.confirm {
            confirm.span().set_status(Status::Ok);
            confirm.span().end();
        }
        let span = self.publish.span();
        span.set_attribute(KeyValue::new("courier.outcome", "confirmed"));
        span.set_status(Status::Ok);
        span.end();
    }

    /// The attempt failed for `reason` and the row goes back for another attempt: the
    /// spans end here.
    pub(crate) fn retrying(self, reason: &str) {
        let span = self.failed(reason);
        span.set_attribute(KeyValue::new("courier.outcome", "retrying"));
        span.end();
    }

    /// The attempt failed for `reason` and the row is to be dead-lettered: the `publish`
    /// span stays open until [`MessageTrace::dead_lettered`].
    pub(crate) fn exhausted(mut self, reason: &str) -> MessageTrace {
        self.failed(reason);
        self.confirm = None;
        self
    }

    /// Ends `confirm` with `reason` and marks the `publish` span failed; returns it.
    fn failed(&self, reason: &str) -> opentelemetry::trace::SpanRef<'_> {
        if let Some(confirm) = &self.confirm {
            confirm.span().set_status(Status::error(reason.to_string()));
            confirm.span().end();
        }
        let span = self.publish.span();
        span.add_event(
            "attempt failed",
            vec![KeyValue::new("courier.reason", reason.to_string())],
        );
        span.set_status(Status::error(reason.to_string()));
        span
    }

    /// The row moved to `dead_letters` (the move started at `since`).
    pub(crate) fn dead_lettered(self, since: SystemTime, reason: &str) {
        let tracer = global::tracer(SCOPE);
        let mut span = tracer
            .span_builder("dead letter")
            .with_start_time(since)
            .with_attributes([KeyValue::new("courier.reason", reason.to_string())])
            .start_with_context(&tracer, &self.publish);
        span.end();
        let publish = self.publish.span();
        publish.set_attribute(KeyValue::new("courier.outcome", "dead_lettered"));
        publish.end();
    }
}

/// The consumer side: a span of kind *consumer*, `process <queue>`, continuing the trace the
/// delivery's `traceparent` header carries (the engine's `publish` span).
pub(crate) fn consumer_span(
    queue: &str,
    headers: Option<&FieldTable>,
    message_id: &str,
) -> Context {
    let tracer = global::tracer(SCOPE);
    let parent = match headers {
        Some(h) => TraceContextPropagator::new().extract(&AmqpHeadersRead(h)),
        None => Context::new(),
    };
    let span = tracer
        .span_builder(format!("process {queue}"))
        .with_kind(SpanKind::Consumer)
        .with_attributes([
            KeyValue::new("messaging.system", "rabbitmq"),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.destination.name", queue.to_string()),
            KeyValue::new("messaging.message.id", message_id.to_string()),
        ])
        .start_with_context(&tracer, &parent);
    parent.with_span(span)
}

/// Ends a consumer span with what the inbox did.
pub(crate) fn end_consumer_span(
    span: &Context,
    result: &Result<crate::inbox::Disposition, crate::store::StoreError>,
) {
    use crate::inbox::Disposition;
    let span = span.span();
    let outcome = match result {
        Ok(Disposition::Applied) => "applied",
        Ok(Disposition::Duplicate) => "duplicate",
        Ok(Disposition::Reused) => "reused id",
        Ok(Disposition::Failed(why)) => {
            span.set_status(Status::error(why.clone()));
            "failed"
        }
        Err(e) => {
            span.set_status(Status::error(e.to_string()));
            "database unavailable"
        }
    };
    span.set_attribute(KeyValue::new("courier.inbox.outcome", outcome));
    span.end();
}

/// A row's JSON headers as a trace context carrier (string values only).
struct RowHeaders<'a>(&'a serde_json::Value);

impl Extractor for RowHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(serde_json::Value::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .as_object()
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }
}

/// AMQP headers being written, as a carrier.
struct AmqpHeaders<'a>(&'a mut FieldTable);

impl Injector for AmqpHeaders<'_> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            return; // an empty `tracestate`: nothing to carry
        }
        self.0.insert(
            ShortString::from(key.to_string()),
            AMQPValue::LongString(LongString::from(value)),
        );
    }
}

/// AMQP headers received, as a carrier.
struct AmqpHeadersRead<'a>(&'a FieldTable);

impl Extractor for AmqpHeadersRead<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .inner()
            .iter()
            .find(|(k, _)| k.as_str() == key)
            .and_then(|(_, v)| match v {
                AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
                AMQPValue::ShortString(s) => Some(s.as_str()),
                _ => None,
            })
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(ShortString::as_str).collect()
    }
}

/// Why traces could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The exporter could not be built (a bad endpoint, an unsupported protocol).
    #[error("OpenTelemetry exporter: {0}")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    /// `grpc` asked for in the environment; this build exports over HTTP.
    #[error(
        "{0}=grpc: Courier exports OTLP over HTTP; set http/protobuf or http/json \
         (and the collector's HTTP port, 4318)"
    )]
    Grpc(&'static str),
    /// A protocol the OpenTelemetry specification does not name.
    #[error("{var}={value:?}: not an OTLP protocol; set http/protobuf or http/json")]
    Protocol {
        /// The variable.
        var: &'static str,
        /// What it held.
        value: String,
    },
}

/// Whether traces are on: `telemetry.traces`, or an OTLP endpoint in the environment; the
/// standard switches `OTEL_SDK_DISABLED=true` and `OTEL_TRACES_EXPORTER=none` turn them off.
pub fn traces_wanted(config: &TelemetryConfig, env: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| env(name).is_some_and(|v| !v.trim().is_empty());
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    let endpoint = set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    !disabled && (config.traces || endpoint)
}

/// The installed exporter: spans go out until it is dropped (which exports what is queued,
/// waiting at most a few seconds).
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// Builds the OTLP/HTTP exporter (the `telemetry.*` keys, else the standard `OTEL_*`
    /// variables: endpoint, protocol, headers, timeout, service name, resource attributes,
    /// sampler, batch sizes) and makes it the global tracer provider, with W3C Trace Context
    /// as the global propagator.
    pub fn install(config: &TelemetryConfig) -> Result<Traces, TelemetryError> {
        let exporter = exporter(config)?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        let from_env = |var: &str| std::env::var(var).ok();
        if let Some(name) = service_name(config.service_name.as_deref(), from_env) {
            resource = resource.with_service_name(name);
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        global::set_tracer_provider(provider.clone());
        global::set_text_map_propagator(TraceContextPropagator::new());
        Ok(Traces { provider })
    }

    /// Whether [`Traces::install`] would succeed with `config` and the `OTEL_*` variables,
    /// without installing anything (`courier doctor`).
    pub fn check(config: &TelemetryConfig) -> Result<(), TelemetryError> {
        exporter(config).map(drop)
    }

    /// Exports every span ended so far (tests, and before a planned exit).
    pub fn flush(&self) {
        let _ = self.provider.force_flush();
    }
}

/// The OTLP/HTTP span exporter `config` and the `OTEL_*` variables describe.
fn exporter(config: &TelemetryConfig) -> Result<opentelemetry_otlp::SpanExporter, TelemetryError> {
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let protocol = match config.protocol {
        Some(protocol) => protocol,
        None => env_protocol(|var| std::env::var(var).ok())?,
    };
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
    if let Some(endpoint) = &config.endpoint {
        // As OTEL_EXPORTER_OTLP_ENDPOINT: the base URL, the signal's path appended.
        let base = endpoint.trim_end_matches('/');
        exporter = exporter.with_endpoint(format!("{base}/v1/traces"));
    }
    exporter = exporter.with_protocol(match protocol {
        OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
        OtlpProtocol::HttpJson => Protocol::HttpJson,
    });
    exporter.build().map_err(TelemetryError::Exporter)
}

/// The protocol the `OTEL_*` variables ask for (the traces' own first), else the
/// specification's default, `http/protobuf` (the exporter crate's own default follows its
/// build features instead, and is JSON when both encodings are built in).
fn env_protocol(env: impl Fn(&str) -> Option<String>) -> Result<OtlpProtocol, TelemetryError> {
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        let Some(value) = env(var).filter(|v| !v.trim().is_empty()) else {
            continue;
        };
        return match value.trim().to_ascii_lowercase().as_str() {
            "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
            "http/json" => Ok(OtlpProtocol::HttpJson),
            "grpc" => Err(TelemetryError::Grpc(var)),
            _ => Err(TelemetryError::Protocol { var, value }),
        };
    }
    Ok(OtlpProtocol::HttpProtobuf)
}

/// What is wrong with `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, if anything. The
/// specification has an invalid value logged and otherwise ignored: the SDK then samples every
/// trace (`parentbased_always_on`, or a ratio of 1.0), but says so only through its internal
/// logs, which this build leaves out. So Courier names the problem itself (a warning at start,
/// and in `courier doctor`). The values are the ones this SDK implements.
pub fn sampler_problem(env: impl Fn(&str) -> Option<String>) -> Option<String> {
    const SAMPLERS: [&str; 6] = [
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    ];
    let sampler = env("OTEL_TRACES_SAMPLER")?;
    if !SAMPLERS.contains(&sampler.as_str()) {
        return Some(format!(
            "OTEL_TRACES_SAMPLER={sampler:?} is not a sampler this build implements ({}); \
             every trace is sampled (parentbased_always_on)",
            SAMPLERS.join(", ")
        ));
    }
    if !sampler.ends_with("traceidratio") {
        return None;
    }
    let arg = env("OTEL_TRACES_SAMPLER_ARG");
    let ratio = arg.as_deref().and_then(|a| a.parse::<f64>().ok());
    match (ratio, arg) {
        (Some(r), _) if (0.0..=1.0).contains(&r) => None,
        (_, None) => Some(format!(
            "OTEL_TRACES_SAMPLER={sampler} without OTEL_TRACES_SAMPLER_ARG: every trace is \
             sampled (a ratio of 1.0)"
        )),
        (_, Some(arg)) => Some(format!(
            "OTEL_TRACES_SAMPLER_ARG={arg:?} is no ratio between 0 and 1 (for \
             OTEL_TRACES_SAMPLER={sampler}); {}",
            if ratio.is_some() {
                "the SDK uses it as it is (below 0: nothing sampled, above 1: everything)"
            } else {
                "every trace is sampled (a ratio of 1.0)"
            }
        )),
    }
}

/// The `service.name` Courier sets itself, in the specification's order:
/// `telemetry.service_name`, then `OTEL_SERVICE_NAME` (set explicitly: the SDK merges the
/// resource attributes after it, and they would win), then `service.name` among
/// `OTEL_RESOURCE_ATTRIBUTES` (none: the SDK reads it), else `courier` instead of the SDK's
/// `unknown_service`.
fn service_name(configured: Option<&str>, env: impl Fn(&str) -> Option<String>) -> Option<String> {
    let set = |v: &str| !v.trim().is_empty();
    if let Some(name) = configured {
        return Some(name.to_string());
    }
    if let Some(name) = env("OTEL_SERVICE_NAME").filter(|v| set(v)) {
        return Some(name.trim().to_string());
    }
    let in_attributes = env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attrs| {
        attrs.split(',').any(|pair| {
            pair.split_once('=')
                .is_some_and(|(k, v)| k.trim() == "service.name" && set(v))
        })
    });
    (!in_attributes).then(|| "courier".to_string())
}

impl Drop for Traces {
    fn drop(&mut self) {
        // On its own thread, bounded: a dead collector must not hold the exit.
        let provider = self.provider.clone();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = provider.shutdown_with_timeout(SHUTDOWN_WAIT);
            let _ = done.send(());
        });
        let _ = finished.recv_timeout(SHUTDOWN_WAIT + Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::{env_protocol, sampler_problem, service_name, traces_wanted, TelemetryError};
    use crate::config::{OtlpProtocol, TelemetryConfig};

    fn env_of<'a>(env: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_protocol_defaults_to_protobuf_as_the_specification_says() {
        let protocol = |env: &[(&str, &str)]| env_protocol(env_of(env));
        assert_eq!(protocol(&[]).ok(), Some(OtlpProtocol::HttpProtobuf));
        assert_eq!(
            protocol(&[("OTEL_EXPORTER_OTLP_PROTOCOL", " ")]).ok(),
            Some(OtlpProtocol::HttpProtobuf)
        );
        assert_eq!(
            protocol(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).ok(),
            Some(OtlpProtocol::HttpJson)
        );
        assert_eq!(
            protocol(&[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ])
            .ok(),
            Some(OtlpProtocol::HttpProtobuf),
            "the traces' own variable first"
        );
        assert!(matches!(
            protocol(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]),
            Err(TelemetryError::Grpc("OTEL_EXPORTER_OTLP_PROTOCOL"))
        ));
        let err = protocol(&[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "thrift")])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") && err.contains("thrift"),
            "{err}"
        );
    }

    #[test]
    fn the_service_name_follows_the_specification_s_order() {
        let named =
            |configured: Option<&str>, env: &[(&str, &str)]| service_name(configured, env_of(env));
        let attrs = (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=prod, service.name=foo",
        );
        assert_eq!(named(None, &[]).as_deref(), Some("courier"));
        assert_eq!(
            named(None, &[("OTEL_SERVICE_NAME", "billing")]).as_deref(),
            Some("billing")
        );
        assert_eq!(
            named(None, &[attrs]),
            None,
            "left to the SDK, which reads it"
        );
        assert_eq!(
            named(None, &[attrs, ("OTEL_SERVICE_NAME", "bar")]).as_deref(),
            Some("bar"),
            "OTEL_SERVICE_NAME wins over the resource attributes"
        );
        assert_eq!(
            named(Some("baz"), &[attrs, ("OTEL_SERVICE_NAME", "bar")]).as_deref(),
            Some("baz")
        );
        assert_eq!(
            named(
                None,
                &[(
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "deployment.environment=prod,service.namespace=shop"
                )]
            )
            .as_deref(),
            Some("courier")
        );
        assert_eq!(
            named(None, &[("OTEL_SERVICE_NAME", " ")]).as_deref(),
            Some("courier")
        );
    }

    fn wanted(traces: bool, env: &[(&str, &str)]) -> bool {
        let config = TelemetryConfig {
            traces,
            ..Default::default()
        };
        traces_wanted(&config, |name| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn traces_follow_the_config_and_the_standard_switches() {
        assert!(!wanted(false, &[]), "off by default");
        assert!(wanted(true, &[]));
        assert!(wanted(
            false,
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]
        ));
        assert!(wanted(
            false,
            &[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://c:4318/v1/traces"
            )]
        ));
        assert!(!wanted(false, &[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]));
        assert!(!wanted(true, &[("OTEL_SDK_DISABLED", "TRUE")]));
        assert!(!wanted(true, &[("OTEL_TRACES_EXPORTER", "none")]));
        assert!(wanted(true, &[("OTEL_SDK_DISABLED", "false")]));
    }

    #[test]
    fn a_sampler_the_sdk_would_ignore_is_named() {
        let problem = |env: &[(&str, &str)]| sampler_problem(env_of(env));
        assert_eq!(problem(&[]), None);
        assert_eq!(problem(&[("OTEL_TRACES_SAMPLER", "always_off")]), None);
        assert_eq!(
            problem(&[
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ]),
            None
        );
        let bogus = problem(&[("OTEL_TRACES_SAMPLER", "bogus")]).unwrap_or_default();
        assert!(bogus.contains("\"bogus\" is not a sampler"), "{bogus}");
        assert!(bogus.contains("every trace is sampled"), "{bogus}");
        let missing = problem(&[("OTEL_TRACES_SAMPLER", "traceidratio")]).unwrap_or_default();
        assert!(
            missing.contains("without OTEL_TRACES_SAMPLER_ARG"),
            "{missing}"
        );
        for (arg, says) in [("half", "a ratio of 1.0"), ("1.5", "above 1: everything")] {
            let bad = problem(&[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", arg),
            ])
            .unwrap_or_default();
            assert!(
                bad.contains("is no ratio between 0 and 1") && bad.contains(says),
                "{bad}"
            );
        }
    }
}
