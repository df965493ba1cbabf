//! # Courier: a transactional outbox relay from PostgreSQL to RabbitMQ
//!
//! Services lose messages when they write to their database and then publish to a broker:
//! the process dies in between, the broker is down, a confirm never comes. With Courier the
//! application writes its business rows **and** an outbox row in one transaction; Courier
//! publishes the row with publisher confirms (persistent, `mandatory`), marks it `confirmed`
//! only on the broker's ack, retries with backoff what was nacked, returned, timed out or
//! lost with a connection, and moves what exhausted its attempts to a dead-letter table.
//! Delivery is at least once.
//!
//! The crate is laid out like the engine:
//! - [`config`]: `config.yaml`, `COURIER_*` overrides, validation.
//! - [`redact`]: what of a URL may be logged (passwords and credential parameters never).
//! - [`state`]: the typed state machine (`Pending → InFlight → Confirmed`, `Retrying`, `Failed`).
//! - [`backoff`]: the retry delay schedule.
//! - [`message`]: the outbox row and its AMQP form.
//! - [`store`]: the database layer: the pool, migrations, and every SQL statement, one file
//!   per concern (claim, leases, settle, dead letters, stats, retention, inbox, enqueue).
//! - [`actors`]: the engine: Scheduler, Ledger, Publisher, ConfirmTracker, DeadLetter.
//! - [`Engine`] / [`EngineHandle`]: start the actors, enqueue, await outcomes, shut down.
//! - [`events`]: what the engine announces (test signals), its counters and metrics, in one place.
//! - [`inflight`]: the ConfirmTracker's table: tokens, return correlation, deadlines.
//!
//! Producers in other languages enqueue with plain SQL (see README.md, "SQL contract");
//! Rust applications call [`enqueue`] inside their own diesel-async transaction.

pub mod actors;
pub mod admin;
pub mod backoff;
pub mod broker;
pub mod cli;
pub mod config;
mod engine;
mod enqueue;
pub mod events;
pub mod inbox;
pub mod inflight;
mod lifecycle;
pub mod message;
pub mod metrics;
pub mod redact;
pub mod state;
pub mod store;
mod tls;

pub use config::Config;
pub use engine::{Engine, EngineError, EngineHandle};
pub use enqueue::{enqueue, enqueue_in};
pub use message::OutboxMessage;
pub use state::{Delivery, Status};
pub use store::{Outcome, Store, StoreError};
