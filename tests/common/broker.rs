//! A test's own exchange and queue on the real RabbitMQ, deleted afterwards.

use std::{collections::HashMap, time::Duration};

use futures::StreamExt;
use lapin::{
    options::{
        BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
};
use uuid::Uuid;

use super::{broker_url, unique_name, within};

/// One delivery as a consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: Uuid,
    pub routing_key: String,
    pub payload: Vec<u8>,
    pub properties: BasicProperties,
}

/// A topic exchange bound to one queue with `routed.#`: routing keys starting with
/// `routed.` arrive, anything else is unroutable.
pub struct TestBroker {
    pub conn: Connection,
    pub channel: Channel,
    pub exchange: String,
    pub queue: String,
    extra_exchanges: Vec<String>,
    extra_queues: Vec<String>,
    /// The node this guard talks to (the main broker unless made with [`TestBroker::at`]).
    url: String,
}

impl TestBroker {
    pub async fn new(prefix: &str) -> TestBroker {
        Self::at(&broker_url(), prefix, FieldTable::default()).await
    }

    /// On the broker at `url`, its queue declared with `queue_args` (e.g. a quorum queue).
    pub async fn at(url: &str, prefix: &str, queue_args: FieldTable) -> TestBroker {
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = conn.create_channel().await.expect("channel");
        let exchange = unique_name(prefix);
        let queue = format!("{exchange}.q");
        let broker = TestBroker {
            conn,
            channel,
            exchange: exchange.clone(),
            queue: queue.clone(),
            extra_exchanges: Vec::new(),
            extra_queues: Vec::new(),
            url: url.to_string(),
        };
        broker
            .declare_exchange(&exchange, ExchangeKind::Topic)
            .await;
        broker.declare_queue(&queue, queue_args).await;
        broker.bind(&queue, &exchange, "routed.#").await;
        broker
    }

    /// Durable, so a broker restart in a fault test keeps it.
    pub async fn declare_exchange(&self, name: &str, kind: ExchangeKind) {
        let options = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        self.channel
            .exchange_declare(name.into(), kind, options, FieldTable::default())
            .await
            .expect("declare exchange");
    }

    /// Durable, so persistent messages survive a broker restart in a fault test.
    pub async fn declare_queue(&self, name: &str, args: FieldTable) {
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        self.channel
            .queue_declare(name.into(), options, args)
            .await
            .expect("declare queue");
    }

    pub async fn bind(&self, queue: &str, exchange: &str, key: &str) {
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
    }

    /// Another exchange (deleted with the broker guard).
    pub async fn extra_exchange(&mut self, suffix: &str, kind: ExchangeKind) -> String {
        let name = format!("{}.{suffix}", self.exchange);
        self.declare_exchange(&name, kind).await;
        self.extra_exchanges.push(name.clone());
        name
    }

    /// `<exchange>.internal`, an internal topic exchange: the broker refuses every publish
    /// to it with a channel close (403), whatever the permissions. Deleted with the guard.
    pub async fn internal_exchange(&mut self) -> String {
        let name = format!("{}.internal", self.exchange);
        let options = ExchangeDeclareOptions {
            durable: true,
            internal: true,
            ..Default::default()
        };
        self.channel
            .exchange_declare(
                name.as_str().into(),
                ExchangeKind::Topic,
                options,
                FieldTable::default(),
            )
            .await
            .expect("declare internal exchange");
        self.extra_exchanges.push(name.clone());
        name
    }

    /// An exchange declared elsewhere, deleted with the broker guard.
    pub fn adopt_exchange(&mut self, name: &str) {
        self.extra_exchanges.push(name.to_string());
    }

    /// A queue declared elsewhere, deleted with the broker guard.
    pub fn adopt_queue(&mut self, name: &str) {
        self.extra_queues.push(name.to_string());
    }

    /// Another queue (deleted with the broker guard).
    pub async fn extra_queue(&mut self, suffix: &str, args: FieldTable) -> String {
        let name = format!("{}.{suffix}", self.exchange);
        self.declare_queue(&name, args).await;
        self.extra_queues.push(name.clone());
        name
    }

    /// Puts a message whose `message_id` is not UTF-8 (`bad-\xff`) straight into `queue`,
    /// through the broker's own Erlang shell: AMQP allows any bytes in a short string, and
    /// RabbitMQ passes them on, but no client library here can send them.
    pub fn publish_unparsable(&self, queue: &str) {
        let props = "{'P_basic', undefined, undefined, undefined, 2, undefined, undefined, \
                     undefined, undefined, <<\"bad-\", 255>>, undefined, undefined, undefined, \
                     undefined, undefined}";
        let expr = format!(
            "rabbit_basic:publish(rabbit_misc:r(<<\"/\">>, exchange, <<\"\">>), \
             <<\"{queue}\">>, {props}, <<\"body\">>)."
        );
        super::user::rabbitmqctl(&["eval", &expr]);
    }

    /// A queue that nacks every publish: max length 0 with reject-publish overflow.
    pub async fn nacking_queue(&mut self, exchange: &str) -> String {
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongInt(0));
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        let q = self.extra_queue("nack", args).await;
        self.bind(&q, exchange, "#").await;
        q
    }

    /// A fresh connection (the setup one may have died with a broker restart).
    async fn fresh(&self) -> Connection {
        Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ")
    }

    /// Ready messages in `queue`.
    pub async fn depth(&self, queue: &str) -> u32 {
        let conn = self.fresh().await;
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        q.message_count()
    }

    /// Consumes exactly `n` messages from `queue` (auto-ack), failing after `secs`.
    pub async fn take(&self, queue: &str, n: usize, secs: u64) -> Vec<Received> {
        let conn = self.fresh().await;
        let ch = conn.create_channel().await.expect("channel");
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut got = Vec::with_capacity(n);
        within(secs, &format!("{n} messages from {queue}"), async {
            while got.len() < n {
                let d = consumer
                    .next()
                    .await
                    .expect("consumer open")
                    .expect("delivery");
                let id = d
                    .properties
                    .message_id()
                    .as_ref()
                    .and_then(|s| Uuid::parse_str(s.as_str()).ok())
                    .expect("message_id is a uuid");
                got.push(Received {
                    id,
                    routing_key: d.routing_key.to_string(),
                    payload: d.data.clone(),
                    properties: d.properties.clone(),
                });
            }
        })
        .await;
        let _ = conn.close(200, "done".into()).await;
        got
    }
}

/// Counts of each id; asserts none twice.
pub fn assert_once(received: &[Received]) -> HashMap<Uuid, &Received> {
    let mut seen = HashMap::new();
    for r in received {
        assert!(
            seen.insert(r.id, r).is_none(),
            "message {} delivered twice",
            r.id
        );
    }
    seen
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let mut exchanges = self.extra_exchanges.clone();
        exchanges.push(self.exchange.clone());
        let mut queues = self.extra_queues.clone();
        queues.push(self.queue.clone());
        let url = self.url.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let Ok(Ok(conn)) = tokio::time::timeout(
                    Duration::from_secs(5),
                    Connection::connect(&url, ConnectionProperties::default()),
                )
                .await
                else {
                    return;
                };
                if let Ok(ch) = conn.create_channel().await {
                    for q in queues {
                        let _ = ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                    for e in exchanges {
                        let _ = ch
                            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                            .await;
                    }
                }
                let _ = conn.close(200, "bye".into()).await;
            });
        })
        .join();
    }
}
