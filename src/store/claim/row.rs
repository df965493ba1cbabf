//! A claimed row as it comes back from a claim, and the columns it is read with: every
//! column in a form that cannot fail to decode, so one hostile row is set aside alone
//! (dead-lettered with a reason naming the column) instead of failing its whole batch.

use chrono::{DateTime, Utc};
use diesel::{
    sql_types::{BigInt, Bool, Bytea, Integer, Nullable, Text, Timestamptz},
    QueryableByName,
};
use uuid::Uuid;

use crate::message::OutboxMessage;

/// The columns a claimed message is read with (see `ClaimedRow`), `max_payload` being the
/// parameter that holds `publisher.max_payload_bytes`. `cut` says the byte budget left
/// rows out (see `fit` in the claim statements): the claim counts as full, so the engine claims again as soon as
/// bytes come back instead of waiting for the next sweep.
///
/// Every column comes in a form that cannot fail to decode, so one hostile row can never
/// fail the whole batch: headers as text (parsed row by row: valid jsonb is not always valid
/// for serde_json, e.g. `1e400` or deep nesting), `created_at` only when chrono can hold it
/// (not `infinity`, not year 200000), and the payload only when it is not over the limit
/// (its size is read from the varlena header, so an over-size payload is never fetched).
///
/// `candidates` is the SQL for how many heads a keyed claim found ready before locking them
/// (`0` for other claims), the same on every row.
pub(super) fn message_columns(max_payload: &str, candidates: &str) -> String {
    format!(
        "o.id, o.exchange, o.routing_key,
         CASE WHEN octet_length(o.payload) <= {max_payload} THEN o.payload END AS payload,
         octet_length(o.payload)::bigint AS payload_size,
         o.headers::text AS headers,
         o.content_type, o.attempts, o.max_attempts,
         CASE WHEN isfinite(o.created_at) AND o.created_at < '100000-01-01'
              THEN o.created_at END AS created_at,
         CASE WHEN isfinite(o.created_at) AND o.created_at < '100000-01-01'
              THEN NULL ELSE o.created_at::text END AS created_at_text,
         o.ordering_key,
         (SELECT count(*) FROM picked) > (SELECT count(*) FROM fit) AS cut,
         {candidates}::bigint AS candidates"
    )
}

/// A claimed row as read (see [`message_columns`]): every column in a form that
/// cannot fail to decode, so one hostile row is set aside alone ([`ClaimedRow::decode`])
/// instead of failing its whole batch.
#[derive(QueryableByName)]
pub(super) struct ClaimedRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub(super) id: Uuid,
    #[diesel(sql_type = Text)]
    exchange: String,
    #[diesel(sql_type = Text)]
    routing_key: String,
    /// NULL when over `publisher.max_payload_bytes` (never fetched).
    #[diesel(sql_type = Nullable<Bytea>)]
    payload: Option<Vec<u8>>,
    #[diesel(sql_type = BigInt)]
    payload_size: i64,
    /// The jsonb as text, parsed here row by row.
    #[diesel(sql_type = Text)]
    headers: String,
    #[diesel(sql_type = Nullable<Text>)]
    content_type: Option<String>,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Nullable<Integer>)]
    max_attempts: Option<i32>,
    /// NULL when chrono cannot hold it (`infinity`, a year past 99999).
    #[diesel(sql_type = Nullable<Timestamptz>)]
    created_at: Option<DateTime<Utc>>,
    /// The value as PostgreSQL prints it, only when `created_at` is NULL.
    #[diesel(sql_type = Nullable<Text>)]
    created_at_text: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub(super) ordering_key: Option<String>,
    /// The byte budget left rows of this claim out (the same on every row).
    #[diesel(sql_type = Bool)]
    pub(super) cut: bool,
    /// Keyed claims: the heads found ready before locking (the same on every row).
    #[diesel(sql_type = BigInt)]
    pub(super) candidates: i64,
}

/// A claimed row that can never be published, with the reason naming the column.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Undecodable {
    pub(super) id: Uuid,
    pub(super) reason: String,
    /// Its ordering key: the rows after it of its key in the same claim must not go out.
    pub(super) ordering_key: Option<String>,
}

impl ClaimedRow {
    /// The message, or why this row can never be published (it is dead-lettered at once:
    /// no retry can change what the row holds).
    pub(super) fn decode(self, max_payload: u64) -> Result<OutboxMessage, Undecodable> {
        let fail = |reason: String| Undecodable {
            id: self.id,
            reason,
            ordering_key: self.ordering_key.clone(),
        };
        let Some(payload) = self.payload else {
            return Err(fail(format!(
                "payload of {} bytes is over publisher.max_payload_bytes ({max_payload})",
                self.payload_size
            )));
        };
        let headers = serde_json::from_str(&self.headers)
            .map_err(|e| fail(format!("column headers cannot be read as JSON: {e}")))?;
        let Some(created_at) = self.created_at else {
            return Err(fail(format!(
                "column created_at is {}, outside the range Courier can read",
                self.created_at_text.as_deref().unwrap_or("unreadable")
            )));
        };
        Ok(OutboxMessage {
            id: self.id,
            exchange: self.exchange,
            routing_key: self.routing_key,
            payload,
            headers,
            content_type: self.content_type,
            // CHECK constraints keep these in range for new rows; a value read anyway
            // (an older row) is clamped rather than trusted.
            attempts: u32::try_from(self.attempts).unwrap_or(0),
            max_attempts: self.max_attempts.and_then(|m| u32::try_from(m).ok()),
            created_at,
            ordering_key: self.ordering_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::ClaimedRow;

    fn row(headers: &str) -> ClaimedRow {
        ClaimedRow {
            id: uuid::Uuid::nil(),
            exchange: "x".into(),
            routing_key: "k".into(),
            payload: Some(b"p".to_vec()),
            payload_size: 1,
            headers: headers.into(),
            content_type: None,
            attempts: 1,
            max_attempts: None,
            created_at: Some(chrono::Utc::now()),
            created_at_text: None,
            ordering_key: None,
            cut: false,
            candidates: 0,
        }
    }

    #[test]
    fn a_row_that_cannot_be_read_names_the_column() {
        assert!(row(r#"{"a": 1}"#).decode(10).is_ok());
        let why = |r: ClaimedRow| r.decode(10).unwrap_err().reason;
        assert!(why(row(r#"{"n": 1e400}"#)).contains("column headers"));
        // The largest f64, as jsonb prints it (all 309 digits): a number, not out of range.
        let max = format!("{{\"x\": 17976931348623157{}}}", "0".repeat(292));
        assert!(row(&max).decode(10).is_ok());
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        assert!(why(row(&deep)).contains("column headers"));
        let mut r = row("{}");
        r.created_at = None;
        r.created_at_text = Some("infinity".into());
        assert!(why(r).contains("column created_at is infinity"));
        let mut r = row("{}");
        r.payload = None;
        r.payload_size = 4096;
        assert!(why(r).contains("payload of 4096 bytes is over publisher.max_payload_bytes (10)"));
    }
}
