-- The engine registry: every running engine beats here every `scheduler.heartbeat` on its own
-- connection. Any engine that sees another's beat older than `scheduler.engine_timeout` marks
-- it dead and frees the rows it held in the same statement, so a crash costs seconds instead
-- of a whole lease. `id` is what the engine writes into `outbox.locked_by`. No new index on
-- the outbox: a dead engine's rows are found through the in-flight partial index, which
-- holds only the rows in flight.
CREATE TABLE engines (
    id           text        PRIMARY KEY,
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    version      text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    state        text        NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'dead'))
);
