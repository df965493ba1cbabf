//! The Heartbeat: the engine's entry in the engine registry, kept fresh on a connection of
//! its own, and the rescue of engines that stopped beating.
//!
//! Every `scheduler.heartbeat` it beats (an upsert of this engine's row) and then runs the
//! rescue: any other engine silent for `scheduler.engine_timeout` is marked dead and the
//! rows it held are freed for the next claim, in one statement (see `store::engines`). So a
//! crashed engine's rows move on within about `engine_timeout` plus one beat instead of a
//! whole lease; the lease stays as the fallback (engines of an older version, a registry
//! row removed by hand) and as the fence for writes. Every tenth beat, last, it frees
//! in-flight rows that no lease would ever bring back (see `store::free_strays`): a
//! producer can write `status = 'in_flight'` with no lease, or a lease held by nobody, and
//! a key's expired row behind an earlier waiting one would hold its key for ever.
//!
//! Its connection is its own, outside the pool: a busy pool or a blocked claim path never
//! delays a beat. Each beat records in [`Liveness`](crate::events::Liveness) when it was
//! sent; the Scheduler and the Publisher stop claiming and publishing once that is half an
//! `engine_timeout` old, so a frozen or cut-off engine stops before another may take its
//! rows. A beat that finds the engine declared dead says so (WARN, `rejoins`): what it held
//! was freed, its late writes about those rows match nothing, and it goes on as a live
//! engine again.
//!
//! An engine judges others only while it is beating itself. A beat that finds this engine
//! silent for more than half the engine timeout (the database restarted or was out of
//! reach, or this process was paused) declares nobody dead for the next `engine_timeout`:
//! whatever silenced this engine likely silenced the others too, and each needs a beat or
//! two to reconnect. A shorter silence leaves the others at least half the timeout to beat
//! again, a couple of beats. Before, after a database restart the first engine back declared the others
//! dead within milliseconds of their own return (an outside audit, two engines, an 8 s
//! restart), and freed rows they had published and not yet seen confirmed, to be published
//! again.

use std::time::{Duration, Instant};

use actix::prelude::*;
use diesel_async::AsyncPgConnection;

use super::scheduler::{BeatBack, Scheduler, Wake};
use crate::{
    config::SchedulerConfig,
    events::Signals,
    lifecycle::Liveness,
    store::{self, Beat, Beaten, Identity, Rescued, Store, StoreError, Strays},
};

/// Stop beating (a clean shutdown, before the engine deregisters).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopBeating;

/// See the module documentation.
pub struct Heartbeat {
    store: Store,
    me: Identity,
    every: Duration,
    publish_window: Duration,
    engine_timeout: Duration,
    lease: Duration,
    /// `retry.backoff.max`: no `retrying` row of this engine's is due later than this.
    longest_backoff: Duration,
    scheduler: Addr<Scheduler>,
    signals: Signals,
    liveness: Liveness,
    conn: Option<AsyncPgConnection>,
    beating: bool,
    stopped: bool,
    failures: u32,
    /// Beats sent: strays are looked for on every [`STRAYS_EVERY`]th.
    beats: u64,
    /// No engine is declared dead before this (see the module documentation).
    judge_from: Option<Instant>,
    /// When the last tick ran: a long gap means this process did not run.
    ticked: Instant,
}

/// A gap between two ticks longer than this (and than three beats) is reported as this
/// process having been paused.
const PAUSED: Duration = Duration::from_secs(5);

/// Beats between two looks for stray in-flight rows. The look reads every in-flight row
/// (about 1 ms for 4,096 of them), and no engine's rows need it: it is for rows written by
/// hand, which can wait ten beats (10 s by default).
const STRAYS_EVERY: u64 = 10;

impl Heartbeat {
    /// A heartbeat for engine `me`, beating every `scheduler.heartbeat` (`timing`; more
    /// often under a short lease), with the engine's `engine_timeout` and `lease_duration`.
    pub fn new(
        store: Store,
        me: Identity,
        timing: &SchedulerConfig,
        longest_backoff: Duration,
        scheduler: Addr<Scheduler>,
        signals: Signals,
        liveness: Liveness,
    ) -> Self {
        Heartbeat {
            store,
            me,
            every: Self::every(timing),
            publish_window: Self::publish_window(timing),
            engine_timeout: timing.engine_timeout,
            lease: timing.lease_duration,
            longest_backoff,
            scheduler,
            signals,
            liveness,
            conn: None,
            beating: false,
            stopped: false,
            failures: 0,
            beats: 0,
            judge_from: None,
            ticked: Instant::now(),
        }
    }

    /// Says so when this process did not run for a while (SIGSTOP, a paused VM or
    /// container, CPU starvation): every timeout reported right after it — the broker's
    /// heartbeat, a statement's bound — measured that pause, not a server's silence.
    fn note_pause(&mut self, now: Instant) {
        let gap = now.saturating_duration_since(self.ticked);
        self.ticked = now;
        if gap > PAUSED.max(self.every * 3) {
            tracing::warn!(
                paused_for = %humantime::format_duration(Duration::from_secs(gap.as_secs())),
                "this engine did not run for a while (stopped, a paused VM or container, or \
                 starved of CPU): connection and statement timeouts reported around now \
                 measured that pause"
            );
        }
    }

    /// A silence longer than this says this engine was cut off (see the module docs).
    fn cut_off(&self) -> Duration {
        self.engine_timeout / 2
    }

    /// How long a beat's statements may take: half the engine timeout.
    pub fn beat_bound(engine_timeout: Duration) -> Duration {
        engine_timeout / 2
    }

    /// How long after sending a beat the engine may go on publishing. Half the engine
    /// timeout, since others declare it dead after all of it; and a third of the lease at
    /// most, since another engine takes a row whose lease lapsed: leases are renewed every
    /// third of a lease, so the rows of an engine frozen now stay its own at least that
    /// long. A lease shorter than the engine timeout let a frozen engine, once resumed,
    /// publish rows another had taken over meanwhile (an audit: 1,279 duplicates of 6,000,
    /// a key's older message after a newer one).
    pub fn publish_window(timing: &SchedulerConfig) -> Duration {
        Self::beat_bound(timing.engine_timeout).min(timing.lease_duration / 3)
    }

    /// How often to beat: `scheduler.heartbeat`, or more often when a short lease makes the
    /// publish window shorter than two beats.
    fn every(timing: &SchedulerConfig) -> Duration {
        timing.heartbeat.min(Self::publish_window(timing) / 2)
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        self.note_pause(Instant::now());
        if self.beating || self.stopped {
            return;
        }
        self.beating = true;
        let conn = self.conn.take();
        let (store, me) = (self.store.clone(), self.me.clone());
        let (engine_timeout, lease, backoff, bound) = (
            self.engine_timeout,
            self.lease,
            self.longest_backoff,
            Self::beat_bound(self.engine_timeout),
        );
        let sent = Instant::now();
        let holding = self.judge_from.is_some_and(|from| sent < from);
        let cut_off = self.cut_off();
        let look_for_strays = self.beats.is_multiple_of(STRAYS_EVERY);
        self.beats += 1;
        let round = async move {
            let mut conn = match conn {
                Some(conn) => conn,
                None => store::establish(store.url(), bound).await?,
            };
            let schema = store.schema();
            let beat = bounded(
                bound,
                "the heartbeat",
                store::beat(&mut conn, schema, &me, bound),
            )
            .await?;
            // The beat alone keeps this engine alive; the look for other engines' rows may
            // fail (and drop the connection) without pausing it.
            let judging = !holding && beat.silence.is_none_or(|s| s <= cut_off);
            let look = async {
                let rescued = if judging {
                    bounded(
                        bound,
                        "the look for rows of dead engines (the outbox or a row locked by \
                         another transaction?)",
                        store::rescue(&mut conn, schema, &me.id, engine_timeout, bound),
                    )
                    .await?
                } else {
                    Vec::new()
                };
                let strays = if look_for_strays {
                    bounded(
                        bound,
                        "the look for stray in-flight rows (the outbox or a row locked by \
                         another transaction?)",
                        store::free_strays(&mut conn, schema, &me.id, lease, backoff, bound),
                    )
                    .await?
                } else {
                    Strays::default()
                };
                Ok::<_, StoreError>((rescued, strays))
            }
            .await;
            let conn = look.is_ok().then_some(conn);
            Ok::<_, StoreError>((conn, beat, look))
        };
        ctx.spawn(round.into_actor(self).map(move |result, act, _| {
            act.beating = false;
            match result {
                Ok((conn, beat, look)) => {
                    act.conn = conn;
                    let (rescued, strays) = look.unwrap_or_else(|e| {
                        tracing::warn!(error = %e,
                            "looking for rows of dead engines and stray in-flight rows failed; \
                             the next heartbeat looks again");
                        Default::default()
                    });
                    act.beaten(sent, beat, rescued, strays);
                }
                Err(e) => {
                    act.failures += 1;
                    if act.failures == 1 || act.failures % 10 == 0 {
                        tracing::warn!(error = %e, failures = act.failures,
                            "engine heartbeat failed; claiming and publishing pause once it is overdue");
                    }
                }
            }
        }));
    }

    fn beaten(&mut self, sent: Instant, beaten: Beaten, rescued: Vec<Rescued>, strays: Strays) {
        let was_fresh = self.liveness.fresh();
        if self.stopped {
            return;
        }
        self.liveness.beat(sent, self.publish_window);
        let beat = beaten.beat;
        if let Some(silence) = beaten.silence.filter(|s| *s > self.cut_off()) {
            self.judge_from = Some(Instant::now() + self.engine_timeout);
            tracing::info!(
                silent_for = %humantime::format_duration(Duration::from_millis(silence.as_millis() as u64)),
                "this engine's heartbeat was silent (the database restarted or was out of reach, \
                 or this process was paused); it declares no other engine dead for the next {}, \
                 so that engines silenced with it can beat again first",
                humantime::format_duration(self.engine_timeout)
            );
        }
        if self.failures > 0 {
            tracing::info!(failures = self.failures, "engine heartbeat back");
            self.failures = 0;
        }
        if beat == Beat::Rejoined {
            self.signals.rejoined();
            tracing::warn!(engine = %self.me.id,
                "this engine had been declared dead (silent for longer than scheduler.engine_timeout): \
                 the rows it held were taken over; it rejoined and goes on");
        }
        for r in &rescued {
            tracing::warn!(dead_engine = %r.engine, rows = r.rows,
                "an engine missed its heartbeats; declared it dead and freed the rows it held");
            self.signals.rescued(r.rows);
        }
        if strays.freed > 0 {
            tracing::warn!(
                rows = strays.freed,
                "freed in-flight rows no engine holds (no lease, or one under an id that is not \
                 a running engine: written so by a producer or by hand?); they are claimed again"
            );
        }
        if strays.behind > 0 {
            tracing::warn!(
                rows = strays.behind,
                "keyed rows whose lease expired behind an earlier waiting row of their key are \
                 due again, so their keys go on in order"
            );
        }
        if strays.late > 0 {
            tracing::warn!(
                rows = strays.late,
                "retrying rows were due later than any backoff puts them (next_attempt_at written \
                 so by a producer or by hand?); they are due now"
            );
        }
        let strays = strays.freed + strays.behind + strays.late > 0;
        if !was_fresh || beat == Beat::Rejoined {
            self.scheduler.do_send(BeatBack);
        } else if strays || rescued.iter().any(|r| r.rows > 0) {
            self.scheduler.do_send(Wake::ALL);
        }
    }
}

/// `fut`, or a connection error naming `what` once `bound` has passed.
async fn bounded<T>(
    bound: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(bound, fut).await.unwrap_or_else(|_| {
        Err(StoreError::Pool(format!(
            "no answer to {what} within {}",
            humantime::format_duration(bound)
        )))
    })
}

impl Actor for Heartbeat {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.tick(ctx);
        ctx.run_interval(self.every, |act, ctx| act.tick(ctx));
    }
}

impl Handler<StopBeating> for Heartbeat {
    type Result = ();

    fn handle(&mut self, _: StopBeating, ctx: &mut Context<Self>) {
        self.stopped = true;
        self.conn = None;
        ctx.stop();
    }
}
