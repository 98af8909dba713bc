-- 0004_09 (pre): protection and emergency closes per position row.
--
-- 1. trading._close_positions (close_position, close_all, the HARD breaker) and
--    trading._protect count as a row's exits on their way only the open reduce-only
--    orders that will reduce that row, matched as trading.apply_fill books their fills.
--    The account's own row (manual orders, strategy NULL) of an independent account
--    counted every reduce-only order of the instrument, a strategy's close for its own
--    row included: close_all sent that strategy's row its close and then nothing for the
--    account's row when the strategy's row came first (riskiest first), and a stop hit
--    on the account's row sent no order while a strategy's close was open. The leg is
--    the order's leg as the fill books it (a reduce-only 'net' order on a hedge account
--    reduces the long leg for a sell, the short leg for a buy).
-- 2. trading._protect judges and marks a position never marked from its opening fill's
--    time on (positions.opened_at), not from the beginning of time: trading.apply_fill
--    does not set marked_at, so the first bar inserted of any age (a bar backfilled after
--    a reconnect, an import of history) fired the stop on prices from before the
--    position existed and marked it at that old close. The bar holding the fill (closing
--    after it) is still judged: the backtest and the paper broker fill a market order at
--    a bar's open and judge that bar. As before, only bars closing after the mark are
--    judged and marked, so the mark never moves backwards.
-- 3. backtest._run's hint for an unknown run names `mmats runs`.
SET LOCAL ROLE mmats_owner;

-- (as in 0002_05, search path reset in 0004_06) the pending exits of a row are the open
-- reduce-only orders that will reduce that row (its strategy's on an independent account,
-- NULL matching NULL; its own leg), not every such order of the instrument for the
-- account's own row: close_all and the HARD breaker left that row open
CREATE OR REPLACE FUNCTION trading._close_positions(acc trading.accounts, instrument bigint,
                                         trig trading.order_trigger)
RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    p record;
    ids bigint[] := '{}';
    pending numeric;
    qty numeric;
BEGIN
    IF risk.breaker_mode(acc.account_id) = 'FREEZE' THEN
        RAISE EXCEPTION 'account % is frozen (breaker FREEZE): no orders, closes included, until risk.reset_breaker()', acc.name
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    FOR p IN
        SELECT x.*, i.instrument_id AS iid, trading._signed_qty(x) AS sq,
               (COALESCE(x.last_price, x.average_price) - x.average_price) * trading._signed_qty(x) AS upnl,
               abs(trading._signed_qty(x)) * COALESCE(x.last_price, x.average_price) AS exposure
        FROM trading.positions x JOIN market.instruments i USING (instrument_id)
        WHERE x.account_id = acc.account_id AND x.quantity <> 0
          AND (instrument IS NULL OR x.instrument_id = instrument)
        ORDER BY upnl ASC, exposure DESC, x.position_id
    LOOP
        -- the open exits that will reduce this row, as trading.apply_fill books their fills:
        -- on an independent account an order's fill books to its own strategy's row (a
        -- manual order's, strategy NULL, to the account's own row), on any other account
        -- to the one row of the leg; a reduce-only order's leg is its own on a hedge
        -- account (a 'net' one: long for a sell, short for a buy), 'net' on a one-way
        -- one. A manual exit on an independent account reduces the account's row first
        -- and what exceeds that row the strategies' rows, oldest first: the part of that
        -- excess that reaches this strategy row is counted too.
        SELECT COALESCE(sum(e.rest) FILTER (WHERE e.row_strategy IS NOT DISTINCT FROM p.strategy_id), 0)
             + CASE WHEN acc.aggregation = 'independent' AND p.strategy_id IS NOT NULL THEN
                   LEAST(abs(p.sq), GREATEST(0,
                       COALESCE(sum(e.rest) FILTER (WHERE e.row_strategy IS NULL), 0)
                       - (SELECT COALESCE(sum(abs(y.quantity)), 0) FROM trading.positions y
                          WHERE y.account_id = acc.account_id AND y.instrument_id = p.iid
                            AND y.leg = p.leg AND sign(trading._signed_qty(y)) = sign(p.sq)
                            AND (y.strategy_id IS NULL OR y.position_id < p.position_id))))
                   ELSE 0 END
        INTO pending
        FROM (SELECT CASE WHEN acc.aggregation = 'independent' THEN o.strategy_id END AS row_strategy,
                     o.quantity - o.filled_quantity AS rest
              FROM trading.orders o
              WHERE o.account_id = acc.account_id AND o.instrument_id = p.iid AND o.reduce_only
                AND o.side = CASE WHEN p.sq > 0 THEN 'sell' ELSE 'buy' END::trading.order_side
                AND CASE WHEN acc.position_mode = 'oneway' THEN 'net'::trading.position_leg
                         WHEN o.position_leg <> 'net' THEN o.position_leg
                         WHEN o.side = 'buy' THEN 'short'::trading.position_leg
                         ELSE 'long'::trading.position_leg END = p.leg
                AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')) e;
        qty := abs(p.sq) - pending;
        CONTINUE WHEN qty <= 0;
        ids := ids || trading._emit_order(acc, (SELECT i FROM market.instruments i WHERE i.instrument_id = p.iid),
            p.strategy_id, NULL, CASE WHEN p.sq > 0 THEN 'sell' ELSE 'buy' END::trading.order_side, qty,
            trig, COALESCE(p.last_price, p.average_price), reduce_only => true, leg => p.leg);
    END LOOP;
    RETURN ids;
END
$$;

-- (as in 0004_06) the exits already on their way to a hit position are matched to its row
-- as in _close_positions (a strategy's close no longer silences a stop on the account's
-- own row); a position never marked is judged from its opening fill on, not on bars that
-- closed before it was held
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
               -- judged and marked from its last mark on, or, never marked, from its
               -- opening fill's time (a bar closing after it, the bar holding the fill
               -- included): never on a bar that closed before it was held
               COALESCE(x.marked_at, x.opened_at, '-infinity') AS mark
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
        -- exits already on their way to this row (its strategy's close, an earlier stop)
        -- count first: the orders whose fills trading.apply_fill books to this row (as in
        -- trading._close_positions: the row's own strategy, NULL for the account's own
        -- row, on an independent account; its own leg; a manual exit's excess over the
        -- account's row, oldest strategy row first)
        SELECT abs(hit.quantity) - (
                   COALESCE(sum(e.rest) FILTER (WHERE e.row_strategy IS NOT DISTINCT FROM hit.strategy_id), 0)
                   + CASE WHEN acc.aggregation = 'independent' AND hit.strategy_id IS NOT NULL THEN
                         LEAST(abs(hit.quantity), GREATEST(0,
                             COALESCE(sum(e.rest) FILTER (WHERE e.row_strategy IS NULL), 0)
                             - (SELECT COALESCE(sum(abs(y.quantity)), 0) FROM trading.positions y
                                WHERE y.account_id = hit.account_id AND y.instrument_id = hit.instrument_id
                                  AND y.leg = hit.leg
                                  AND sign(trading._signed_qty(y)) = CASE WHEN hit.is_long THEN 1 ELSE -1 END
                                  AND (y.strategy_id IS NULL OR y.position_id < hit.position_id))))
                         ELSE 0 END)
        INTO exit_qty
        FROM (SELECT CASE WHEN acc.aggregation = 'independent' THEN x.strategy_id END AS row_strategy,
                     x.quantity - x.filled_quantity AS rest
              FROM trading.orders x
              WHERE x.account_id = hit.account_id AND x.instrument_id = hit.instrument_id AND x.reduce_only
                AND x.side = CASE WHEN hit.is_long THEN 'sell' ELSE 'buy' END::trading.order_side
                AND CASE WHEN acc.position_mode = 'oneway' THEN 'net'::trading.position_leg
                         WHEN x.position_leg <> 'net' THEN x.position_leg
                         WHEN x.side = 'buy' THEN 'short'::trading.position_leg
                         ELSE 'long'::trading.position_leg END = hit.leg
                AND x.status IN ('created', 'in_flight', 'submitted', 'partially_filled')) e;
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

-- (as in 0003_01, search path reset in 0004_06) the hint names the command that lists the
-- runs, `mmats runs` (there is no `mmats backtest list`)
CREATE OR REPLACE FUNCTION backtest._run(run bigint, lock boolean DEFAULT false) RETURNS backtest.runs
LANGUAGE plpgsql AS $$
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
            USING ERRCODE = 'foreign_key_violation', HINT = 'list the runs with `mmats runs`';
    END IF;
    RETURN r;
END
$$;
