//! What the Scheduler claims next: which kinds of rows may be due (unkeyed rows with expired
//! leases, and heads of ordering keys), and how a claim round splits its room between them.
//! Pure state, so the rules are unit-tested without a database.
//!
//! A kind whose last claim found nothing is not claimed again until something says it may
//! be due: an engine without keyed traffic never walks the keys, and a keyed chain (each
//! confirm lets one more head go) does not pay for an unkeyed claim every time.

use super::Wake;

/// One kind of claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Expired leases, then unkeyed due rows.
    Unkeyed,
    /// Heads of ordering keys.
    Keyed,
}

/// The room each kind gets in a round (0: not claimed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    pub unkeyed: u32,
    pub keyed: u32,
}

/// How a round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundEnd {
    /// Some claim came back full, or a kind that may be due got no room this round: claim
    /// again as soon as there is room.
    pub full: bool,
    /// Rows claimed in the round.
    pub got: usize,
    /// Some claim of the round failed (the database is unreachable or refused it).
    pub failed: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct Round {
    parts: u8,
    full: bool,
    got: usize,
    failed: bool,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Demand {
    unkeyed_idle: bool,
    keyed_idle: bool,
    /// Wake-ups received during the round in progress: that round's queries may have missed
    /// the rows they announce, so its "found nothing" must not put the kind to sleep.
    woken: Wake,
    round_up: bool,
    round: Option<Round>,
}

const NOTHING: Wake = Wake {
    unkeyed: false,
    keyed: false,
};

impl Default for Demand {
    fn default() -> Self {
        Demand {
            unkeyed_idle: false,
            keyed_idle: false,
            woken: NOTHING,
            round_up: false,
            round: None,
        }
    }
}

impl Demand {
    /// A round is in progress.
    pub fn in_round(&self) -> bool {
        self.round.is_some()
    }

    /// Something may be due: now, or when the round in progress ends.
    pub fn wake(&mut self, wake: Wake) {
        self.woken.unkeyed |= wake.unkeyed;
        self.woken.keyed |= wake.keyed;
        if !self.in_round() {
            self.apply_wakes();
        }
    }

    /// No keyed head can be ready now (the `keys` module knows): keyed claims sleep until a
    /// wake-up for them, as after a claim that found nothing, without running that claim.
    /// Only between rounds: a round's wake-ups are applied when it ends.
    pub fn no_key_ready(&mut self) {
        if !self.in_round() {
            self.keyed_idle = true;
        }
    }

    fn apply_wakes(&mut self) {
        self.unkeyed_idle &= !self.woken.unkeyed;
        self.keyed_idle &= !self.woken.keyed;
        self.woken = NOTHING;
    }

    /// Starts a round with room for `limit` rows; `None` when nothing may be due (or a
    /// round is already running). When both kinds may be due, keyed heads get half (odd
    /// limits round that half up and down in turn), so neither kind starves the other.
    pub fn start(&mut self, limit: u32) -> Option<Split> {
        if self.in_round() || limit == 0 {
            return None;
        }
        let split = match (self.unkeyed_idle, self.keyed_idle) {
            (true, true) => return None,
            (false, true) => Split {
                unkeyed: limit,
                keyed: 0,
            },
            (true, false) => Split {
                unkeyed: 0,
                keyed: limit,
            },
            (false, false) => {
                self.round_up = !self.round_up;
                let keyed = (limit + u32::from(self.round_up)) / 2;
                Split {
                    unkeyed: limit - keyed,
                    keyed,
                }
            }
        };
        let parts = u8::from(split.unkeyed > 0) + u8::from(split.keyed > 0);
        // A room of one goes to one kind: the other, still awake, must get the next round
        // even if this one finds nothing (nothing else would wake the Scheduler for it).
        let left_out =
            (split.unkeyed == 0 && !self.unkeyed_idle) || (split.keyed == 0 && !self.keyed_idle);
        self.round = Some(Round {
            parts,
            full: left_out,
            got: 0,
            failed: false,
        });
        Some(split)
    }

    /// One claim of the round answered: `Some((rows, full))`, or `None` when it failed (the
    /// kind stays awake). Returns how the round ended once its last claim answered.
    pub fn answered(&mut self, kind: Kind, outcome: Option<(usize, bool)>) -> Option<RoundEnd> {
        let round = self.round.as_mut()?;
        if let Some((got, full)) = outcome {
            // Full with nothing claimed: a keyed walk stopped at its bound with keys left to
            // visit, so that kind goes on.
            let idle = got == 0 && !full;
            match kind {
                Kind::Unkeyed => self.unkeyed_idle = idle,
                Kind::Keyed => self.keyed_idle = idle,
            }
            round.got += got;
            round.full |= full;
        } else {
            round.failed = true;
        }
        round.parts = round.parts.saturating_sub(1);
        if round.parts > 0 {
            return None;
        }
        let end = RoundEnd {
            full: round.full,
            got: round.got,
            failed: round.failed,
        };
        self.round = None;
        self.apply_wakes();
        Some(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNKEYED: Wake = Wake {
        unkeyed: true,
        keyed: false,
    };
    const KEYED: Wake = Wake {
        unkeyed: false,
        keyed: true,
    };

    fn split(unkeyed: u32, keyed: u32) -> Option<Split> {
        Some(Split { unkeyed, keyed })
    }

    #[test]
    fn a_full_answer_with_nothing_claimed_keeps_its_kind_awake() {
        let mut d = Demand::default();
        assert_eq!(d.start(10), split(5, 5));
        d.answered(Kind::Unkeyed, Some((0, false)));
        let end = d
            .answered(Kind::Keyed, Some((0, true)))
            .expect("round over");
        assert!(end.full);
        assert_eq!(d.start(10), split(0, 10), "the keys are walked on");
    }

    #[test]
    fn both_kinds_share_a_round_until_one_finds_nothing() {
        let mut d = Demand::default();
        assert_eq!(d.start(10), split(5, 5));
        assert_eq!(d.start(10), None, "one round at a time");
        assert_eq!(d.answered(Kind::Unkeyed, Some((5, true))), None);
        let end = d.answered(Kind::Keyed, Some((0, false)));
        assert_eq!(
            end,
            Some(RoundEnd {
                full: true,
                got: 5,
                failed: false
            })
        );
        assert_eq!(
            d.start(10),
            split(10, 0),
            "no keyed heads: unkeyed take it all"
        );
        d.answered(Kind::Unkeyed, Some((0, false)));
        assert_eq!(d.start(10), None, "nothing may be due");
        d.wake(KEYED);
        assert_eq!(
            d.start(10),
            split(0, 10),
            "a keyed chain skips the unkeyed claim"
        );
    }

    #[test]
    fn a_wake_during_a_round_outlives_its_empty_answer() {
        let mut d = Demand::default();
        d.start(4);
        d.answered(Kind::Unkeyed, Some((0, false)));
        d.answered(Kind::Keyed, Some((0, false)));
        assert_eq!(d.start(4), None);
        d.wake(UNKEYED);
        assert_eq!(d.start(4), split(4, 0));
        d.wake(UNKEYED); // a row committed while that claim ran
        let end = d.answered(Kind::Unkeyed, Some((0, false)));
        assert_eq!(
            end,
            Some(RoundEnd {
                full: false,
                got: 0,
                failed: false
            })
        );
        assert_eq!(d.start(4), split(4, 0), "claimed again, not put to sleep");
    }

    #[test]
    fn keyed_claims_sleep_when_no_key_can_be_ready_until_woken() {
        let mut d = Demand::default();
        d.no_key_ready();
        assert_eq!(d.start(4), split(4, 0), "unkeyed rows take the room");
        d.no_key_ready(); // during a round: no effect on it
        d.answered(Kind::Unkeyed, Some((0, false)));
        assert_eq!(d.start(4), None, "nothing may be due");
        d.wake(KEYED); // this engine freed a key
        assert_eq!(d.start(4), split(0, 4));
    }

    #[test]
    fn a_failed_claim_keeps_its_kind_awake() {
        let mut d = Demand::default();
        d.start(2);
        d.answered(Kind::Unkeyed, None);
        let end = d.answered(Kind::Keyed, Some((0, false)));
        assert!(end.is_some_and(|e| e.failed), "the round says it failed");
        assert_eq!(d.start(2), split(2, 0));
    }

    #[test]
    fn a_kind_left_out_of_a_round_gets_the_next_one() {
        let mut d = Demand::default();
        let s = d.start(1).expect("a round");
        let (ran, left) = if s.keyed == 1 {
            (Kind::Keyed, Kind::Unkeyed)
        } else {
            (Kind::Unkeyed, Kind::Keyed)
        };
        // The kind that ran finds nothing; the round still says "go again".
        let end = d.answered(ran, Some((0, false))).expect("round over");
        assert!(end.full, "the left-out kind must not wait for the sweep");
        let next = d.start(1).expect("the next round");
        let room = match left {
            Kind::Unkeyed => next.unkeyed,
            Kind::Keyed => next.keyed,
        };
        assert_eq!(room, 1);
    }

    #[test]
    fn odd_rooms_alternate_the_keyed_half_so_a_room_of_one_serves_both() {
        let mut d = Demand::default();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let s = d.start(1).expect("a round");
            seen.push((s.unkeyed, s.keyed));
            if s.unkeyed > 0 {
                d.answered(Kind::Unkeyed, Some((1, true)));
            }
            if s.keyed > 0 {
                d.answered(Kind::Keyed, Some((1, true)));
            }
        }
        assert!(seen.contains(&(1, 0)) && seen.contains(&(0, 1)), "{seen:?}");
    }
}
