//! Which ordering keys the next keyed claim looks at: all of them (a walk), or only the keys
//! this engine freed since. Pure state, so the rules are unit-tested without a database.
//!
//! A walk visits every key with open rows, in flight or not, one index probe each: with a
//! thousand busy keys that was most of the database's extra work per keyed message. A key
//! this engine holds becomes ready only when its last row settles, so once a walk has seen
//! every key, probing the keys freed since is enough, until something else may ready a key:
//! an insert's NOTIFY, a delay or backoff ending, the sweep, a nudge (every wake-up but a
//! settlement), or a walk that stopped at its limit with keys unvisited. Keys freed by
//! another engine are that engine's to probe; a key not ready when probed waits for such a
//! wake-up. An engine that stops wakes the others once it has given its rows back (one
//! NOTIFY); rows an engine gives back while it runs (the rest of a failed run, its queue
//! when the broker is lost) wait for a wake-up or the other engines' sweep, a second by
//! default.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use crate::store::Claimed;

/// How the next keyed claim finds its heads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Scan {
    /// Every key, round-robin from the cursor (`claim_keyed`).
    Walk,
    /// These keys only (`claim_keys`).
    Listed(Vec<String>),
}

/// See the module documentation.
#[derive(Debug)]
pub(super) struct Keys {
    /// Held rows of each key, and the key of each held keyed row.
    rows: HashMap<String, u32>,
    key_of: HashMap<Uuid, String>,
    /// Keys whose last held row settled since the last claim that looked at them.
    freed: Vec<String>,
    /// The next keyed claim walks every key.
    walk_due: bool,
}

impl Default for Keys {
    fn default() -> Keys {
        Keys {
            rows: HashMap::new(),
            key_of: HashMap::new(),
            freed: Vec::new(),
            walk_due: true,
        }
    }
}

impl Keys {
    /// Row `id` of `key` is now held (counted once, however often it is claimed again).
    pub(super) fn held(&mut self, id: Uuid, key: &str) {
        if self.key_of.insert(id, key.to_owned()).is_none() {
            *self.rows.entry(key.to_owned()).or_default() += 1;
        }
    }

    /// Row `id` is no longer held: its key is freed when it was the key's last, whatever
    /// order the rows settle in (the Ledger's flushes may commit out of order). Returns
    /// whether it freed its key.
    pub(super) fn let_go(&mut self, id: &Uuid) -> bool {
        let Some(key) = self.key_of.remove(id) else {
            return false;
        };
        let Some(rows) = self.rows.get_mut(&key) else {
            return false;
        };
        *rows -= 1;
        if *rows > 0 {
            return false;
        }
        self.rows.remove(&key);
        self.freed.push(key);
        true
    }

    /// A wake-up other than this engine's own settlement: any key may be ready.
    pub(super) fn woke(&mut self) {
        self.walk_due = true;
    }

    /// Whether a keyed claim may find a ready head: a walk is due, or this engine freed
    /// keys since. Otherwise no key can be ready (see the module documentation), and a claim
    /// would walk every key to find nothing: with a thousand keys held, that walk took
    /// 5–15 ms of the database's time, and the walk after it stood in for a listed claim.
    pub(super) fn may_be_ready(&self) -> bool {
        self.walk_due || !self.freed.is_empty()
    }

    /// How the next claim, of at most `heads` heads, finds them.
    pub(super) fn scan(&mut self, heads: u32) -> Scan {
        if self.walk_due || self.freed.is_empty() {
            // The walk covers the freed keys; its answer says whether it saw every key.
            self.walk_due = false;
            self.freed.clear();
            return Scan::Walk;
        }
        let n = self.freed.len().min(heads as usize);
        Scan::Listed(self.freed.drain(..n).collect())
    }

    /// A claim made with `scan` and `heads` answered (`None`: it failed). Returns whether a
    /// walk just saw every key: the caller then arms the timer for the earliest delayed
    /// row, which settlements no longer bring to a walk. A wake-up that came while the claim
    /// ran still asks for a walk.
    pub(super) fn answered(&mut self, scan: &Scan, heads: u32, claimed: Option<&Claimed>) -> bool {
        self.walk_due |= match (scan, claimed) {
            (Scan::Walk, Some(c)) => !saw_every_key(c, heads),
            (Scan::Listed(_), Some(c)) => left_keys_out(c),
            (_, None) => true,
        };
        *scan == Scan::Walk && !self.walk_due
    }

    /// Freed keys are left beyond the last listed claim's heads: claim again.
    pub(super) fn more_listed(&self) -> bool {
        !self.walk_due && !self.freed.is_empty()
    }
}

/// Whether a walk with a limit of `heads` heads visited every key and took every ready
/// head: it found fewer ready heads than its limit (counted before locking, so heads
/// another engine locked first do not pass for the end of the keys), it returned rows (an
/// empty answer does not say how far it walked), none was left out by the byte budget, and
/// none was dead-lettered (a key may go on past a dead-lettered head without any
/// settlement here). Its rows come heads first (see `claim_keyed`), so a claim that
/// returned any row after a head took every head it found; one that returned heads only
/// and was cut may have left heads out.
fn saw_every_key(claimed: &Claimed, heads: u32) -> bool {
    let found = keys_of(claimed);
    claimed.dead_lettered.is_empty()
        && found > 0
        && claimed.candidates < heads as usize
        && (claimed.messages.len() > found || !claimed.full)
}

/// Whether a claim of listed keys may have left a ready one out (see [`saw_every_key`]).
fn left_keys_out(claimed: &Claimed) -> bool {
    !claimed.dead_lettered.is_empty()
        || (claimed.full && claimed.messages.len() == keys_of(claimed))
}

/// How many keys a keyed claim's rows belong to: each key's head came with its run.
fn keys_of(claimed: &Claimed) -> usize {
    let keys: HashSet<&str> = claimed
        .messages
        .iter()
        .filter_map(|m| m.ordering_key.as_deref())
        .collect();
    keys.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OutboxMessage;

    fn row(key: &str) -> OutboxMessage {
        OutboxMessage {
            ordering_key: Some(key.into()),
            ..OutboxMessage::new("ex", "rk", b"x".to_vec())
        }
    }

    /// A claim that returned these keys' rows, `candidates` heads found ready.
    fn claimed(keys: &[&str], candidates: usize, full: bool) -> Claimed {
        Claimed {
            messages: keys.iter().map(|k| row(k)).collect(),
            full,
            candidates,
            ..Claimed::default()
        }
    }

    /// Holds one row of each key and lets it go: each key is freed.
    fn free(keys: &mut Keys, names: &[&str]) {
        for name in names {
            let id = Uuid::now_v7();
            keys.held(id, name);
            keys.let_go(&id);
        }
    }

    #[test]
    fn it_walks_until_a_walk_has_seen_every_key_then_lists_the_freed_ones() {
        let mut keys = Keys::default();
        free(&mut keys, &["a"]);
        assert_eq!(keys.scan(10), Scan::Walk, "the first claim walks");
        assert!(keys.answered(&Scan::Walk, 10, Some(&claimed(&["a", "b"], 2, false))));
        free(&mut keys, &["a", "b", "c"]);
        assert_eq!(
            keys.scan(2),
            Scan::Listed(vec!["a".into(), "b".into()]),
            "at most `heads` keys"
        );
        assert!(keys.more_listed(), "c is left: claim again");
        assert!(!keys.answered(&Scan::Listed(vec![]), 2, Some(&claimed(&["a"], 1, false))));
        assert_eq!(keys.scan(2), Scan::Listed(vec!["c".into()]));
        assert!(!keys.more_listed());
        assert!(
            !keys.may_be_ready(),
            "nothing freed, no wake-up: nothing to claim"
        );
        keys.woke();
        assert!(keys.may_be_ready());
        assert_eq!(keys.scan(2), Scan::Walk, "a wake-up: walk");
    }

    #[test]
    fn a_walk_that_may_have_left_keys_unvisited_is_followed_by_another() {
        let walk = |c: Claimed| {
            let mut keys = Keys::default();
            assert_eq!(keys.scan(4), Scan::Walk);
            keys.answered(&Scan::Walk, 4, Some(&c));
            free(&mut keys, &["a"]);
            keys.scan(4)
        };
        assert_eq!(
            walk(claimed(&["a", "b", "c", "d"], 4, false)),
            Scan::Walk,
            "at its limit"
        );
        assert_eq!(
            walk(claimed(&["a", "b"], 4, false)),
            Scan::Walk,
            "ready heads counted before another engine locked two of them"
        );
        assert_eq!(walk(claimed(&[], 0, false)), Scan::Walk, "an empty answer");
        assert_eq!(
            walk(claimed(&["a", "b"], 2, true)),
            Scan::Walk,
            "heads only, cut"
        );
        let mut dead = claimed(&["a"], 2, false);
        dead.dead_lettered
            .push((Uuid::now_v7(), "unreadable".into()));
        assert_eq!(walk(dead), Scan::Walk, "a dead-lettered head");
        assert_eq!(
            walk(claimed(&["a", "a", "b"], 2, true)),
            Scan::Listed(vec!["a".into()]),
            "a run row came back: every head was taken"
        );
    }

    #[test]
    fn a_wake_up_brings_the_walk_back_even_during_a_walk() {
        let mut keys = Keys::default();
        assert!(keys.may_be_ready(), "the first claim walks");
        assert_eq!(keys.scan(10), Scan::Walk);
        keys.woke(); // an insert's NOTIFY while the walk runs
        assert!(!keys.answered(&Scan::Walk, 10, Some(&claimed(&["a"], 1, false))));
        free(&mut keys, &["a"]);
        assert_eq!(keys.scan(10), Scan::Walk);
        keys.answered(&Scan::Walk, 10, None);
        free(&mut keys, &["a"]);
        assert_eq!(keys.scan(10), Scan::Walk, "after a failed claim");
    }

    #[test]
    fn a_key_is_freed_when_its_last_held_row_lets_go() {
        let mut keys = Keys::default();
        let (a1, a2) = (Uuid::now_v7(), Uuid::now_v7());
        keys.held(a1, "a");
        keys.held(a2, "a");
        // Claimed again while held: counted once.
        keys.held(a2, "a");
        // The run's last row settles first: its flush committed before the one ahead.
        assert!(!keys.let_go(&a2), "a1 still held");
        assert!(!keys.let_go(&Uuid::now_v7()), "not a keyed row");
        assert!(keys.freed.is_empty());
        assert!(keys.let_go(&a1), "the key's last held row frees it");
        assert_eq!(keys.freed, vec!["a".to_string()]);
        assert!(keys.rows.is_empty() && keys.key_of.is_empty());
        assert!(!keys.let_go(&a1), "settled twice frees nothing");
    }
}
