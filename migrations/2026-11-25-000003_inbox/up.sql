-- The consumer inbox: one row per (consumer, message id) a consumer has applied. Its
-- primary key is what turns at-least-once delivery into effectively-once processing.
CREATE TABLE inbox (
    consumer    text        NOT NULL,
    message_id  text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- Inbox retention deletes old rows by age.
CREATE INDEX inbox_received_at_idx ON inbox (received_at);
