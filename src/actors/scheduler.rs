//! The Scheduler: decides when to claim and how much.
//!
//! It wakes on the insert trigger's NOTIFY (through its own LISTEN connection), on
//! `EngineHandle::nudge()`, on the safety-net sweep, and when settled messages give credits
//! back. It holds `publisher.max_in_flight` credits, lent one per claimed row and repaid
//! when the row's outcome is durable (see `credit`): a claim never asks for more rows than
//! credits left, so the engine's in-flight bound holds end to end (claimed, published,
//! awaiting confirm, awaiting its database write). Claims loop while they come back full;
//! a wake-up during a claim is remembered, so a row committed mid-claim is not left for
//! the sweep. Rows claimed past their attempt budget (earlier leases expired) go straight
//! to the DeadLetter actor; the rest wait in a queue and are handed to the Publisher in
//! batches while the rows handed on and not yet settled fit the measured window (`window`):
//! those are the rows a crash would publish twice, so the engine keeps only as many as the
//! broker needs to run at full rate. While the engine's registry beat is overdue (see the
//! Heartbeat) it neither claims nor hands anything on.
//!
//! Ordered rows: the keyed claim takes the head of each ordering key with nothing in flight,
//! and the key's run (the rows after it, `ordering.run`). Heads are queued like any row; a
//! run waits here and hands on its next row when the ConfirmTracker reports the broker's ack
//! of the one before ([`KeyTurn`]), so a key moves at one broker round trip per message. A
//! failure ends the run: the rest goes back unpublished. A key's next claim comes when its
//! last row is confirmed or dead-lettered: those settlements say so (`Settled::keys_freed`)
//! and the Scheduler claims keyed heads again at once; it also remembers the last key
//! served, so successive claims walk the keys round-robin and none starves. Once a walk has
//! seen every key, the claims that follow this engine's own settlements probe only the keys
//! they freed, until a wake-up says another key may be ready (the `keys` module). Which kinds of
//! rows a round claims, and how it splits its room, is decided by the `demand` module: an
//! engine without keyed traffic never walks the keys.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use actix::prelude::*;

use super::{
    dead_letter::{Bury, DeadLetterActor},
    ledger::{Claim, ClaimKeyed, Ledger, NextDue, Release, RenewLeases, WriteNow},
    publisher::{Publish, Publisher},
};
use crate::{
    config::{Config, OnDeadLetter},
    events::Signals,
    lifecycle::Lifecycle,
    state::Delivery,
    store::{ClaimLimits, Claimed, KeyScan, Store},
    telemetry::MessageTrace,
};

mod credit;
mod demand;
mod keys;
mod listen;
mod window;

pub use credit::{Credit, CreditLine, Credits};

use demand::{Demand, Kind};
use keys::{Keys, Scan};
use window::Window;

/// What the Ledger answered to a claim.
type ClaimAnswer = Result<Result<Claimed, crate::store::StoreError>, MailboxError>;

/// Something may be due: claim if there are credits.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Wake {
    /// Unkeyed rows (or expired leases) may be due: run the unkeyed claim.
    pub unkeyed: bool,
    /// Keyed rows may be among it (a `keyed` NOTIFY, a nudge): walk the keys too.
    pub keyed: bool,
}

impl Wake {
    /// Anything may be due.
    pub const ALL: Wake = Wake {
        unkeyed: true,
        keyed: true,
    };
}

/// Messages reached a durable outcome (or were given back): their credits come back.
/// Only [`Credits`] and [`Credit`] build it (the fields are private to this module), so
/// credits come back through them and nowhere else.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Settled {
    /// Which: an id the Scheduler no longer holds (settled twice) gives nothing back.
    ids: Vec<uuid::Uuid>,
    /// The shortest backoff among those sent back to `retrying`: the Scheduler wakes then
    /// instead of at the next sweep.
    earliest_retry: Option<Duration>,
    /// Some of them carried an ordering key: their keys' next messages may be due now.
    keys_freed: bool,
}

/// Keyed rows' first answers from the broker, in the order they came: `true` an ack,
/// `false` a failure. A run waiting on one of them goes on (the next row is published at
/// once, before the ack's write) or is given back.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct KeyTurn(pub Vec<(uuid::Uuid, bool)>);

/// Publishing connection `lane` can (or cannot) take publishes: connected and not blocked.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct BrokerReady {
    /// Which of the engine's publishers (`publisher.connections` of them).
    pub lane: usize,
    /// Whether it can.
    pub ready: bool,
}

/// Stop claiming (shutdown). Answers with the number of messages still unsettled.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "usize")]
pub struct StopClaiming;

/// How many claimed messages have not settled yet.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "usize")]
pub struct Outstanding;

/// The addresses the Scheduler hands work to.
pub struct Peers {
    /// Claims go here.
    pub ledger: Addr<Ledger>,
    /// Claimed rows go here, a batch to each in turn (one per publishing connection).
    pub publishers: Vec<Addr<Publisher>>,
    /// Rows claimed past their budget go here.
    pub dead_letter: Addr<DeadLetterActor>,
}

/// See the module documentation.
pub struct Scheduler {
    config: std::sync::Arc<Config>,
    peers: Peers,
    store: Store,
    signals: Signals,
    lifecycle: Lifecycle,
    engine_id: String,
    /// Every row claimed and not yet settled, with its payload size and, once handed to the
    /// Publisher, since when: the in-flight bound
    /// (`publisher.max_in_flight` rows, `publisher.max_in_flight_bytes` bytes), the window's
    /// latency samples and the rows whose leases this engine renews.
    held: HashMap<uuid::Uuid, (u64, Option<Instant>)>,
    /// Claimed rows not handed to the Publisher yet: they wait for room in the window.
    queue: std::collections::VecDeque<Delivery>,
    /// Rows handed to the Publisher and not settled (their outcome durable): published or
    /// about to be, each a duplicate if the engine dies now. At most `window.size()`.
    dispatched: usize,
    /// How many rows may be dispatched: measured, capped by `publisher.max_in_flight`.
    window: Window,
    held_bytes: u64,
    more: bool,
    /// Which publishing connections can take publishes (see `BrokerReady`).
    lanes_ready: Vec<bool>,
    /// The publisher the next batch goes to, unless it cannot take it.
    next_lane: usize,
    stopping: bool,
    /// The armed wake-up for the earliest future row (delayed message, backoff, poll).
    wake_at: Option<(Instant, SpawnHandle)>,
    /// Without LISTEN: the current poll interval (short while rows keep coming).
    poll: Duration,
    /// Where the next claim resumes its round-robin walk over ordering keys.
    next_key: Option<String>,
    /// Which kinds of rows may be due, and the claim round in progress.
    demand: Demand,
    /// Claim rounds failed in a row, and the instant before which no claim is tried
    /// (the database is gone: neither wake-ups nor settlements may spin the loop).
    failed_rounds: u32,
    retry_at: Option<Instant>,
    /// Lends each claimed row its credit (set when the actor starts, before any claim).
    credit_line: Option<CreditLine>,
    /// Keys' runs: the rows claimed after a key's head, each handed on when the broker
    /// acked the one before (see [`KeyTurn`]).
    runs: HashMap<String, std::collections::VecDeque<Delivery>>,
    /// The dispatched row each run waits on, by id: its ack hands on the next.
    run_turns: HashMap<uuid::Uuid, String>,
    /// Which keys the next keyed claim looks at (see `keys`).
    keys: Keys,
    /// Rows this engine gave back after its beat was overdue, until their release is
    /// written. No claim runs meanwhile: a claim racing that release could take the same
    /// rows again (a claim lost in a database crash left them `pending`), find them still
    /// held here and leave them, and once the release settled they sat `in_flight` under
    /// this engine, held by nobody, for a whole lease (an outside audit: 152 rows, 60 s).
    giving_back: HashSet<uuid::Uuid>,
    /// When the last summary line was written: the interval's missed ticks fire together
    /// after the process was paused, and one line says it all (an outside audit saw the
    /// same line twice within microseconds after a `SIGCONT`).
    last_summary: Option<Instant>,
}

/// Fastest poll without LISTEN (while rows keep coming).
const MIN_POLL: Duration = Duration::from_millis(10);

impl Scheduler {
    /// A scheduler holding nothing yet.
    pub fn new(
        config: std::sync::Arc<Config>,
        peers: Peers,
        store: Store,
        signals: Signals,
        lifecycle: Lifecycle,
        engine_id: String,
    ) -> Self {
        let window = Window::new(
            config.publisher.max_in_flight as usize,
            config.publisher.adaptive_window,
            Instant::now(),
        );
        let peers_lanes = peers.publishers.len();
        Scheduler {
            config,
            window,
            peers,
            store,
            signals,
            lifecycle,
            engine_id,
            held: HashMap::new(),
            queue: std::collections::VecDeque::new(),
            dispatched: 0,
            held_bytes: 0,
            more: true,
            lanes_ready: vec![false; peers_lanes],
            next_lane: 0,
            stopping: false,
            wake_at: None,
            poll: MIN_POLL,
            next_key: None,
            demand: Demand::default(),
            failed_rounds: 0,
            retry_at: None,
            credit_line: None,
            runs: HashMap::new(),
            run_turns: HashMap::new(),
            keys: Keys::default(),
            giving_back: HashSet::new(),
            last_summary: None,
        }
    }

    fn outstanding(&self) -> usize {
        self.held.len()
    }

    /// Rows that may still be claimed.
    fn credits(&self) -> usize {
        (self.config.publisher.max_in_flight as usize).saturating_sub(self.held.len())
    }

    /// Payload bytes that may still be claimed.
    fn bytes_left(&self) -> u64 {
        self.config
            .publisher
            .max_in_flight_bytes
            .saturating_sub(self.held_bytes)
    }

    /// Byte budget for one claim of `rows` out of a round of `total` rows.
    fn limits(&self, rows: u32, total: u32) -> ClaimLimits {
        let share = self.bytes_left() / u64::from(total.max(1)) * u64::from(rows);
        ClaimLimits {
            rows,
            bytes: share.max(1),
            max_payload: self.config.publisher.max_payload_bytes,
        }
    }

    /// Notes what may be due and claims (or claims again after the round in progress).
    fn wake(&mut self, ctx: &mut Context<Self>, wake: Wake) {
        if wake.keyed {
            // An insert, a backoff or delay ending, the sweep, a nudge: any key may be ready.
            self.keys.woke();
        }
        self.wake_for(ctx, wake);
    }

    /// Wakes the claim loop for `wake`'s kinds without deciding how keys are found.
    fn wake_for(&mut self, ctx: &mut Context<Self>, wake: Wake) {
        self.more = true;
        self.demand.wake(wake);
        self.maybe_claim(ctx);
    }

    /// One claim round (see [`Demand`]): unkeyed rows (and expired leases) and heads of
    /// ordering keys, as two statements side by side, each batch dispatched as soon as it
    /// arrives, so one kind never waits for the other's query.
    fn maybe_claim(&mut self, ctx: &mut Context<Self>) {
        if self.demand.in_round() {
            self.more = true;
            return;
        }
        if self.stopping || !self.broker_ready() || self.credits() == 0 || self.bytes_left() == 0 {
            return;
        }
        if !self.giving_back.is_empty() {
            // Claimed again once the release is written (its settlement wakes this).
            self.more = true;
            return;
        }
        if !self.lifecycle.liveness.fresh() {
            // The registry beat is overdue: another engine may be taking this one's rows
            // over. The Heartbeat wakes the Scheduler when a beat succeeds again.
            self.more = true;
            return;
        }
        if let Some(wait) = self
            .retry_at
            .and_then(|at| at.checked_duration_since(Instant::now()))
        {
            // Backing off after a failed round: claim when it ends, not before.
            self.more = true;
            self.arm(ctx, wait);
            return;
        }
        let limit = self
            .credits()
            .min(self.config.scheduler.claim_batch as usize) as u32;
        if !self.keys.may_be_ready() {
            self.demand.no_key_ready();
        }
        let Some(split) = self.demand.start(limit) else {
            return;
        };
        self.more = false;
        // Heads share the claim's room; their runs may take the credits beyond it (held, not
        // published, until their turn), so a run is not cut short by the batch size.
        let heads = split.keyed;
        let run = self.config.ordering.run;
        let keyed_rows = (heads as usize * (1 + run as usize))
            .min(self.credits().saturating_sub(split.unkeyed as usize))
            .max(heads as usize) as u32;
        let total = split.unkeyed + keyed_rows;
        if split.unkeyed > 0 {
            let limit = split.unkeyed;
            let limits = self.limits(limit, total);
            self.peers
                .ledger
                .send(Claim { limits })
                .into_actor(self)
                .map(move |result, act, ctx| {
                    let outcome = act.claimed(Kind::Unkeyed, result);
                    act.answered(ctx, Kind::Unkeyed, outcome);
                })
                .spawn(ctx);
        }
        if heads > 0 {
            let scan = self.keys.scan(heads);
            let (heads, listed) = match &scan {
                Scan::Walk => (heads, None),
                Scan::Listed(keys) => (keys.len() as u32, Some(keys.clone())),
            };
            let keys = KeyScan {
                after: self.next_key.clone(),
                block_on_dead_letter: self.config.ordering.on_dead_letter == OnDeadLetter::Block,
                run,
                heads: Some(heads),
            };
            let limits = self.limits(keyed_rows, total);
            self.peers
                .ledger
                .send(ClaimKeyed {
                    limits,
                    keys,
                    listed,
                })
                .into_actor(self)
                .map(move |result, act, ctx| {
                    if let Ok(Ok(claimed)) = &result {
                        act.next_key = claimed.next_key.clone();
                    }
                    let answer = match &result {
                        Ok(Ok(c)) => Some(c),
                        _ => None,
                    };
                    if act.keys.answered(&scan, heads, answer) {
                        // Keyed rows that fall due later (a producer's delay) no longer
                        // reach a walk through settlements: their own timer must.
                        act.arm_next_due(ctx);
                    }
                    let more_listed = act.keys.more_listed();
                    let outcome = act.claimed(Kind::Keyed, result);
                    // Freed keys beyond this claim's heads: keep keyed claims going.
                    let outcome = outcome.map(|(n, full)| (n, full || more_listed));
                    act.answered(ctx, Kind::Keyed, outcome);
                })
                .spawn(ctx);
        }
    }

    /// Dispatches what a claim returned; the rows claimed (dead-lettered ones included)
    /// and whether the batch came back full, or `None` when the claim failed.
    fn claimed(&mut self, kind: Kind, answer: ClaimAnswer) -> Option<(usize, bool)> {
        match answer {
            Ok(Ok(claimed)) => {
                let n = claimed.messages.len() + claimed.dead_lettered.len();
                self.dispatch(claimed.messages, kind == Kind::Keyed);
                Some((n, claimed.full))
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, ?kind, "claim failed; claiming again after a backoff");
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "ledger unavailable");
                None
            }
        }
    }

    /// One claim of the round answered; the round ends with the last one.
    fn answered(&mut self, ctx: &mut Context<Self>, kind: Kind, outcome: Option<(usize, bool)>) {
        if let Some(end) = self.demand.answered(kind, outcome) {
            if end.failed {
                self.back_off(ctx);
            } else {
                self.failed_rounds = 0;
                self.retry_at = None;
            }
            self.round_done(ctx, end.full, end.got);
        }
    }

    /// A claim failed: no claim before a backoff that grows with each failed round in a
    /// row, whatever wakes the Scheduler meanwhile.
    fn back_off(&mut self, ctx: &mut Context<Self>) {
        self.failed_rounds = self.failed_rounds.saturating_add(1);
        self.signals.claim_failed();
        let delay = crate::backoff::CLAIM.delay(self.failed_rounds);
        self.retry_at = Some(Instant::now() + delay);
        self.arm(ctx, delay);
    }

    /// A claim round ended: go again at once if it came back full or something woke the
    /// Scheduler meanwhile, else arm the timer for the next due row.
    fn round_done(&mut self, ctx: &mut Context<Self>, full: bool, got: usize) {
        if full {
            self.more = true;
        }
        if self.more {
            self.maybe_claim(ctx);
        } else {
            self.after_drain(ctx, got);
        }
    }

    /// Wakes the scheduler after `delay` unless an earlier wake-up is already armed.
    fn arm(&mut self, ctx: &mut Context<Self>, delay: Duration) {
        let delay = delay.max(Duration::from_millis(1));
        let at = Instant::now() + delay;
        if let Some((armed, _)) = &self.wake_at {
            if *armed <= at {
                return;
            }
        }
        if let Some((_, handle)) = self.wake_at.take() {
            ctx.cancel_future(handle);
        }
        let handle = ctx.run_later(delay, |act, ctx| {
            act.wake_at = None;
            act.wake(ctx, Wake::ALL);
        });
        self.wake_at = Some((at, handle));
    }

    /// Nothing more is due now: arm a wake-up for the earliest future row (a delayed
    /// message is published when due, not a sweep later), and without LISTEN, poll again
    /// soon while rows keep coming, backing off to the sweep interval when idle.
    fn after_drain(&mut self, ctx: &mut Context<Self>, claimed: usize) {
        let sweep = self.config.scheduler.sweep_interval;
        if !self.config.database.listen {
            self.poll = if claimed > 0 {
                MIN_POLL
            } else {
                (self.poll * 2).min(sweep)
            };
            let poll = self.poll;
            self.arm(ctx, poll);
        }
        self.arm_next_due(ctx);
    }

    /// Arms the timer for the earliest row not due yet (a delay, a backoff), if it falls
    /// before the next sweep.
    fn arm_next_due(&mut self, ctx: &mut Context<Self>) {
        let sweep = self.config.scheduler.sweep_interval;
        self.peers
            .ledger
            .send(NextDue)
            .into_actor(self)
            .map(move |result, act, ctx| match result {
                Ok(Ok(Some(due))) if due < sweep => act.arm(ctx, due),
                Ok(Err(e)) => tracing::debug!(error = %e, "next-due query failed"),
                _ => {}
            })
            .spawn(ctx);
    }

    /// Takes claimed rows into the bound and queues them for the Publisher. A keyed claim
    /// returns each key's head followed by its run (in `seq` order): the heads are queued,
    /// each run waits for its head's ack.
    fn dispatch(&mut self, rows: Vec<crate::OutboxMessage>, keyed: bool) {
        let rows = self.not_held(rows);
        if rows.is_empty() {
            return;
        }
        for row in &rows {
            let size = row.payload.len() as u64;
            if self.held.insert(row.id, (size, None)).is_none() {
                self.held_bytes += size;
                if let Some(key) = &row.ordering_key {
                    self.keys.held(row.id, key);
                }
            }
        }
        self.signals.claimed(rows.len(), self.held_bytes);
        let max_attempts = self.config.retry.max_attempts;
        let traces = self.config.telemetry.traces;
        let mut exhausted = Vec::new();
        let mut to_publish = Vec::with_capacity(rows.len());
        let deliveries: Vec<Delivery> = rows
            .into_iter()
            .map(|row| {
                let mut d = Delivery::claimed(row, max_attempts);
                if traces {
                    d.trace = Some(MessageTrace::claimed(&d.message, d.attempts()));
                }
                self.lend(d)
            })
            .collect();
        let deliveries = if keyed {
            self.start_runs(deliveries)
        } else {
            deliveries
        };
        for mut delivery in deliveries {
            if delivery.over_budget() {
                match delivery.exhaust() {
                    Ok(()) => {
                        // Not published again. Its earlier attempts ended with expired
                        // leases, or its row was written (or `max_attempts` lowered) so.
                        // The claim clamps the count below 1,000,000 (its constraint).
                        let used = match delivery.attempts() - 1 {
                            n if n >= 999_999 => "1000000 or more".to_string(),
                            n => n.to_string(),
                        };
                        let reason = format!(
                            "attempts exhausted ({used} of {}) before this claim: earlier leases expired without a confirm, or the row was written with that many attempts",
                            delivery.max_attempts()
                        );
                        exhausted.push((delivery, reason));
                    }
                    Err(e) => tracing::error!(error = %e, "state machine refused exhaust"),
                }
            } else {
                to_publish.push(delivery);
            }
        }
        if !exhausted.is_empty() {
            self.peers.dead_letter.do_send(Bury(exhausted));
        }
        self.queue.extend(to_publish);
        self.pump();
    }

    /// The claimed rows this engine does not hold already. It can claim a row it holds when
    /// its claim was lost (a database crash loses a claim's commit, which does not wait for
    /// the WAL flush) or its lease lapsed while it was paused: the copy in hand goes on
    /// (its outcome write names this engine, which holds the row again), and a second copy
    /// would be published twice and counted twice in the window, which then never empties.
    /// A keyed claim's other rows of such a key are given back: its head is the copy in
    /// hand, so they cannot be a run here.
    fn not_held(&mut self, rows: Vec<crate::OutboxMessage>) -> Vec<crate::OutboxMessage> {
        let again: HashSet<String> = rows
            .iter()
            .filter(|r| self.held.contains_key(&r.id))
            .filter_map(|r| r.ordering_key.clone())
            .collect();
        let mut known = 0;
        let mut keyed_back = Vec::new();
        let mut fresh = Vec::with_capacity(rows.len());
        for row in rows {
            if self.held.contains_key(&row.id) {
                known += 1;
            } else if row
                .ordering_key
                .as_deref()
                .is_some_and(|k| again.contains(k))
            {
                keyed_back.push(row);
            } else {
                fresh.push(row);
            }
        }
        if known > 0 {
            tracing::warn!(
                rows = known,
                "claimed rows this engine already holds (its claim was lost in a database \
                 crash, its lease lapsed while it was paused, or a producer or a hand set them \
                 back to pending); the copies in hand go on"
            );
        }
        if !keyed_back.is_empty() {
            let max_attempts = self.config.retry.max_attempts;
            let back: Vec<Delivery> = keyed_back
                .into_iter()
                .map(|row| self.lend(Delivery::claimed(row, max_attempts)))
                .collect();
            self.peers.ledger.do_send(Release(Credits::released(back)));
        }
        fresh
    }

    /// Splits keyed rows (ordered by key, then `seq`) into heads, returned, and runs, kept
    /// until their turn. A row past its attempt budget ends its key's run: a head's whole
    /// run, or the row and those after it, are given back, to be handled as heads later, in
    /// order.
    fn start_runs(&mut self, rows: Vec<Delivery>) -> Vec<Delivery> {
        let mut heads = Vec::new();
        let mut give_back = Vec::new();
        let mut current: Option<(String, bool)> = None;
        for delivery in rows {
            let Some(key) = delivery.message.ordering_key.clone() else {
                heads.push(delivery);
                continue;
            };
            match &mut current {
                Some((k, broken)) if *k == key => {
                    if *broken || delivery.over_budget() {
                        *broken = true;
                        give_back.push(delivery);
                    } else {
                        self.runs.entry(key).or_default().push_back(delivery);
                    }
                }
                _ => {
                    current = Some((key, delivery.over_budget()));
                    heads.push(delivery);
                }
            }
        }
        for head in &heads {
            if let Some(key) = &head.message.ordering_key {
                if self.runs.contains_key(key) {
                    self.run_turns.insert(head.message.id, key.clone());
                }
            }
        }
        if !give_back.is_empty() {
            self.peers
                .ledger
                .do_send(Release(Credits::released(give_back)));
        }
        heads
    }

    /// The row a run waited on was acked: its key's next row goes first in the queue (the
    /// caller pumps). It failed: the rest of the run is given back unpublished, and the key
    /// is claimed again from its head, as any key. Returns whether the key now waits on
    /// this ack's write (it was acked and nothing of its key follows it here): its next
    /// claim needs that write.
    fn turn(&mut self, id: uuid::Uuid, acked: bool) -> bool {
        let Some(key) = self.run_turns.remove(&id) else {
            return acked;
        };
        if !acked {
            // Its settlement frees the key again (claimed from its head, as any key).
            self.end_run(&key);
            return false;
        }
        let Some(run) = self.runs.get_mut(&key) else {
            return true;
        };
        let Some(next) = run.pop_front() else {
            self.runs.remove(&key);
            return true;
        };
        if run.is_empty() {
            self.runs.remove(&key);
        } else {
            self.run_turns.insert(next.message.id, key);
        }
        self.queue.push_front(next);
        false
    }

    /// Gives back the rest of `key`'s run unpublished.
    fn end_run(&mut self, key: &str) {
        if let Some(run) = self.runs.remove(key) {
            if !run.is_empty() {
                self.peers.ledger.do_send(Release(Credits::released(run)));
            }
        }
    }

    /// `delivery` holding its credit: it comes back with the row's durable outcome.
    fn lend(&self, delivery: Delivery) -> Delivery {
        match &self.credit_line {
            Some(line) => {
                let m = &delivery.message;
                let credit = line.lend(m.id, m.ordering_key.is_some());
                delivery.holding(credit)
            }
            None => delivery,
        }
    }

    /// Hands queued rows to the Publisher while the window has room, in publish batches.
    /// With the registry beat overdue nothing is handed on: the queue is given back (the
    /// release is fenced, so rows another engine took over are left alone).
    fn pump(&mut self) {
        if !self.lifecycle.liveness.fresh() || self.stopping {
            self.give_back_queue();
            return;
        }
        let batch = self.config.publisher.publish_batch as usize;
        let now = Instant::now();
        loop {
            let room = self.window.size().saturating_sub(self.dispatched);
            let n = room.min(batch).min(self.queue.len());
            if n == 0 {
                return;
            }
            let rows: Vec<Delivery> = self.queue.drain(..n).collect();
            for d in &rows {
                if let Some(entry) = self.held.get_mut(&d.message.id) {
                    entry.1 = Some(now);
                }
            }
            self.dispatched += n;
            self.next_publisher().do_send(Publish(rows));
        }
    }

    /// Whether any publishing connection can take publishes.
    fn broker_ready(&self) -> bool {
        self.lanes_ready.iter().any(|ready| *ready)
    }

    /// The next publisher in turn that can take publishes (any, when none can: it fails the
    /// batch back as not sent).
    fn next_publisher(&mut self) -> &Addr<Publisher> {
        // Never empty: the engine starts `publisher.connections` (validated to 1..=16).
        let lanes = self.peers.publishers.len();
        let ready = (0..lanes)
            .map(|step| (self.next_lane + step) % lanes)
            .find(|lane| self.lanes_ready.get(*lane).copied().unwrap_or(false));
        let lane = ready.unwrap_or(self.next_lane % lanes);
        self.next_lane = lane + 1;
        &self.peers.publishers[lane]
    }

    /// Rows dispatched at these instants left the window: sample it, refill it.
    fn left_window(&mut self, dispatched_at: Vec<Instant>) {
        let now = Instant::now();
        let rows = dispatched_at.len();
        let total: Duration = dispatched_at
            .iter()
            .map(|at| now.saturating_duration_since(*at))
            .sum();
        self.dispatched = self.dispatched.saturating_sub(rows);
        let average = total.checked_div(rows as u32).unwrap_or_default();
        self.window.settled(rows, average, now);
        self.pump();
    }

    /// Gives back every queued row unpublished; their credits return when it is written.
    fn give_back_queue(&mut self) {
        self.run_turns.clear();
        let runs = std::mem::take(&mut self.runs).into_values().flatten();
        let rows: Vec<Delivery> = self.queue.drain(..).chain(runs).collect();
        if rows.is_empty() {
            return;
        }
        // The ids the release's settlement will name (rows holding a credit: all of them).
        let credits = Credits::released(rows);
        self.giving_back.extend(credits.ids().iter().copied());
        self.peers.ledger.do_send(Release(credits));
    }

    fn log_summary(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let half = self.config.logging.summary_interval / 2;
        if self
            .last_summary
            .is_some_and(|last| now.saturating_duration_since(last) < half)
        {
            return;
        }
        self.last_summary = Some(now);
        let store = self.store.clone();
        let counters = self.signals.counters();
        let outstanding = self.outstanding();
        let (window, dispatched) = (self.window.size(), self.dispatched);
        ctx.spawn(
            async move {
                let oldest = store.oldest_pending_age().await.ok().flatten();
                tracing::info!(
                    published = counters.published,
                    confirmed = counters.confirmed,
                    retried = counters.retried,
                    dead_lettered = counters.dead_lettered,
                    in_flight = outstanding,
                    window,
                    dispatched,
                    oldest_pending = %oldest
                        .map(|a| humantime::format_duration(Duration::from_secs(a.as_secs())).to_string())
                        .unwrap_or_else(|| "none".into()),
                    "summary"
                );
            }
            .into_actor(self),
        );
    }
}

impl Actor for Scheduler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.credit_line = Some(CreditLine::new(ctx.address().downgrade().recipient()));
        ctx.run_interval(self.config.scheduler.sweep_interval, |act, ctx| {
            act.wake(ctx, Wake::ALL)
        });
        ctx.run_interval(self.config.logging.summary_interval, |act, ctx| {
            act.log_summary(ctx)
        });
        ctx.run_interval(self.config.scheduler.lease_duration / 3, |act, _| {
            if !act.held.is_empty() {
                let ids = act.held.keys().copied().collect();
                act.peers.ledger.do_send(RenewLeases(ids));
            }
        });
        if self.config.database.listen {
            listen::start(
                ctx,
                self.store.clone(),
                self.engine_id.clone(),
                self.signals.clone(),
            );
        } else {
            tracing::info!(
                sweep = %humantime::format_duration(self.config.scheduler.sweep_interval),
                "database.listen is off: polling with the sweep"
            );
        }
    }
}

impl Handler<Wake> for Scheduler {
    type Result = ();

    fn handle(&mut self, msg: Wake, ctx: &mut Context<Self>) {
        self.wake(ctx, msg);
    }
}

/// The registry beat was overdue and has just succeeded again (a freeze, a long pause):
/// rows held unpublished meanwhile may have been taken over by another engine once their
/// leases lapsed, so none of them is published from memory. They are given back (fenced:
/// rows another engine took are left alone) and claimed again.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct BeatBack;

impl Handler<BeatBack> for Scheduler {
    type Result = ();

    fn handle(&mut self, _: BeatBack, ctx: &mut Context<Self>) {
        self.give_back_queue();
        self.wake(ctx, Wake::ALL);
    }
}

impl Handler<Settled> for Scheduler {
    type Result = ();

    fn handle(&mut self, msg: Settled, ctx: &mut Context<Self>) {
        let mut settled = Vec::new();
        // Whether a key is free now: this engine holds none of its rows any more. Counted
        // per key, not read off the rows settled: flushes may commit out of order, so a
        // run's last row can settle before the one ahead of it.
        let mut frees_a_key = false;
        for id in &msg.ids {
            self.giving_back.remove(id);
            // A run's current row settled without its turn (an outcome that bypassed the
            // ConfirmTracker): the run cannot go on in order, so it is given back.
            if let Some(key) = self.run_turns.remove(id) {
                self.end_run(&key);
            }
            if let Some((size, dispatched)) = self.held.remove(id) {
                self.held_bytes -= size;
                settled.extend(dispatched);
                frees_a_key |= self.keys.let_go(id);
            }
        }
        self.left_window(settled);
        self.signals.window(self.window.size());
        if let Some(delay) = msg.earliest_retry {
            if delay < self.config.scheduler.sweep_interval {
                self.arm(ctx, delay);
            }
        }
        if msg.keys_freed && frees_a_key {
            let keyed = Wake {
                unkeyed: false,
                keyed: true,
            };
            // Only this engine's own keys were freed: `Keys::scan` may probe just those.
            self.wake_for(ctx, keyed);
        } else if self.more {
            self.maybe_claim(ctx);
        }
    }
}

impl Handler<KeyTurn> for Scheduler {
    type Result = ();

    fn handle(&mut self, msg: KeyTurn, _: &mut Context<Self>) {
        let mut waiting = false;
        for (id, acked) in msg.0 {
            waiting |= self.turn(id, acked);
        }
        if waiting {
            // A key's next claim waits on an ack's write: the Ledger writes it now rather
            // than after its gap (the ack's Record is in its mailbox before this).
            self.peers.ledger.do_send(WriteNow);
        }
        // The next rows of every run that moved, in one publish batch.
        self.pump();
    }
}

impl Handler<BrokerReady> for Scheduler {
    type Result = ();

    fn handle(&mut self, msg: BrokerReady, ctx: &mut Context<Self>) {
        if let Some(ready) = self.lanes_ready.get_mut(msg.lane) {
            *ready = msg.ready;
        }
        if msg.ready {
            self.wake(ctx, Wake::ALL);
        }
    }
}

impl Handler<StopClaiming> for Scheduler {
    type Result = usize;

    fn handle(&mut self, _: StopClaiming, _: &mut Context<Self>) -> usize {
        self.stopping = true;
        self.give_back_queue();
        self.signals.shutting_down();
        self.outstanding()
    }
}

impl Handler<Outstanding> for Scheduler {
    type Result = usize;

    fn handle(&mut self, _: Outstanding, _: &mut Context<Self>) -> usize {
        self.outstanding()
    }
}
