-- SQL contract v5. `failed` is a value of `outbox_status` (the state of a message in
-- `dead_letters`) that the engine never writes into the outbox. A row a producer wrote as
-- `failed` was neither published nor dead-lettered and, keyed, let its key's later rows go
-- out past it. It is refused at INSERT from now on. NOT VALID: rows already in a large
-- outbox are not scanned (nor moved); `SELECT id FROM <schema>.outbox WHERE status =
-- 'failed'` finds any, and setting them `pending` publishes them.
ALTER TABLE outbox ADD CONSTRAINT outbox_status_not_failed
    CHECK (status <> 'failed') NOT VALID;
