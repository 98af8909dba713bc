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
-- 3. trading._protect judges only the positions of the accounts it has locked. Its first
--    statement locks the accounts holding the instruments; a position opened by a fill
--    committed after that statement (its account not locked) was still judged, and
--    locked, by the second: the account-first lock order was broken (the router's
--    paper book and a bar insert deadlocked on it), and an exit being decided for that
--    account could meet a protective one. Such a position is judged from the next
--    insert on (a paper fill's own bar is judged by the router, with trading.on_bar, as
--    it applies the fill).
-- 4. trading.lock_accounts: a worker's transaction that writes to several accounts (the
--    strategy worker's step, the router's paper book) takes them all first, in id order.
--    Every audit event locks the chain head until commit; a transaction that wrote one
--    for an account and then locked the next waited for a bar insert that held that
--    next account and wanted the chain head for its own event (a deadlock, broken by
--    the server after a second).
-- 5. backtest.step returns each created order's triggered_at, so that the engine fills a
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
ALTER FUNCTION trading._size(trading.accounts, trading.strategies, market.instruments, numeric,
                             numeric, numeric, numeric, timestamptz) RESET search_path;
ALTER FUNCTION trading._votes(bigint, bigint, timestamptz, timestamptz) RESET search_path;
ALTER FUNCTION trading._aggregate(trading.accounts, trading.strategies, market.instruments,
                                  trading.signal_action, timestamptz) RESET search_path;
ALTER FUNCTION trading._finish_signal(bigint, trading.signal_status, text, text, bigint, jsonb)
    RESET search_path;
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

-- (as in 0004_04, with the positions of the locked accounts only)
CREATE OR REPLACE FUNCTION trading._protect(instruments bigint[], bars market.bars[], account bigint,
                                 OUT order_ids bigint[], OUT touched bigint[],
                                 OUT marked_until timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    locked bigint[];   -- the accounts locked, in id order: only their positions are judged
    hits jsonb;
    hit record;
    acc trading.accounts;
    inst market.instruments;
    trig trading.order_trigger;
    fire_price numeric;
    exit_qty numeric;
BEGIN
    order_ids := '{}';
    touched := '{}';
    -- the accounts first, in id order, as submit_signal and apply_fill lock them: an exit
    -- they are deciding for one of these positions is then committed (and counted below
    -- as already on its way) or not yet begun, never half-seen
    locked := ARRAY(
        SELECT a.account_id FROM trading.accounts a
        WHERE a.account_id IN (
            SELECT x.account_id FROM trading.positions x JOIN trading.accounts ac USING (account_id)
            WHERE x.instrument_id = ANY (_protect.instruments) AND x.quantity <> 0
              AND (_protect.account IS NULL AND ac.environment IN ('live', 'paper')
                   OR x.account_id = _protect.account))
        ORDER BY a.account_id FOR UPDATE);
    IF cardinality(locked) = 0 THEN
        RETURN;  -- nobody holds these instruments: nothing to judge or mark
    END IF;

    -- one statement judges every position (locked, in account and position order) on
    -- the bars it has not seen, and marks it; the hits come back to be turned into orders
    -- below. (Every part reads the positions as they were before the marks.) A hit is
    -- the first bar after a position's last mark whose low/high touches its stop (as
    -- breakeven and the trailing distance move it over the earlier bars of the batch) or
    -- its target.
    WITH pos AS MATERIALIZED (
        SELECT x.*, (x.leg = 'long' OR (x.leg = 'net' AND x.quantity > 0)) AS is_long,
               COALESCE(x.marked_at, '-infinity') AS mark
        FROM trading.positions x
        WHERE x.instrument_id = ANY (_protect.instruments) AND x.quantity <> 0
          AND x.account_id = ANY (locked)
        ORDER BY x.account_id, x.position_id
        FOR UPDATE OF x),
    raw AS MATERIALIZED (
        SELECT u.instrument_id, u.open AS o, u.high AS h, u.low AS l, u.close AS c,
               u.ts + market.timeframe_interval(u.timeframe) AS ct,
               market.timeframe_interval(u.timeframe) AS span
        FROM unnest(_protect.bars) u
        WHERE u.instrument_id = ANY (_protect.instruments)),
    -- bars closing at the same time: the one of the finest timeframe
    b AS MATERIALIZED (
        SELECT DISTINCT ON (r.instrument_id, r.ct) r.instrument_id, r.o, r.h, r.l, r.c, r.ct
        FROM raw r ORDER BY r.instrument_id, r.ct, r.span),
    -- per (instrument, last mark), over all the bars newer than the mark: the highest
    -- high, the lowest low, the last close (of the finest timeframe among the bars
    -- closing last) and its time. A position with no newer bar is left as it is.
    span AS MATERIALIZED (
        SELECT k.instrument_id, k.mark, max(r.h) AS hi, min(r.l) AS lo, max(r.ct) AS ct,
               (array_agg(r.c ORDER BY r.ct DESC, r.span))[1] AS c
        FROM (SELECT DISTINCT p.instrument_id, p.mark FROM pos p) k
        JOIN raw r ON r.instrument_id = k.instrument_id AND r.ct > k.mark
        GROUP BY k.instrument_id, k.mark),
    -- the positions these bars could reach: their range must meet the target or the
    -- furthest the stop can be moved within the batch (breakeven can lift a long's stop
    -- to the entry at most, the trailing distance to the batch's high less the
    -- distance; a short's mirror image). Only these are judged bar by bar.
    guarded AS (
        SELECT p.* FROM pos p
        JOIN span r ON r.instrument_id = p.instrument_id AND r.mark = p.mark
        WHERE CASE WHEN p.is_long
                   THEN r.lo <= GREATEST(
                            CASE WHEN p.breakeven IS NOT NULL
                                 THEN GREATEST(COALESCE(p.stop_loss, 0), p.average_price)
                                 ELSE p.stop_loss END,
                            GREATEST(p.trail_anchor, r.hi) - p.trailing_stop)
                        OR r.hi >= p.take_profit
                   ELSE r.hi >= LEAST(
                            CASE WHEN p.breakeven IS NOT NULL
                                 THEN LEAST(COALESCE(p.stop_loss, p.average_price), p.average_price)
                                 ELSE p.stop_loss END,
                            LEAST(p.trail_anchor, r.lo) + p.trailing_stop)
                        OR r.lo <= p.take_profit END),
    -- the bars each position has not seen, with the highest high and lowest low before
    -- each: the same for every position of an instrument marked at the same time, so
    -- computed once per (instrument, last mark)
    seen AS MATERIALIZED (
        SELECT b.*, k.mark,
               max(b.h) OVER earlier AS high_before, min(b.l) OVER earlier AS low_before
        FROM (SELECT DISTINCT g.instrument_id, g.mark FROM guarded g) k
        JOIN b ON b.instrument_id = k.instrument_id AND b.ct > k.mark
        WINDOW earlier AS (PARTITION BY k.instrument_id, k.mark ORDER BY b.ct
                           ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)),
    w AS (
        SELECT p.position_id, p.is_long, p.stop_loss, p.take_profit, p.trailing_stop,
               p.average_price, p.trail_anchor, n.o, n.h, n.l, n.c, n.ct,
               CASE WHEN p.is_long THEN n.high_before ELSE n.low_before END AS best_before,
               -- breakeven reached by an earlier bar of the batch
               COALESCE(CASE WHEN p.is_long THEN n.high_before >= p.breakeven
                             ELSE n.low_before <= p.breakeven END, false) AS be_before
        FROM guarded p JOIN seen n ON n.instrument_id = p.instrument_id AND n.mark = p.mark),
    s AS (
        SELECT w.*,
               CASE WHEN w.be_before
                    THEN CASE WHEN w.is_long THEN GREATEST(COALESCE(w.stop_loss, 0), w.average_price)
                              ELSE LEAST(COALESCE(w.stop_loss, w.average_price), w.average_price) END
                    ELSE w.stop_loss END AS sl,
               CASE WHEN w.is_long THEN GREATEST(w.trail_anchor, w.best_before)
                    ELSE LEAST(w.trail_anchor, w.best_before) END AS anchor
        FROM w),
    t AS (
        SELECT s.*,
               CASE WHEN s.trailing_stop IS NULL OR s.anchor IS NULL THEN s.sl
                    WHEN s.is_long THEN GREATEST(COALESCE(s.sl, 0), s.anchor - s.trailing_stop)
                    ELSE LEAST(COALESCE(s.sl, 'Infinity'), s.anchor + s.trailing_stop) END AS raw_stop
        FROM s),
    v AS (
        SELECT t.*, CASE WHEN t.raw_stop <= 0 OR t.raw_stop = 'Infinity' THEN t.sl ELSE t.raw_stop END AS stop
        FROM t),
    first_hit AS (
        SELECT DISTINCT ON (v.position_id) v.* FROM v
        WHERE (v.stop IS NOT NULL AND ((v.is_long AND v.l <= v.stop) OR (NOT v.is_long AND v.h >= v.stop)))
           OR (v.take_profit IS NOT NULL
               AND ((v.is_long AND v.h >= v.take_profit) OR (NOT v.is_long AND v.l <= v.take_profit)))
        ORDER BY v.position_id, v.ct),
    -- the marks: the last close, the trailing anchor, breakeven's move of the stop
    marked AS (
        UPDATE trading.positions x SET
            last_price = r.c, marked_at = r.ct,
            trail_anchor = CASE WHEN x.trailing_stop IS NULL THEN x.trail_anchor
                                WHEN p.is_long THEN GREATEST(x.trail_anchor, r.hi)
                                ELSE LEAST(x.trail_anchor, r.lo) END,
            stop_loss = CASE WHEN x.breakeven IS NOT NULL
                                  AND CASE WHEN p.is_long THEN r.hi >= x.breakeven
                                           ELSE r.lo <= x.breakeven END
                             THEN CASE WHEN p.is_long THEN GREATEST(COALESCE(x.stop_loss, 0), x.average_price)
                                       ELSE LEAST(COALESCE(x.stop_loss, x.average_price), x.average_price) END
                             ELSE x.stop_loss END,
            breakeven = CASE WHEN CASE WHEN p.is_long THEN r.hi >= x.breakeven
                                       ELSE r.lo <= x.breakeven END
                             THEN NULL ELSE x.breakeven END
        FROM pos p JOIN span r ON r.instrument_id = p.instrument_id AND r.mark = p.mark
        WHERE x.position_id = p.position_id
        RETURNING x.account_id, r.ct)
    SELECT (SELECT jsonb_agg(jsonb_build_object(
                'position_id', p.position_id, 'account_id', p.account_id,
                'instrument_id', p.instrument_id, 'strategy_id', p.strategy_id,
                'entry_strategy_id', p.entry_strategy_id, 'leg', p.leg, 'quantity', p.quantity,
                'is_long', f.is_long, 'stop_loss', f.stop_loss, 'take_profit', f.take_profit,
                'average_price', f.average_price, 'o', f.o, 'h', f.h, 'l', f.l, 'c', f.c,
                'ct', f.ct, 'sl', f.sl, 'be_before', f.be_before, 'stop', f.stop)
                ORDER BY p.instrument_id, p.account_id, p.position_id)
            FROM first_hit f JOIN pos p USING (position_id)),
           (SELECT COALESCE(array_agg(DISTINCT m.account_id ORDER BY m.account_id), '{}')
            FROM marked m),
           (SELECT max(m.ct) FROM marked m)
    INTO hits, touched, marked_until;

    -- the hits, in instrument, account and position order (as the per-instrument calls of
    -- before made them)
    FOR hit IN
        SELECT * FROM jsonb_to_recordset(COALESCE(hits, '[]')) AS x(
            position_id bigint, account_id bigint, instrument_id bigint, strategy_id bigint,
            entry_strategy_id bigint, leg trading.position_leg, quantity numeric,
            is_long boolean, stop_loss numeric, take_profit numeric, average_price numeric,
            o numeric, h numeric, l numeric, c numeric, ct timestamptz, sl numeric,
            be_before boolean, stop numeric)
        ORDER BY x.instrument_id, x.account_id, x.position_id
    LOOP
        IF hit.stop IS NOT NULL AND ((hit.is_long AND hit.l <= hit.stop) OR (NOT hit.is_long AND hit.h >= hit.stop)) THEN
            -- at the entry price because breakeven moved it there (in this batch or before)
            trig := CASE WHEN hit.stop = hit.sl AND hit.sl = hit.average_price
                          AND (hit.be_before OR hit.stop_loss = hit.average_price) THEN 'breakeven'
                         WHEN hit.stop = hit.sl THEN 'stop_loss'
                         ELSE 'trailing_stop' END;
            fire_price := CASE WHEN hit.is_long THEN LEAST(hit.o, hit.stop) ELSE GREATEST(hit.o, hit.stop) END;
        ELSE
            trig := 'take_profit';
            fire_price := CASE WHEN hit.is_long THEN GREATEST(hit.o, hit.take_profit) ELSE LEAST(hit.o, hit.take_profit) END;
        END IF;
        SELECT * INTO acc FROM trading.accounts x WHERE x.account_id = hit.account_id;
        -- exits already on their way (a strategy's close, an earlier stop) count first
        SELECT abs(hit.quantity) - COALESCE(sum(x.quantity - x.filled_quantity), 0) INTO exit_qty
        FROM trading.orders x
        WHERE x.account_id = hit.account_id AND x.instrument_id = hit.instrument_id AND x.reduce_only
          AND x.side = CASE WHEN hit.is_long THEN 'sell' ELSE 'buy' END::trading.order_side
          AND x.position_leg = hit.leg
          AND (hit.strategy_id IS NULL OR x.strategy_id = hit.strategy_id)
          AND x.status IN ('created', 'in_flight', 'submitted', 'partially_filled');
        IF inst.instrument_id IS DISTINCT FROM hit.instrument_id THEN
            SELECT * INTO inst FROM market.instruments i WHERE i.instrument_id = hit.instrument_id;
        END IF;
        IF acc.mode = 'operator' AND risk.breaker_mode(acc.account_id) <> 'FREEZE' AND exit_qty > 0 THEN
            order_ids := order_ids || trading._emit_order(acc, inst,
                COALESCE(hit.strategy_id, hit.entry_strategy_id), NULL,
                CASE WHEN hit.is_long THEN 'sell' ELSE 'buy' END::trading.order_side, exit_qty, trig,
                hit.c, reduce_only => true, leg => hit.leg, trigger_price => fire_price,
                triggered_at => hit.ct);
        ELSIF acc.mode = 'advisory' THEN
            INSERT INTO risk.events (account_id, severity, event_type, message, details)
            VALUES (hit.account_id, 'warning', upper(trig::text),
                    format('%s hit on %s at %s (advisory account: no order)', trig, inst.symbol,
                           fire_price),
                    jsonb_build_object('position_id', hit.position_id, 'price', fire_price, 'bar_close', hit.ct));
        END IF;
    END LOOP;
END
$$;

-- Lock accounts in id order, for a transaction that writes to several: taken first, before
-- any audit event, so that no two writers wait for each other on an account and on the
-- audit chain's head.
CREATE FUNCTION trading.lock_accounts(accounts bigint[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM 1 FROM trading.accounts a WHERE a.account_id = ANY (accounts)
    ORDER BY a.account_id FOR UPDATE;
END
$$;
REVOKE ALL ON FUNCTION trading.lock_accounts(bigint[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION trading.lock_accounts(bigint[]) TO mmats_strategy, mmats_router;

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
