-- Per-key ordering (SQL contract v2). Rows with the same `ordering_key` are published one at
-- a time, in `seq` order: a key's next row waits until the previous one is confirmed (or
-- dead-lettered). Rows without a key (NULL) keep the v1 behaviour.
--
-- Cheap on a large live outbox: the new columns are NULL for existing rows (no table
-- rewrite), the indexes below only hold keyed rows, and `seq`'s default is set after the
-- column exists, so old rows are not renumbered.

-- Byte order ("C"): the engine resumes its round-robin scan over keys from the last key it
-- served, comparing keys the same way in Rust and in SQL.
ALTER TABLE outbox ADD COLUMN ordering_key text COLLATE "C";
ALTER TABLE outbox ADD COLUMN seq bigint;
CREATE SEQUENCE outbox_seq OWNED BY outbox.seq;
ALTER TABLE outbox ALTER COLUMN seq SET DEFAULT nextval('outbox_seq');
-- A keyed row must have a place in its key's order. NOT VALID: existing rows have no key.
ALTER TABLE outbox ADD CONSTRAINT outbox_keyed_seq CHECK (ordering_key IS NULL OR seq IS NOT NULL) NOT VALID;

-- Each key's open rows in order: the head of a key is its first entry here. The claim walks
-- this index one key at a time (a loose index scan).
CREATE INDEX outbox_key_idx ON outbox (ordering_key, seq)
    WHERE ordering_key IS NOT NULL AND status IN ('pending', 'in_flight', 'retrying');
-- "Does this key have a message in flight?" (at most publisher.max_in_flight entries).
CREATE INDEX outbox_key_in_flight_idx ON outbox (ordering_key)
    WHERE ordering_key IS NOT NULL AND status = 'in_flight';
-- The due index now holds unkeyed rows only, so a long backlog behind one key is never
-- scanned by the claim of unkeyed rows; keyed rows have their own (for the next-due timer).
DROP INDEX outbox_due_idx;
CREATE INDEX outbox_due_idx ON outbox (next_attempt_at)
    WHERE status IN ('pending', 'retrying') AND ordering_key IS NULL;
CREATE INDEX outbox_keyed_due_idx ON outbox (next_attempt_at)
    WHERE status IN ('pending', 'retrying') AND ordering_key IS NOT NULL;

-- A dead-lettered row keeps its key and place: a requeue puts it back where it was, and in
-- `ordering.on_dead_letter: block` mode its key waits while it sits here.
ALTER TABLE dead_letters ADD COLUMN ordering_key text COLLATE "C";
ALTER TABLE dead_letters ADD COLUMN seq bigint;
CREATE INDEX dead_letters_key_idx ON dead_letters (ordering_key) WHERE ordering_key IS NOT NULL;

-- Retention's archive mode copies rows with SELECT *: same columns, same order.
ALTER TABLE outbox_archive ADD COLUMN ordering_key text COLLATE "C";
ALTER TABLE outbox_archive ADD COLUMN seq bigint;

-- Keyed rows also say so in their NOTIFY ('keyed'; PostgreSQL folds repeats within a
-- transaction into one), so an engine only walks the keys when keyed rows may be waiting and
-- the claim of unkeyed rows stays as cheap as before. Unkeyed inserts never run this trigger.
CREATE FUNCTION notify_outbox_keyed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '.outbox', 'keyed');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify_keyed AFTER INSERT ON outbox
    FOR EACH ROW WHEN (NEW.ordering_key IS NOT NULL) EXECUTE FUNCTION notify_outbox_keyed();
