DROP TRIGGER IF EXISTS outbox_notify ON outbox;
DROP FUNCTION IF EXISTS notify_outbox();
DROP TABLE IF EXISTS dead_letters;
DROP TABLE IF EXISTS outbox;
DROP TYPE IF EXISTS outbox_status;
