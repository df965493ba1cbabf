//! The engine's actors, one per file, each owning one resource:
//!
//! - [`scheduler`]: when to claim and how much (sweep timer, LISTEN connection, credits);
//! - [`ledger`]: the engine's side of the database: claims, outcomes written behind the
//!   publisher in batches, lease renewals;
//! - [`publisher`]: the AMQP connection and confirm channel (supervised);
//! - [`confirms`]: the in-flight table, confirm deadlines and return correlation;
//! - [`dead_letter`]: the move to `dead_letters` and the optional dead-letter exchange;
//! - [`heartbeat`]: the engine's row in the engine registry, beaten on its own connection,
//!   and the rescue of engines that stopped beating;
//!
//! and one maintenance service, [`retention`], which removes old confirmed rows.
//!
//! They talk only through the typed messages defined next to each actor.

pub mod confirms;
pub mod dead_letter;
pub mod heartbeat;
pub mod ledger;
pub mod publisher;
pub mod retention;
pub mod scheduler;
