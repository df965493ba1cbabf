CREATE INDEX outbox_key_idx ON outbox (ordering_key, seq)
    WHERE ordering_key IS NOT NULL AND status IN ('pending', 'in_flight', 'retrying');
DROP INDEX outbox_key_waiting_idx;
