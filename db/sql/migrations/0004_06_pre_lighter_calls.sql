-- 0004_06 (pre): lighter internal calls; a backtest's protective orders name their bar.
--
-- 1. The internal helpers run in their callers' search path. Only mmats_owner may execute
--    them (every other role reaches them through the public functions, which are SECURITY
--    DEFINER and pin search_path = pg_catalog, pg_temp), and their bodies name every
--    table and function by schema. A SET clause made each call save, set and restore the
--    search path, and made every cached plan check it again: some thirty calls per
--    signal and fill (the JSON parsers alone, twenty-five). tests/test_roles.py checks
--    that a function without a pinned search path is executable by the owner alone, or
--    is a SQL function (inlined into its caller's plan), and is never SECURITY DEFINER.
--    The trigger functions of tables only the owner writes (audit.events, trading.orders
--    and the order queue) run in the writer's path the same way.
-- 2. Fewer statements where one does: risk.return_correlation finds both last bars and
--    the cached value in one statement (three before; the correlation rule calls it for
--    every other instrument held); trading._locked_order finds an order named by its
--    id in one lookup (a client order id first, as before: two statements when the
--    reference was an order id, as the backtest's fills name theirs).
-- 3. backtest.step returns each created order's triggered_at, so that the engine fills a
--    protective order on the bar whose prices fired it, as the paper broker does, instead
--    of looking for the first bar of the batch whose range held the trigger price.
SET LOCAL ROLE mmats_owner;

ALTER FUNCTION trading._num(jsonb, text, text, numeric, numeric, boolean) RESET search_path;
ALTER FUNCTION trading._text(jsonb, text, text, integer) RESET search_path;
ALTER FUNCTION trading._ts(jsonb, text, text) RESET search_path;
ALTER FUNCTION trading._account(text, boolean) RESET search_path;
ALTER FUNCTION market._instrument(text, text) RESET search_path;
ALTER FUNCTION trading._strategy(text, text) RESET search_path;
ALTER FUNCTION trading._fx_or_fail(text, text, timestamptz) RESET search_path;
ALTER FUNCTION trading._open_order_qty(bigint, bigint, trading.order_side) RESET search_path;
ALTER FUNCTION trading._reserved_cash(trading.accounts) RESET search_path;
ALTER FUNCTION market.atr(bigint, market.timeframe, integer, timestamptz) RESET search_path;
ALTER FUNCTION risk.return_correlation(bigint, bigint, market.timeframe, integer, timestamptz)
    RESET search_path;
ALTER FUNCTION trading._size(trading.accounts, trading.strategies, market.instruments, numeric,
                             numeric, numeric, numeric, timestamptz) RESET search_path;
ALTER FUNCTION trading._votes(bigint, bigint, timestamptz, timestamptz) RESET search_path;
ALTER FUNCTION trading._aggregate(trading.accounts, trading.strategies, market.instruments,
                                  trading.signal_action, timestamptz) RESET search_path;
ALTER FUNCTION trading._finish_signal(bigint, trading.signal_status, text, text, bigint, jsonb)
    RESET search_path;
ALTER FUNCTION trading._locked_order(text) RESET search_path;
ALTER FUNCTION trading._set_order_status(text, trading.order_status, text, text) RESET search_path;
ALTER FUNCTION trading._close_positions(trading.accounts, bigint, trading.order_trigger)
    RESET search_path;
ALTER FUNCTION risk._trip(trading.accounts, risk.breaker_mode, text, text) RESET search_path;
ALTER FUNCTION trading.snapshot_equity(bigint, timestamptz) RESET search_path;
ALTER FUNCTION risk.check_order(trading.accounts, trading.strategies, market.instruments,
                                trading.order_side, numeric, numeric, numeric, numeric,
                                timestamptz) RESET search_path;
ALTER FUNCTION risk._check_order(trading.accounts, trading.strategies, market.instruments,
                                 trading.order_side, numeric, numeric, numeric, numeric,
                                 timestamptz) RESET search_path;
ALTER FUNCTION trading._emit_order(trading.accounts, market.instruments, bigint, bigint,
    trading.order_side, numeric, trading.order_trigger, numeric, boolean, trading.position_leg,
    trading.order_type, numeric, numeric, trading.time_in_force, timestamptz, numeric, numeric,
    numeric, numeric, numeric, text, timestamptz) RESET search_path;
ALTER FUNCTION trading._protect(bigint[], market.bars[], bigint) RESET search_path;
ALTER FUNCTION backtest._run(bigint, boolean) RESET search_path;
ALTER FUNCTION backtest._state(bigint) RESET search_path;
ALTER FUNCTION audit.chain_event() RESET search_path;
ALTER FUNCTION trading.check_order_transition() RESET search_path;
ALTER FUNCTION trading.order_queued() RESET search_path;

-- (as in 0003_02, the cache hit in one statement)
CREATE OR REPLACE FUNCTION risk.return_correlation(a bigint, b bigint, tf market.timeframe,
                                                   lookback integer, at timestamptz)
RETURNS numeric
LANGUAGE plpgsql AS $$
DECLARE
    lo bigint := LEAST(a, b);
    hi bigint := GREATEST(a, b);
    lo_ts timestamptz;
    hi_ts timestamptz;
    hit boolean;
    cached numeric;
    v numeric;
BEGIN
    SELECT t.lo_ts, t.hi_ts,
           k.a IS NOT NULL AND k.a_ts IS NOT DISTINCT FROM t.lo_ts
                           AND k.b_ts IS NOT DISTINCT FROM t.hi_ts,
           k.value
    INTO lo_ts, hi_ts, hit, cached
    FROM (SELECT (SELECT x.ts FROM market.bars x
                  WHERE x.instrument_id = lo AND x.timeframe = tf
                    AND x.ts <= COALESCE(at, 'infinity')
                  ORDER BY x.ts DESC LIMIT 1) AS lo_ts,
                 (SELECT x.ts FROM market.bars x
                  WHERE x.instrument_id = hi AND x.timeframe = tf
                    AND x.ts <= COALESCE(at, 'infinity')
                  ORDER BY x.ts DESC LIMIT 1) AS hi_ts) t
    LEFT JOIN risk.correlation_cache k
           ON k.a = lo AND k.b = hi AND k.timeframe = tf
          AND k.lookback = return_correlation.lookback;
    IF hit THEN
        RETURN cached;
    END IF;
    WITH pa AS (SELECT x.ts, x.close::float8 AS c FROM market.bars x
                WHERE x.instrument_id = lo AND x.timeframe = tf AND x.ts <= lo_ts
                ORDER BY x.ts DESC LIMIT lookback + 1),
         pb AS (SELECT x.ts, x.close::float8 AS c FROM market.bars x
                WHERE x.instrument_id = hi AND x.timeframe = tf AND x.ts <= hi_ts
                ORDER BY x.ts DESC LIMIT lookback + 1),
         j AS (SELECT pa.ts, pa.c AS ca, pb.c AS cb FROM pa JOIN pb USING (ts)),
         r AS (SELECT ca / lag(ca) OVER (ORDER BY ts) - 1 AS ra,
                      cb / lag(cb) OVER (ORDER BY ts) - 1 AS rb FROM j)
    SELECT CASE WHEN count(*) >= 3 THEN corr(ra, rb)::numeric END INTO v
    FROM r WHERE ra IS NOT NULL AND rb IS NOT NULL;
    INSERT INTO risk.correlation_cache AS k VALUES (lo, hi, tf, lookback, lo_ts, hi_ts, v)
    ON CONFLICT ON CONSTRAINT correlation_cache_pkey DO UPDATE
        SET a_ts = EXCLUDED.a_ts, b_ts = EXCLUDED.b_ts, value = EXCLUDED.value;
    RETURN v;
END
$$;

-- (as in 0002_05, one lookup: the client order id first, then the order id)
CREATE OR REPLACE FUNCTION trading._locked_order(ref text, OUT acc trading.accounts,
                                                 OUT o trading.orders)
LANGUAGE plpgsql AS $$
DECLARE
    account bigint;
    id bigint;
BEGIN
    IF ref IS NULL THEN
        RAISE EXCEPTION 'an order id or client order id is required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- two index probes in one statement, never one OR-ed scan (the plan of an OR with a
    -- cast would read the whole table, or cast a non-number in a generic plan); the
    -- second probe runs only when the first finds nothing and ref is a number
    SELECT x.order_id, x.account_id INTO id, account FROM (
        SELECT c.order_id, c.account_id, 1 AS rank FROM trading.orders c
        WHERE c.client_order_id = ref
        UNION ALL
        SELECT n.order_id, n.account_id, 2 FROM trading.orders n
        WHERE n.order_id = CASE WHEN ref ~ '^\d{1,18}$' THEN ref::bigint END) x
    ORDER BY x.rank LIMIT 1;
    IF id IS NULL THEN
        RAISE EXCEPTION 'unknown order %', quote_literal(ref) USING ERRCODE = 'foreign_key_violation';
    END IF;
    SELECT * INTO acc FROM trading.accounts a WHERE a.account_id = account FOR UPDATE;
    SELECT * INTO o FROM trading.orders x WHERE x.order_id = id FOR UPDATE;
END
$$;

-- (as in 0003_01, with each order's triggered_at)
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
CREATE OR REPLACE FUNCTION backtest.step(run bigint, ops jsonb) RETURNS jsonb
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
                'breakeven', o.breakeven, 'triggered_at', o.triggered_at) ORDER BY o.order_id)
            FROM trading.orders o WHERE o.account_id = acc.account_id AND o.order_id > before), '[]'),
        'account', backtest._state(acc.account_id));
END
$$;
