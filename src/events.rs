//! What the engine tells the world: events on a broadcast channel, running counters and
//! the Prometheus metrics, all through [`Signals`].
//!
//! Events are announced only after the fact they report is durable (a `Confirmed` event
//! follows the committed UPDATE), so an application or a test can await a message's
//! outcome instead of sleeping (River's "test signals"). Counters feed the periodic summary
//! log, `EngineHandle::counters` and `GET /api/stats`; metrics feed `/metrics`.
//!
//! An actor reports a fact once, by name (`signals.published(..)`, `signals.failed(..)`),
//! and [`Signals`] updates whichever of the three record it: a counter and its metric can
//! never drift apart because a call site forgot one of them.

mod counters;
mod signals;

pub use counters::{CounterSnapshot, Counters};
pub use signals::Signals;

use std::sync::Arc;

use uuid::Uuid;

/// Something that happened in the engine.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    /// A publishing connection opened (or reopened): one per `publisher.connections`.
    BrokerConnected,
    /// A publishing connection was lost; its unconfirmed messages go back to `retrying`
    /// (the engine is disconnected once none is left, see [`BrokerState`]).
    BrokerDisconnected(String),
    /// The broker blocked publishers (memory or disk alarm).
    BrokerBlocked(String),
    /// The broker unblocked publishers.
    BrokerUnblocked,
    /// The LISTEN self-check finished: `receiving` is false behind a pooler that drops
    /// notifications (the engine then relies on the sweep). Sent again, `true`, when a
    /// reconnected listener whose first check was late receives a later one.
    ListenerReady {
        /// Whether the engine's own NOTIFY came back.
        receiving: bool,
    },
    /// Rows were claimed.
    Claimed(usize),
    /// Messages were written to the broker (confirms pending).
    Published(usize),
    /// These messages are durably `confirmed`.
    Confirmed(Arc<Vec<Uuid>>),
    /// These messages are durably `retrying`, with the reason.
    Retrying(Arc<Vec<(Uuid, String)>>),
    /// These messages are durably in `dead_letters`, with the reason.
    DeadLettered(Arc<Vec<(Uuid, String)>>),
    /// The engine stopped claiming and is draining.
    ShuttingDown,
}

/// The broker link: connected while one of the publishing connections is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerState {
    /// No connection.
    Disconnected,
    /// Connected and accepting publishes.
    Connected,
    /// Connected but blocked by a broker alarm (memory or disk).
    Blocked,
}

impl BrokerState {
    /// The name `GET /api/stats` and the dashboard show.
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerState::Disconnected => "disconnected",
            BrokerState::Connected => "connected",
            BrokerState::Blocked => "blocked",
        }
    }

    fn from_u8(n: u8) -> BrokerState {
        match n {
            1 => BrokerState::Connected,
            2 => BrokerState::Blocked,
            _ => BrokerState::Disconnected,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            BrokerState::Disconnected => 0,
            BrokerState::Connected => 1,
            BrokerState::Blocked => 2,
        }
    }
}
