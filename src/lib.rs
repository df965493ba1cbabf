//! # Courier: a transactional outbox relay from PostgreSQL to RabbitMQ
//!
//! Services lose messages when they write to their database and then publish to a broker:
//! the process dies in between, the broker is down, a confirm never comes. With Courier the
//! application writes its business rows **and** an outbox row in one transaction; Courier
//! publishes the row with publisher confirms (persistent, `mandatory`), marks it `confirmed`
//! only on the broker's ack, retries with backoff what was nacked, returned, timed out or
//! lost with a connection, and moves what exhausted its attempts to a dead-letter table.
//! Delivery is at least once; the [`inbox`] makes consuming effectively once.
//!
//! ## Three ways to use it
//!
//! **A standalone engine.** `courier run` with a `config.yaml` (see README.md for every
//! key): producers in any language write rows with plain SQL (README.md, "SQL contract").
//! This crate's [`cli`] is that binary's entry point.
//!
//! **Embedded in an application.** Start an [`Engine`] inside your actix or tokio
//! application, enqueue inside your own transaction, and await outcomes:
//!
//! ```no_run
//! use std::{path::Path, time::Duration};
//!
//! use courier::{enqueue_in, Config, Engine, OutboxMessage, StoreError};
//! use diesel_async::AsyncConnection;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let engine = Engine::start(Config::load(Path::new("config.yaml"))?).await?;
//! let event = OutboxMessage::new("billing", "invoice.created", br#"{"id":42}"#.to_vec());
//! let id = event.id;
//! let schema = engine.store().schema().to_string();
//! let mut conn = engine.store().conn().await?;
//! conn.transaction::<(), StoreError, _>(async |tx| {
//!     // ... the application's own rows, then, in the same transaction:
//!     enqueue_in(tx, &schema, &event).await
//! })
//! .await?;
//! engine.nudge(); // publish now, not at the next notification
//! let outcome = engine.wait_for(id, Duration::from_secs(5)).await?;
//! println!("{id}: {outcome:?}");
//! engine.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! [`admin::start`] serves the same HTTP API and dashboard as the standalone engine.
//!
//! **Load-tested.** `cargo bench` runs the Criterion benches (`benches/engine.rs`: throughput
//! and commit→confirmed latency through a real engine) and the side-by-side comparison
//! against raw lapin (`benches/side_by_side.rs`); README.md has the figures and the method.
//!
//! ## What is public
//! [`Engine`] and [`EngineHandle`], [`Config`] and its sections ([`config`]),
//! [`OutboxMessage`], [`enqueue`] / [`enqueue_in`] and [`migrate`], the outcomes and events
//! ([`Outcome`], [`Status`], [`EngineEvent`], [`BrokerState`], [`CounterSnapshot`]), the
//! [`Store`] handle (a pool on the outbox schema: enqueue, stats, dead letters), the
//! consumer [`inbox`], the [`admin`] server and the [`cli`]. Everything else is the engine's
//! own: actors, SQL, the in-flight table, metrics. Its tests reach what they need through
//! [`testing`], which makes no promise of stability.

#![warn(missing_docs)]

pub mod admin;
pub mod cli;
pub mod config;
pub mod inbox;
pub mod telemetry;
#[doc(hidden)]
pub mod testing;

mod actors;
mod backoff;
mod broker;
mod engine;
mod enqueue;
mod events;
mod inflight;
mod lifecycle;
mod message;
mod metrics;
mod redact;
mod state;
mod store;
mod tls;

pub use config::Config;
pub use engine::{Engine, EngineError, EngineHandle};
pub use enqueue::{enqueue, enqueue_in};
pub use events::{BrokerState, CounterSnapshot, EngineEvent};
pub use message::OutboxMessage;
pub use state::{Status, UnknownStatus};
pub use store::{migrate, DeadLetter, Outcome, Stats, Store, StoreError};
