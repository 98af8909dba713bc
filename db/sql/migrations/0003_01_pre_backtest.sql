-- 0003_01 (pre): backtest runs as rows. A run owns one backtest account; the engine
-- replays stored bars through the trading core's own functions (submit_signal,
-- protect_bars, apply_fill, cancel_order) with backtest.step, and records what it
-- measured: the equity curve, the metrics, Monte Carlo and walk-forward results.
-- Trades are the account's trading.trades rows (the backtest.trades view names them).
RESET ROLE;
CREATE SCHEMA IF NOT EXISTS backtest AUTHORIZATION mmats_owner;
COMMENT ON SCHEMA backtest IS 'backtest runs, their equity curves, metrics, Monte Carlo and walk-forward results';
SET LOCAL ROLE mmats_owner;

CREATE TYPE backtest.run_status AS ENUM ('running', 'finished', 'failed');

CREATE SEQUENCE backtest.run_seq;

CREATE TABLE backtest.runs (
    run_id          bigint PRIMARY KEY DEFAULT nextval('backtest.run_seq'),
    account_id      bigint NOT NULL UNIQUE REFERENCES trading.accounts,
    strategy        text NOT NULL CONSTRAINT runs_strategy_format
                        CHECK (strategy ~ '^[A-Za-z][A-Za-z0-9_.-]{0,63}$'),
    strategy_version text NOT NULL CONSTRAINT runs_strategy_version_format
                        CHECK (strategy_version ~ '^[A-Za-z0-9][A-Za-z0-9_.+-]{0,31}$'),
    params          jsonb NOT NULL DEFAULT '{}' CONSTRAINT runs_params_object
                        CHECK (jsonb_typeof(params) = 'object'),
    symbols         text[] NOT NULL CONSTRAINT runs_symbols_count
                        CHECK (cardinality(symbols) BETWEEN 1 AND 200),
    timeframe       market.timeframe NOT NULL,
    start_ts        timestamptz NOT NULL,
    end_ts          timestamptz NOT NULL,
    starting_cash   numeric NOT NULL CONSTRAINT runs_starting_cash_positive
                        CHECK (starting_cash > 0 AND starting_cash < 'Infinity'),
    currency        text NOT NULL CHECK (currency ~ '^[A-Z0-9]{2,12}$'),
    -- commission, slippage, spread, shorting, seed, limits: every assumption of the run
    settings        jsonb NOT NULL DEFAULT '{}' CONSTRAINT runs_settings_object
                        CHECK (jsonb_typeof(settings) = 'object'),
    label           text CONSTRAINT runs_label_length CHECK (length(label) BETWEEN 1 AND 200),
    -- a walk-forward's windows are runs of their own
    walk_forward_id bigint,
    status          backtest.run_status NOT NULL DEFAULT 'running',
    bars            bigint CHECK (bars >= 0),
    -- SHA-256 of the canonical trade list and open positions: equal runs, equal prints
    fingerprint     text CONSTRAINT runs_fingerprint_format CHECK (fingerprint ~ '^[0-9a-f]{64}$'),
    error           text CONSTRAINT runs_error_length CHECK (length(error) <= 2000),
    -- what the engine counted and checked: signals by status, fills, sanity warnings,
    -- strategy errors
    notes           jsonb NOT NULL DEFAULT '{}' CONSTRAINT runs_notes_object
                        CHECK (jsonb_typeof(notes) = 'object'),
    created_by      text NOT NULL DEFAULT session_user,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    elapsed_seconds double precision CHECK (elapsed_seconds >= 0),
    CONSTRAINT runs_period_order CHECK (end_ts > start_ts),
    CONSTRAINT runs_finished_has_fingerprint CHECK (status <> 'finished' OR fingerprint IS NOT NULL)
);
COMMENT ON CONSTRAINT runs_period_order ON backtest.runs IS 'a run''s end must be after its start';
CREATE INDEX runs_strategy_idx ON backtest.runs (strategy, created_at DESC);

-- One row per metric and scope: the run as a whole, or one strategy, market or symbol.
CREATE TABLE backtest.metrics (
    run_id     bigint NOT NULL REFERENCES backtest.runs ON DELETE CASCADE,
    scope      text NOT NULL CHECK (scope IN ('run', 'strategy', 'market', 'symbol')),
    scope_key  text NOT NULL DEFAULT '' CHECK (length(scope_key) <= 64),
    metric     text NOT NULL CHECK (metric ~ '^[a-z][a-z0-9_]{0,63}$'),
    value      numeric CONSTRAINT metrics_value_is_number
                   CHECK (value NOT IN ('NaN', 'Infinity', '-Infinity')),
    PRIMARY KEY (run_id, scope, scope_key, metric)
);

-- The equity curve at bar closes (sampled for very long runs; the metrics are computed
-- on every bar), with the buy-and-hold benchmark on the same times.
CREATE TABLE backtest.equity (
    run_id     bigint NOT NULL REFERENCES backtest.runs ON DELETE CASCADE,
    ts         timestamptz NOT NULL,
    equity     numeric NOT NULL CHECK (equity NOT IN ('NaN', 'Infinity', '-Infinity')),
    benchmark  numeric CHECK (benchmark NOT IN ('NaN', 'Infinity', '-Infinity')),
    drawdown   double precision NOT NULL CHECK (drawdown >= 0 AND drawdown <= 1e6),
    exposed    boolean NOT NULL,
    PRIMARY KEY (run_id, ts)
);

CREATE TABLE backtest.montecarlo (
    run_id        bigint NOT NULL REFERENCES backtest.runs ON DELETE CASCADE,
    method        text NOT NULL CHECK (method IN ('shuffle', 'bootstrap')),
    paths         integer NOT NULL CHECK (paths BETWEEN 1 AND 100000),
    seed          bigint NOT NULL,
    ruin_level    numeric NOT NULL CHECK (ruin_level > 0 AND ruin_level < 1),
    result        jsonb NOT NULL CHECK (jsonb_typeof(result) = 'object'),
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, method, paths, seed, ruin_level)
);

CREATE TABLE backtest.walk_forwards (
    walk_forward_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    strategy        text NOT NULL CHECK (strategy ~ '^[A-Za-z][A-Za-z0-9_.-]{0,63}$'),
    symbols         text[] NOT NULL CHECK (cardinality(symbols) BETWEEN 1 AND 200),
    timeframe       market.timeframe NOT NULL,
    start_ts        timestamptz NOT NULL,
    end_ts          timestamptz NOT NULL CHECK (end_ts > start_ts),
    settings        jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(settings) = 'object'),
    objective       text NOT NULL CHECK (objective ~ '^[a-z][a-z0-9_]{0,63}$'),
    status          backtest.run_status NOT NULL DEFAULT 'running',
    result          jsonb CHECK (jsonb_typeof(result) = 'object'),
    created_by      text NOT NULL DEFAULT session_user,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
ALTER TABLE backtest.runs ADD CONSTRAINT runs_walk_forward_fk
    FOREIGN KEY (walk_forward_id) REFERENCES backtest.walk_forwards;

CREATE TABLE backtest.walk_forward_windows (
    walk_forward_id bigint NOT NULL REFERENCES backtest.walk_forwards ON DELETE CASCADE,
    window_no       integer NOT NULL CHECK (window_no >= 1),
    train_start     timestamptz NOT NULL,
    train_end       timestamptz NOT NULL,
    test_start      timestamptz NOT NULL,
    test_end        timestamptz NOT NULL,
    params          jsonb NOT NULL CHECK (jsonb_typeof(params) = 'object'),
    train_score     double precision,
    candidates      integer NOT NULL CHECK (candidates >= 1),
    test_run_id     bigint REFERENCES backtest.runs,
    PRIMARY KEY (walk_forward_id, window_no),
    CONSTRAINT walk_forward_windows_order
        CHECK (train_start < train_end AND train_end <= test_start AND test_start < test_end)
);
COMMENT ON CONSTRAINT walk_forward_windows_order ON backtest.walk_forward_windows IS
    'a window trains before it tests: train_start < train_end <= test_start < test_end';

-- the orders of one account by number: backtest.step returns the orders it created
-- (those numbered above the sequence's value before it) with one range probe
CREATE INDEX orders_account_order_idx ON trading.orders (account_id, order_id);

------------------------------------------------------------------------------ views
-- The closed trades of every run, with names instead of ids.
CREATE VIEW backtest.trades AS
SELECT r.run_id, t.trade_id, i.symbol, i.market::text AS market, s.name AS strategy, t.side,
       trim_scale(t.quantity) AS quantity, t.entry_time, trim_scale(t.entry_price) AS entry_price,
       t.exit_time, trim_scale(t.exit_price) AS exit_price, trim_scale(t.gross_pnl) AS gross_pnl,
       trim_scale(t.commission) AS commission, trim_scale(t.pnl) AS pnl,
       t.exit_trigger::text AS exit_trigger
FROM backtest.runs r
JOIN trading.trades t ON t.account_id = r.account_id
JOIN market.instruments i ON i.instrument_id = t.instrument_id
LEFT JOIN trading.strategies s ON s.strategy_id = t.strategy_id;

-- What each run still held at its end, marked at the last close.
CREATE VIEW backtest.open_positions AS
SELECT r.run_id, i.symbol, i.market::text AS market, s.name AS strategy,
       CASE WHEN trading._signed_qty(p) > 0 THEN 'long' ELSE 'short' END AS side,
       trim_scale(abs(p.quantity)) AS quantity, trim_scale(p.average_price) AS average_price,
       trim_scale(p.last_price) AS last_price,
       trim_scale(trading._signed_qty(p) * (p.last_price - p.average_price)) AS unrealized_pnl,
       p.opened_at
FROM backtest.runs r
JOIN trading.positions p ON p.account_id = r.account_id AND p.quantity <> 0
JOIN market.instruments i ON i.instrument_id = p.instrument_id
LEFT JOIN trading.strategies s ON s.strategy_id = COALESCE(p.strategy_id, p.entry_strategy_id);

-- One row per run with its headline figures.
CREATE VIEW backtest.summary AS
SELECT r.run_id, r.strategy, r.strategy_version, r.params, r.symbols, r.timeframe::text AS timeframe,
       r.start_ts, r.end_ts, r.starting_cash, r.currency, r.status, r.bars, r.fingerprint,
       r.created_at, r.elapsed_seconds, r.walk_forward_id, r.label,
       max(m.value) FILTER (WHERE m.metric = 'final_equity') AS final_equity,
       max(m.value) FILTER (WHERE m.metric = 'total_return') AS total_return,
       max(m.value) FILTER (WHERE m.metric = 'sharpe') AS sharpe,
       max(m.value) FILTER (WHERE m.metric = 'max_drawdown') AS max_drawdown,
       max(m.value) FILTER (WHERE m.metric = 'trades') AS trades,
       max(m.value) FILTER (WHERE m.metric = 'win_rate') AS win_rate,
       max(m.value) FILTER (WHERE m.metric = 'buy_and_hold_return') AS buy_and_hold_return
FROM backtest.runs r
LEFT JOIN backtest.metrics m ON m.run_id = r.run_id AND m.scope = 'run'
GROUP BY r.run_id;

------------------------------------------------------------------------------ functions
CREATE FUNCTION backtest._run(run bigint, lock boolean DEFAULT false) RETURNS backtest.runs
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r backtest.runs;
BEGIN
    IF lock THEN
        SELECT * INTO r FROM backtest.runs x WHERE x.run_id = run FOR UPDATE;
    ELSE
        SELECT * INTO r FROM backtest.runs x WHERE x.run_id = run;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown backtest run %', COALESCE(run::text, 'NULL')
            USING ERRCODE = 'foreign_key_violation', HINT = 'list the runs with `mmats backtest list`';
    END IF;
    RETURN r;
END
$$;

-- A run and its account (named bt-<run id>, backtest environment, operator mode, the
-- strategy assigned with all the capital, sized by percent of equity unless the
-- settings say otherwise). Returns the run id.
CREATE FUNCTION backtest.create_run(strategy text, strategy_version text, params jsonb,
                                    symbols text[], timeframe text, start_ts timestamptz,
                                    end_ts timestamptz, cash numeric, currency text,
                                    settings jsonb DEFAULT '{}', label text DEFAULT NULL,
                                    walk_forward_id bigint DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    id bigint := nextval('backtest.run_seq');
    acc bigint;
    s jsonb := COALESCE(settings, '{}');
BEGIN
    IF symbols IS NULL OR cardinality(symbols) = 0 THEN
        RAISE EXCEPTION 'a backtest needs at least one symbol' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF start_ts IS NULL OR end_ts IS NULL OR end_ts <= start_ts THEN
        RAISE EXCEPTION 'a backtest period needs a start before its end, got % to %',
            COALESCE(start_ts::text, 'NULL'), COALESCE(end_ts::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cash IS NULL OR cash = 'NaN' OR cash <= 0 OR cash = 'Infinity' THEN
        RAISE EXCEPTION 'backtest cash must be a number > 0, got %', COALESCE(cash::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF timeframe IS NULL OR timeframe NOT IN (SELECT unnest(enum_range(NULL::market.timeframe))::text) THEN
        RAISE EXCEPTION 'unknown timeframe %, expected one of %', quote_literal(COALESCE(timeframe, 'NULL')),
            array_to_string(enum_range(NULL::market.timeframe), ', ')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    acc := trading.create_account('bt-' || id, 'backtest', 'operator', cash, currency,
        position_mode => COALESCE(s ->> 'position_mode', 'oneway'),
        aggregation => 'independent',
        allow_short => COALESCE((s ->> 'allow_short')::boolean, false),
        taker_fee => COALESCE(trading._num(s, 'taker_fee', 'settings', 0, 0.1), 0),
        maker_fee => COALESCE(trading._num(s, 'maker_fee', 'settings', -0.01, 0.1), 0));
    INSERT INTO backtest.runs (run_id, account_id, strategy, strategy_version, params, symbols,
                               timeframe, start_ts, end_ts, starting_cash, currency, settings,
                               label, walk_forward_id)
    VALUES (id, acc, strategy, strategy_version, COALESCE(params, '{}'),
            ARRAY(SELECT upper(x) FROM unnest(symbols) x), timeframe::market.timeframe,
            start_ts, end_ts, cash, upper(currency), s, label, walk_forward_id);
    -- the strategy's own versioned row, so that its signals find this assignment
    INSERT INTO trading.account_strategies (account_id, strategy_id, allocation, sizing_method,
                                            sizing_params)
    VALUES (acc, (trading._strategy(strategy, strategy_version)).strategy_id,
            COALESCE(trading._num(s, 'allocation', 'settings', 0, 1), 1),
            COALESCE(s ->> 'sizing_method', 'percent_equity')::trading.sizing_method,
            COALESCE(s -> 'sizing_params', '{}'));
    PERFORM audit.record('backtest.created', 'backtest.runs', id::text,
        jsonb_build_object('strategy', strategy, 'version', strategy_version, 'symbols', symbols,
                           'timeframe', timeframe, 'start', start_ts, 'end', end_ts, 'cash', cash,
                           'settings', s));
    RETURN id;
END
$$;

-- The account as the engine needs it after a step: cash, equity and every open position
-- with its protection (what the engine watches to know when to call protect_bars).
CREATE FUNCTION backtest._state(account bigint) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN (
    SELECT jsonb_build_object(
        'cash', e.cash, 'equity', e.equity, 'positions_value', e.positions_value,
        'positions', COALESCE((
            SELECT jsonb_agg(jsonb_build_object(
                'instrument_id', p.instrument_id, 'symbol', i.symbol, 'leg', p.leg,
                'strategy_id', p.strategy_id, 'quantity', trading._signed_qty(p),
                'average_price', p.average_price, 'last_price', p.last_price,
                'stop_loss', p.stop_loss, 'take_profit', p.take_profit,
                'trailing_stop', p.trailing_stop, 'trail_anchor', p.trail_anchor,
                'breakeven', p.breakeven, 'marked_at', p.marked_at,
                'unrealized_pnl', trading._signed_qty(p) * (COALESCE(p.last_price, p.average_price) - p.average_price))
                ORDER BY p.position_id)
            FROM trading.positions p JOIN market.instruments i USING (instrument_id)
            WHERE p.account_id = account AND p.quantity <> 0), '[]'))
    FROM trading.account_equity(account) e);

-- One step of a run: the operations in order, each through the trading core's own
-- function, in one transaction. Operations (JSON objects, "op" names the kind):
--   {"op": "fill", "order_id": N, "broker_fill_id": ..., "quantity", "price", "commission", "ts", "liquidity"}
--                                                                   -> trading.apply_fill
--   {"op": "cancel", "order_id": N, "reason": "..."}                -> trading.cancel_order
--   {"op": "protect", "instrument_id": N, "timeframe": "1m", "from": ts, "to": ts}
--        the stored bars with from <= ts <= to                      -> trading.protect_bars
--   {"op": "signal", ...the signal...} (its account is the run's)   -> trading.submit_signal
-- Every order and fill must belong to the run's account. Returns the results in order,
-- the orders the step created, and the account's state after it.
CREATE FUNCTION backtest.step(run bigint, ops jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r backtest.runs := backtest._run(run);
    acc trading.accounts;
    op jsonb;
    kind text;
    res jsonb;
    results jsonb := '[]';
    pb record;
    n integer := 0;
    -- every order the step creates is returned, the breaker's closing orders included
    -- (protect_bars' equity snapshot may trip it): they are the orders numbered above this
    before bigint := (SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END
                      FROM trading.orders_order_id_seq s);
BEGIN
    IF r.status <> 'running' THEN
        RAISE EXCEPTION 'backtest run % is %: it takes no more steps', run, r.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF ops IS NULL OR jsonb_typeof(ops) <> 'array' THEN
        RAISE EXCEPTION 'backtest.step needs a JSON array of operations' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO acc FROM trading.accounts a WHERE a.account_id = r.account_id;
    FOR op IN SELECT x FROM jsonb_array_elements(ops) x LOOP
        n := n + 1;
        kind := CASE WHEN jsonb_typeof(op) = 'object' THEN op ->> 'op' END;
        IF kind IN ('fill', 'cancel') THEN
            IF NOT EXISTS (SELECT 1 FROM trading.orders o
                           WHERE o.order_id = trading._num(op, 'order_id', 'step', 0)::bigint
                             AND o.account_id = acc.account_id) THEN
                RAISE EXCEPTION 'backtest.step operation %: order % is not an order of run %', n,
                    COALESCE(op ->> 'order_id', 'NULL'), run USING ERRCODE = 'foreign_key_violation';
            END IF;
        END IF;
        CASE kind
        WHEN 'fill' THEN
            res := trading.apply_fill(op - 'op');
        WHEN 'cancel' THEN
            res := trading.cancel_order(op ->> 'order_id', COALESCE(op ->> 'reason', 'cancelled by the simulator'));
        WHEN 'protect' THEN
            pb := trading.protect_bars(trading._num(op, 'instrument_id', 'step', 0)::bigint,
                ARRAY(SELECT b FROM market.bars b
                      WHERE b.instrument_id = trading._num(op, 'instrument_id', 'step', 0)::bigint
                        AND b.timeframe = (op ->> 'timeframe')::market.timeframe
                        AND b.ts BETWEEN trading._ts(op, 'from', 'step') AND trading._ts(op, 'to', 'step')
                      ORDER BY b.ts),
                acc.account_id, true);
            res := jsonb_build_object('order_ids', to_jsonb(pb.order_ids), 'marked_until', pb.marked_until);
        WHEN 'signal' THEN
            res := trading.submit_signal(jsonb_set(op - 'op', '{account}', to_jsonb(acc.name)));
        ELSE
            RAISE EXCEPTION 'backtest.step operation %: unknown op %, expected fill, cancel, protect or signal',
                n, COALESCE(quote_literal(op ->> 'op'), 'NULL') USING ERRCODE = 'invalid_parameter_value';
        END CASE;
        results := results || jsonb_build_array(res);
    END LOOP;
    RETURN jsonb_build_object(
        'results', results,
        'orders', COALESCE((SELECT jsonb_agg(jsonb_build_object(
                'order_id', o.order_id, 'instrument_id', o.instrument_id, 'side', o.side,
                'order_type', o.order_type, 'quantity', o.quantity, 'limit_price', o.limit_price,
                'stop_price', o.stop_price, 'trigger', o.trigger, 'trigger_price', o.trigger_price,
                'reduce_only', o.reduce_only, 'reference_price', o.reference_price,
                'strategy_id', o.strategy_id, 'stop_loss', o.stop_loss,
                'take_profit', o.take_profit, 'trailing_stop', o.trailing_stop,
                'breakeven', o.breakeven) ORDER BY o.order_id)
            FROM trading.orders o WHERE o.account_id = acc.account_id AND o.order_id > before), '[]'),
        'account', backtest._state(acc.account_id));
END
$$;

-- The end of a run: its fingerprint, bar count and timing; its queue messages are
-- removed (a backtest's orders are settled by the simulator, never by a router).
CREATE FUNCTION backtest.finish_run(run bigint, status text, fingerprint text DEFAULT NULL,
                                    bars bigint DEFAULT NULL, elapsed_seconds double precision DEFAULT NULL,
                                    error text DEFAULT NULL, notes jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r backtest.runs := backtest._run(run, true);
BEGIN
    IF r.status <> 'running' THEN
        RAISE EXCEPTION 'backtest run % is already %', run, r.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF status NOT IN ('finished', 'failed') THEN
        RAISE EXCEPTION 'a run finishes as finished or failed, got %', quote_literal(status)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE backtest.runs x SET status = finish_run.status::backtest.run_status,
        fingerprint = finish_run.fingerprint, bars = finish_run.bars,
        elapsed_seconds = finish_run.elapsed_seconds, error = left(finish_run.error, 2000),
        notes = COALESCE(finish_run.notes, '{}'), finished_at = now()
    WHERE x.run_id = run;
    DELETE FROM pgmq.q_orders q WHERE (q.message ->> 'account_id')::bigint = r.account_id;
    PERFORM audit.record('backtest.' || status, 'backtest.runs', run::text,
        jsonb_build_object('fingerprint', fingerprint, 'bars', bars, 'error', left(error, 2000)));
END
$$;

-- The equity curve, in one call per batch of points.
CREATE FUNCTION backtest.record_equity(run bigint, ts timestamptz[], equity numeric[],
                                       benchmark numeric[], drawdown double precision[],
                                       exposed boolean[])
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r backtest.runs := backtest._run(run);
    n integer;
BEGIN
    IF r.status <> 'running' THEN
        RAISE EXCEPTION 'backtest run % is %: its equity curve is final', run, r.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF cardinality(ts) IS DISTINCT FROM cardinality(equity)
       OR cardinality(ts) IS DISTINCT FROM cardinality(drawdown)
       OR cardinality(ts) IS DISTINCT FROM cardinality(exposed)
       OR (benchmark IS NOT NULL AND cardinality(ts) IS DISTINCT FROM cardinality(benchmark)) THEN
        RAISE EXCEPTION 'record_equity needs arrays of one length (ts %, equity %, drawdown %, exposed %)',
            cardinality(ts), cardinality(equity), cardinality(drawdown), cardinality(exposed)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO backtest.equity (run_id, ts, equity, benchmark, drawdown, exposed)
    SELECT run, u.t, u.e, u.b, u.d, u.x
    FROM unnest(ts, equity, COALESCE(benchmark, array_fill(NULL::numeric, ARRAY[cardinality(ts)])),
                drawdown, exposed) AS u(t, e, b, d, x);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Metrics as {"run": {name: value}, "strategy": {key: {name: value}}, "market": ..., "symbol": ...};
-- non-numeric and null values are left out. Replaces the run's earlier metrics.
CREATE FUNCTION backtest.record_metrics(run bigint, metrics jsonb) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r backtest.runs := backtest._run(run);
    n integer;
BEGIN
    IF metrics IS NULL OR jsonb_typeof(metrics) <> 'object' THEN
        RAISE EXCEPTION 'metrics must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM backtest.metrics m WHERE m.run_id = r.run_id;
    INSERT INTO backtest.metrics (run_id, scope, scope_key, metric, value)
    SELECT r.run_id, 'run', '', k, v::text::numeric
    FROM jsonb_each(COALESCE(metrics -> 'run', '{}')) AS x(k, v)
    WHERE jsonb_typeof(v) = 'number'
    UNION ALL
    SELECT r.run_id, g.scope, g.key, k, v::text::numeric
    FROM (SELECT s.scope, e.key, e.value
          FROM unnest(ARRAY['strategy', 'market', 'symbol']) AS s(scope),
               LATERAL jsonb_each(CASE WHEN jsonb_typeof(metrics -> s.scope) = 'object'
                                       THEN metrics -> s.scope ELSE '{}' END) AS e) g,
         LATERAL jsonb_each(CASE WHEN jsonb_typeof(g.value) = 'object' THEN g.value ELSE '{}' END) AS x(k, v)
    WHERE jsonb_typeof(v) = 'number';
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

CREATE FUNCTION backtest.record_montecarlo(run bigint, method text, paths integer, seed bigint,
                                           ruin_level numeric, result jsonb)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r backtest.runs := backtest._run(run);
BEGIN
    INSERT INTO backtest.montecarlo AS m (run_id, method, paths, seed, ruin_level, result)
    VALUES (r.run_id, method, paths, seed, ruin_level, result)
    ON CONFLICT ON CONSTRAINT montecarlo_pkey DO UPDATE SET result = EXCLUDED.result,
        created_at = now();
END
$$;

CREATE FUNCTION backtest.create_walk_forward(strategy text, symbols text[], timeframe text,
                                             start_ts timestamptz, end_ts timestamptz,
                                             objective text, settings jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    id bigint;
BEGIN
    INSERT INTO backtest.walk_forwards AS w (strategy, symbols, timeframe, start_ts, end_ts,
                                             objective, settings)
    VALUES (strategy, ARRAY(SELECT upper(x) FROM unnest(symbols) x), timeframe::market.timeframe,
            start_ts, end_ts, objective, COALESCE(settings, '{}'))
    RETURNING w.walk_forward_id INTO id;
    PERFORM audit.record('walk_forward.created', 'backtest.walk_forwards', id::text,
        jsonb_build_object('strategy', strategy, 'symbols', symbols, 'objective', objective));
    RETURN id;
END
$$;

CREATE FUNCTION backtest.record_window(walk_forward bigint, window_no integer,
                                       train_start timestamptz, train_end timestamptz,
                                       test_start timestamptz, test_end timestamptz,
                                       params jsonb, train_score double precision,
                                       candidates integer, test_run bigint)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    INSERT INTO backtest.walk_forward_windows (walk_forward_id, window_no, train_start, train_end,
        test_start, test_end, params, train_score, candidates, test_run_id)
    VALUES (walk_forward, window_no, train_start, train_end, test_start, test_end, params,
            train_score, candidates, test_run);
END;

CREATE FUNCTION backtest.finish_walk_forward(walk_forward bigint, status text, result jsonb)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE backtest.walk_forwards w SET status = finish_walk_forward.status::backtest.run_status,
        result = finish_walk_forward.result, finished_at = now()
    WHERE w.walk_forward_id = walk_forward AND w.status = 'running';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'walk-forward % is unknown or already finished', walk_forward
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    PERFORM audit.record('walk_forward.' || status, 'backtest.walk_forwards', walk_forward::text,
        jsonb_build_object('windows', (SELECT count(*) FROM backtest.walk_forward_windows x
                                       WHERE x.walk_forward_id = walk_forward)));
END
$$;

-- Fresh statistics for the ledger's tables. A backtest writes thousands of rows into
-- tables that may have been empty when its session planned the trading functions; the
-- plans cached then (e.g. the duplicate-fill lookup taking the account/time index and
-- filtering every fill of the account) stay until the statistics change. The engine
-- calls this a few times as a run grows; it re-plans its session's functions.
CREATE FUNCTION backtest.refresh_statistics() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    ANALYZE trading.fills, trading.orders, trading.signals, trading.positions, trading.trades;
END
$$;

------------------------------------------------------------------------------ grants
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA backtest FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA backtest FROM PUBLIC;
GRANT USAGE ON SCHEMA backtest TO mmats_api, mmats_readonly;
GRANT SELECT ON ALL TABLES IN SCHEMA backtest TO mmats_api, mmats_readonly;
GRANT EXECUTE ON FUNCTION
    backtest.create_run(text, text, jsonb, text[], text, timestamptz, timestamptz, numeric, text, jsonb, text, bigint),
    backtest.step(bigint, jsonb),
    backtest.finish_run(bigint, text, text, bigint, double precision, text, jsonb),
    backtest.record_equity(bigint, timestamptz[], numeric[], numeric[], double precision[], boolean[]),
    backtest.record_metrics(bigint, jsonb),
    backtest.record_montecarlo(bigint, text, integer, bigint, numeric, jsonb),
    backtest.create_walk_forward(text, text[], text, timestamptz, timestamptz, text, jsonb),
    backtest.record_window(bigint, integer, timestamptz, timestamptz, timestamptz, timestamptz, jsonb, double precision, integer, bigint),
    backtest.finish_walk_forward(bigint, text, jsonb),
    backtest.refresh_statistics()
    TO mmats_api;
