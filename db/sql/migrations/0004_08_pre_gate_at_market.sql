-- 0004_08 (pre): the risk gate at the market price.
--
-- 1. trading.submit_signal sized and checked an order at the signal's own `price` when it
--    had one. A strategy that sent price 1 for an instrument trading at 40 000 had an
--    order thousands of times its cash approved (INSUFFICIENT_CASH, MAX_POSITION_SIZE,
--    MAX_EXPOSURE, MAX_LEVERAGE and MAX_ORDER_VALUE all measured at 1), and the fill at
--    the market drove cash deeply negative. The latest close at the signal's time now
--    prices it; a signal's price is used only when higher (a smaller order), or when the
--    instrument has no bar at all. The protection sanity check (INVALID_PROTECTION) is
--    against the latest close.
-- 2. risk._check_order on a hedge account measured the instrument's position net: a long
--    leg and an equal short leg counted 0 for MAX_POSITION_SIZE, MAX_EXPOSURE and
--    MAX_LEVERAGE, so the second leg passed any limit. On a hedge account the instrument
--    now counts gross for exposure and leverage (every leg and entry, plus this order),
--    and MAX_POSITION_SIZE measures the leg the order adds to.
-- 3. MAX_VOLATILITY passed when the ATR could not be computed (fewer bars than the
--    period, or none of the limit's timeframe): a configured limit that silently never
--    applied. It now refuses, saying the measure is missing, as MIN_VOLUME does.
-- 4. A deposit or withdrawal moved the peak equity and the day's starting equity by its
--    amount (trading.book_cash, 0004_07). The loss in money stayed the same, but as a
--    fraction of a smaller peak it grew: a withdrawal of 4 000 from an equity of 8 500,
--    15 % below a peak of 10 000, left it 25 % below 6 000 and tripped a MAX_DRAWDOWN of
--    20 % by itself (a deposit hid a drawdown the same way). The peak now scales with the
--    equity at the booking (10 000 x 4 500 / 8 500: still 15 %), and so does a new
--    accounts.day_start_scaled, the day's start for DAILY_LOSS as a fraction; as an amount
--    the day's start still moves by the amount.
SET LOCAL ROLE mmats_owner;

-- (as in 0003_02, with the instrument gross on hedge accounts and MAX_VOLATILITY refusing
-- without a measure; no SET clause, as since 0004_06)
CREATE OR REPLACE FUNCTION risk._check_order(acc trading.accounts, strat trading.strategies,
                                  inst market.instruments, side trading.order_side,
                                  qty numeric, opening numeric, price numeric,
                                  stop_loss numeric, at timestamptz,
                                  OUT code text, OUT reason text)
LANGUAGE plpgsql AS $$
DECLARE
    breaker risk.breaker_mode;
    breaker_reason text;
    eq record;
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
    other record;
    corr_value numeric;
    available numeric;
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
            SELECT * INTO eq FROM trading.account_equity(acc.account_id);
            have_eq := true;
        END IF;
        measure := NULL;
        CASE l.limit_type
        WHEN 'MAX_DRAWDOWN' THEN
            IF acc.peak_equity > 0 THEN
                measure := GREATEST(0, (acc.peak_equity - eq.equity) / acc.peak_equity);
                IF measure >= l.value THEN
                    code := l.limit_type;
                    reason := format('MAX_DRAWDOWN: limit=%s, drawdown=%s, peak=%s, equity=%s',
                                     l.value, round(measure, 4), acc.peak_equity, round(eq.equity, 2));
                END IF;
            END IF;
        WHEN 'DAILY_LOSS' THEN
            IF acc.day_start_equity IS NOT NULL AND acc.trading_day = (at AT TIME ZONE 'UTC')::date THEN
                measure := acc.day_start_equity - eq.equity;
                IF l.params ->> 'unit' = 'fraction' THEN  -- of the day's start, flow-scaled
                    measure := CASE WHEN COALESCE(acc.day_start_scaled, acc.day_start_equity) > 0
                        THEN (COALESCE(acc.day_start_scaled, acc.day_start_equity) - eq.equity)
                             / COALESCE(acc.day_start_scaled, acc.day_start_equity) END;
                END IF;
                IF measure >= l.value THEN
                    code := l.limit_type;
                    reason := format('DAILY_LOSS: limit=%s, loss=%s%s', l.value, round(measure, 4),
                                     CASE WHEN l.params ->> 'unit' = 'fraction' THEN ', unit=fraction' ELSE '' END);
                END IF;
            END IF;
        WHEN 'MAX_POSITION_SIZE' THEN
            IF eq.equity > 0 THEN
                measure := leg_after * px / eq.equity;
                IF measure > l.value THEN
                    code := l.limit_type;
                    reason := format('MAX_POSITION_SIZE: limit=%s, requested=%s, scope=%s',
                                     l.value, round(measure, 4), l.scope || COALESCE(':' || l.scope_key, ''));
                END IF;
            ELSE
                code := l.limit_type;
                reason := format('MAX_POSITION_SIZE: limit=%s, equity=%s', l.value, round(eq.equity, 2));
            END IF;
        WHEN 'MAX_EXPOSURE', 'MAX_LEVERAGE' THEN
            -- gross exposure of the scope after this order, as a share of equity (each
            -- position row on its own, so a hedge account's legs never net)
            SELECT COALESCE(sum(abs(CASE WHEN p.instrument_id = inst.instrument_id THEN 0
                                    ELSE trading._signed_qty(p) END
                                * COALESCE(p.last_price, p.average_price)
                                * CASE WHEN i.quote_currency = acc.base_currency THEN 1
                                       ELSE COALESCE(trading.fx_rate(i.quote_currency, acc.base_currency, NULL), 0) END)), 0)
            INTO measure
            FROM trading.positions p JOIN market.instruments i USING (instrument_id)
            WHERE p.account_id = acc.account_id AND p.quantity <> 0
              AND (l.limit_type = 'MAX_LEVERAGE' OR l.scope = 'global'
                   OR (l.scope = 'market' AND i.market::text = l.scope_key)
                   OR (l.scope = 'strategy' AND COALESCE(p.strategy_id, p.entry_strategy_id) = strat.strategy_id)
                   OR (l.scope = 'symbol' AND i.instrument_id = inst.instrument_id));
            -- entry orders not yet filled on other instruments of the scope count too
            measure := measure + COALESCE((
                SELECT sum((o.quantity - o.filled_quantity)
                           * COALESCE(o.limit_price, o.reference_price, market.latest_close(o.instrument_id))
                           * CASE WHEN i.quote_currency = acc.base_currency THEN 1
                                  ELSE COALESCE(trading.fx_rate(i.quote_currency, acc.base_currency, NULL), 0) END)
                FROM trading.orders o JOIN market.instruments i USING (instrument_id)
                WHERE o.account_id = acc.account_id AND o.instrument_id <> inst.instrument_id
                  AND NOT o.reduce_only
                  AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')
                  AND (l.limit_type = 'MAX_LEVERAGE' OR l.scope = 'global'
                       OR (l.scope = 'market' AND i.market::text = l.scope_key)
                       OR (l.scope = 'strategy' AND o.strategy_id = strat.strategy_id))), 0);
            measure := (measure + gross_after * px) / NULLIF(eq.equity, 0);
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
            -- open positions and entry orders not yet filled, each in its direction
            FOR other IN
                SELECT DISTINCT i.instrument_id, i.symbol, sign(x.q) AS direction
                FROM (SELECT p.instrument_id, trading._signed_qty(p) AS q FROM trading.positions p
                      WHERE p.account_id = acc.account_id AND p.quantity <> 0
                      UNION ALL
                      SELECT o.instrument_id, CASE WHEN o.side = 'buy' THEN 1 ELSE -1 END
                                              * (o.quantity - o.filled_quantity)
                      FROM trading.orders o
                      WHERE o.account_id = acc.account_id AND NOT o.reduce_only
                        AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')) x
                JOIN market.instruments i USING (instrument_id)
                WHERE x.instrument_id <> inst.instrument_id
                ORDER BY i.instrument_id, direction
            LOOP
                CONTINUE WHEN other.direction <> dir;
                corr_value := risk.return_correlation(inst.instrument_id, other.instrument_id,
                    COALESCE(l.params ->> 'timeframe', '1d')::market.timeframe,
                    COALESCE((l.params ->> 'lookback')::integer, 30), at);
                IF corr_value > l.value THEN
                    code := l.limit_type;
                    reason := format('MAX_CORRELATION: limit=%s, correlation=%s, with=%s', l.value,
                                     round(corr_value, 4), other.symbol);
                    EXIT;
                END IF;
            END LOOP;
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

-- (as in 0003_02, priced at the latest close)
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
                     -- what is held less the closing orders already open for that leg (a
                     -- reduce-only sell closes the long leg, a reduce-only buy the short one)
                     LATERAL (SELECT p.quantity - COALESCE(sum(o.quantity - o.filled_quantity), 0) AS remaining
                              FROM trading.orders o
                              WHERE o.account_id = p.account_id AND o.instrument_id = p.instrument_id
                                AND o.reduce_only
                                AND o.side = CASE WHEN p.leg = 'long' THEN 'sell' ELSE 'buy' END::trading.order_side
                                AND (pos_strategy IS NULL OR o.strategy_id = pos_strategy)
                                AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')) r
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

        denial := risk._check_order(acc, s, inst, side, abs(delta), opening, price, sl, at);
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

-- the day's starting equity for DAILY_LOSS as a fraction: scaled by each deposit and
-- withdrawal of the day (day_start_equity moves by their amounts). Added without a
-- default, as in 0004_07 (PostgreSQL 15 refuses one on a table whose row type a
-- SQL-standard function body uses).
ALTER TABLE trading.accounts ADD COLUMN day_start_scaled numeric;
UPDATE trading.accounts SET day_start_scaled = day_start_equity;
ALTER TABLE trading.accounts ADD CONSTRAINT accounts_day_start_scaled_is_number
    CHECK (day_start_scaled > '-Infinity' AND day_start_scaled < 'Infinity');

-- (as in 0004_07) a deposit or withdrawal scales the peak and the day's start for
-- fractions with the equity, and moves the day's start in money by its amount
CREATE OR REPLACE FUNCTION trading.book_cash(movement jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    what CONSTANT text := 'book_cash';
    acc trading.accounts;
    inst market.instruments;
    prior trading.cash_movements;
    k trading.cash_kind;
    kind_txt text;
    amt numeric;
    ccy text;
    ref text;
    at timestamptz;
    descr text;
    sym text;
    rate numeric;
    moved numeric;
    id bigint;
    eq numeric;
    scales boolean := false;  -- a flow the equity can scale by (both sides of it > 0)
BEGIN
    IF movement IS NULL OR jsonb_typeof(movement) <> 'object' THEN
        RAISE EXCEPTION 'book_cash takes a JSON object, got %', COALESCE(movement::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    kind_txt := lower(trading._text(movement, 'kind', what, 20));
    IF kind_txt IS NULL THEN
        RAISE EXCEPTION 'book_cash.kind is required: one of %',
            array_to_string(enum_range(NULL::trading.cash_kind)::text[], ', ')
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF NOT kind_txt = ANY (enum_range(NULL::trading.cash_kind)::text[]) THEN
        RAISE EXCEPTION 'book_cash.kind must be one of %, got %',
            array_to_string(enum_range(NULL::trading.cash_kind)::text[], ', '),
            to_json(kind_txt)::text
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    k := kind_txt::trading.cash_kind;
    amt := trading._num(movement, 'amount', what);
    IF amt IS NULL OR amt = 0 THEN
        RAISE EXCEPTION 'book_cash.amount is required and must not be zero'
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF k = 'deposit' AND amt < 0 OR k = 'withdrawal' AND amt > 0 THEN
        RAISE EXCEPTION 'book_cash.amount of a % must be %, got %', k,
            CASE k WHEN 'deposit' THEN 'positive' ELSE 'negative' END, amt
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    ref := trading._text(movement, 'broker_ref', what, 128);
    IF ref IS NULL OR ref !~ '^[[:print:]]{1,128}$' THEN
        RAISE EXCEPTION 'book_cash.broker_ref is required: 1 to 128 printable characters, got %',
            COALESCE(to_json(ref)::text, 'none')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    descr := trading._text(movement, 'description', what, 200);
    at := COALESCE(trading._ts(movement, 'ts', what), now());
    sym := trading._text(movement, 'symbol', what, 64);

    acc := trading._account(trading._text(movement, 'account', what, 64), true);
    ccy := upper(COALESCE(trading._text(movement, 'currency', what, 12), acc.base_currency));
    IF ccy !~ '^[A-Z0-9]{2,12}$' THEN
        RAISE EXCEPTION 'book_cash.currency must be 2 to 12 letters or digits, got %',
            to_json(ccy)::text USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF sym IS NOT NULL THEN
        sym := upper(sym);
        IF sym !~ '^[[:print:]]{1,64}$' THEN
            RAISE EXCEPTION 'book_cash.symbol must be printable characters, got %',
                to_json(sym)::text USING ERRCODE = 'invalid_parameter_value';
        END IF;
        -- the instrument when the symbol names exactly one; money is booked either way
        -- (a dividend of a stock MMATS holds no bars of is still the account's cash)
        SELECT * INTO inst FROM market.instruments i
        WHERE i.symbol = sym AND i.venue !~ '^replay[0-9]+$'
          AND NOT EXISTS (SELECT 1 FROM market.instruments j
                          WHERE j.symbol = sym AND j.venue !~ '^replay[0-9]+$'
                            AND j.instrument_id <> i.instrument_id);
    END IF;

    SELECT * INTO prior FROM trading.cash_movements m
    WHERE m.account_id = acc.account_id AND m.broker_ref = ref;
    IF FOUND THEN
        IF (prior.kind, prior.amount, prior.currency) IS DISTINCT FROM (k, amt, ccy) THEN
            RAISE EXCEPTION 'book_cash: broker_ref % of account % is already booked as % % %, not % % %',
                to_json(ref)::text, acc.name, prior.kind, prior.amount, prior.currency, k, amt, ccy
                USING ERRCODE = 'unique_violation';
        END IF;
        RETURN jsonb_build_object('status', 'duplicate', 'movement_id', prior.movement_id,
                                  'currency', ccy, 'amount_account', prior.amount_account,
                                  'cash', acc.cash);
    END IF;

    rate := CASE WHEN ccy = acc.base_currency THEN 1
                 ELSE trading._fx_or_fail(ccy, acc.base_currency, at) END;
    INSERT INTO trading.cash_movements AS m (account_id, kind, amount, currency, fx,
        broker_ref, symbol, instrument_id, ts, description)
    VALUES (acc.account_id, k, amt, ccy, rate, ref, sym, inst.instrument_id, at, descr)
    RETURNING m.movement_id, m.amount_account INTO id, moved;

    -- a deposit or withdrawal is no gain or loss: the marks the risk rules measure from
    -- move with it. The day's start moves by the amount (a loss in money stays that loss);
    -- the peak and the day's start for fractions scale with the equity, so that a
    -- drawdown or a day's loss as a fraction of the capital stays what it was (a
    -- withdrawal of 4 000 from 8 500, 15 % below a peak of 10 000, left 25 % below 6 000;
    -- to 12 decimals, trailing zeros trimmed)
    IF k IN ('deposit', 'withdrawal') THEN
        SELECT e.equity INTO eq FROM trading.account_equity(acc.account_id) e;
        scales := COALESCE(eq > 0 AND eq + moved > 0, false);
    END IF;
    UPDATE trading.accounts a
    SET cash = a.cash + moved,
        peak_equity = CASE WHEN k NOT IN ('deposit', 'withdrawal') THEN a.peak_equity
                           WHEN scales
                           THEN trim_scale(round(a.peak_equity * (eq + moved) / eq, 12))
                           ELSE a.peak_equity + moved END,
        day_start_equity = CASE WHEN k IN ('deposit', 'withdrawal') THEN a.day_start_equity + moved
                                ELSE a.day_start_equity END,
        day_start_scaled = CASE WHEN k NOT IN ('deposit', 'withdrawal') THEN a.day_start_scaled
                                WHEN scales
                                THEN trim_scale(round(a.day_start_scaled * (eq + moved) / eq, 12))
                                ELSE a.day_start_scaled + moved END,
        flows_since_snapshot = CASE WHEN k IN ('deposit', 'withdrawal')
                                    THEN a.flows_since_snapshot + moved
                                    ELSE a.flows_since_snapshot END
    WHERE a.account_id = acc.account_id;

    PERFORM audit.record('cash.booked', 'trading.cash_movements', id::text, jsonb_build_object(
        'account', acc.name, 'kind', k, 'amount', amt, 'currency', ccy, 'fx', rate,
        'amount_account', moved, 'broker_ref', ref, 'symbol', sym, 'ts', at));
    RETURN jsonb_build_object('status', 'booked', 'movement_id', id, 'currency', ccy,
                              'amount_account', moved, 'cash', acc.cash + moved);
END
$$;

-- (as in 0004_07) a new day starts day_start_scaled with day_start_equity; DAILY_LOSS as
-- a fraction is measured from it
CREATE OR REPLACE FUNCTION trading.snapshot_equity(account bigint, at timestamptz) RETURNS numeric
LANGUAGE plpgsql AS $$
DECLARE
    acc trading.accounts;
    e record;
    peak numeric;
    day date := (at AT TIME ZONE 'UTC')::date;
    day_start numeric;
    day_scaled numeric;
    l risk.limits;
    loss numeric;
BEGIN
    SELECT * INTO acc FROM trading.accounts a WHERE a.account_id = account FOR UPDATE;
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
