-- 0004_02 (pre): an account's fills are found by fill id, not by time. The live path asks
-- for "the fills of this account after fill N" at every bar (trading.strategy_events,
-- before a strategy sees its bar, and the paper session's echo). Where the planner cannot
-- tell that N is recent (a SQL function's parameters, a plan cached while the table was
-- small), the (account_id, ts) index answered it by reading every fill the account ever
-- had, so a long-running account paid more at each bar than at the last. An index on
-- (account_id, fill_id) reads only the new ones whatever the estimate. Nothing reads fills
-- by account and time, so it replaces the old index rather than adding a second one.
SET LOCAL ROLE mmats_owner;

DROP INDEX trading.fills_account_ts_idx;
CREATE INDEX fills_account_fill_idx ON trading.fills (account_id, fill_id);
COMMENT ON INDEX trading.fills_account_fill_idx IS
    'an account''s fills after a fill id (trading.strategy_events, resume points)';
