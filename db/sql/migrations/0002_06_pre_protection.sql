-- 0002_06 (pre): bars drive protection (mark to market, stops, targets, trailing stops,
-- breakeven, equity snapshots, drawdown and daily-loss breakers); the breaker and the
-- account controls.
SET LOCAL ROLE mmats_owner;

------------------------------------------------------------------------------ breaker
-- Trip (or strengthen) the breaker. SOFT stops entries; HARD also sends closing orders
-- for every position, riskiest first; FREEZE stops everything, closes included.
CREATE FUNCTION risk._trip(acc trading.accounts, mode risk.breaker_mode, reason text,
                           event_type text DEFAULT 'BREAKER_TRIPPED')
RETURNS risk.breaker_mode
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    current risk.breaker_mode := risk.breaker_mode(acc.account_id);
    ids bigint[] := '{}';
BEGIN
    IF mode = 'OK' THEN
        RAISE EXCEPTION 'tripping needs SOFT, HARD or FREEZE; use risk.reset_breaker() to clear'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF current >= mode THEN
        RETURN current;  -- already as strong or stronger
    END IF;
    INSERT INTO risk.breaker_state AS b (account_id, mode, reason, tripped_at, tripped_by)
    VALUES (acc.account_id, mode, reason, now(), session_user)
    ON CONFLICT (account_id) DO UPDATE SET mode = EXCLUDED.mode, reason = EXCLUDED.reason,
        tripped_at = EXCLUDED.tripped_at, tripped_by = EXCLUDED.tripped_by;
    IF mode = 'HARD' AND acc.mode = 'operator' THEN
        ids := trading._close_positions(acc, NULL, 'breaker');
    END IF;
    INSERT INTO risk.events (account_id, severity, event_type, message, details)
    VALUES (acc.account_id, 'critical', upper(event_type),
            format('breaker %s on %s: %s', mode, acc.name, reason),
            jsonb_build_object('mode', mode, 'previous', current, 'closing_orders', to_jsonb(ids)));
    PERFORM audit.record('risk.breaker_tripped', 'trading.accounts', acc.account_id::text,
        jsonb_build_object('mode', mode, 'previous', current, 'reason', reason,
                           'closing_orders', to_jsonb(ids)));
    RETURN mode;
END
$$;

CREATE FUNCTION risk.trip_breaker(account text, mode text, reason text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts := trading._account(account, true);
    m risk.breaker_mode;
BEGIN
    IF upper(mode) NOT IN ('SOFT', 'HARD', 'FREEZE') THEN
        RAISE EXCEPTION 'breaker mode must be SOFT, HARD or FREEZE, got %', quote_literal(mode)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'tripping the breaker needs a reason' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    m := risk._trip(acc, upper(mode)::risk.breaker_mode, reason, 'BREAKER_MANUAL');
    RETURN jsonb_build_object('account', acc.name, 'mode', m,
        'open_orders', (SELECT count(*) FROM trading.orders o WHERE o.account_id = acc.account_id
                        AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')));
END
$$;

-- Clearing the breaker needs the explicit confirmation 'RESET <account name>'.
CREATE FUNCTION risk.reset_breaker(account text, confirmation text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts := trading._account(account, true);
    previous risk.breaker_mode := risk.breaker_mode(acc.account_id);
BEGIN
    IF confirmation IS DISTINCT FROM 'RESET ' || acc.name THEN
        RAISE EXCEPTION 'resetting the breaker of % needs the confirmation %', acc.name,
            quote_literal('RESET ' || acc.name) USING ERRCODE = 'insufficient_privilege';
    END IF;
    UPDATE risk.breaker_state b SET mode = 'OK', reason = NULL, tripped_at = NULL, tripped_by = NULL
    WHERE b.account_id = acc.account_id;
    UPDATE trading.accounts a SET consecutive_rejections = 0, peak_equity = e.equity
    FROM trading.account_equity(acc.account_id) e WHERE a.account_id = acc.account_id;
    INSERT INTO risk.events (account_id, severity, event_type, message, details)
    VALUES (acc.account_id, 'warning', 'BREAKER_RESET', format('breaker reset on %s', acc.name),
            jsonb_build_object('previous', previous));
    PERFORM audit.record('risk.breaker_reset', 'trading.accounts', acc.account_id::text,
                         jsonb_build_object('previous', previous));
    RETURN jsonb_build_object('account', acc.name, 'mode', 'OK', 'previous', previous);
END
$$;

------------------------------------------------------------------------------ modes
CREATE FUNCTION trading.request_operator_mode(account text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts := trading._account(account, true);
    token text := replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '');
BEGIN
    IF acc.mode = 'operator' THEN
        RAISE EXCEPTION 'account % is already in operator mode', acc.name USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF acc.environment = 'live' AND NOT EXISTS (
            SELECT 1 FROM trading.credentials c WHERE c.account_id = acc.account_id AND c.is_live) THEN
        RAISE EXCEPTION 'live account % has no credentials marked live: it cannot go to operator mode', acc.name
            USING ERRCODE = 'insufficient_privilege', HINT = 'add live credentials first (mmats creds set)';
    END IF;
    INSERT INTO trading.mode_requests AS r (account_id, token_hash, requested_by, requested_at, expires_at)
    VALUES (acc.account_id, sha256(convert_to(token, 'UTF8')), session_user, now(), now() + interval '5 minutes')
    ON CONFLICT (account_id) DO UPDATE SET token_hash = EXCLUDED.token_hash,
        requested_by = EXCLUDED.requested_by, requested_at = EXCLUDED.requested_at,
        expires_at = EXCLUDED.expires_at;
    PERFORM audit.record('control.operator_requested', 'trading.accounts', acc.account_id::text,
                         jsonb_build_object('expires_in_seconds', 300));
    RETURN token;
END
$$;

CREATE FUNCTION trading.confirm_operator_mode(account text, token text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts := trading._account(account, true);
    r trading.mode_requests;
BEGIN
    SELECT * INTO r FROM trading.mode_requests x WHERE x.account_id = acc.account_id;
    IF NOT FOUND OR r.expires_at < now() OR r.token_hash <> sha256(convert_to(COALESCE(token, ''), 'UTF8')) THEN
        RAISE EXCEPTION 'operator mode for %: no valid request for this token (request one with trading.request_operator_mode(); it expires after 5 minutes)', acc.name
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    DELETE FROM trading.mode_requests x WHERE x.account_id = acc.account_id;
    UPDATE trading.accounts a SET mode = 'operator', consecutive_rejections = 0
    WHERE a.account_id = acc.account_id;
    PERFORM audit.record('control.operator_confirmed', 'trading.accounts', acc.account_id::text,
                         jsonb_build_object('requested_by', r.requested_by));
    RETURN jsonb_build_object('account', acc.name, 'mode', 'operator');
END
$$;

CREATE FUNCTION trading.set_advisory(account text, reason text DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts := trading._account(account, true);
BEGIN
    UPDATE trading.accounts a SET mode = 'advisory' WHERE a.account_id = acc.account_id;
    PERFORM audit.record('control.advisory', 'trading.accounts', acc.account_id::text,
                         jsonb_build_object('reason', reason, 'previous', acc.mode));
    RETURN jsonb_build_object('account', acc.name, 'mode', 'advisory');
END
$$;

------------------------------------------------------------------------------ bars
-- Snapshot an account's equity at a time, track its peak and its UTC day, and trip the
-- breaker on a breached drawdown or daily-loss limit. Returns the equity.
CREATE FUNCTION trading.snapshot_equity(account bigint, at timestamptz) RETURNS numeric
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts;
    e record;
    peak numeric;
    day date := (at AT TIME ZONE 'UTC')::date;
    day_start numeric;
    l risk.limits;
    loss numeric;
BEGIN
    SELECT * INTO acc FROM trading.accounts a WHERE a.account_id = account FOR UPDATE;
    SELECT * INTO e FROM trading.account_equity(account);
    peak := GREATEST(COALESCE(acc.peak_equity, e.equity), e.equity);
    -- a new day starts from the equity the previous day ended with (the last snapshot
    -- before this one), so that the first bar of the day counts towards its loss (with
    -- daily bars every bar is the first of its day)
    IF acc.trading_day = day THEN
        day_start := acc.day_start_equity;
    ELSE
        SELECT s.equity INTO day_start FROM trading.equity_snapshots s
        WHERE s.account_id = account AND s.ts < at ORDER BY s.ts DESC LIMIT 1;
        day_start := COALESCE(day_start, e.equity);
    END IF;
    -- (only when something changed: every bar of every held instrument comes here, and
    -- a new row version per bar makes every later read of the account slower)
    IF (acc.peak_equity, acc.trading_day, acc.day_start_equity) IS DISTINCT FROM (peak, day, day_start) THEN
        UPDATE trading.accounts a SET peak_equity = peak, trading_day = day, day_start_equity = day_start
        WHERE a.account_id = account;
    END IF;
    INSERT INTO trading.equity_snapshots AS s (account_id, ts, cash, positions_value, equity, peak_equity, drawdown)
    VALUES (account, at, e.cash, e.positions_value, e.equity, peak,
            CASE WHEN peak > 0 THEN LEAST(GREATEST((peak - e.equity) / peak, 0), 1) ELSE 0 END)
    ON CONFLICT (account_id, ts) DO UPDATE SET cash = EXCLUDED.cash,
        positions_value = EXCLUDED.positions_value, equity = EXCLUDED.equity,
        peak_equity = EXCLUDED.peak_equity, drawdown = EXCLUDED.drawdown;
    FOR l IN SELECT * FROM risk.effective_limits(account) x
             WHERE x.limit_type IN ('MAX_DRAWDOWN', 'DAILY_LOSS') AND x.scope = 'global' LOOP
        IF l.limit_type = 'MAX_DRAWDOWN' AND peak > 0 AND (peak - e.equity) / peak >= l.value THEN
            PERFORM risk._trip(acc, COALESCE(upper(l.params ->> 'mode'), 'HARD')::risk.breaker_mode,
                format('MAX_DRAWDOWN: limit=%s, drawdown=%s', l.value, round((peak - e.equity) / peak, 4)),
                'MAX_DRAWDOWN');
        ELSIF l.limit_type = 'DAILY_LOSS' THEN
            loss := day_start - e.equity;
            IF l.params ->> 'unit' = 'fraction' AND day_start > 0 THEN
                loss := loss / day_start;
            END IF;
            IF loss >= l.value THEN
                PERFORM risk._trip(acc, COALESCE(upper(l.params ->> 'mode'), 'HARD')::risk.breaker_mode,
                    format('DAILY_LOSS: limit=%s, loss=%s', l.value, round(loss, 4)), 'DAILY_LOSS');
            END IF;
        END IF;
    END LOOP;
    RETURN e.equity;
END
$$;

-- Closed bars for one instrument drive the protection of its open positions. For each
-- position (every live and paper account's when account is NULL — the bars trigger; the
-- backtest engine passes its own account), in close-time order over the bars that close
-- after the position's last mark (one bar per close time, the finest timeframe):
--   * the stop in force during a bar is the stop-loss (moved to the entry price once an
--     EARLIER bar reached the breakeven level) and the trailing stop from the best price
--     of the EARLIER bars: a bar's own extremes come in an unknown order;
--   * the first bar that touches the stop or the target fires one reduce-only market
--     order through the order path (the stop first when both are inside one bar; at the
--     open when the bar gapped through), minus exits already open; an advisory account
--     gets a risk event instead;
--   * then the position is marked once: last price, marked_at, trail anchor, breakeven.
-- The whole batch is judged in one set-based pass per position, so a backfill of many
-- bars costs about what one bar does. With snapshot, the accounts touched get an equity
-- snapshot at the last close time (and their drawdown and daily-loss limits checked).
CREATE FUNCTION trading.protect_bars(instrument bigint, bars market.bars[],
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

-- One closed bar (the backtest engine's call, and the tests'): protect_bars of one bar.
CREATE FUNCTION trading.on_bar(instrument bigint, tf market.timeframe, bar_ts timestamptz,
                               o numeric, h numeric, l numeric, c numeric,
                               account bigint DEFAULT NULL)
RETURNS bigint[]
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
RETURN (trading.protect_bars(instrument,
            ARRAY[ROW(instrument, tf, bar_ts, o, h, l, c, 0)::market.bars], account)).order_ids;

-- Live and paper accounts: every INSERT (or COPY) of bars drives protection once per
-- statement, with all its rows: instruments nobody holds cost one index probe each.
CREATE FUNCTION market.bars_inserted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    inst bigint;
    r record;
    touched bigint[] := '{}';
    until timestamptz;
    a bigint;
BEGIN
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
    RETURN NULL;
END
$$;
CREATE TRIGGER bars_drive_protection AFTER INSERT ON market.bars
    REFERENCING NEW TABLE AS new_bars
    FOR EACH STATEMENT EXECUTE FUNCTION market.bars_inserted();
