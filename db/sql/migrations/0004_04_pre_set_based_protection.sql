-- 0004_04 (pre): bar protection in a fixed number of statements, whatever the number of
-- positions and instruments. It decides exactly as before (the same first bar touching
-- the stop or the target, the same trigger and price, the exits already on their way
-- counted first, the same orders in the same order, the same marks); what changes is the
-- cost. protect_bars ran three statements per position, and the bars trigger ran
-- protect_bars once per instrument: a live step of ten symbols held by a few accounts
-- took dozens of statements, each with its executor start-up. Now trading._protect
-- judges every position of a set of instruments with one query (every position locked,
-- in account and position order, as before), turns the few hits into orders one by one
-- (in instrument, account and position order, as the per-instrument calls did), and
-- marks every position with one UPDATE. protect_bars is _protect of one instrument plus
-- its equity snapshots; the bars trigger calls _protect once for the whole insert.
-- _emit_order reads no position, so marking after the orders changes nothing they see.
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
    hit record;
    acc trading.accounts;
    inst market.instruments;
    trig trading.order_trigger;
    fire_price numeric;
    exit_qty numeric;
BEGIN
    order_ids := '{}';
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

    -- every position judged, locked; for each, the first bar after its last mark whose
    -- low/high touches its stop (as breakeven and the trailing distance move it over the
    -- earlier bars of the batch) or its target. Bars closing at the same time: the one of
    -- the finest timeframe.
    FOR hit IN
        WITH pos AS MATERIALIZED (
            SELECT x.*, (x.leg = 'long' OR (x.leg = 'net' AND x.quantity > 0)) AS is_long,
                   COALESCE(x.marked_at, '-infinity') AS mark
            FROM trading.positions x JOIN trading.accounts ac USING (account_id)
            WHERE x.instrument_id = ANY (_protect.instruments) AND x.quantity <> 0
              AND (_protect.account IS NULL AND ac.environment IN ('live', 'paper')
                   OR x.account_id = _protect.account)
            ORDER BY x.account_id, x.position_id
            FOR UPDATE OF x),
        b AS MATERIALIZED (
            SELECT DISTINCT ON (u.instrument_id, u.ts + market.timeframe_interval(u.timeframe))
                   u.instrument_id, u.open AS o, u.high AS h, u.low AS l, u.close AS c,
                   u.ts + market.timeframe_interval(u.timeframe) AS ct
            FROM unnest(_protect.bars) u
            WHERE u.instrument_id = ANY (_protect.instruments)
            ORDER BY u.instrument_id, u.ts + market.timeframe_interval(u.timeframe),
                     market.timeframe_interval(u.timeframe)),
        guarded AS (
            SELECT * FROM pos p
            WHERE p.stop_loss IS NOT NULL OR p.take_profit IS NOT NULL
               OR p.trailing_stop IS NOT NULL OR p.breakeven IS NOT NULL),
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
            ORDER BY v.position_id, v.ct)
        SELECT f.*, p.account_id, p.instrument_id, p.strategy_id, p.entry_strategy_id, p.leg,
               p.quantity
        FROM first_hit f JOIN pos p USING (position_id)
        ORDER BY p.instrument_id, p.account_id, p.position_id
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

    -- mark every position once, from all its bars newer than its last mark: the last
    -- close (of the finest timeframe among the bars closing last), the trailing anchor,
    -- breakeven's move of the stop. The rows are ours: locked above, unchanged since.
    WITH pos AS (
        SELECT x.position_id, x.instrument_id, x.breakeven,
               (x.leg = 'long' OR (x.leg = 'net' AND x.quantity > 0)) AS is_long,
               COALESCE(x.marked_at, '-infinity') AS mark
        FROM trading.positions x JOIN trading.accounts ac USING (account_id)
        WHERE x.instrument_id = ANY (_protect.instruments) AND x.quantity <> 0
          AND (_protect.account IS NULL AND ac.environment IN ('live', 'paper')
               OR x.account_id = _protect.account)),
    raw AS MATERIALIZED (
        SELECT u.instrument_id, u.high, u.low, u.close,
               u.ts + market.timeframe_interval(u.timeframe) AS ct,
               market.timeframe_interval(u.timeframe) AS span
        FROM unnest(_protect.bars) u
        WHERE u.instrument_id = ANY (_protect.instruments)),
    -- once per (instrument, last mark): the bars newer than the mark (a position with none
    -- is left as it is)
    k AS MATERIALIZED (
        SELECT k.instrument_id, k.mark,
               (array_agg(r.close ORDER BY r.ct DESC, r.span))[1] AS c,
               max(r.ct) AS ct, max(r.high) AS h, min(r.low) AS l
        FROM (SELECT DISTINCT p.instrument_id, p.mark FROM pos p) k
        JOIN raw r ON r.instrument_id = k.instrument_id AND r.ct > k.mark
        GROUP BY k.instrument_id, k.mark),
    m AS (
        SELECT p.position_id, p.is_long, k.c, k.ct, k.h, k.l,
               COALESCE(CASE WHEN p.is_long THEN k.h >= p.breakeven ELSE k.l <= p.breakeven END,
                        false) AS be
        FROM pos p JOIN k ON k.instrument_id = p.instrument_id AND k.mark = p.mark),
    u AS (
        UPDATE trading.positions x SET
            last_price = m.c, marked_at = m.ct,
            trail_anchor = CASE WHEN x.trailing_stop IS NULL THEN x.trail_anchor
                                WHEN m.is_long THEN GREATEST(x.trail_anchor, m.h)
                                ELSE LEAST(x.trail_anchor, m.l) END,
            stop_loss = CASE WHEN x.breakeven IS NOT NULL AND m.be
                             THEN CASE WHEN m.is_long THEN GREATEST(COALESCE(x.stop_loss, 0), x.average_price)
                                       ELSE LEAST(COALESCE(x.stop_loss, x.average_price), x.average_price) END
                             ELSE x.stop_loss END,
            breakeven = CASE WHEN m.be THEN NULL ELSE x.breakeven END
        FROM m WHERE x.position_id = m.position_id
        RETURNING x.account_id, m.ct)
    SELECT COALESCE(array_agg(DISTINCT u.account_id ORDER BY u.account_id), '{}'), max(u.ct)
    INTO touched, marked_until FROM u;
END
$$;

CREATE OR REPLACE FUNCTION trading.protect_bars(instrument bigint, bars market.bars[],
                                     account bigint DEFAULT NULL, snapshot boolean DEFAULT true,
                                     OUT order_ids bigint[], OUT touched bigint[],
                                     OUT marked_until timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    a bigint;
BEGIN
    SELECT r.order_ids, r.touched, r.marked_until INTO order_ids, touched, marked_until
    FROM trading._protect(ARRAY[protect_bars.instrument], protect_bars.bars, protect_bars.account) r;
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
