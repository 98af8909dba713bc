-- 0004_04 (pre): bar protection in a fixed number of statements, whatever the number of
-- positions and instruments. It decides exactly as before (the same first bar touching
-- the stop or the target, the same trigger and price, the exits already on their way
-- counted first, the same orders in the same order, the same marks:
-- tests/test_protection_reference.py compares it with the function it replaces on random
-- books and bars); what changes is the cost. protect_bars ran three statements per
-- position, and the bars trigger ran protect_bars once per instrument: a live step of ten
-- symbols held by a few accounts took dozens of statements, each with its executor
-- start-up. Now trading._protect locks the accounts, then one statement judges and marks
-- every position of a set of instruments (locked in account and position order, as
-- before), and the few hits come back to be turned into orders one by one (in
-- instrument, account and position order, as the per-instrument calls made them). Only
-- the positions whose stop or target the batch's range could reach are judged bar by
-- bar; the running highs and lows, and the marks, are computed once per instrument and
-- last mark. protect_bars is _protect of one instrument plus its equity snapshots; the
-- bars trigger calls _protect once for the whole insert. _emit_order reads no position,
-- so marking before the orders are made changes nothing they see.
--
-- And a protective order remembers the bar that fired it. The paper broker
-- fills a stop-loss, take-profit, trailing stop or breakeven order on the bar whose prices
-- fired it, as the backtest does; it took "the latest bar" to be that bar, which holds
-- only while the router keeps up. After a router outage (or any delay) spanning several
-- bars, the exit was filled at the right price but dated on the latest bar, so the trade's
-- exit time, the equity curve between and a day's loss could land minutes or hours late.
-- orders.triggered_at is the close time of the firing bar (NULL for every other order);
-- _emit_order takes it and _protect passes it.
SET LOCAL ROLE mmats_owner;

ALTER TABLE trading.orders ADD COLUMN triggered_at timestamptz;
COMMENT ON COLUMN trading.orders.triggered_at IS
    'a protective order: the close time of the bar whose prices fired it (the paper broker fills it on that bar); NULL for every other order';

-- (a new last parameter: the old signature goes, so that no call is ambiguous)
DROP FUNCTION trading._emit_order(trading.accounts, market.instruments, bigint, bigint,
    trading.order_side, numeric, trading.order_trigger, numeric, boolean, trading.position_leg,
    trading.order_type, numeric, numeric, trading.time_in_force, timestamptz, numeric, numeric,
    numeric, numeric, numeric, text);

CREATE FUNCTION trading._emit_order(acc trading.accounts, inst market.instruments,
                                               strategy_id bigint, signal_id bigint,
                                               side trading.order_side, qty numeric,
                                               trig trading.order_trigger, reference_price numeric,
                                               reduce_only boolean DEFAULT false,
                                               leg trading.position_leg DEFAULT 'net',
                                               order_type trading.order_type DEFAULT 'market',
                                               limit_price numeric DEFAULT NULL, stop_price numeric DEFAULT NULL,
                                               tif trading.time_in_force DEFAULT 'GTC',
                                               expire_at timestamptz DEFAULT NULL,
                                               stop_loss numeric DEFAULT NULL, take_profit numeric DEFAULT NULL,
                                               trailing_stop numeric DEFAULT NULL, breakeven numeric DEFAULT NULL,
                                               trigger_price numeric DEFAULT NULL,
                                               client_order_id text DEFAULT NULL,
                                               triggered_at timestamptz DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    id bigint;
    coid text;
BEGIN
    INSERT INTO trading.orders AS o (account_id, instrument_id, strategy_id, signal_id,
        client_order_id, side, order_type, time_in_force, quantity, limit_price, stop_price,
        expire_at, reduce_only, position_leg, trigger, trigger_price, stop_loss, take_profit,
        trailing_stop, breakeven, reference_price, triggered_at)
    VALUES (acc.account_id, inst.instrument_id, strategy_id, signal_id,
        COALESCE(client_order_id, 'mm' || acc.account_id || '-' || nextval('trading.client_order_seq')),
        side, order_type, tif, qty, limit_price, stop_price, expire_at, reduce_only, leg, trig,
        trigger_price, stop_loss, take_profit, trailing_stop, breakeven, reference_price,
        triggered_at)
    RETURNING o.order_id, o.client_order_id INTO id, coid;
    INSERT INTO pgmq.q_orders AS q (vt, message, headers)
    VALUES (clock_timestamp(), jsonb_build_object(
        'order_id', id, 'account_id', acc.account_id, 'environment', acc.environment,
        'client_order_id', coid), NULL);
    PERFORM audit.record('order.created', 'trading.orders', id::text, jsonb_build_object(
        'account', acc.name, 'symbol', inst.symbol, 'side', side, 'quantity', qty,
        'type', order_type, 'trigger', trig, 'strategy_id', strategy_id, 'signal_id', signal_id,
        'reference_price', reference_price, 'reduce_only', reduce_only));
    RETURN id;
END
$$;


CREATE FUNCTION trading._protect(instruments bigint[], bars market.bars[], account bigint,
                                 OUT order_ids bigint[], OUT touched bigint[],
                                 OUT marked_until timestamptz)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
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
    PERFORM 1 FROM trading.accounts a
    WHERE a.account_id IN (
        SELECT x.account_id FROM trading.positions x JOIN trading.accounts ac USING (account_id)
        WHERE x.instrument_id = ANY (_protect.instruments) AND x.quantity <> 0
          AND (_protect.account IS NULL AND ac.environment IN ('live', 'paper')
               OR x.account_id = _protect.account))
    ORDER BY a.account_id FOR UPDATE;
    IF NOT FOUND THEN
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
        FROM trading.positions x JOIN trading.accounts ac USING (account_id)
        WHERE x.instrument_id = ANY (_protect.instruments) AND x.quantity <> 0
          AND (_protect.account IS NULL AND ac.environment IN ('live', 'paper')
               OR x.account_id = _protect.account)
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

CREATE OR REPLACE FUNCTION trading.protect_bars(instrument bigint, bars market.bars[],
                                     account bigint DEFAULT NULL, snapshot boolean DEFAULT true,
                                     OUT order_ids bigint[], OUT touched bigint[],
                                     OUT marked_until timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    a bigint;
BEGIN
    r := trading._protect(ARRAY[protect_bars.instrument], protect_bars.bars, protect_bars.account);
    order_ids := r.order_ids;
    touched := r.touched;
    marked_until := r.marked_until;
    IF snapshot THEN
        FOREACH a IN ARRAY touched LOOP
            PERFORM trading.snapshot_equity(a, marked_until);
        END LOOP;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION market.bars_inserted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    held bigint[];
    r record;
    a bigint;
BEGIN
    -- the instruments of the insert that a live or paper account holds, all judged at once
    -- (_protect locks their accounts in id order before judging any of them, so two feeds'
    -- inserts and the workers' calls all take accounts in the same order); then one
    -- equity snapshot per account touched
    held := ARRAY(
        SELECT i.instrument_id FROM (SELECT DISTINCT nb.instrument_id FROM new_bars nb) i
        WHERE EXISTS (SELECT 1 FROM trading.positions p JOIN trading.accounts ac USING (account_id)
                      WHERE p.instrument_id = i.instrument_id AND p.quantity <> 0
                        AND ac.environment IN ('live', 'paper'))
        ORDER BY i.instrument_id);
    IF cardinality(held) > 0 THEN
        r := trading._protect(held, ARRAY(SELECT nb::market.bars FROM new_bars nb
                                          WHERE nb.instrument_id = ANY (held)), NULL);
        FOREACH a IN ARRAY r.touched LOOP
            PERFORM trading.snapshot_equity(a, r.marked_until);
        END LOOP;
    END IF;
    FOR r IN
        SELECT nb.instrument_id, nb.timeframe, min(nb.ts) AS first, max(nb.ts) AS last,
               count(*) AS n
        FROM new_bars nb GROUP BY nb.instrument_id, nb.timeframe
        ORDER BY nb.instrument_id, nb.timeframe
    LOOP
        PERFORM pg_notify('mmats_bars', json_build_object(
            'instrument_id', r.instrument_id, 'timeframe', r.timeframe, 'first', r.first,
            'last', r.last, 'n', r.n)::text);
    END LOOP;
    RETURN NULL;
END
$$;
