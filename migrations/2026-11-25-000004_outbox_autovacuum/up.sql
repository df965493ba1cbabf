-- Every message leaves three row versions behind (insert, claim, confirm) and retention
-- deletes it later: let autovacuum reclaim that space early instead of at 20 % dead rows.
ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_cost_delay = 0
);
