//! Retention: removes confirmed rows older than `retention.confirmed`, so the outbox does
//! not bloat (peers' users report cleanup jobs that stall their database).
//!
//! River's cleaner shape: a trivial loop on a timer and a `run_once` that works in small
//! batches (`retention.batch_size`, `SKIP LOCKED`, oldest first) until a short batch, with a
//! small random pause between batches so maintenance never hogs the database or holds up
//! the claim and confirm statements. Dead letters are never touched: they stay until an
//! operator discards them.
//!
//! A confirmed row another table references by foreign key cannot go, and a batch that
//! holds one fails whole, every run. So a refused batch is removed one row at a time, and
//! the rows the key refuses are left out of the batches ([`Kept`]) for an hour, so the rows
//! behind them go.

use std::{
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use actix::prelude::*;
use rand::Rng;
use uuid::Uuid;

use crate::{
    config::{RetentionConfig, RetentionMode},
    events::Signals,
    store::{Store, StoreError},
};

/// Run retention now (tests and tools); answers with the rows removed.
#[derive(Message)]
#[rtype(result = "Result<usize, StoreError>")]
pub struct RunRetention;

/// See the module documentation.
pub struct Retention {
    store: Store,
    config: RetentionConfig,
    signals: Signals,
    running: bool,
    kept: Arc<Mutex<Kept>>,
}

impl Retention {
    /// A retention service over `store`.
    pub fn new(store: Store, config: RetentionConfig, signals: Signals) -> Self {
        Retention {
            store,
            config,
            signals,
            running: false,
            kept: Arc::default(),
        }
    }
}

/// Confirmed rows a foreign key kept in the outbox (another table references them), left out
/// of retention's batches so that the rows beside them go; tried again after [`KEPT_FOR`].
#[derive(Default)]
pub struct Kept {
    ids: Vec<Uuid>,
    since: Option<Instant>,
}

/// How long rows a foreign key held are left out before retention tries them again.
const KEPT_FOR: Duration = Duration::from_secs(3600);

/// Rows left out at most; past it a batch a foreign key refuses fails the run, as before.
const MAX_KEPT: usize = 10_000;

impl Kept {
    /// The ids to leave out now (none once they have been left out for [`KEPT_FOR`]).
    fn current(&mut self) -> Vec<Uuid> {
        if self.since.is_some_and(|since| since.elapsed() >= KEPT_FOR) {
            *self = Kept::default();
        }
        self.ids.clone()
    }

    fn keep(&mut self, ids: Vec<Uuid>) {
        if self.since.is_none() && !ids.is_empty() {
            self.since = Some(Instant::now());
        }
        self.ids = ids;
    }
}

/// Removes old confirmed rows batch by batch until a short batch. Returns the total.
pub async fn run_once(
    store: &Store,
    config: &RetentionConfig,
    kept: &Mutex<Kept>,
) -> Result<usize, StoreError> {
    let mut skip = lock(kept).current();
    let result = purge(store, config, &mut skip).await;
    lock(kept).keep(skip);
    result
}

fn lock(kept: &Mutex<Kept>) -> MutexGuard<'_, Kept> {
    kept.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn purge(
    store: &Store,
    config: &RetentionConfig,
    skip: &mut Vec<Uuid>,
) -> Result<usize, StoreError> {
    let archive = config.mode == RetentionMode::Archive;
    let mut total = 0;
    loop {
        let (removed, examined) = match store
            .purge_confirmed(config.confirmed, config.batch_size, archive, skip)
            .await
        {
            Ok(n) => (n, n),
            Err(e) if e.is_foreign_key_violation() && skip.len() < MAX_KEPT => {
                one_at_a_time(store, config, archive, skip).await?
            }
            Err(e) => return Err(e),
        };
        total += removed;
        if examined < config.batch_size as usize {
            if total > 0 && config.vacuum {
                store.vacuum_outbox().await?;
            }
            return Ok(total);
        }
        let pause = rand::thread_rng().gen_range(10..50);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// A foreign key refused the batch: its rows one at a time, each one the key refuses added
/// to `skip`. Returns the rows removed and the rows the batch held.
async fn one_at_a_time(
    store: &Store,
    config: &RetentionConfig,
    archive: bool,
    skip: &mut Vec<Uuid>,
) -> Result<(usize, usize), StoreError> {
    let ids = store
        .old_confirmed_ids(config.confirmed, config.batch_size, skip)
        .await?;
    let mut removed = 0;
    let mut refused = 0;
    for id in &ids {
        match store.purge_one(*id, archive).await {
            Ok(gone) => removed += usize::from(gone),
            Err(e) if e.is_foreign_key_violation() && skip.len() < MAX_KEPT => {
                skip.push(*id);
                refused += 1;
            }
            Err(e) => return Err(e),
        }
    }
    tracing::warn!(
        refused,
        kept = skip.len(),
        "retention: a foreign key refused removing confirmed rows another table references \
         (a reference to outbox.id); they stay, and are tried again within the hour"
    );
    Ok((removed, ids.len()))
}

impl Actor for Retention {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.config.interval, |act, ctx| {
            if act.running {
                return;
            }
            act.running = true;
            let (store, config, kept) = (act.store.clone(), act.config.clone(), act.kept.clone());
            async move { run_once(&store, &config, &kept).await }
                .into_actor(act)
                .map(|result, act, _| {
                    act.running = false;
                    match result {
                        Ok(0) => {}
                        Ok(n) => {
                            act.signals.retention_removed(n);
                            tracing::info!(
                                removed = n,
                                mode = act.config.mode.as_str(),
                                "retention"
                            );
                        }
                        Err(e) => tracing::warn!(error = %e, "retention failed; next run retries"),
                    }
                })
                .spawn(ctx);
        });
    }
}

impl Handler<RunRetention> for Retention {
    type Result = ResponseFuture<Result<usize, StoreError>>;

    fn handle(&mut self, _: RunRetention, _: &mut Context<Self>) -> Self::Result {
        let (store, config, signals, kept) = (
            self.store.clone(),
            self.config.clone(),
            self.signals.clone(),
            self.kept.clone(),
        );
        Box::pin(async move {
            let n = run_once(&store, &config, &kept).await?;
            signals.retention_removed(n);
            Ok(n)
        })
    }
}
