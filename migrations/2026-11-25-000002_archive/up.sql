-- Archive for retention in `archive` mode: confirmed rows moved out of the hot table.
CREATE TABLE outbox_archive (LIKE outbox INCLUDING DEFAULTS);
ALTER TABLE outbox_archive ADD PRIMARY KEY (id);
CREATE INDEX outbox_archive_confirmed_at_idx ON outbox_archive (confirmed_at);
