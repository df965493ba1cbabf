//! The outbox message: what a producer enqueues and what the engine claims and publishes.
//!
//! Everything a row holds comes from outside (any producer in any language can insert one),
//! so the conversion to AMQP ([`OutboxMessage::amqp_properties`]) checks every part and
//! returns a reason instead of panicking: lapin's `ShortString::from` panics past 255 bytes.

use chrono::{DateTime, Utc};
use lapin::{
    types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString},
    BasicProperties,
};
use serde_json::Value;
use uuid::Uuid;

/// One outbox row.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    /// Row id, sent as the AMQP `message_id`. [`OutboxMessage::new`] makes a time-ordered one
    /// (UUID version 7), like the table's default: new ids land at the primary key's right
    /// edge instead of on a random page of the whole retained history.
    pub id: Uuid,
    /// Target exchange (`""` is the default exchange).
    pub exchange: String,
    /// Matched against the exchange's bindings (`""` is allowed).
    pub routing_key: String,
    /// Published byte for byte; Courier never decodes it.
    pub payload: Vec<u8>,
    /// A JSON object; each key becomes an AMQP header.
    pub headers: Value,
    /// AMQP `content_type`.
    pub content_type: Option<String>,
    /// Attempts so far (after a claim: this attempt included).
    pub attempts: u32,
    /// Per-row attempt budget; `None` uses `retry.max_attempts`.
    pub max_attempts: Option<u32>,
    /// When the producer committed it.
    pub created_at: DateTime<Utc>,
    /// Messages with the same key are published one at a time, in insertion order; `None`
    /// (the default) leaves the message unordered.
    pub ordering_key: Option<String>,
}

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

impl OutboxMessage {
    /// A new message with a fresh id, no headers and no content type.
    ///
    /// ```
    /// let m = courier::OutboxMessage::new("orders", "order.created", br#"{"id":42}"#.to_vec())
    ///     .with_content_type("application/json")
    ///     .with_header("tenant", "a");
    /// assert_eq!(m.headers["tenant"], "a");
    /// ```
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        OutboxMessage {
            id: Uuid::now_v7(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            payload: payload.into(),
            headers: Value::Object(Default::default()),
            content_type: None,
            attempts: 0,
            max_attempts: None,
            created_at: Utc::now(),
            ordering_key: None,
        }
    }

    /// Orders this message after every earlier message with the same key: it is published
    /// only once they are confirmed (or dead-lettered, per `ordering.on_dead_letter`).
    pub fn with_ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Sets the id (e.g. to make enqueueing itself idempotent).
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// Sets the content type.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Adds one header (headers must be a JSON object; anything else is replaced by one).
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        if !self.headers.is_object() {
            self.headers = Value::Object(Default::default());
        }
        if let Value::Object(map) = &mut self.headers {
            map.insert(key.into(), value.into());
        }
        self
    }

    /// Sets a per-message attempt budget.
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = Some(max_attempts);
        self
    }

    /// The AMQP exchange name, checked.
    pub fn amqp_exchange(&self) -> Result<ShortString, String> {
        short_string("exchange", &self.exchange)
    }

    /// The AMQP routing key, checked.
    pub fn amqp_routing_key(&self) -> Result<ShortString, String> {
        short_string("routing_key", &self.routing_key)
    }

    /// Properties for the publish: persistent, `message_id` = row id, content type,
    /// headers from the row plus `extra` (e.g. Courier's own).
    pub fn amqp_properties(&self) -> Result<BasicProperties, String> {
        check_routing_headers(&self.headers)?;
        let mut props = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_message_id(ShortString::from(self.id.to_string()))
            .with_timestamp(self.created_at.timestamp().max(0) as u64)
            .with_headers(headers_to_table(&self.headers)?);
        if let Some(ct) = &self.content_type {
            props = props.with_content_type(short_string("content_type", ct)?);
        }
        Ok(props)
    }
}

/// Bytes of the content-header frame that carries `props`: frame header (7), class id,
/// weight and body size (12), the encoded properties (flags, headers table…) and the frame
/// end (1). A header frame over the connection's negotiated `frame_max` is a frame error
/// that closes the whole connection, so it must be refused before publishing.
pub fn content_header_frame_size(props: &BasicProperties) -> Result<usize, String> {
    let encoded = lapin::protocol::basic::gen_properties(props)(Vec::new().into())
        .map_err(|e| format!("properties cannot be encoded: {e}"))?;
    Ok(7 + 12 + encoded.write.len() + 1)
}

/// Rejects properties whose content-header frame would not fit in `frame_max` bytes.
pub fn check_header_frame(props: &BasicProperties, frame_max: u32) -> Result<(), String> {
    let size = content_header_frame_size(props)?;
    if frame_max > 0 && size > frame_max as usize {
        return Err(format!(
            "headers need a {size}-byte content header frame, over the connection's \
             frame_max of {frame_max} bytes"
        ));
    }
    Ok(())
}

/// RabbitMQ routes on the `CC` and `BCC` headers (sender-selected distribution) and closes
/// the publishing channel (406 `unacceptable_type_in_header`) when either is anything but an
/// array. The close names no message, so the failure could not be pinned on this row; it is
/// refused here instead, before it can take the channel down under good messages.
fn check_routing_headers(headers: &Value) -> Result<(), String> {
    let Value::Object(map) = headers else {
        return Ok(()); // not an object: `headers_to_table` names that
    };
    for name in ["CC", "BCC"] {
        match map.get(name) {
            None | Some(Value::Array(_)) => {}
            Some(other) => {
                return Err(format!(
                    "header {name} is {}, but RabbitMQ routes on it and accepts only an \
                     array of routing keys",
                    json_kind(other)
                ))
            }
        }
    }
    Ok(())
}

fn short_string(what: &str, s: &str) -> Result<ShortString, String> {
    ShortString::try_new(s)
        .map_err(|_| format!("{what} is {} bytes, AMQP allows at most 255", s.len()))
}

/// Converts the row's JSON headers to an AMQP field table. Only a JSON object can become
/// headers; keys are AMQP short strings (≤ 255 bytes).
pub fn headers_to_table(headers: &Value) -> Result<FieldTable, String> {
    match headers {
        Value::Null => Ok(FieldTable::default()),
        Value::Object(map) => {
            let mut table = FieldTable::default();
            for (k, v) in map {
                let key = ShortString::try_new(k.as_str())
                    .map_err(|_| format!("header name of {} bytes is over AMQP's 255", k.len()))?;
                table.insert(key, json_to_amqp(v)?);
            }
            Ok(table)
        }
        other => Err(format!(
            "headers must be a JSON object, got {}",
            json_kind(other)
        )),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn json_to_amqp(v: &Value) -> Result<AMQPValue, String> {
    Ok(match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                AMQPValue::LongLongInt(i)
            } else if let Some(f) = n.as_f64() {
                AMQPValue::Double(f)
            } else {
                return Err(format!("header number {n} does not fit AMQP"));
            }
        }
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items
                .iter()
                .map(json_to_amqp)
                .collect::<Result<Vec<_>, _>>()?,
        )),
        Value::Object(_) => AMQPValue::FieldTable(headers_to_table(v)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn headers_convert() {
        let t = headers_to_table(&json!({"a": "x", "n": 5, "f": 1.5, "b": true, "z": null,
            "arr": [1, "y"], "obj": {"k": "v"}}))
        .unwrap();
        let inner = t.inner();
        assert_eq!(inner.len(), 7);
        assert_eq!(inner.get("n"), Some(&AMQPValue::LongLongInt(5)));
        assert_eq!(inner.get("b"), Some(&AMQPValue::Boolean(true)));
    }

    #[test]
    fn routing_headers_that_would_close_the_channel_are_refused() {
        let with = |headers: Value| {
            let mut m = OutboxMessage::new("x", "k", b"p".to_vec());
            m.headers = headers;
            m.amqp_properties()
        };
        for bad in [
            json!({"CC": 5}),
            json!({"CC": "k"}),
            json!({"BCC": {"a": 1}}),
            json!({"CC": null}),
        ] {
            let e = with(bad.clone()).unwrap_err();
            assert!(e.contains("array of routing keys"), "{bad}: {e}");
        }
        assert!(with(json!({"CC": ["a", "b"], "BCC": []})).is_ok());
        // Only the top level routes: a nested table may hold anything.
        assert!(with(json!({"t": {"CC": 5}, "cc": 5})).is_ok());
    }

    #[test]
    fn non_object_headers_are_rejected_with_a_reason() {
        let e = headers_to_table(&json!([1, 2])).unwrap_err();
        assert!(e.contains("JSON object") && e.contains("array"), "{e}");
        assert!(headers_to_table(&json!("s")).is_err());
    }

    #[test]
    fn long_names_are_errors_not_panics() {
        let long = "k".repeat(300);
        assert!(headers_to_table(&json!({ long.clone(): 1 })).is_err());
        let m = OutboxMessage::new(long.clone(), "rk", vec![]);
        assert!(m.amqp_exchange().unwrap_err().contains("255"));
        let m = OutboxMessage::new("x", long.clone(), vec![]);
        assert!(m.amqp_routing_key().is_err());
        let m = OutboxMessage::new("x", "y", vec![]).with_content_type(long);
        assert!(m.amqp_properties().is_err());
    }

    #[test]
    fn header_frames_are_measured_against_frame_max() {
        let small = OutboxMessage::new("x", "y", b"p".to_vec()).with_header("a", "b");
        let props = small.amqp_properties().unwrap();
        let size = content_header_frame_size(&props).unwrap();
        assert!(size > 36 && size < 200, "{size}");
        assert!(check_header_frame(&props, 131_072).is_ok());
        assert!(check_header_frame(&props, size as u32).is_ok());
        assert!(check_header_frame(&props, size as u32 - 1).is_err());

        let big = small.with_header("big", "x".repeat(200_000));
        let props = big.amqp_properties().unwrap();
        let size = content_header_frame_size(&props).unwrap();
        assert!(size > 200_000, "{size}");
        let e = check_header_frame(&props, 131_072).unwrap_err();
        assert!(e.contains(&size.to_string()) && e.contains("131072"), "{e}");
    }

    #[test]
    fn properties_are_persistent_with_message_id() {
        let m = OutboxMessage::new("x", "y", b"p".to_vec()).with_content_type("text/plain");
        let p = m.amqp_properties().unwrap();
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(
            p.message_id().as_ref().map(|s| s.as_str().to_string()),
            Some(m.id.to_string())
        );
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("text/plain")
        );
    }
}
