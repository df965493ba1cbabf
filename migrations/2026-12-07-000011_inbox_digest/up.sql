-- The SHA-256 of the body each consumer applied under a message id. A later delivery under
-- the same id whose body differs is not a duplicate but another message a producer gave a
-- reused id: the inbox refuses it loudly instead of acking it as a duplicate. Null for rows
-- recorded before this column (and by an older Courier): those are not compared.
ALTER TABLE inbox ADD COLUMN digest bytea;
