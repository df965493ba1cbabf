ALTER TABLE outbox DROP CONSTRAINT outbox_status_not_failed;
