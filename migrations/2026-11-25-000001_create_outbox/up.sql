-- Courier's outbox (SQL contract v1). Runs with search_path set to the configured schema,
-- so every name below lives in that schema (default `courier`).

CREATE TYPE outbox_status AS ENUM ('pending', 'in_flight', 'confirmed', 'retrying', 'failed');

CREATE TABLE outbox (
    id              uuid          PRIMARY KEY DEFAULT gen_random_uuid(),
    exchange        text          NOT NULL,
    routing_key     text          NOT NULL DEFAULT '',
    payload         bytea         NOT NULL DEFAULT ''::bytea,
    headers         jsonb         NOT NULL DEFAULT '{}'::jsonb,
    content_type    text,
    status          outbox_status NOT NULL DEFAULT 'pending',
    attempts        integer       NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts    integer       CHECK (max_attempts IS NULL OR max_attempts > 0),
    next_attempt_at timestamptz   NOT NULL DEFAULT now(),
    locked_by       text,
    locked_until    timestamptz,
    last_error      text,
    created_at      timestamptz   NOT NULL DEFAULT now(),
    updated_at      timestamptz   NOT NULL DEFAULT now(),
    confirmed_at    timestamptz
);

-- The claim query reads only due rows: a partial index keeps it small however many
-- confirmed rows wait for retention.
CREATE INDEX outbox_due_idx ON outbox (next_attempt_at) WHERE status IN ('pending', 'retrying');
-- Expired leases of crashed engines.
CREATE INDEX outbox_lease_idx ON outbox (locked_until) WHERE status = 'in_flight';
-- Retention deletes old confirmed rows in small batches.
CREATE INDEX outbox_confirmed_idx ON outbox (confirmed_at) WHERE status = 'confirmed';

CREATE TABLE dead_letters (
    id           uuid        PRIMARY KEY,
    exchange     text        NOT NULL,
    routing_key  text        NOT NULL,
    payload      bytea       NOT NULL,
    headers      jsonb       NOT NULL,
    content_type text,
    max_attempts integer,
    attempts     integer     NOT NULL,
    last_error   text,
    created_at   timestamptz NOT NULL,
    failed_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX dead_letters_failed_at_idx ON dead_letters (failed_at);

-- One NOTIFY per inserting statement (not per row): a bulk insert of 10,000 rows wakes the
-- engine once. The channel is "<schema>.outbox", so engines on other schemas stay asleep.
CREATE FUNCTION notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '.outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION notify_outbox();
