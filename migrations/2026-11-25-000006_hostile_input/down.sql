DROP TABLE dead_letters_superseded;
ALTER TABLE outbox DROP CONSTRAINT outbox_max_attempts_range;
ALTER TABLE outbox DROP CONSTRAINT outbox_attempts_range;
