DROP TABLE IF EXISTS outbox_archive;
