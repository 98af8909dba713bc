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

-- name: backtest_instrument
SELECT instrument_id, symbol, venue, market::text, quote_currency, price_tick, quantity_step,
       min_quantity
FROM market.instruments
WHERE symbol = %(symbol)s
  -- a replay session's copy (venue replay<N>) only when its venue is named
  AND (venue = %(venue)s OR (%(venue)s::text IS NULL AND venue !~ '^replay[0-9]+$'))
ORDER BY venue;

-- name: backtest_bar_range
WITH warm AS (
    SELECT b.ts FROM market.bars b
    WHERE b.instrument_id = %(instrument)s AND b.timeframe = %(timeframe)s::market.timeframe
      AND b.ts < %(start)s
    ORDER BY b.ts DESC LIMIT %(warmup)s),
first AS (SELECT COALESCE((SELECT min(ts) FROM warm), %(start)s::timestamptz) AS ts)
SELECT first.ts,
       EXISTS (SELECT 1 FROM market.bars b
               WHERE b.instrument_id = %(instrument)s AND b.timeframe = %(timeframe)s::market.timeframe
                 AND b.ts >= %(start)s AND b.ts < %(end)s),
       EXISTS (SELECT 1 FROM market.bars b JOIN market.instruments i USING (instrument_id)
               WHERE b.instrument_id = %(instrument)s AND b.timeframe = %(timeframe)s::market.timeframe
                 AND b.ts >= first.ts AND b.ts < %(end)s
                 AND (b.open %% i.price_tick <> 0 OR b.high %% i.price_tick <> 0
                      OR b.low %% i.price_tick <> 0 OR b.close %% i.price_tick <> 0))
FROM first;

-- name: backtest_bar_coverage
SELECT min(ts), max(ts) FROM market.bars
WHERE instrument_id = %(instrument)s AND timeframe = %(timeframe)s::market.timeframe;

-- name: backtest_bars_ticks
COPY (SELECT (extract(epoch FROM ts) * 1000000)::bigint, (open / %(tick)s)::bigint,
             (high / %(tick)s)::bigint, (low / %(tick)s)::bigint, (close / %(tick)s)::bigint,
             volume::float8
      FROM market.bars
      WHERE instrument_id = %(instrument)s AND timeframe = %(timeframe)s::market.timeframe
        AND ts >= %(from)s AND ts < %(end)s
      ORDER BY ts) TO STDOUT;

-- name: backtest_bars_text
COPY (SELECT (extract(epoch FROM ts) * 1000000)::bigint, open::text, high::text, low::text,
             close::text, volume::float8
      FROM market.bars
      WHERE instrument_id = %(instrument)s AND timeframe = %(timeframe)s::market.timeframe
        AND ts >= %(from)s AND ts < %(end)s
      ORDER BY ts) TO STDOUT;

-- name: backtest_create_run
SELECT backtest.create_run(%(strategy)s, %(version)s, %(params)s, %(symbols)s, %(timeframe)s,
                           %(start)s, %(end)s, %(cash)s, %(currency)s, %(settings)s, %(label)s,
                           %(walk_forward_id)s);

-- name: backtest_set_limit
SELECT risk.set_limit(%(type)s, %(value)s, %(scope)s, %(key)s, %(account)s, NULL, %(params)s);

-- name: backtest_step
SELECT backtest.step(%(run)s, %(ops)s);

-- name: backtest_finish_run
SELECT backtest.finish_run(%(run)s, %(status)s, %(fingerprint)s, %(bars)s, %(elapsed)s, %(error)s,
                           %(notes)s);

-- name: backtest_record_equity
-- (arrays as text literals: one parameter each, however long the curve)
SELECT backtest.record_equity(%(run)s,
    ARRAY(SELECT timestamptz 'epoch' + u * interval '1 microsecond'
          FROM unnest(%(ts)s::bigint[]) WITH ORDINALITY AS x(u, n) ORDER BY n),
    %(equity)s::numeric[], %(benchmark)s::numeric[], %(drawdown)s::float8[],
    %(exposed)s::boolean[]);

-- name: backtest_record_metrics
SELECT backtest.record_metrics(%(run)s, %(metrics)s);

-- name: backtest_fills
SELECT (extract(epoch FROM f.ts) * 1000000)::bigint, f.instrument_id,
       CASE WHEN f.side = 'buy' THEN f.quantity ELSE -f.quantity END, f.price, f.commission
FROM trading.fills f JOIN backtest.runs r ON r.account_id = f.account_id
WHERE r.run_id = %(run)s
ORDER BY f.fill_id;

-- name: backtest_trades
SELECT symbol, market, strategy, side, quantity, entry_time, entry_price, exit_time, exit_price,
       pnl, commission, exit_trigger
FROM backtest.trades WHERE run_id = %(run)s
ORDER BY exit_time, trade_id;

-- name: backtest_open_positions
SELECT symbol, market, strategy, side, quantity, average_price, last_price, unrealized_pnl
FROM backtest.open_positions WHERE run_id = %(run)s
ORDER BY symbol, strategy;

-- name: backtest_final_state
SELECT e.cash, e.equity, e.positions_value
FROM backtest.runs r, LATERAL trading.account_equity(r.account_id) e
WHERE r.run_id = %(run)s;

-- name: backtest_open_orders
SELECT o.order_id FROM trading.orders o JOIN backtest.runs r ON r.account_id = o.account_id
WHERE r.run_id = %(run)s AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')
ORDER BY o.order_id;

-- name: backtest_run
SELECT run_id, account_id, strategy, strategy_version, params, symbols, timeframe::text,
       start_ts, end_ts, starting_cash, currency, settings, label, walk_forward_id,
       status::text, bars, fingerprint, error, notes, created_at, finished_at, elapsed_seconds
FROM backtest.runs WHERE run_id = %(run)s;

-- name: backtest_metrics
SELECT scope, scope_key, metric, value FROM backtest.metrics WHERE run_id = %(run)s
ORDER BY scope, scope_key, metric;

-- name: backtest_equity
SELECT ts, equity, benchmark, drawdown, exposed FROM backtest.equity WHERE run_id = %(run)s
ORDER BY ts;

-- name: backtest_prices
SELECT ts, close FROM (
    SELECT b.ts + market.timeframe_interval(b.timeframe) AS ts, b.close,
           row_number() OVER (ORDER BY b.ts) AS n, count(*) OVER () AS total
    FROM market.bars b
    WHERE b.instrument_id = %(instrument)s AND b.timeframe = %(timeframe)s::market.timeframe
      AND b.ts >= %(start)s AND b.ts < %(end)s) x
WHERE (n - 1) %% GREATEST(total / %(points)s, 1) = 0 OR n = total
ORDER BY ts;

-- name: backtest_montecarlo
SELECT result FROM backtest.montecarlo WHERE run_id = %(run)s ORDER BY created_at, method;

-- name: backtest_list
SELECT run_id, strategy, array_to_string(symbols, ','), timeframe, start_ts, end_ts, status::text,
       total_return, sharpe, max_drawdown, trades, fingerprint
FROM backtest.summary ORDER BY run_id DESC LIMIT %(limit)s;

-- name: backtest_last_fingerprint
SELECT run_id, fingerprint FROM backtest.runs
WHERE label = %(label)s AND status = 'finished'
ORDER BY run_id DESC LIMIT 1;

-- name: backtest_equity_limits
SELECT EXISTS (SELECT 1 FROM backtest.runs r, risk.effective_limits(r.account_id) l
               WHERE r.run_id = %(run)s AND l.limit_type IN ('MAX_DRAWDOWN', 'DAILY_LOSS'));

-- name: backtest_refresh_statistics
SELECT backtest.refresh_statistics();
