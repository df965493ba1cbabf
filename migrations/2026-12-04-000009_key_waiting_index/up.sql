-- Keys' waiting rows only (nothing changes for producers). The index the keyed claim walks
-- held every open row of a key, in flight too, so each claim wrote one more entry into it
-- per row (the row turning `in_flight`) and each confirm left two dead entries behind it
-- for the next walk to step over until vacuum. A key's head is its first row here, and the
-- claim already skips a key with any row in flight (`outbox_key_in_flight_idx`), so the
-- lowest waiting row of a key with nothing in flight is exactly its lowest open row: the
-- claim takes the same heads in the same order, one index entry cheaper per message.
--
-- The build scans the outbox once while holding a lock that blocks inserts. On a large
-- outbox, create the index beforehand without blocking, with the same definition:
--   CREATE INDEX CONCURRENTLY outbox_key_waiting_idx ON <schema>.outbox (ordering_key, seq)
--       WHERE ordering_key IS NOT NULL AND status IN ('pending', 'retrying');
-- and this migration only drops the old one.
CREATE INDEX IF NOT EXISTS outbox_key_waiting_idx ON outbox (ordering_key, seq)
    WHERE ordering_key IS NOT NULL AND status IN ('pending', 'retrying');
DROP INDEX outbox_key_idx;
