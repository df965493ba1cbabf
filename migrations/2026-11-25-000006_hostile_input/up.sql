-- Hostile input (SQL contract v3). Producers in any language write the outbox; nothing they
-- write may stop the engine. Two kinds of guard:
--
-- 1. Constraints on what no producer may write. NOT VALID: rows already in a large outbox
--    are not scanned (the engine clamps what they hold instead); every new row is checked.
--    The attempt count is the engine's: a producer leaves it at 0 (the default). A huge
--    value used to overflow `attempts + 1` in the claim and stop every claim.
ALTER TABLE outbox ADD CONSTRAINT outbox_attempts_range
    CHECK (attempts BETWEEN 0 AND 1000000) NOT VALID;
-- A per-row budget is bounded like `retry.max_attempts`: a row may not retry for ever.
ALTER TABLE outbox ADD CONSTRAINT outbox_max_attempts_range
    CHECK (max_attempts IS NULL OR max_attempts BETWEEN 1 AND 1000) NOT VALID;

-- 2. A message id reused after its first copy was dead-lettered: the second failure must
--    not overwrite the first (nor fail the move, and every dead letter after it). The
--    earlier dead letter moves here, in the same transaction, when a newer failure of the
--    same id arrives, so both stay inspectable.
CREATE TABLE dead_letters_superseded (
    LIKE dead_letters INCLUDING DEFAULTS,
    superseded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_superseded_id_idx ON dead_letters_superseded (id);
