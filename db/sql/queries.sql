-- Named queries run by MMATS's Python code. Each starts with "-- name: <name>".
-- Values are always bound as parameters (%(name)s), never formatted into the text.

-- name: bar_coverage
SELECT symbol, venue, market::text, timeframe::text, first_ts, last_ts, bars
FROM market.bar_coverage
ORDER BY symbol, venue, timeframe;

-- name: aggregate_counts
SELECT 'bars_5m' AS view, count(*) FROM market.bars_5m
UNION ALL SELECT 'bars_15m', count(*) FROM market.bars_15m
UNION ALL SELECT 'bars_1h', count(*) FROM market.bars_1h
UNION ALL SELECT 'bars_4h', count(*) FROM market.bars_4h
UNION ALL SELECT 'bars_1d', count(*) FROM market.bars_1d;

-- name: audit_chain_status
SELECT (SELECT count(*) FROM audit.events) AS events,
       (SELECT event_id FROM audit.verify_chain() LIMIT 1) AS first_bad_event;

-- name: server_info
SELECT current_setting('server_version') AS version,
       (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb') AS timescaledb;
