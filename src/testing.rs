//! Internals the project's own tests and benches reach into: the Store's pipeline
//! statements, the registry, the in-flight table, the broker link. Not part of the API:
//! no promise of stability, hidden from the documentation. Applications use the crate root.

use std::{collections::BTreeMap, time::Duration};

use uuid::Uuid;

/// The retry delay schedules.
pub mod backoff {
    pub use crate::backoff::*;
}
/// The broker link (connect, TLS) as the engine opens it.
pub mod broker {
    pub use crate::broker::*;
}
pub use crate::actors::scheduler::Credit;
pub use crate::broker::BrokerError;
pub use crate::inflight::{Answer, InFlightTable, ReturnNote, Settled};
pub use crate::metrics::MAX_EXCHANGE_LABELS;
pub use crate::state::{AfterFailure, Delivery, FailureReason, TransitionError};
pub use crate::store::{
    establish, rescue, Claimed, DeadLetterUpdate, EngineRecord, KeyScan, MessageState, Rescued,
    RetryUpdate, EXACT_UP_TO, MIGRATION_NAMES,
};

use crate::{store::Store, OutboxMessage, StoreError};

/// The engine's own statements on a [`Store`], for tests that drive the pipeline's
/// database steps by hand (claim, settle, dead-letter) or inspect what the engine wrote.
#[allow(async_fn_in_trait, missing_docs)]
pub trait StoreInternals {
    async fn claim(
        &self,
        engine: &str,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<OutboxMessage>, StoreError>;
    async fn claim_keyed(
        &self,
        engine: &str,
        limit: u32,
        lease: Duration,
        keys: &KeyScan,
    ) -> Result<Claimed, StoreError>;
    async fn claim_keys(
        &self,
        engine: &str,
        limit: u32,
        lease: Duration,
        keys: &KeyScan,
        only: &[String],
    ) -> Result<Claimed, StoreError>;
    async fn renew_leases(
        &self,
        engine: &str,
        ids: &[Uuid],
        lease: Duration,
    ) -> Result<usize, StoreError>;
    async fn release(&self, engine: &str, ids: &[Uuid]) -> Result<usize, StoreError>;
    async fn release_all(&self, engine: &str) -> Result<usize, StoreError>;
    async fn mark_confirmed(&self, ids: &[Uuid]) -> Result<usize, StoreError>;
    async fn mark_retrying(
        &self,
        engine: &str,
        updates: &[RetryUpdate],
    ) -> Result<usize, StoreError>;
    /// The Ledger's write of acks: rows another transaction holds locked are waited for a
    /// second, then left out and returned.
    async fn record_confirmed(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError>;
    /// The Ledger's write of retries, as [`record_confirmed`](Self::record_confirmed).
    async fn record_retrying(
        &self,
        engine: &str,
        updates: &[RetryUpdate],
    ) -> Result<Vec<Uuid>, StoreError>;
    async fn move_to_dead_letters(
        &self,
        engine: &str,
        updates: &[DeadLetterUpdate],
    ) -> Result<Vec<Uuid>, StoreError>;
    async fn message_state(&self, id: Uuid) -> Result<Option<MessageState>, StoreError>;
    async fn publishers_of_confirmed(&self) -> Result<BTreeMap<String, i64>, StoreError>;
    async fn engines(&self, timeout: Duration) -> Result<Vec<EngineRecord>, StoreError>;
    fn notify_channel(&self) -> String;
    fn url(&self) -> &crate::config::SecretUrl;
}

impl StoreInternals for Store {
    async fn claim(
        &self,
        engine: &str,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        Store::claim(self, engine, limit, lease).await
    }
    async fn claim_keyed(
        &self,
        engine: &str,
        limit: u32,
        lease: Duration,
        keys: &KeyScan,
    ) -> Result<Claimed, StoreError> {
        Store::claim_keyed(self, engine, limit, lease, keys).await
    }
    async fn claim_keys(
        &self,
        engine: &str,
        limit: u32,
        lease: Duration,
        keys: &KeyScan,
        only: &[String],
    ) -> Result<Claimed, StoreError> {
        let limits = crate::store::ClaimLimits::rows(limit);
        Store::claim_keys_within(self, engine, limits, lease, keys, only).await
    }
    async fn renew_leases(
        &self,
        engine: &str,
        ids: &[Uuid],
        lease: Duration,
    ) -> Result<usize, StoreError> {
        Store::renew_leases(self, engine, ids, lease).await
    }
    async fn release(&self, engine: &str, ids: &[Uuid]) -> Result<usize, StoreError> {
        Store::release(self, engine, ids).await
    }
    async fn release_all(&self, engine: &str) -> Result<usize, StoreError> {
        Store::release_all(self, engine).await
    }
    async fn mark_confirmed(&self, ids: &[Uuid]) -> Result<usize, StoreError> {
        Store::mark_confirmed(self, ids).await
    }
    async fn mark_retrying(
        &self,
        engine: &str,
        updates: &[RetryUpdate],
    ) -> Result<usize, StoreError> {
        Store::mark_retrying(self, engine, updates).await
    }
    async fn record_confirmed(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        Store::record_confirmed(self, ids, crate::store::Locked::WaitBriefly).await
    }
    async fn record_retrying(
        &self,
        engine: &str,
        updates: &[RetryUpdate],
    ) -> Result<Vec<Uuid>, StoreError> {
        Store::record_retrying(self, engine, updates, crate::store::Locked::WaitBriefly).await
    }
    async fn move_to_dead_letters(
        &self,
        engine: &str,
        updates: &[DeadLetterUpdate],
    ) -> Result<Vec<Uuid>, StoreError> {
        Store::move_to_dead_letters(self, engine, updates).await
    }
    async fn message_state(&self, id: Uuid) -> Result<Option<MessageState>, StoreError> {
        Store::message_state(self, id).await
    }
    async fn publishers_of_confirmed(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        Store::publishers_of_confirmed(self).await
    }
    async fn engines(&self, timeout: Duration) -> Result<Vec<EngineRecord>, StoreError> {
        Store::engines(self, timeout).await
    }
    fn notify_channel(&self) -> String {
        Store::notify_channel(self)
    }
    fn url(&self) -> &crate::config::SecretUrl {
        Store::url(self)
    }
}
