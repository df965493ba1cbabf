//! OpenTelemetry traces, exported to a small OTLP/HTTP receiver inside the test: a
//! message's spans (claim, publish, confirm; dead letter) share the trace id its producer
//! wrote in `headers.traceparent`, the published message carries the engine's `publish`
//! span to the consumer, and the inbox continues the same trace. The binary turns traces on
//! from the standard `OTEL_*` variables, and a collector that never answers neither slows
//! delivery nor holds the exit.

mod common;

use std::{
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use common::{broker::TestBroker, eventually, within, EngineProcess, TestDb};
use courier::{
    config::{OtlpProtocol, SecretUrl, TelemetryConfig},
    inbox::{Disposition, Inbox, InboxConfig, InboxMessage},
    telemetry::Traces,
    Engine, OutboxMessage, Outcome,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(30);

/// The spans a receiver was sent, as OTLP/JSON span objects (with the resource's
/// `service.name` copied into `service`).
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Value>>>);

impl Received {
    fn spans(&self) -> Vec<Value> {
        self.0.lock().expect("receiver lock").clone()
    }

    fn of_trace(&self, trace_id: &str) -> Vec<Value> {
        self.spans()
            .into_iter()
            .filter(|s| s["traceId"].as_str() == Some(trace_id))
            .collect()
    }

    fn record(&self, body: &[u8]) {
        let Ok(doc) = serde_json::from_slice::<Value>(body) else {
            return;
        };
        let mut spans = self.0.lock().expect("receiver lock");
        for rs in doc["resourceSpans"].as_array().into_iter().flatten() {
            let service = rs["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .and_then(|a| a["value"]["stringValue"].as_str())
                .unwrap_or_default()
                .to_string();
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for span in ss["spans"].as_array().into_iter().flatten() {
                    let mut span = span.clone();
                    span["service"] = Value::String(service.clone());
                    spans.push(span);
                }
            }
        }
    }
}

/// An OTLP/HTTP receiver on a free port (JSON bodies; keep-alive connections): answers
/// every POST with 200 and records its spans.
async fn receiver() -> (String, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let received = Received::default();
    let sink = received.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    // One request: headers, then Content-Length bytes of body.
                    let (head_end, length) = loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                            let length = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (end + 4, length);
                        }
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    while buf.len() < head_end + length {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    sink.record(&buf[head_end..head_end + length]);
                    buf.drain(..head_end + length);
                    let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                    if sock.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, received)
}

/// The process's one tracer provider (it is global), exporting to one receiver.
struct Exporting {
    traces: Traces,
    received: Received,
}

static EXPORTING: OnceLock<Exporting> = OnceLock::new();

/// Installs the provider once for this test binary, on a runtime of its own that outlives
/// every test (the receiver must keep answering).
fn exporting() -> &'static Exporting {
    EXPORTING.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            let (url, received) = rt.block_on(receiver());
            tx.send((url, received)).expect("send receiver");
            rt.block_on(std::future::pending::<()>());
        });
        let (url, received) = rx.recv().expect("receiver started");
        let config = TelemetryConfig {
            traces: true,
            endpoint: Some(url),
            protocol: Some(OtlpProtocol::HttpJson),
            service_name: Some("courier-test".into()),
        };
        let traces = std::thread::spawn(move || Traces::install(&config))
            .join()
            .expect("install thread")
            .expect("install traces");
        Exporting { traces, received }
    })
}

/// A random W3C trace id and span id, as the producer's `traceparent`.
fn producer_context() -> (String, String, String) {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
    let header = format!("00-{trace}-{span}-01");
    (trace, span, header)
}

fn named<'a>(spans: &'a [Value], name: &str) -> &'a Value {
    spans
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no span {name} in {spans:#?}"))
}

fn attribute<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
}

/// Waits until the spans of `trace` include every name in `names`.
async fn spans_of(trace: &str, names: &[&str]) -> Vec<Value> {
    let exporting = exporting();
    eventually(20, &format!("spans {names:?} of trace {trace}"), || {
        exporting.traces.flush();
        let spans = exporting.received.of_trace(trace);
        let all = names.iter().all(|n| spans.iter().any(|s| s["name"] == *n));
        async move { all.then_some(spans) }
    })
    .await
}

/// An inbox handler that applies nothing.
fn apply<'a>(
    _: &'a mut diesel_async::AsyncPgConnection,
    _: &'a InboxMessage,
) -> futures::future::BoxFuture<'a, Result<(), courier::inbox::HandlerError>> {
    Box::pin(async { Ok(()) })
}

#[actix_rt::test]
async fn a_message_is_traced_from_its_producer_through_the_engine_to_the_inbox() {
    exporting();
    let db = TestDb::new("traces").await;
    let broker = TestBroker::new("traces").await;
    let mut config = db.engine_config();
    config.telemetry.traces = true;
    let engine = Engine::start(config.clone()).await.expect("engine starts");

    let (trace, producer_span, traceparent) = producer_context();
    let traced = OutboxMessage::new(&broker.exchange, "routed.traced", b"x".to_vec())
        .with_header("traceparent", traceparent.as_str())
        .with_header("tenant", "a");
    let untraced = OutboxMessage::new(&broker.exchange, "routed.plain", b"y".to_vec());
    engine
        .store()
        .enqueue_many(&[traced.clone(), untraced.clone()])
        .await
        .expect("enqueue");
    let outcomes = engine
        .wait_for_all(&[traced.id, untraced.id], WAIT)
        .await
        .expect("settled");
    assert!(
        outcomes.values().all(|o| *o == Outcome::Confirmed),
        "{outcomes:?}"
    );

    let publish_name = format!("publish {}", broker.exchange);
    let spans = spans_of(&trace, &[&publish_name, "claim", "confirm"]).await;
    let publish = named(&spans, &publish_name);
    assert_eq!(
        publish["parentSpanId"],
        producer_span.as_str(),
        "{publish:#}"
    );
    assert_eq!(publish["kind"], 4, "a producer span: {publish:#}");
    assert_eq!(publish["service"], "courier-test");
    let publish_id = publish["spanId"].as_str().expect("span id").to_string();
    for child in ["claim", "confirm"] {
        assert_eq!(named(&spans, child)["parentSpanId"], publish_id.as_str());
    }
    assert_eq!(
        attribute(publish, "messaging.message.id").and_then(|v| v["stringValue"].as_str()),
        Some(traced.id.to_string().as_str())
    );
    assert_eq!(
        attribute(publish, "courier.outcome").and_then(|v| v["stringValue"].as_str()),
        Some("confirmed")
    );

    // The consumer gets the engine's span as its parent; the producer's other headers stay.
    let got = broker.take(&broker.queue, 2, 20).await;
    let delivered = got
        .iter()
        .find(|r| r.id == traced.id)
        .expect("traced delivered");
    let headers = delivered.properties.headers().clone().expect("headers");
    let header = |key: &str| {
        headers
            .inner()
            .iter()
            .find(|(k, _)| k.as_str() == key)
            .and_then(|(_, v)| match v {
                lapin::types::AMQPValue::LongString(s) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                _ => None,
            })
            .unwrap_or_default()
    };
    assert_eq!(header("traceparent"), format!("00-{trace}-{publish_id}-01"));
    assert_eq!(header("tenant"), "a", "{headers:?}");
    assert!(
        !headers.inner().keys().any(|k| k.as_str() == "tracestate"),
        "{headers:?}"
    );
    // A row without a traceparent starts a trace of its own.
    let plain = got
        .iter()
        .find(|r| r.id == untraced.id)
        .expect("plain delivered");
    let plain_headers = plain
        .properties
        .headers()
        .clone()
        .expect("engine's traceparent");
    assert!(format!("{plain_headers:?}").contains("traceparent"));

    // The inbox continues the trace.
    let mut inbox_config = InboxConfig::new("traced-consumer", &broker.queue);
    inbox_config.traces = true;
    let broker_config = courier::config::BrokerConfig {
        url: SecretUrl::new(common::broker_url()).into(),
        ..Default::default()
    };
    let inbox = Inbox::new(engine.store().clone(), broker_config, inbox_config);
    let message = InboxMessage {
        message_id: traced.id.to_string(),
        exchange: broker.exchange.clone(),
        routing_key: delivered.routing_key.clone(),
        payload: delivered.payload.clone(),
        properties: delivered.properties.clone(),
        redelivered: false,
    };
    let applied = inbox.process(&apply, &message).await.expect("processed");
    assert_eq!(applied, Disposition::Applied);
    let process_name = format!("process {}", broker.queue);
    let spans = spans_of(&trace, &[&process_name]).await;
    let process = named(&spans, &process_name);
    assert_eq!(process["parentSpanId"], publish_id.as_str(), "{process:#}");
    assert_eq!(process["kind"], 5, "a consumer span: {process:#}");
    engine.shutdown().await;
}

#[actix_rt::test]
async fn a_dead_lettered_message_ends_its_trace_with_a_dead_letter_span() {
    exporting();
    let db = TestDb::new("tracesdl").await;
    let broker = TestBroker::new("tracesdl").await;
    let mut config = db.engine_config();
    config.telemetry.traces = true;
    config.retry.max_attempts = 1;
    let engine = Engine::start(config).await.expect("engine starts");
    let (trace, _, traceparent) = producer_context();
    let missing = format!("{}.missing", broker.exchange);
    let doomed = OutboxMessage::new(&missing, "k", b"x".to_vec())
        .with_header("traceparent", traceparent.as_str());
    engine.store().enqueue(&doomed).await.expect("enqueue");
    let outcome = engine.wait_for(doomed.id, WAIT).await.expect("settled");
    assert!(matches!(outcome, Outcome::DeadLettered(_)), "{outcome:?}");
    let publish_name = format!("publish {missing}");
    let spans = spans_of(&trace, &[&publish_name, "dead letter"]).await;
    let publish = named(&spans, &publish_name);
    assert_eq!(
        attribute(publish, "courier.outcome").and_then(|v| v["stringValue"].as_str()),
        Some("dead_lettered"),
        "{publish:#}"
    );
    assert_eq!(publish["status"]["code"], 2, "an error status: {publish:#}");
    let dead = named(&spans, "dead letter");
    assert_eq!(dead["parentSpanId"], publish["spanId"]);
    engine.shutdown().await;
}

/// `courier run` with the standard variables: OTEL_EXPORTER_OTLP_ENDPOINT turns traces
/// on, OTEL_EXPORTER_OTLP_PROTOCOL and OTEL_SERVICE_NAME are honoured.
#[actix_rt::test]
async fn the_binary_exports_as_the_standard_otel_variables_say() {
    let (url, received) = receiver().await;
    let db = TestDb::new("tracesenv").await;
    let broker = TestBroker::new("tracesenv").await;
    let mut env = db.process_env();
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", url));
    env.push(("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json".into()));
    env.push(("OTEL_SERVICE_NAME", "billing-relay".into()));
    env.push(("OTEL_BSP_SCHEDULE_DELAY", "100".into()));
    let mut engine = EngineProcess::spawn("tracesenv", &env);
    let (trace, _, traceparent) = producer_context();
    let m = OutboxMessage::new(&broker.exchange, "routed.env", b"x".to_vec())
        .with_header("traceparent", traceparent.as_str());
    db.store().await.enqueue(&m).await.expect("enqueue");
    let publish_name = format!("publish {}", broker.exchange);
    let spans = eventually(30, "the binary's spans", || {
        let spans = received.of_trace(&trace);
        let seen = spans.iter().any(|s| s["name"] == publish_name.as_str());
        async move { seen.then_some(spans) }
    })
    .await;
    assert!(
        spans.iter().all(|s| s["service"] == "billing-relay"),
        "{spans:#?}"
    );
    let status = engine.terminate(20).await;
    assert!(status.success(), "{}", engine.log());
}

/// A collector that accepts connections and never answers: every row is still delivered,
/// and the engine still exits promptly on SIGTERM.
#[actix_rt::test]
async fn a_dead_collector_neither_slows_delivery_nor_holds_the_exit() {
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", hole.local_addr().expect("addr"));
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = hole.accept().await {
            keep.lock().expect("lock").push(sock); // accepted, never read or answered
        }
    });
    let db = TestDb::new("tracesdead").await;
    let broker = TestBroker::new("tracesdead").await;
    let mut env = db.process_env();
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", url));
    env.push(("OTEL_BSP_SCHEDULE_DELAY", "50".into()));
    env.push(("OTEL_BSP_MAX_QUEUE_SIZE", "256".into()));
    let mut engine = EngineProcess::spawn("tracesdead", &env);
    let ids = db.insert_sql(&broker.exchange, 3_000, "routed.{i}").await;
    let (db, n) = (&db, ids.len() as i64);
    eventually(
        60,
        "3,000 rows confirmed past a dead collector",
        move || async move { (db.count(courier::Status::Confirmed).await >= n).then_some(()) },
    )
    .await;
    assert!(
        !held.lock().expect("lock").is_empty(),
        "the exporter never tried"
    );
    let status = within(
        15,
        "exit on SIGTERM with a dead collector",
        engine.terminate(15),
    )
    .await;
    assert!(status.success(), "{}", engine.log());
}
