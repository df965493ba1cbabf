//! Retention: removes confirmed rows older than `retention.confirmed`, so the outbox does
//! not bloat (peers' users report cleanup jobs that stall their database).
//!
//! River's cleaner shape: a trivial loop on a timer and a `run_once` that works in small
//! batches (`retention.batch_size`, `SKIP LOCKED`, oldest first) until a short batch, with a
//! small random pause between batches so maintenance never hogs the database or holds up
//! the claim and confirm statements. Dead letters are never touched: they stay until an
//! operator discards them.

use std::time::Duration;

use actix::prelude::*;
use rand::Rng;

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
}

impl Retention {
    /// A retention service over `store`.
    pub fn new(store: Store, config: RetentionConfig, signals: Signals) -> Self {
        Retention {
            store,
            config,
            signals,
            running: false,
        }
    }
}

/// Removes old confirmed rows batch by batch until a short batch. Returns the total.
pub async fn run_once(store: &Store, config: &RetentionConfig) -> Result<usize, StoreError> {
    let archive = config.mode == RetentionMode::Archive;
    let mut total = 0;
    loop {
        let n = store
            .purge_confirmed(config.confirmed, config.batch_size, archive)
            .await?;
        total += n;
        if n < config.batch_size as usize {
            if total > 0 && config.vacuum {
                store.vacuum_outbox().await?;
            }
            return Ok(total);
        }
        let pause = rand::thread_rng().gen_range(10..50);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

impl Actor for Retention {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.config.interval, |act, ctx| {
            if act.running {
                return;
            }
            act.running = true;
            let (store, config) = (act.store.clone(), act.config.clone());
            async move { run_once(&store, &config).await }
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
        let (store, config, signals) = (
            self.store.clone(),
            self.config.clone(),
            self.signals.clone(),
        );
        Box::pin(async move {
            let n = run_once(&store, &config).await?;
            signals.retention_removed(n);
            Ok(n)
        })
    }
}
