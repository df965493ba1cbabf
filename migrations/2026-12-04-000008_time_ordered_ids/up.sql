-- Time-ordered message ids (SQL contract v4). A row's id is the outbox's primary key, and
-- every claim and confirm adds an entry to that index (the status change is no HOT update).
-- With random ids (version 4) each entry lands on a random leaf of an index that holds the
-- whole retained history, so the cost of a message grows with the week of confirmed rows
-- the table keeps: leaves that do not fit in memory, and a full-page image in the WAL for
-- nearly every insert after a checkpoint. Ids that grow with time (UUID version 7, RFC
-- 9562: 48 bits of Unix milliseconds, then random bits) put new entries at the index's
-- right edge, among the pages recent messages already touched. Producers that choose
-- their own ids keep them; only the default changes, and old rows keep theirs.
CREATE FUNCTION uuid_v7() RETURNS uuid LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;

ALTER TABLE outbox ALTER COLUMN id SET DEFAULT uuid_v7();
