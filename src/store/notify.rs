//! The outbox's NOTIFY channel. The insert trigger (see `migrations/`) notifies
//! `<schema>.outbox` for every statement that adds rows (delivered at commit), so engines
//! claim within milliseconds. Engines also notify it themselves, to check at start that
//! notifications reach them and to wake each other when a discarded dead letter unblocks
//! a key.

use diesel::sql_types::Text;

use super::{Schema, Store, StoreError};

/// The payload of a NOTIFY about keyed rows: the insert trigger's when keyed rows were among
/// an insert's, and a discard's that may unblock a key. The trigger's other payload is `''`
/// (unkeyed rows only).
pub(crate) const NOTIFY_KEYED: &str = "keyed";

/// The payload of an engine that stopped and gave rows back: any row may be due.
pub(crate) const NOTIFY_RELEASED: &str = "released";

/// The channel's name: `<schema>.outbox`, unquoted (a channel is not an identifier here,
/// but a string the trigger passes to `pg_notify`).
fn channel(s: &Schema) -> String {
    format!("{}.outbox", s.name())
}

/// -- name: notify
///
/// `$1` payload. The channel is a literal: the schema name was checked, so it holds
/// nothing to escape.
fn notify(s: &Schema) -> String {
    let schema = s.name();
    format!("SELECT pg_notify('{schema}.outbox', $1)::text AS v")
}

impl Store {
    /// The NOTIFY channel of the insert trigger: `<schema>.outbox`.
    pub(crate) fn notify_channel(&self) -> String {
        channel(&self.schema)
    }

    /// Sends a NOTIFY on the outbox channel with `payload` (the listener's self-check).
    pub(crate) async fn notify(&self, payload: &str) -> Result<(), StoreError> {
        let mut conn = self.op().await?;
        conn.run(diesel::sql_query(notify(&self.schema)).bind::<Text, _>(payload))
            .await?;
        Ok(())
    }
}
