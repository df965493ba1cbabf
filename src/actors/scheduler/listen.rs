//! The LISTEN side of immediate dispatch, owned by the Scheduler.
//!
//! `notifications_stream` borrows its connection for as long as it is read, so LISTEN gets
//! a dedicated connection outside the pool. At start the listener sends itself a NOTIFY and
//! waits for it: behind a transaction-mode pooler (PgBouncer) LISTEN succeeds but nothing
//! ever arrives, and the only symptom would be latency. When the check fails the engine
//! says so loudly and the sweep carries the load. A lost connection is re-established; the
//! sweep covers the gap.
//!
//! A connection to a frozen server (a primary that stopped answering, after a failover to
//! its standby) is not lost as far as TCP can tell: notifications simply stop. So while
//! notifications are known to arrive (on this connection or, after a reconnection, on an
//! earlier one), the listener repeats its self-check every
//! [`RECHECK_EVERY`] through the pool (which reaches whichever host answers now), and a
//! check that does not come back within [`RECHECK_WAIT`] of being sent ends the connection,
//! which is then made again from the URL's first host that answers. A check whose NOTIFY
//! could not be sent (the database down or frozen for everyone) is not held against the
//! connection (an outside audit saw a working LISTEN connection dropped 5 s after a 20 s
//! freeze of the whole server had ended, for a check sent into the freeze); the next check
//! goes at the next tick instead.
//!
//! The reconnection is tried every second; through a database outage each try fails, so
//! the loss is said once at WARN, again once a minute while it lasts, and the return with
//! how long it took (an outside audit saw one WARN a second for a whole outage).

use std::time::Duration;

use actix::prelude::*;
use diesel_async::SimpleAsyncConnection;
use futures::StreamExt;

use super::{Scheduler, Wake};
use crate::{
    events::Signals,
    store::{establish, Store, StoreError, NOTIFY_KEYED},
};

const SELF_CHECK_WAIT: Duration = Duration::from_secs(2);
const RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// How often a receiving listener checks that its own NOTIFY still comes back.
const RECHECK_EVERY: Duration = Duration::from_secs(15);
/// How long a repeated self-check may take before the connection is presumed dead.
const RECHECK_WAIT: Duration = Duration::from_secs(10);
/// How often a lasting loss of the LISTEN connection is said again at WARN.
const STILL_LOST_EVERY: Duration = Duration::from_secs(60);

/// Starts the listener task; it ends when the Scheduler stops.
pub fn start(ctx: &mut Context<Scheduler>, store: Store, engine_id: String, signals: Signals) {
    let addr = ctx.address();
    actix::spawn(async move {
        let mut past = Past::First;
        let mut outage = Outage::default();
        while addr.connected() {
            if let Err(e) =
                listen(&addr, &store, &engine_id, &signals, &mut past, &mut outage).await
            {
                match outage.failed(std::time::Instant::now()) {
                    Say::Lost => {
                        tracing::warn!(error = %e, "LISTEN connection lost; relying on the sweep until it is back")
                    }
                    Say::StillLost(since) => tracing::warn!(
                        error = %e,
                        "LISTEN connection still lost after {}; relying on the sweep, trying again every {}",
                        humantime::format_duration(whole_seconds(since)),
                        humantime::format_duration(RECONNECT_DELAY)
                    ),
                    Say::Quiet => {
                        tracing::debug!(error = %e, "LISTEN connection not made again yet")
                    }
                }
            }
            tokio::time::sleep(RECONNECT_DELAY).await;
        }
    });
}

async fn listen(
    addr: &Addr<Scheduler>,
    store: &Store,
    engine_id: &str,
    signals: &Signals,
    past: &mut Past,
    outage: &mut Outage,
) -> Result<(), StoreError> {
    let channel = store.notify_channel();
    let mut conn = establish(store.url(), Duration::from_secs(10)).await?;
    conn.batch_execute(&format!("LISTEN \"{channel}\"")).await?;
    let lost_for = outage
        .over()
        .map(|d| humantime::format_duration(whole_seconds(d)).to_string());
    let token = format!("self-check:{engine_id}:{}", uuid::Uuid::new_v4());
    store.notify(&token).await?;
    let mut stream = Box::pin(conn.notifications_stream());

    let receiving = tokio::time::timeout(SELF_CHECK_WAIT, async {
        while let Some(note) = stream.next().await {
            match note {
                Ok(n) if n.payload == token => return true,
                Ok(n) => addr.do_send(wake_for(&n.payload)),
                Err(_) => return false,
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    let before = *past;
    if receiving {
        *past = Past::Received;
    } else if before == Past::First {
        *past = Past::NeverReceived;
    }
    match (receiving, before) {
        // Its loss was a warning: its return is said too, or the log ends on the loss.
        (true, Past::Received) => tracing::info!(
            %channel,
            lost_for = lost_for.as_deref().unwrap_or("0s"),
            "LISTEN connection back; notifications arrive again"
        ),
        (true, _) => tracing::debug!(%channel, "LISTEN self-check received"),
        (false, Past::First) => tracing::warn!(
            %channel,
            "LISTEN self-check: this engine's own NOTIFY never arrived. A transaction-mode \
             connection pooler between Courier and PostgreSQL drops notifications. Falling \
             back to the sweep (scheduler.sweep_interval); set database.listen: false to \
             silence this"
        ),
        (false, Past::Received) => tracing::warn!(
            %channel,
            "LISTEN connection made again, but its self-check did not come back within {}; \
             relying on the sweep and checking again",
            humantime::format_duration(SELF_CHECK_WAIT)
        ),
        (false, Past::NeverReceived) => {}
    }
    signals.listener_ready(receiving);
    addr.do_send(Wake::ALL);

    let mut alive = tokio::time::interval(Duration::from_secs(1));
    // Where notifications arrived before, one check that missed its 2 s (a loaded machine)
    // must not leave the new connection unchecked for good: it is checked again.
    let mut check = Recheck::new(*past == Past::Received, engine_id);
    let mut receiving = receiving;
    loop {
        tokio::select! {
            note = stream.next() => match note {
                Some(Ok(n)) if check.answers(&n.payload) => {
                    if !receiving {
                        receiving = true;
                        tracing::info!(%channel, "LISTEN self-check received late; notifications arrive again");
                        signals.listener_ready(true);
                    }
                }
                Some(Ok(n)) => addr.do_send(wake_for(&n.payload)),
                Some(Err(e)) => return Err(StoreError::Query(e)),
                None => return Err(StoreError::Pool("LISTEN connection closed".into())),
            },
            _ = alive.tick() => {
                if !addr.connected() {
                    return Ok(());
                }
                if let Some(token) = check.due()? {
                    // Through the pool. A NOTIFY that failed or took too long is the
                    // database's fault (down, frozen), not this connection's: that check did
                    // not happen, and the next one tries again. Its wait for the answer
                    // starts once it was sent.
                    match tokio::time::timeout(RECHECK_WAIT, store.notify(&token)).await {
                        Ok(Ok(())) => check.sent(),
                        _ => check.not_sent(),
                    }
                }
            }
        }
    }
}

/// What the listener's earlier connections showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Past {
    /// No connection yet.
    First,
    /// Some connection's self-check came back: notifications reach this engine.
    Received,
    /// None came back: a pooler drops them (the first connection's warning said so).
    NeverReceived,
}

/// Since when the LISTEN connection is lost, and when that was last said at WARN.
#[derive(Debug, Default)]
struct Outage {
    since: Option<std::time::Instant>,
    said: Option<std::time::Instant>,
}

/// What a failed (re)connection says.
#[derive(Debug, PartialEq, Eq)]
enum Say {
    /// The connection was there until now: WARN.
    Lost,
    /// Still lost this long, and not said for [`STILL_LOST_EVERY`]: WARN again.
    StillLost(Duration),
    /// Still lost, said recently: DEBUG.
    Quiet,
}

impl Outage {
    fn failed(&mut self, now: std::time::Instant) -> Say {
        let Some(since) = self.since else {
            self.since = Some(now);
            self.said = Some(now);
            return Say::Lost;
        };
        match self.said {
            Some(said) if now.saturating_duration_since(said) < STILL_LOST_EVERY => Say::Quiet,
            _ => {
                self.said = Some(now);
                Say::StillLost(now.saturating_duration_since(since))
            }
        }
    }

    /// The connection is made again: how long it was lost, if it was.
    fn over(&mut self) -> Option<Duration> {
        self.said = None;
        self.since.take().map(|since| since.elapsed())
    }
}

fn whole_seconds(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// The repeated self-check of a receiving listener (see the module documentation).
struct Recheck {
    enabled: bool,
    engine_id: String,
    /// The token sent and when, until it comes back.
    pending: Option<(String, std::time::Instant)>,
    last: std::time::Instant,
    /// The last check could not be sent: the next one goes at the next tick, so a
    /// connection left on a frozen host is still found out soon after the pool has moved to
    /// one that answers.
    again: bool,
}

impl Recheck {
    fn new(enabled: bool, engine_id: &str) -> Recheck {
        Recheck {
            enabled,
            engine_id: engine_id.to_owned(),
            pending: None,
            last: std::time::Instant::now(),
            again: false,
        }
    }

    /// Whether `payload` is the pending check coming back.
    fn answers(&mut self, payload: &str) -> bool {
        let back = self.pending.as_ref().is_some_and(|(t, _)| t == payload);
        if back {
            self.pending = None;
        }
        back
    }

    /// The pending check's NOTIFY was sent: its answer is awaited from now.
    fn sent(&mut self) {
        if let Some((_, at)) = &mut self.pending {
            *at = std::time::Instant::now();
        }
    }

    /// The pending check's NOTIFY could not be sent: no answer is awaited, and the next
    /// check goes at once.
    fn not_sent(&mut self) {
        self.pending = None;
        self.again = true;
    }

    /// A token to send now, if a check is due; an error once one did not come back in time.
    fn due(&mut self) -> Result<Option<String>, StoreError> {
        if !self.enabled {
            return Ok(None);
        }
        if let Some((_, sent)) = &self.pending {
            if sent.elapsed() > RECHECK_WAIT {
                return Err(StoreError::Pool(format!(
                    "the LISTEN connection's own NOTIFY did not come back within {}: \
                     presumed dead (a frozen server?), connecting again",
                    humantime::format_duration(RECHECK_WAIT)
                )));
            }
            return Ok(None);
        }
        if !self.again && self.last.elapsed() < RECHECK_EVERY {
            return Ok(None);
        }
        self.again = false;
        self.last = std::time::Instant::now();
        let token = format!("self-check:{}:{}", self.engine_id, uuid::Uuid::new_v4());
        self.pending = Some((token.clone(), self.last));
        Ok(Some(token))
    }
}

/// The insert trigger says `''` for every inserting statement and `keyed` when keyed rows
/// were among them (so does a discard that may unblock a key); anything else (another
/// engine's self-check, or a stopping engine's [`NOTIFY_RELEASED`]) may mean anything.
fn wake_for(payload: &str) -> Wake {
    match payload {
        "" => Wake {
            unkeyed: true,
            keyed: false,
        },
        NOTIFY_KEYED => Wake {
            unkeyed: false,
            keyed: true,
        },
        _ => Wake::ALL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn long_ago(d: Duration) -> Instant {
        Instant::now()
            .checked_sub(d)
            .expect("the clock goes back that far")
    }

    #[test]
    fn a_lasting_loss_is_said_once_then_once_a_minute_and_its_end_resets_it() {
        let mut outage = Outage::default();
        let start = Instant::now();
        assert_eq!(outage.failed(start), Say::Lost);
        // One try a second through an outage: quiet until a minute has passed.
        for s in 1..60 {
            assert_eq!(
                outage.failed(start + Duration::from_secs(s)),
                Say::Quiet,
                "at {s}s"
            );
        }
        let minute = start + STILL_LOST_EVERY;
        assert_eq!(outage.failed(minute), Say::StillLost(STILL_LOST_EVERY));
        assert_eq!(outage.failed(minute + Duration::from_secs(1)), Say::Quiet);
        assert!(outage.over().is_some(), "it was lost");
        assert!(outage.over().is_none(), "and is not any more");
        // A new loss is said at once.
        assert_eq!(outage.failed(minute + Duration::from_secs(2)), Say::Lost);
    }

    #[test]
    fn a_check_that_could_not_be_sent_is_not_held_against_the_connection() {
        let mut check = Recheck::new(true, "e");
        check.last = long_ago(RECHECK_EVERY + Duration::from_secs(1));
        assert!(check.due().expect("no error").is_some(), "a check is due");
        // The NOTIFY failed (the database was down): no error, and the next check goes at
        // the next tick, not a whole period later.
        check.not_sent();
        assert!(
            check.due().expect("no error").is_some(),
            "the next check goes at once"
        );
        assert!(check.due().expect("waiting").is_none(), "one at a time");
    }

    #[test]
    fn the_wait_for_an_answer_starts_when_the_check_was_sent() {
        let mut check = Recheck::new(true, "e");
        check.last = long_ago(RECHECK_EVERY + Duration::from_secs(1));
        let token = check.due().expect("no error").expect("due");
        // Sending took longer than the wait itself (a slow pool): the answer still may come.
        if let Some((_, at)) = &mut check.pending {
            *at = long_ago(RECHECK_WAIT + Duration::from_secs(1));
        }
        check.sent();
        assert!(check.due().expect("still waiting").is_none());
        // An answer that never comes, once the wait is over, is the connection's.
        if let Some((_, at)) = &mut check.pending {
            *at = long_ago(RECHECK_WAIT + Duration::from_secs(1));
        }
        assert!(check.due().is_err());
        assert!(!check.answers("other"));
        assert!(check.answers(&token));
    }
}
