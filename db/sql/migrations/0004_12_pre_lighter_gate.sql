-- 0004_12 (pre): the risk gate reads less for the same decisions.
--
-- Measured with benchmarks/bench_trading_core.py (5 strategies x 10 symbols, every rule):
-- a buy signal took ~2.1 ms, of which MAX_CORRELATION alone 0.38 ms (--without
-- MAX_CORRELATION): one call of risk.return_correlation per instrument held, each reading
-- the latest bar of both instruments and the cache, the signal's own instrument again each
-- time.
-- 1. MAX_CORRELATION is one statement: the latest bars and the cache for every instrument
--    held at once; risk.return_correlation (which computes and caches) only where the
--    cache misses.
-- 2. MAX_EXPOSURE and MAX_LEVERAGE read the positions and the open entry orders once per
--    signal (all, this market, this strategy), not twice per limit.
-- 3. The equity is read once per signal: trading._size returns the equity it sized from
--    and risk._check_order takes it (read again when not given, as by risk.check_order).
-- 4. trading.account_equity reads the positions in one pass; trading._known_fields
--    answers a document whose fields are all known with one operation.
-- The decisions, their codes and reasons are unchanged.
-- 5. risk.breaker_mode, granted to mmats_strategy and mmats_router since 0002_07, reads
--    risk.breaker_state with the caller's rights, and neither role could read that table:
--    the function refused them. They may read the breaker state now.
-- 6. trading._protect judged a bar of a coarser timeframe on its whole range even when part
--    of its period came before a position's mark: a 1h bar arriving after the 1m bars of
--    its hour fired a stop on a dip before the fill, and moved a trailing stop's anchor to
--    a high from before it. A coarser bar is now judged only when it opens at or after the
--    mark (the instrument's finest timeframe as before).
-- 7. trading.snapshot_equity dated a bar closing at 00:00 UTC in the new day (the last
--    bar's loss counted in the next day, and DAILY_LOSS missed a breach on the day it
--    happened), and a late bar of an earlier day moved the account's day back, so that the
--    next bar started the current day afresh from the latest equity, its losses forgotten.
--    A snapshot at `at` belongs to the day of `at` less a microsecond, and the day never
--    goes back.
-- 8. trading.mark_in_flight let an order already in flight through unjudged: the router,
--    sending again an order whose first sending never reached its broker, sent it after a
--    FREEZE, a SOFT or HARD breaker or a downgrade to advisory. The gate (trading._gate)
--    now judges every sending, the first and any later one.
SET LOCAL ROLE mmats_owner;

GRANT SELECT ON risk.breaker_state TO mmats_strategy, mmats_router;
GRANT USAGE ON SCHEMA risk TO mmats_strategy;

-- (as in 0004_08, with MAX_CORRELATION in one statement, the exposures read once and the
-- equity given by the caller)
DROP FUNCTION risk._check_order(trading.accounts, trading.strategies, market.instruments,
                                trading.order_side, numeric, numeric, numeric, numeric,
                                timestamptz);
CREATE FUNCTION risk._check_order(acc trading.accounts, strat trading.strategies,
                                  inst market.instruments, side trading.order_side,
                                  qty numeric, opening numeric, price numeric,
                                  stop_loss numeric, at timestamptz,
                                  known_equity numeric DEFAULT NULL,
                                  OUT code text, OUT reason text)
LANGUAGE plpgsql AS $$
DECLARE
    breaker risk.breaker_mode;
    breaker_reason text;
    eq_equity numeric;
    have_eq boolean := false;
    fx numeric;
    px numeric;
    dir numeric := CASE WHEN side = 'buy' THEN 1 ELSE -1 END;
    held numeric;
    inst_qty numeric;
    after_qty numeric;
    gross_after numeric;  -- this instrument's exposure after the order, each leg counted
    leg_after numeric;    -- the position the order sizes after it (a hedge account: its leg)
    l risk.limits;
    measure numeric;
    n integer;
    local_ts timestamp;
    tz text;
    corr_value numeric;
    available numeric;
    expo_all numeric;       -- gross exposure of the other instruments: all, this market,
    expo_market numeric;    -- this strategy (positions and entries not yet filled),
    expo_strategy numeric;  -- read once for every MAX_EXPOSURE / MAX_LEVERAGE limit
    corr_symbol text;
    required numeric;
BEGIN
    -- risk.breaker_mode(), with the reason a FREEZE names
    SELECT b.mode, b.reason INTO breaker, breaker_reason
    FROM risk.breaker_state b WHERE b.account_id = acc.account_id;
    breaker := COALESCE(breaker, 'OK');
    IF breaker = 'FREEZE' THEN
        code := 'BREAKER_FREEZE';
        reason := format('BREAKER_FREEZE: account=%s, reason=%s', acc.name, breaker_reason);
        RETURN;
    END IF;
    IF opening <= 0 THEN
        RETURN;  -- closing and reducing orders pass every other check
    END IF;
    IF breaker IN ('SOFT', 'HARD') THEN
        code := 'BREAKER_' || breaker;
        reason := format('BREAKER_%s: account=%s, entries stopped until risk.reset_breaker()',
                         breaker, acc.name);
        RETURN;
    END IF;

    fx := CASE WHEN inst.quote_currency = acc.base_currency THEN 1
               ELSE trading._fx_or_fail(inst.quote_currency, acc.base_currency, at) END;
    px := price * fx;
    -- the position on the instrument, with the entry orders not yet filled: an approved
    -- entry counts at once, so that orders decided one after the other (or by sessions
    -- waiting on the account lock) cannot together pass a limit each passes alone
    SELECT x.held, x.held + x.entries INTO held, inst_qty
    FROM (SELECT COALESCE((SELECT sum(trading._signed_qty(p)) FROM trading.positions p
                           WHERE p.account_id = acc.account_id
                             AND p.instrument_id = inst.instrument_id), 0) AS held,
                 COALESCE((SELECT sum(CASE WHEN o.side = 'buy' THEN 1 ELSE -1 END
                                      * (o.quantity - o.filled_quantity))
                           FROM trading.orders o
                           WHERE o.account_id = acc.account_id AND o.instrument_id = inst.instrument_id
                             AND NOT o.reduce_only
                             AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')), 0)
                     AS entries) x;
    after_qty := inst_qty + dir * qty;
    -- a hedge account's long and short legs are both exposure (a long and an equal short
    -- net to 0, yet each is at risk and each takes margin): there the order adds to its
    -- own leg (a buy to the long, a sell to the short), which is the position it sizes,
    -- and the instrument's exposure is every leg and entry, gross
    IF acc.position_mode = 'hedge' THEN
        SELECT COALESCE(sum(x.q) FILTER (WHERE x.leg = own_leg), 0) + qty,
               COALESCE(sum(x.q), 0) + qty
        INTO leg_after, gross_after
        FROM (SELECT p.leg, abs(p.quantity) AS q FROM trading.positions p
              WHERE p.account_id = acc.account_id AND p.instrument_id = inst.instrument_id
              UNION ALL
              SELECT o.position_leg, o.quantity - o.filled_quantity FROM trading.orders o
              WHERE o.account_id = acc.account_id AND o.instrument_id = inst.instrument_id
                AND NOT o.reduce_only
                AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')) x,
             LATERAL (SELECT CASE WHEN side = 'buy' THEN 'long' ELSE 'short' END::trading.position_leg
                      AS own_leg) l;
        -- (no row at all: the sums are NULL)
        leg_after := COALESCE(leg_after, qty);
        gross_after := COALESCE(gross_after, qty);
    ELSE
        leg_after := abs(after_qty);
        gross_after := abs(after_qty);
    END IF;

    FOR l IN SELECT * FROM risk.effective_limits(acc.account_id) el
             WHERE el.scope = 'global'
                OR (el.scope = 'market' AND el.scope_key = inst.market::text)
                OR (el.scope = 'strategy' AND el.scope_key = strat.name)
                OR (el.scope = 'symbol' AND el.scope_key = inst.symbol)
             ORDER BY array_position(ARRAY['global', 'market', 'strategy', 'symbol']::risk.limit_scope[], el.scope),
                      CASE WHEN el.limit_type IN ('REQUIRE_STOP_LOSS', 'MAX_ORDER_VALUE') THEN 1 ELSE 0 END,
                      el.limit_type
    LOOP
        -- the equity is read by limits only (and cannot fail): read it when one applies
        IF NOT have_eq THEN
            IF known_equity IS NOT NULL THEN
                eq_equity := known_equity;  -- (the caller's sizing read it in this transaction)
            ELSE
                SELECT e.equity INTO eq_equity FROM trading.account_equity(acc.account_id) e;
            END IF;
            have_eq := true;
        END IF;
        measure := NULL;
        CASE l.limit_type
        WHEN 'MAX_DRAWDOWN' THEN
            IF acc.peak_equity > 0 THEN
                measure := GREATEST(0, (acc.peak_equity - eq_equity) / acc.peak_equity);
                IF measure >= l.value THEN
                    code := l.limit_type;
                    reason := format('MAX_DRAWDOWN: limit=%s, drawdown=%s, peak=%s, equity=%s',
                                     l.value, round(measure, 4), acc.peak_equity, round(eq_equity, 2));
                END IF;
            END IF;
        WHEN 'DAILY_LOSS' THEN
            IF acc.day_start_equity IS NOT NULL AND acc.trading_day = (at AT TIME ZONE 'UTC')::date THEN
                measure := acc.day_start_equity - eq_equity;
                IF l.params ->> 'unit' = 'fraction' THEN  -- of the day's start, flow-scaled
                    measure := CASE WHEN COALESCE(acc.day_start_scaled, acc.day_start_equity) > 0
                        THEN (COALESCE(acc.day_start_scaled, acc.day_start_equity) - eq_equity)
                             / COALESCE(acc.day_start_scaled, acc.day_start_equity) END;
                END IF;
                IF measure >= l.value THEN
                    code := l.limit_type;
                    reason := format('DAILY_LOSS: limit=%s, loss=%s%s', l.value, round(measure, 4),
                                     CASE WHEN l.params ->> 'unit' = 'fraction' THEN ', unit=fraction' ELSE '' END);
                END IF;
            END IF;
        WHEN 'MAX_POSITION_SIZE' THEN
            IF eq_equity > 0 THEN
                measure := leg_after * px / eq_equity;
                IF measure > l.value THEN
                    code := l.limit_type;
                    reason := format('MAX_POSITION_SIZE: limit=%s, requested=%s, scope=%s',
                                     l.value, round(measure, 4), l.scope || COALESCE(':' || l.scope_key, ''));
                END IF;
            ELSE
                code := l.limit_type;
                reason := format('MAX_POSITION_SIZE: limit=%s, equity=%s', l.value, round(eq_equity, 2));
            END IF;
        WHEN 'MAX_EXPOSURE', 'MAX_LEVERAGE' THEN
            -- gross exposure of the scope after this order, as a share of equity (each
            -- position row on its own, so a hedge account's legs never net): the other
            -- instruments' positions and entry orders not yet filled, summed once per scope
            -- for every such limit (this instrument counts as gross_after; a symbol scope
            -- holds this instrument only)
            IF expo_all IS NULL THEN
                SELECT COALESCE(sum(x.v), 0),
                       COALESCE(sum(x.v) FILTER (WHERE x.market = inst.market), 0),
                       COALESCE(sum(x.v) FILTER (WHERE x.strategy_id = strat.strategy_id), 0)
                INTO expo_all, expo_market, expo_strategy
                FROM (SELECT abs(trading._signed_qty(p) * COALESCE(p.last_price, p.average_price)
                                 * CASE WHEN i.quote_currency = acc.base_currency THEN 1
                                        ELSE COALESCE(trading.fx_rate(i.quote_currency, acc.base_currency, NULL), 0) END) AS v,
                             i.market, COALESCE(p.strategy_id, p.entry_strategy_id) AS strategy_id
                      FROM trading.positions p JOIN market.instruments i USING (instrument_id)
                      WHERE p.account_id = acc.account_id AND p.quantity <> 0
                        AND p.instrument_id <> inst.instrument_id
                      UNION ALL
                      SELECT (o.quantity - o.filled_quantity)
                             * COALESCE(o.limit_price, o.reference_price, market.latest_close(o.instrument_id))
                             * CASE WHEN i.quote_currency = acc.base_currency THEN 1
                                    ELSE COALESCE(trading.fx_rate(i.quote_currency, acc.base_currency, NULL), 0) END,
                             i.market, o.strategy_id
                      FROM trading.orders o JOIN market.instruments i USING (instrument_id)
                      WHERE o.account_id = acc.account_id AND o.instrument_id <> inst.instrument_id
                        AND NOT o.reduce_only
                        AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')) x;
            END IF;
            -- (the limits read are those of this market, strategy and symbol only)
            measure := CASE WHEN l.limit_type = 'MAX_LEVERAGE' OR l.scope = 'global' THEN expo_all
                            WHEN l.scope = 'market' THEN expo_market
                            WHEN l.scope = 'strategy' THEN expo_strategy
                            ELSE 0 END;
            measure := (measure + gross_after * px) / NULLIF(eq_equity, 0);
            IF measure IS NULL OR measure > l.value THEN
                code := l.limit_type;
                reason := format('%s: limit=%s, requested=%s, scope=%s', l.limit_type, l.value,
                                 COALESCE(round(measure, 4)::text, 'equity<=0'),
                                 l.scope || COALESCE(':' || l.scope_key, ''));
            END IF;
        WHEN 'MAX_OPEN_POSITIONS' THEN
            -- open positions and entry orders not yet filled (each one a position to be)
            IF l.scope = 'symbol' THEN
                -- position rows (strategy, leg) on the symbol, this order's own included
                SELECT count(*) INTO n FROM (
                    SELECT p.strategy_id, p.leg FROM trading.positions p
                    WHERE p.account_id = acc.account_id AND p.instrument_id = inst.instrument_id
                      AND p.quantity <> 0
                    UNION
                    SELECT CASE WHEN acc.aggregation = 'independent' THEN o.strategy_id END, o.position_leg
                    FROM trading.orders o
                    WHERE o.account_id = acc.account_id AND o.instrument_id = inst.instrument_id
                      AND NOT o.reduce_only
                      AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')
                    UNION
                    SELECT CASE WHEN acc.aggregation = 'independent' THEN strat.strategy_id END,
                           CASE WHEN acc.position_mode = 'oneway' THEN 'net'
                                WHEN side = 'buy' THEN 'long' ELSE 'short' END::trading.position_leg) k;
            ELSE
                SELECT count(DISTINCT x.instrument_id) INTO n FROM (
                    SELECT p.instrument_id, COALESCE(p.strategy_id, p.entry_strategy_id) AS strategy_id
                    FROM trading.positions p
                    WHERE p.account_id = acc.account_id AND p.quantity <> 0
                    UNION ALL
                    SELECT o.instrument_id, o.strategy_id FROM trading.orders o
                    WHERE o.account_id = acc.account_id AND NOT o.reduce_only
                      AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')) x
                JOIN market.instruments i USING (instrument_id)
                WHERE x.instrument_id <> inst.instrument_id
                  AND (l.scope = 'global' OR (l.scope = 'market' AND i.market::text = l.scope_key)
                       OR (l.scope = 'strategy' AND x.strategy_id = strat.strategy_id));
                n := n + CASE WHEN after_qty <> 0 THEN 1 ELSE 0 END;
            END IF;
            IF n > l.value THEN
                code := l.limit_type;
                reason := format('MAX_OPEN_POSITIONS: limit=%s, requested=%s, scope=%s', l.value, n,
                                 l.scope || COALESCE(':' || l.scope_key, ''));
            END IF;
        WHEN 'MAX_CORRELATION' THEN
            -- open positions and entry orders not yet filled in the order's direction, each
            -- instrument once, in one statement: the cached correlation where the cache holds
            -- the latest bars of both (risk.return_correlation's hit), else computed (and
            -- cached) by it; the first instrument above the limit is named
            WITH o AS (
                SELECT DISTINCT x.instrument_id
                FROM (SELECT p.instrument_id, trading._signed_qty(p) AS q FROM trading.positions p
                      WHERE p.account_id = acc.account_id AND p.quantity <> 0
                      UNION ALL
                      SELECT o.instrument_id, CASE WHEN o.side = 'buy' THEN 1 ELSE -1 END
                                              * (o.quantity - o.filled_quantity)
                      FROM trading.orders o
                      WHERE o.account_id = acc.account_id AND NOT o.reduce_only
                        AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')) x
                WHERE x.instrument_id <> inst.instrument_id AND sign(x.q) = dir),
            p AS (SELECT COALESCE(l.params ->> 'timeframe', '1d')::market.timeframe AS tf,
                         COALESCE((l.params ->> 'lookback')::integer, 30) AS lookback),
            own AS MATERIALIZED (
                SELECT (SELECT b.ts FROM market.bars b
                        WHERE b.instrument_id = inst.instrument_id AND b.timeframe = p.tf
                          AND b.ts <= COALESCE(at, 'infinity')
                        ORDER BY b.ts DESC LIMIT 1) AS ts
                FROM p),
            t AS MATERIALIZED (
                SELECT o.instrument_id,
                       (SELECT b.ts FROM market.bars b
                        WHERE b.instrument_id = o.instrument_id AND b.timeframe = p.tf
                          AND b.ts <= COALESCE(at, 'infinity')
                        ORDER BY b.ts DESC LIMIT 1) AS ts,
                       own.ts AS own_ts
                FROM o, p, own)
            SELECT i.symbol, c.v INTO corr_symbol, corr_value
            FROM t CROSS JOIN p
            JOIN market.instruments i USING (instrument_id)
            LEFT JOIN risk.correlation_cache k
                   ON k.a = LEAST(inst.instrument_id, t.instrument_id)
                  AND k.b = GREATEST(inst.instrument_id, t.instrument_id)
                  AND k.timeframe = p.tf AND k.lookback = p.lookback
            CROSS JOIN LATERAL (
                SELECT CASE WHEN k.a IS NOT NULL
                             AND k.a_ts IS NOT DISTINCT FROM CASE WHEN inst.instrument_id < t.instrument_id
                                                                  THEN t.own_ts ELSE t.ts END
                             AND k.b_ts IS NOT DISTINCT FROM CASE WHEN inst.instrument_id < t.instrument_id
                                                                  THEN t.ts ELSE t.own_ts END
                            THEN k.value
                            ELSE risk.return_correlation(inst.instrument_id, t.instrument_id, p.tf,
                                                         p.lookback, at) END AS v) c
            WHERE c.v > l.value
            ORDER BY t.instrument_id LIMIT 1;
            IF corr_symbol IS NOT NULL THEN
                code := l.limit_type;
                reason := format('MAX_CORRELATION: limit=%s, correlation=%s, with=%s', l.value,
                                 round(corr_value, 4), corr_symbol);
            END IF;
        WHEN 'TRADING_HOURS' THEN
            tz := COALESCE(l.params ->> 'tz', 'UTC');
            local_ts := at AT TIME ZONE tz;
            IF NOT (l.params -> 'days' IS NULL
                    OR (l.params -> 'days') @> to_jsonb(extract(isodow FROM local_ts)::integer))
               OR (l.params ? 'start' AND local_ts::time < (l.params ->> 'start')::time)
               OR (l.params ? 'end' AND local_ts::time >= (l.params ->> 'end')::time) THEN
                code := l.limit_type;
                reason := format('TRADING_HOURS: at=%s %s, allowed=days %s %s-%s', to_char(local_ts, 'Dy HH24:MI'), tz,
                                 COALESCE(l.params ->> 'days', 'all'), COALESCE(l.params ->> 'start', '00:00'),
                                 COALESCE(l.params ->> 'end', '24:00'));
            END IF;
        WHEN 'MIN_VOLUME' THEN
            SELECT b.volume INTO measure FROM market.bars b
            WHERE b.instrument_id = inst.instrument_id
              AND b.timeframe = COALESCE(l.params ->> 'timeframe', market.finest_timeframe(inst.instrument_id)::text)::market.timeframe
              AND b.ts <= at ORDER BY b.ts DESC LIMIT 1;
            IF COALESCE(measure, 0) < l.value THEN
                code := l.limit_type;
                reason := format('MIN_VOLUME: limit=%s, volume=%s', l.value, COALESCE(measure::text, 'none'));
            END IF;
        WHEN 'MAX_VOLATILITY' THEN
            measure := market.atr(inst.instrument_id,
                COALESCE(l.params ->> 'timeframe', market.finest_timeframe(inst.instrument_id)::text)::market.timeframe,
                COALESCE((l.params ->> 'period')::integer, 14), at) / price;
            -- no measure (fewer bars than the period, or none of that timeframe) refuses, as
            -- MIN_VOLUME does without a volume: a limit that cannot be checked never passes
            IF measure IS NULL OR measure > l.value THEN
                code := l.limit_type;
                reason := CASE WHEN measure IS NULL
                    THEN format('MAX_VOLATILITY: limit=%s, atr_ratio=none (fewer than %s bars of %s)',
                                l.value, COALESCE((l.params ->> 'period')::integer, 14) + 1,
                                COALESCE(l.params ->> 'timeframe', market.finest_timeframe(inst.instrument_id)::text, '-'))
                    ELSE format('MAX_VOLATILITY: limit=%s, atr_ratio=%s', l.value, round(measure, 6)) END;
            END IF;
        WHEN 'REQUIRE_STOP_LOSS' THEN
            IF l.value > 0 AND stop_loss IS NULL THEN
                code := l.limit_type;
                reason := 'REQUIRE_STOP_LOSS: an entry must carry stop_loss';
            END IF;
        WHEN 'MAX_ORDER_VALUE' THEN
            measure := opening * px;
            IF measure > l.value THEN
                code := l.limit_type;
                reason := format('MAX_ORDER_VALUE: limit=%s, requested=%s', l.value, round(measure, 2));
            END IF;
        ELSE
            NULL;
        END CASE;
        IF code IS NOT NULL THEN
            RETURN;
        END IF;
    END LOOP;

    -- Trade level: the position and the cash must exist.
    -- a sell may not go below what is held: buys not yet filled may never fill
    IF held + dir * qty < 0 AND NOT acc.allow_short AND (held >= 0 OR dir < 0) THEN
        code := 'SHORT_NOT_ALLOWED';
        reason := format('SHORT_NOT_ALLOWED: position=%s, sell=%s, account=%s', held, qty, acc.name);
        RETURN;
    END IF;
    IF side = 'buy' THEN
        available := acc.cash - trading._reserved_cash(acc);
        required := qty * px * (1 + acc.taker_fee);
        IF required > available THEN
            code := 'INSUFFICIENT_CASH';
            reason := format('INSUFFICIENT_CASH: available=%s, required=%s', round(available, 2), round(required, 2));
            RETURN;
        END IF;
    END IF;
END
$$;

REVOKE ALL ON FUNCTION risk._check_order(trading.accounts, trading.strategies, market.instruments,
    trading.order_side, numeric, numeric, numeric, numeric, timestamptz, numeric) FROM PUBLIC;

-- (as in 0002_04, returning the equity it sized from; no SET clause, as since 0004_06)
DROP FUNCTION trading._size(trading.accounts, trading.strategies, market.instruments, numeric,
                            numeric, numeric, numeric, timestamptz);
CREATE FUNCTION trading._size(acc trading.accounts, s trading.strategies, inst market.instruments,
                              size numeric, price numeric, fx numeric, stop_loss numeric,
                              at timestamptz, OUT qty numeric, OUT clamp_to_cash boolean,
                              OUT equity numeric)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    a trading.account_strategies;
    allocation numeric;
    method trading.sizing_method;
    params jsonb;
    capital numeric;
    eq numeric;
    risk_amount numeric;
    atr numeric;
    stats record;
    f numeric;
    unit_cost numeric := price * fx * (1 + acc.taker_fee);
BEGIN
    SELECT * INTO a FROM trading.account_strategies x
    WHERE x.account_id = acc.account_id AND x.strategy_id = s.strategy_id;
    allocation := COALESCE(a.allocation, 1);
    method := COALESCE(a.sizing_method, 'percent_equity');
    params := COALESCE(a.sizing_params, '{}');
    SELECT e.equity INTO eq FROM trading.account_equity(acc.account_id) e;
    equity := eq;  -- (for the gate's checks: read once per signal)
    capital := GREATEST(eq, 0) * allocation;
    clamp_to_cash := method IN ('percent_equity', 'fixed_fractional', 'kelly');
    CASE method
    WHEN 'percent_equity' THEN
        qty := capital * size / unit_cost;
    WHEN 'fixed_fractional' THEN
        qty := acc.starting_cash * allocation * size / unit_cost;
    WHEN 'fixed_quantity' THEN
        qty := trading._num(params, 'quantity', 'sizing_params', 0, NULL, false) * size;
        IF qty IS NULL THEN
            RAISE EXCEPTION 'fixed_quantity sizing needs sizing_params.quantity'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    WHEN 'fixed_notional' THEN
        qty := trading._num(params, 'amount', 'sizing_params', 0, NULL, false) * size / unit_cost;
        IF qty IS NULL THEN
            RAISE EXCEPTION 'fixed_notional sizing needs sizing_params.amount'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    WHEN 'risk_per_trade' THEN
        IF stop_loss IS NULL OR stop_loss = price THEN
            RAISE EXCEPTION 'risk_per_trade sizing needs a stop_loss away from the price'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        risk_amount := capital * COALESCE(trading._num(params, 'risk', 'sizing_params', 0, 1), 0.01) * size;
        qty := risk_amount / (abs(price - stop_loss) * fx);
    WHEN 'volatility' THEN
        atr := market.atr(inst.instrument_id,
            COALESCE(params ->> 'timeframe', market.finest_timeframe(inst.instrument_id)::text)::market.timeframe,
            COALESCE(trading._num(params, 'period', 'sizing_params', 1)::integer, 14), at);
        IF atr IS NULL OR atr = 0 THEN
            RAISE EXCEPTION 'volatility sizing needs % bars of history for %',
                COALESCE(trading._num(params, 'period', 'sizing_params', 1)::integer, 14) + 1, inst.symbol
                USING ERRCODE = 'no_data_found';
        END IF;
        risk_amount := capital * COALESCE(trading._num(params, 'risk', 'sizing_params', 0, 1), 0.01) * size;
        qty := risk_amount / (COALESCE(trading._num(params, 'multiple', 'sizing_params', 0, NULL, false), 2) * atr * fx);
    WHEN 'kelly' THEN
        SELECT count(*) AS n, count(*) FILTER (WHERE t.pnl > 0) AS wins,
               avg(t.pnl) FILTER (WHERE t.pnl > 0) AS avg_win,
               avg(-t.pnl) FILTER (WHERE t.pnl <= 0) AS avg_loss
        INTO stats FROM trading.trades t
        WHERE t.account_id = acc.account_id AND t.strategy_id = s.strategy_id;
        IF stats.n < COALESCE(trading._num(params, 'min_trades', 'sizing_params', 0)::integer, 20) THEN
            f := COALESCE(trading._num(params, 'fallback', 'sizing_params', 0, 1), 0.02);
        ELSE
            -- no win: W = 0, f <= 0; no loss (or losses of 0): R infinite, f = W
            f := CASE WHEN stats.wins = 0 THEN 0
                      WHEN COALESCE(stats.avg_loss, 0) = 0 THEN stats.wins::numeric / stats.n
                      ELSE stats.wins::numeric / stats.n
                           - (1 - stats.wins::numeric / stats.n) / (stats.avg_win / stats.avg_loss) END;
            f := f * COALESCE(trading._num(params, 'fraction', 'sizing_params', 0, 1), 0.5);
            f := LEAST(GREATEST(f, 0), COALESCE(trading._num(params, 'cap', 'sizing_params', 0, 1), 0.25));
        END IF;
        qty := capital * f * size / unit_cost;
    END CASE;
END
$$;

REVOKE ALL ON FUNCTION trading._size(trading.accounts, trading.strategies, market.instruments,
    numeric, numeric, numeric, numeric, timestamptz) FROM PUBLIC;

-- (as in 0004_11, giving the gate the equity the sizing read)
CREATE OR REPLACE FUNCTION trading.submit_signal(signal jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts;
    s trading.strategies;
    inst market.instruments;
    action_text text;
    act trading.signal_action;
    size numeric;
    sl numeric; tp numeric; trail numeric; be numeric; conf numeric;
    at timestamptz;
    reasoning text;
    meta jsonb;
    sig_id bigint;
    written boolean := false;    -- the signal row exists (inserted as pending)
    f_status trading.signal_status;
    f_code text;
    f_reason text;
    extra jsonb := '{}';
    agg record;
    pos_strategy bigint;
    cur numeric;
    sig_leg trading.position_leg;
    hedge_ids bigint[];
    held numeric;
    pending_entry numeric;
    pending_exit numeric;
    price numeric;
    market_px numeric;
    fx numeric;
    sized record;
    sized_equity numeric;  -- the equity the sizing read, for the gate
    target numeric;
    delta numeric;
    opening numeric;
    side trading.order_side;
    denial record;
    oid bigint;
    cash_room numeric;
BEGIN
    IF signal IS NULL OR jsonb_typeof(signal) <> 'object' THEN
        RAISE EXCEPTION 'a signal must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM trading._known_fields(signal, '{account,strategy,version,symbol,venue,action,size,
        stop_loss,take_profit,trailing_stop,confidence,reasoning,metadata,ts,price}', 'signal');
    acc := trading._account(trading._text(signal, 'account', 'signal', 64), true);
    s := trading._strategy(trading._text(signal, 'strategy', 'signal', 64),
                           trading._text(signal, 'version', 'signal', 32));
    inst := market._instrument(trading._text(signal, 'symbol', 'signal', 40),
                               trading._text(signal, 'venue', 'signal', 32));
    action_text := lower(trading._text(signal, 'action', 'signal', 10));
    IF action_text NOT IN ('buy', 'sell', 'close', 'hold') THEN
        RAISE EXCEPTION 'signal.action must be buy, sell, close or hold, got %', signal -> 'action'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    act := action_text::trading.signal_action;
    IF act IS NULL THEN
        RAISE EXCEPTION 'signal.action is required (buy, sell, close or hold)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    size := COALESCE(trading._num(signal, 'size', 'signal', 0, 1), 1);
    sl := trading._num(signal, 'stop_loss', 'signal', 0, NULL, false);
    tp := trading._num(signal, 'take_profit', 'signal', 0, NULL, false);
    trail := trading._num(signal, 'trailing_stop', 'signal', 0, NULL, false);
    be := trading._num(signal -> 'metadata', 'breakeven', 'signal.metadata', 0, NULL, false);
    conf := trading._num(signal, 'confidence', 'signal', 0, 1);
    at := COALESCE(trading._ts(signal, 'ts', 'signal'), now());
    IF signal ? 'metadata' AND jsonb_typeof(signal -> 'metadata') <> 'object' THEN
        RAISE EXCEPTION 'signal.metadata must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF length((signal -> 'metadata')::text) > 16384 THEN
        RAISE EXCEPTION 'signal.metadata must be at most 16384 characters of JSON, got %',
            length((signal -> 'metadata')::text) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- (a bad price is refused whatever the decision, as the other fields are)
    PERFORM trading._num(signal, 'price', 'signal', 0, NULL, false);
    -- a live or paper decision is made now: a time in the future is a clock or a typo
    IF acc.environment IN ('live', 'paper') AND at > now() + interval '5 minutes' THEN
        RAISE EXCEPTION 'signal.ts % is in the future (now %): a % account decides at the present',
            at, now(), acc.environment USING ERRCODE = 'invalid_parameter_value';
    END IF;

    IF acc.aggregation = 'independent' THEN
        -- in the order the INSERT evaluates them: its id, then the reasoning
        sig_id := nextval('trading.signals_signal_id_seq');
        reasoning := trading._text(signal, 'reasoning', 'signal', 4000);
        meta := COALESCE(signal -> 'metadata', '{}');
    ELSE
        INSERT INTO trading.signals AS g (account_id, strategy_id, instrument_id, ts, action, size,
            stop_loss, take_profit, trailing_stop, confidence, reasoning, metadata)
        VALUES (acc.account_id, s.strategy_id, inst.instrument_id, at, act, size, sl, tp, trail, conf,
                trading._text(signal, 'reasoning', 'signal', 4000), COALESCE(signal -> 'metadata', '{}'))
        RETURNING g.signal_id INTO sig_id;
        written := true;
    END IF;

    <<decide>>
    BEGIN
        IF acc.mode = 'advisory' THEN
            f_status := 'advisory'; f_reason := 'advisory account: recorded, no order';
            EXIT decide;
        END IF;
        IF act = 'hold' THEN
            f_status := 'ignored'; f_code := 'HOLD'; f_reason := 'hold: nothing to do';
            EXIT decide;
        END IF;
        IF NOT s.enabled THEN
            f_status := 'ignored'; f_code := 'STRATEGY_DISABLED';
            f_reason := format('STRATEGY_DISABLED: strategy=%s', s.name);
            EXIT decide;
        END IF;
        -- only a strategy given a share of the account trades it (a misspelt name was
        -- sized with all the capital)
        IF NOT EXISTS (SELECT 1 FROM trading.account_strategies x
                       WHERE x.account_id = acc.account_id AND x.strategy_id = s.strategy_id) THEN
            f_status := 'rejected'; f_code := 'STRATEGY_NOT_ASSIGNED';
            f_reason := format('STRATEGY_NOT_ASSIGNED: strategy=%s %s, account=%s (assign it with trading.assign_strategy or [[strategies]] in mmats.toml)',
                               s.name, s.version, acc.name);
            EXIT decide;
        END IF;

        IF acc.aggregation <> 'independent' THEN  -- (independent: always decided)
            agg := trading._aggregate(acc, s, inst, act, at);
            IF NOT agg.decided THEN
                f_status := 'ignored'; f_code := agg.code; f_reason := agg.reason;
                EXIT decide;
            END IF;
        END IF;

        -- the position this signal acts on: the strategy's own (independent) or the account's net
        pos_strategy := CASE WHEN acc.aggregation = 'independent' THEN s.strategy_id END;
        -- hedge mode: buy works the long leg, sell the short leg (on a long-only account, where
        -- there is no short leg, a sell closes the long one, as in one-way mode), close both
        sig_leg := CASE WHEN acc.position_mode = 'oneway' THEN 'net'
                    WHEN act = 'buy' THEN 'long'
                    WHEN act = 'sell' AND NOT acc.allow_short THEN 'long'
                    WHEN act = 'sell' THEN 'short' END;
        IF sig_leg IS NULL THEN
            IF NOT written THEN
                INSERT INTO trading.signals AS g (signal_id, account_id, strategy_id, instrument_id,
                    ts, action, size, stop_loss, take_profit, trailing_stop, confidence, reasoning,
                    metadata)
                OVERRIDING SYSTEM VALUE
                VALUES (sig_id, acc.account_id, s.strategy_id, inst.instrument_id, at, act, size, sl,
                        tp, trail, conf, reasoning, meta);
            END IF;
            SELECT array_agg(x.order_id ORDER BY x.order_id) INTO hedge_ids FROM (
                SELECT trading._emit_order(acc, inst, s.strategy_id, sig_id,
                           CASE WHEN p.leg = 'long' THEN 'sell' ELSE 'buy' END::trading.order_side,
                           r.remaining, 'signal', market.latest_close(inst.instrument_id, at),
                           reduce_only => true, leg => p.leg) AS order_id
                FROM trading.positions p,
                     -- what is held less the closing orders already on their way to that
                     -- row (a manual exit's part that reaches it included)
                     LATERAL (SELECT p.quantity - trading._row_exits(acc, p.instrument_id, p.strategy_id,
                                         p.leg, trading._signed_qty(p), p.position_id) AS remaining) r
                WHERE p.account_id = acc.account_id AND p.instrument_id = inst.instrument_id
                  AND p.strategy_id IS NOT DISTINCT FROM pos_strategy AND r.remaining > 0
                  AND risk.breaker_mode(acc.account_id) <> 'FREEZE') x;
            IF hedge_ids IS NULL THEN
                RETURN trading._finish_signal(sig_id,
                    CASE WHEN risk.breaker_mode(acc.account_id) = 'FREEZE' THEN 'rejected' ELSE 'ignored' END::trading.signal_status,
                    CASE WHEN risk.breaker_mode(acc.account_id) = 'FREEZE' THEN 'BREAKER_FREEZE' ELSE 'NO_POSITION' END,
                    'nothing closed', NULL);
            END IF;
            RETURN trading._finish_signal(sig_id, 'approved', NULL, NULL, hedge_ids[1],
                                          jsonb_build_object('order_ids', to_jsonb(hedge_ids)));
        END IF;
        -- what is held, and the open orders that count toward the position the signal moves
        -- from (entries not yet filled would otherwise be sent twice)
        SELECT COALESCE((SELECT sum(trading._signed_qty(p)) FROM trading.positions p
                         WHERE p.account_id = acc.account_id AND p.instrument_id = inst.instrument_id
                           AND p.strategy_id IS NOT DISTINCT FROM pos_strategy AND p.leg = sig_leg), 0),
               x.entries, x.exits
        INTO held, pending_entry, pending_exit
        FROM (SELECT COALESCE(sum(q) FILTER (WHERE NOT o.reduce_only), 0) AS entries,
                     COALESCE(sum(q) FILTER (WHERE o.reduce_only), 0) AS exits
              FROM trading.orders o,
                   LATERAL (SELECT CASE WHEN o.side = 'buy' THEN 1 ELSE -1 END * (o.quantity - o.filled_quantity) AS q) q
              WHERE o.account_id = acc.account_id AND o.instrument_id = inst.instrument_id
                AND (pos_strategy IS NULL OR o.strategy_id = pos_strategy) AND o.position_leg = sig_leg
                AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')) x;
        IF pos_strategy IS NOT NULL AND held <> 0 THEN
            -- a strategy's own row on an independent account: its exits, and the part of the
            -- account's manual exits that reaches this row once the account's own row is
            -- flat, as trading.apply_fill books them (a manual sell of the whole position
            -- left the strategy's close counting nothing, and two exits went out)
            pending_exit := -sign(held) * trading._row_exits(acc, inst.instrument_id, pos_strategy,
                sig_leg, held, (SELECT p.position_id FROM trading.positions p
                                WHERE p.account_id = acc.account_id AND p.instrument_id = inst.instrument_id
                                  AND p.strategy_id = pos_strategy AND p.leg = sig_leg));
        END IF;
        cur := held + pending_entry + pending_exit;

        -- the market prices the order: a strategy's price is taken only when it is above the
        -- latest close (a smaller order); below it, it would size an order the cash cannot
        -- pay for and pass every value limit with it. Without any bar the signal's price is
        -- all there is.
        price := trading._num(signal, 'price', 'signal', 0, NULL, false);
        market_px := COALESCE(market.latest_close(inst.instrument_id, at), price);
        IF market_px IS NULL THEN
            f_status := 'rejected'; f_code := 'NO_PRICE';
            f_reason := format('NO_PRICE: no bar for %s at or before %s to size the order', inst.symbol, at);
            EXIT decide;
        END IF;
        price := GREATEST(market_px, price);
        fx := CASE WHEN inst.quote_currency = acc.base_currency THEN 1
                   ELSE trading.fx_rate(inst.quote_currency, acc.base_currency, at) END;
        IF fx IS NULL THEN
            f_status := 'rejected'; f_code := 'NO_CONVERSION_RATE';
            f_reason := format('NO_CONVERSION_RATE: from=%s, to=%s', inst.quote_currency, acc.base_currency);
            EXIT decide;
        END IF;

        -- target position after the signal
        IF act = 'close' THEN
            target := 0;
        ELSE
            IF act = 'sell' AND NOT acc.allow_short THEN
                target := 0;  -- a long-only account sells what it holds (no sizing needed)
            ELSE
                sized := trading._size(acc, s, inst, size, price, fx, sl, at);
                target := trading._round_down(sized.qty, inst.quantity_step);
                sized_equity := sized.equity;
                IF sized.clamp_to_cash AND act = 'buy' THEN
                    -- never size past the cash there is (after buying back a short first)
                    cash_room := acc.cash - trading._reserved_cash(acc)
                                 - GREATEST(-cur, 0) * price * fx * (1 + acc.taker_fee);
                    -- (what is held or already ordered is paid for: the cap is on what this order adds)
                    target := LEAST(target, GREATEST(cur, 0)
                                            + trading._round_down(cash_room / (price * fx * (1 + acc.taker_fee)),
                                                                  inst.quantity_step));
                END IF;
                IF act = 'sell' THEN
                    target := -target;
                END IF;
            END IF;
        END IF;

        IF target = 0 THEN
            -- closing: what is held, less the exits already on their way
            cur := held + pending_exit;
        END IF;
        IF act = 'close' AND cur = 0 THEN
            f_status := 'ignored'; f_code := 'NO_POSITION';
            f_reason := format('NO_POSITION: nothing to close (held %s, closing orders open for %s)', held, -pending_exit);
            EXIT decide;
        END IF;
        IF act = 'sell' AND NOT acc.allow_short AND cur <= 0 THEN
            f_status := 'rejected'; f_code := 'SHORT_NOT_ALLOWED';
            f_reason := format('SHORT_NOT_ALLOWED: position=%s, account=%s', held, acc.name);
            EXIT decide;
        END IF;
        IF act <> 'close' AND target <> 0 AND abs(target) < inst.min_quantity THEN
            f_status := 'rejected'; f_code := 'QUANTITY_BELOW_MINIMUM';
            f_reason := format('QUANTITY_BELOW_MINIMUM: quantity=%s, minimum=%s, step=%s',
                               abs(target), inst.min_quantity, inst.quantity_step);
            EXIT decide;
        END IF;
        IF act = 'buy' AND target <= 0 THEN
            f_status := 'rejected'; f_code := 'QUANTITY_BELOW_MINIMUM';
            f_reason := format('QUANTITY_BELOW_MINIMUM: quantity=0, step=%s (not enough capital at price %s)',
                               inst.quantity_step, price);
            EXIT decide;
        END IF;
        IF act = 'sell' AND target = 0 AND cur = 0 THEN
            -- allow_short: the short sized to nothing, and no long to close
            f_status := 'rejected'; f_code := 'QUANTITY_BELOW_MINIMUM';
            f_reason := format('QUANTITY_BELOW_MINIMUM: quantity=0, step=%s (not enough capital at price %s)',
                               inst.quantity_step, price);
            EXIT decide;
        END IF;
        -- a target in the same direction and no larger than the current position: nothing to do
        IF (act = 'buy' AND cur >= target) OR (act = 'sell' AND target < 0 AND cur <= target) THEN
            f_status := 'ignored'; f_code := 'ALREADY_AT_TARGET';
            f_reason := format('ALREADY_AT_TARGET: position=%s, target=%s', cur, target);
            EXIT decide;
        END IF;

        delta := target - cur;
        side := CASE WHEN delta > 0 THEN 'buy' ELSE 'sell' END::trading.order_side;
        -- the part that opens or increases exposure (the rest closes)
        opening := CASE WHEN sign(target) = 0 THEN 0
                        WHEN sign(cur) = sign(target) THEN GREATEST(abs(target) - abs(cur), 0)
                        ELSE abs(target) END;
        -- an order that adds exposure must itself reach the minimum (a top-up of a position
        -- by less than min_quantity would be refused by the venue); closing orders may be smaller
        IF opening > 0 AND abs(delta) < inst.min_quantity THEN
            f_status := 'rejected'; f_code := 'QUANTITY_BELOW_MINIMUM';
            f_reason := format('QUANTITY_BELOW_MINIMUM: quantity=%s, minimum=%s, step=%s (position %s, target %s)',
                               abs(delta), inst.min_quantity, inst.quantity_step, cur, target);
            EXIT decide;
        END IF;

        -- protection on the wrong side of the price would fire on the next bar
        IF opening > 0 AND ((target > 0 AND (sl >= market_px OR tp <= market_px))
                            OR (target < 0 AND (sl <= market_px OR tp >= market_px))) THEN
            f_status := 'rejected'; f_code := 'INVALID_PROTECTION';
            f_reason := format('INVALID_PROTECTION: side=%s, price=%s, stop_loss=%s, take_profit=%s',
                               CASE WHEN target > 0 THEN 'long' ELSE 'short' END, market_px,
                               COALESCE(sl::text, '-'), COALESCE(tp::text, '-'));
            EXIT decide;
        END IF;

        denial := risk._check_order(acc, s, inst, side, abs(delta), opening, price, sl, at,
                                    sized_equity);
        IF denial.code IS NOT NULL THEN
            f_status := 'rejected'; f_code := denial.code; f_reason := denial.reason;
            EXIT decide;
        END IF;
        f_status := 'approved';
    END;

    IF NOT written THEN
        INSERT INTO trading.signals AS g (signal_id, account_id, strategy_id, instrument_id, ts,
            action, size, stop_loss, take_profit, trailing_stop, confidence, reasoning, metadata,
            status, reason_code, reason)
        OVERRIDING SYSTEM VALUE
        VALUES (sig_id, acc.account_id, s.strategy_id, inst.instrument_id, at, act, size, sl, tp,
                trail, conf, reasoning, meta, f_status, f_code, f_reason);
    END IF;
    IF f_status = 'approved' THEN
        oid := trading._emit_order(acc, inst, s.strategy_id, sig_id, side, abs(delta), 'signal', price,
                                   reduce_only => opening = 0, leg => sig_leg, stop_loss => sl, take_profit => tp,
                                   trailing_stop => trail, breakeven => be);
        extra := jsonb_build_object('side', side, 'quantity', abs(delta), 'reference_price', price);
    END IF;
    IF written THEN
        RETURN trading._finish_signal(sig_id, f_status, f_code, f_reason, oid, extra);
    END IF;
    -- what _finish_signal records and answers
    PERFORM audit.record('signal.' || f_status::text, 'trading.signals', sig_id::text,
        jsonb_build_object('reason_code', f_code, 'reason', f_reason, 'order_id', oid) || extra);
    RETURN jsonb_build_object('signal_id', sig_id, 'status', f_status, 'reason_code', f_code,
                              'reason', f_reason, 'order_id', oid) || extra;
END
$$;

-- (as in 0003_02, in one pass over the positions)
CREATE OR REPLACE FUNCTION trading.account_equity(account bigint)
RETURNS TABLE (cash numeric, positions_value numeric, gross_exposure numeric, equity numeric)
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT a.cash, COALESCE(sum(v.value), 0), COALESCE(sum(abs(v.value)), 0),
           a.cash + COALESCE(sum(v.value), 0)
    FROM trading.accounts a
    LEFT JOIN LATERAL (
        SELECT trading._signed_qty(p) * COALESCE(p.last_price, p.average_price)
               * CASE WHEN i.quote_currency = a.base_currency THEN 1
                      ELSE COALESCE(trading.fx_rate(i.quote_currency, a.base_currency, NULL), 0) END AS value
        FROM trading.positions p
        JOIN market.instruments i USING (instrument_id)
        WHERE p.account_id = a.account_id AND p.quantity <> 0) v ON true
    WHERE a.account_id = account
    GROUP BY a.account_id;
END;

-- (as in 0004_11, with the all-known answer first)
CREATE OR REPLACE FUNCTION trading._known_fields(doc jsonb, known text[], what text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    unknown text;
BEGIN
    IF jsonb_typeof(doc) = 'object' AND doc - known = '{}'::jsonb THEN
        RETURN;  -- every field known: one operation, not a scan of the keys
    END IF;
    SELECT string_agg(to_json(left(regexp_replace(k, '[[:cntrl:]]', '?', 'g'), 40))::text, ', ' ORDER BY k)
    INTO unknown
    FROM jsonb_object_keys(doc) k
    WHERE NOT k = ANY (known);
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION '%: unknown field(s) % (known: %)', what, unknown,
            array_to_string(known, ', ') USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- (as in 0004_09, a coarser bar judged only when its whole period is after the mark)
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
    -- each instrument's finest timeframe: a bar of a coarser one is judged only when its
    -- whole period is after a position's mark (it opens at or after it); its range would
    -- otherwise bring back prices the finer bars were judged on already, or prices from
    -- before the position was held (a 1h bar arriving after the 1m bars of its hour
    -- fired a stop on a dip before the fill)
    fine AS MATERIALIZED (
        SELECT i.id AS instrument_id, market.finest_timeframe(i.id) AS tf
        FROM unnest(_protect.instruments) i(id)),
    raw AS MATERIALIZED (
        SELECT u.instrument_id, u.open AS o, u.high AS h, u.low AS l, u.close AS c,
               u.ts, u.ts + market.timeframe_interval(u.timeframe) AS ct,
               market.timeframe_interval(u.timeframe) AS span,
               (f.tf IS NULL OR u.timeframe = f.tf) AS fine  -- (no bar stored: all are)
        FROM unnest(_protect.bars) u LEFT JOIN fine f USING (instrument_id)
        WHERE u.instrument_id = ANY (_protect.instruments)),
    -- bars closing at the same time: the one of the finest timeframe
    b AS MATERIALIZED (
        SELECT DISTINCT ON (r.instrument_id, r.ct) r.instrument_id, r.o, r.h, r.l, r.c, r.ct,
               r.ts, r.fine
        FROM raw r ORDER BY r.instrument_id, r.ct, r.span),
    -- per (instrument, last mark), over all the bars newer than the mark: the highest
    -- high, the lowest low, the last close (of the finest timeframe among the bars
    -- closing last) and its time. A position with no newer bar is left as it is.
    span AS MATERIALIZED (
        SELECT k.instrument_id, k.mark, max(r.h) AS hi, min(r.l) AS lo, max(r.ct) AS ct,
               (array_agg(r.c ORDER BY r.ct DESC, r.span))[1] AS c
        FROM (SELECT DISTINCT p.instrument_id, p.mark FROM pos p) k
        JOIN raw r ON r.instrument_id = k.instrument_id AND r.ct > k.mark
                  AND (r.fine OR r.ts >= k.mark)
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
                AND (b.fine OR b.ts >= k.mark)
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

-- (as in 0004_08, the day of a bar closing at midnight is the day before; the day never goes
-- back)
CREATE OR REPLACE FUNCTION trading.snapshot_equity(account bigint, at timestamptz) RETURNS numeric
LANGUAGE plpgsql AS $$
DECLARE
    acc trading.accounts;
    e record;
    peak numeric;
    -- the day whose end `at` is or falls in: a bar closing at 00:00 UTC is the last of
    -- the day before (its loss was that day's; a signal on it is dated 23:59:59.999999)
    day date := ((at - interval '1 microsecond') AT TIME ZONE 'UTC')::date;
    day_start numeric;
    day_scaled numeric;
    l risk.limits;
    loss numeric;
BEGIN
    SELECT * INTO acc FROM trading.accounts a WHERE a.account_id = account FOR UPDATE;
    -- a late bar of an earlier day (another instrument's, after a reconnect) is measured
    -- in the account's current day: the day never goes back (going back and forth again
    -- started the current day afresh from the latest equity, forgetting its losses)
    IF acc.trading_day IS NOT NULL AND day < acc.trading_day THEN
        day := acc.trading_day;
    END IF;
    SELECT * INTO e FROM trading.account_equity(account);
    peak := GREATEST(COALESCE(acc.peak_equity, e.equity), e.equity);
    -- a new day starts from the equity the previous day ended with (the last snapshot
    -- before this one), so that the first bar of the day counts towards its loss (with
    -- daily bars every bar is the first of its day), plus the deposits and withdrawals
    -- booked since that snapshot (they are no gain or loss of the new day)
    IF acc.trading_day = day THEN
        day_start := acc.day_start_equity;
        day_scaled := COALESCE(acc.day_start_scaled, day_start);
    ELSE
        SELECT s.equity + acc.flows_since_snapshot INTO day_start FROM trading.equity_snapshots s
        WHERE s.account_id = account AND s.ts < at ORDER BY s.ts DESC LIMIT 1;
        day_start := COALESCE(day_start, e.equity);
        day_scaled := day_start;
    END IF;
    -- (only when something changed: every bar of every held instrument comes here, and
    -- a new row version per bar makes every later read of the account slower)
    IF (acc.peak_equity, acc.trading_day, acc.day_start_equity, acc.flows_since_snapshot,
        acc.day_start_scaled)
       IS DISTINCT FROM (peak, day, day_start, 0, day_scaled) THEN
        UPDATE trading.accounts a SET peak_equity = peak, trading_day = day,
                                      day_start_equity = day_start, flows_since_snapshot = 0,
                                      day_start_scaled = day_scaled
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
            IF l.params ->> 'unit' = 'fraction' THEN
                loss := CASE WHEN day_scaled > 0 THEN (day_scaled - e.equity) / day_scaled END;
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

-- (as in 0004_07, the gate judging an order sent again while in flight too)
CREATE OR REPLACE FUNCTION trading._advance_to_broker(order_ref text, new_status trading.order_status,
                                           broker_order_id text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    lk record := trading._locked_order(order_ref);
BEGIN
    RETURN COALESCE(CASE WHEN (lk.o).status = 'created'
                              OR (new_status = 'in_flight' AND (lk.o).status = 'in_flight')
                         THEN trading._gate(lk.acc, lk.o) END,
                    trading._set_status(lk.acc, lk.o, new_status, NULL, broker_order_id));
END
$$;
