-- 0004_03 (pre): a bar's protection and a strategy's exit no longer race. The bars trigger
-- judged a position without the account's lock, so while a strategy's close for that
-- position was being decided (its transaction not yet committed), a bar through the stop
-- did not see the close as an exit on its way and sent a second one: the position was
-- sold twice, and the ledger refused the second fill. protect_bars now locks the accounts
-- it judges first, in id order, as submit_signal and apply_fill do; the bars trigger locks
-- every account of the whole insert up front, in the same order. Found by inserting bars
-- faster than the workers settled them; tests/test_protection.py reproduces it with two
-- sessions.
SET LOCAL ROLE mmats_owner;

CREATE OR REPLACE FUNCTION trading.protect_bars(instrument bigint, bars market.bars[],
                                     account bigint DEFAULT NULL, snapshot boolean DEFAULT true,
                                     OUT order_ids bigint[], OUT touched bigint[],
                                     OUT marked_until timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p record;
    hit record;
    fin record;
    acc trading.accounts;
    inst market.instruments;
    trig trading.order_trigger;
    fire_price numeric;
    exit_qty numeric;
    a bigint;
BEGIN
    order_ids := '{}';
    touched := '{}';
    -- the accounts first, in id order, as submit_signal and apply_fill lock them: an exit
    -- they are deciding for one of these positions is then committed (and counted below
    -- as already on its way) or not yet begun, never half-seen
    PERFORM 1 FROM trading.accounts a
    WHERE a.account_id IN (
        SELECT x.account_id FROM trading.positions x JOIN trading.accounts ac USING (account_id)
        WHERE x.instrument_id = protect_bars.instrument AND x.quantity <> 0
          AND (protect_bars.account IS NULL AND ac.environment IN ('live', 'paper')
               OR x.account_id = protect_bars.account))
    ORDER BY a.account_id FOR UPDATE;
    FOR p IN
        SELECT x.*, (x.leg = 'long' OR (x.leg = 'net' AND x.quantity > 0)) AS is_long
        FROM trading.positions x JOIN trading.accounts ac USING (account_id)
        WHERE x.instrument_id = protect_bars.instrument AND x.quantity <> 0
          AND (protect_bars.account IS NULL AND ac.environment IN ('live', 'paper')
               OR x.account_id = protect_bars.account)
        ORDER BY x.account_id, x.position_id
        FOR UPDATE OF x
    LOOP
        -- the first bar whose low/high touches the stop or the target
        WITH b AS (
            SELECT DISTINCT ON (u.ts + market.timeframe_interval(u.timeframe))
                   u.open AS o, u.high AS h, u.low AS l, u.close AS c,
                   u.ts + market.timeframe_interval(u.timeframe) AS ct
            FROM unnest(bars) u
            WHERE u.instrument_id = protect_bars.instrument
              AND (p.marked_at IS NULL OR u.ts + market.timeframe_interval(u.timeframe) > p.marked_at)
            ORDER BY u.ts + market.timeframe_interval(u.timeframe), market.timeframe_interval(u.timeframe)),
        w AS (
            SELECT b.*,
                   CASE WHEN p.is_long THEN max(b.h) OVER earlier ELSE min(b.l) OVER earlier END AS best_before,
                   COALESCE(bool_or(CASE WHEN p.is_long THEN b.h >= p.breakeven ELSE b.l <= p.breakeven END)
                            OVER earlier, false) AS be_before
            FROM b WINDOW earlier AS (ORDER BY b.ct ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)),
        s AS (
            SELECT w.*,
                   CASE WHEN w.be_before
                        THEN CASE WHEN p.is_long THEN GREATEST(COALESCE(p.stop_loss, 0), p.average_price)
                                  ELSE LEAST(COALESCE(p.stop_loss, p.average_price), p.average_price) END
                        ELSE p.stop_loss END AS sl,
                   CASE WHEN p.is_long THEN GREATEST(p.trail_anchor, w.best_before)
                        ELSE LEAST(p.trail_anchor, w.best_before) END AS anchor
            FROM w),
        t AS (
            SELECT s.*,
                   CASE WHEN p.trailing_stop IS NULL OR s.anchor IS NULL THEN s.sl
                        WHEN p.is_long THEN GREATEST(COALESCE(s.sl, 0), s.anchor - p.trailing_stop)
                        ELSE LEAST(COALESCE(s.sl, 'Infinity'), s.anchor + p.trailing_stop) END AS raw_stop
            FROM s),
        v AS (
            SELECT t.*, CASE WHEN t.raw_stop <= 0 OR t.raw_stop = 'Infinity' THEN t.sl ELSE t.raw_stop END AS stop
            FROM t)
        SELECT v.* INTO hit FROM v
        WHERE (v.stop IS NOT NULL AND ((p.is_long AND v.l <= v.stop) OR (NOT p.is_long AND v.h >= v.stop)))
           OR (p.take_profit IS NOT NULL
               AND ((p.is_long AND v.h >= p.take_profit) OR (NOT p.is_long AND v.l <= p.take_profit)))
        ORDER BY v.ct LIMIT 1;

        IF hit.ct IS NOT NULL THEN
            IF hit.stop IS NOT NULL AND ((p.is_long AND hit.l <= hit.stop) OR (NOT p.is_long AND hit.h >= hit.stop)) THEN
                -- at the entry price because breakeven moved it there (in this batch or before)
                trig := CASE WHEN hit.stop = hit.sl AND hit.sl = p.average_price
                              AND (hit.be_before OR p.stop_loss = p.average_price) THEN 'breakeven'
                             WHEN hit.stop = hit.sl THEN 'stop_loss'
                             ELSE 'trailing_stop' END;
                fire_price := CASE WHEN p.is_long THEN LEAST(hit.o, hit.stop) ELSE GREATEST(hit.o, hit.stop) END;
            ELSE
                trig := 'take_profit';
                fire_price := CASE WHEN p.is_long THEN GREATEST(hit.o, p.take_profit) ELSE LEAST(hit.o, p.take_profit) END;
            END IF;
            SELECT * INTO acc FROM trading.accounts x WHERE x.account_id = p.account_id;
            -- exits already on their way (a strategy's close, an earlier stop) count first
            SELECT abs(p.quantity) - COALESCE(sum(x.quantity - x.filled_quantity), 0) INTO exit_qty
            FROM trading.orders x
            WHERE x.account_id = p.account_id AND x.instrument_id = protect_bars.instrument AND x.reduce_only
              AND x.side = CASE WHEN p.is_long THEN 'sell' ELSE 'buy' END::trading.order_side
              AND x.position_leg = p.leg
              AND (p.strategy_id IS NULL OR x.strategy_id = p.strategy_id)
              AND x.status IN ('created', 'in_flight', 'submitted', 'partially_filled');
            IF acc.mode = 'operator' AND risk.breaker_mode(acc.account_id) <> 'FREEZE' AND exit_qty > 0 THEN
                SELECT * INTO inst FROM market.instruments i WHERE i.instrument_id = protect_bars.instrument;
                order_ids := order_ids || trading._emit_order(acc, inst,
                    COALESCE(p.strategy_id, p.entry_strategy_id), NULL,
                    CASE WHEN p.is_long THEN 'sell' ELSE 'buy' END::trading.order_side, exit_qty, trig,
                    hit.c, reduce_only => true, leg => p.leg, trigger_price => fire_price);
            ELSIF acc.mode = 'advisory' THEN
                INSERT INTO risk.events (account_id, severity, event_type, message, details)
                VALUES (p.account_id, 'warning', upper(trig::text),
                        format('%s hit on %s at %s (advisory account: no order)', trig,
                               (SELECT i.symbol FROM market.instruments i WHERE i.instrument_id = protect_bars.instrument),
                               fire_price),
                        jsonb_build_object('position_id', p.position_id, 'price', fire_price, 'bar_close', hit.ct));
            END IF;
        END IF;

        -- mark once, from all the bars
        SELECT (array_agg(u.close ORDER BY u.ts + market.timeframe_interval(u.timeframe) DESC,
                          market.timeframe_interval(u.timeframe)))[1] AS c,
               max(u.ts + market.timeframe_interval(u.timeframe)) AS ct,
               max(u.high) AS h, min(u.low) AS l,
               COALESCE(bool_or(CASE WHEN p.is_long THEN u.high >= p.breakeven ELSE u.low <= p.breakeven END), false) AS be
        INTO fin FROM unnest(bars) u
        WHERE u.instrument_id = protect_bars.instrument
          AND (p.marked_at IS NULL OR u.ts + market.timeframe_interval(u.timeframe) > p.marked_at);
        CONTINUE WHEN fin.ct IS NULL;  -- no bar newer than the last mark
        UPDATE trading.positions x SET
            last_price = fin.c, marked_at = fin.ct,
            trail_anchor = CASE WHEN x.trailing_stop IS NULL THEN x.trail_anchor
                                WHEN p.is_long THEN GREATEST(x.trail_anchor, fin.h)
                                ELSE LEAST(x.trail_anchor, fin.l) END,
            stop_loss = CASE WHEN x.breakeven IS NOT NULL AND fin.be
                             THEN CASE WHEN p.is_long THEN GREATEST(COALESCE(x.stop_loss, 0), x.average_price)
                                       ELSE LEAST(COALESCE(x.stop_loss, x.average_price), x.average_price) END
                             ELSE x.stop_loss END,
            breakeven = CASE WHEN fin.be THEN NULL ELSE x.breakeven END
        WHERE x.position_id = p.position_id;
        IF NOT p.account_id = ANY (touched) THEN
            touched := touched || p.account_id;
        END IF;
        marked_until := GREATEST(marked_until, fin.ct);
    END LOOP;
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
    inst bigint;
    r record;
    touched bigint[] := '{}';
    until timestamptz;
    a bigint;
BEGIN
    -- every account holding one of these instruments, locked in id order before any of
    -- them is judged (protect_bars locks each instrument's accounts again: held already),
    -- so two feeds' inserts and the workers' calls all take accounts in the same order
    PERFORM 1 FROM trading.accounts a
    WHERE a.account_id IN (
        SELECT p.account_id FROM trading.positions p JOIN trading.accounts ac USING (account_id)
        WHERE p.instrument_id IN (SELECT DISTINCT nb.instrument_id FROM new_bars nb)
          AND p.quantity <> 0 AND ac.environment IN ('live', 'paper'))
    ORDER BY a.account_id FOR UPDATE;
    FOR inst IN
        SELECT i.instrument_id FROM (SELECT DISTINCT nb.instrument_id FROM new_bars nb) i
        WHERE EXISTS (SELECT 1 FROM trading.positions p JOIN trading.accounts ac USING (account_id)
                      WHERE p.instrument_id = i.instrument_id AND p.quantity <> 0
                        AND ac.environment IN ('live', 'paper'))
        ORDER BY i.instrument_id
    LOOP
        r := trading.protect_bars(inst, ARRAY(SELECT nb::market.bars FROM new_bars nb
                                              WHERE nb.instrument_id = inst),
                                  NULL, false);
        touched := touched || r.touched;
        until := GREATEST(until, r.marked_until);
    END LOOP;
    FOR a IN SELECT DISTINCT x FROM unnest(touched) x ORDER BY 1 LOOP
        PERFORM trading.snapshot_equity(a, until);
    END LOOP;
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
