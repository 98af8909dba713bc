-- 0002_03 (pre): risk limits (set with functions, kept with their history), the breaker,
-- and the hierarchical pre-trade check: Global -> Market -> Strategy -> Symbol -> Trade.
-- A denial is data: a stable UPPER_SNAKE code and key=value context.
SET LOCAL ROLE mmats_owner;

CREATE TABLE risk.limit_types (
    limit_type   text PRIMARY KEY,
    unit         text NOT NULL CHECK (unit IN ('fraction', 'amount', 'count', 'flag', 'ratio')),
    description  text NOT NULL
);
INSERT INTO risk.limit_types VALUES
    ('MAX_POSITION_SIZE', 'fraction', 'largest position notional as a fraction of equity'),
    ('MAX_EXPOSURE', 'fraction', 'gross exposure of the scope (all, a market, a strategy, a symbol) as a fraction of equity, e.g. crypto <= 0.4'),
    ('MAX_LEVERAGE', 'ratio', 'gross exposure of all positions divided by equity'),
    ('MAX_OPEN_POSITIONS', 'count', 'open positions in the scope (symbol scope: position rows on that symbol)'),
    ('MAX_DRAWDOWN', 'fraction', 'drawdown from peak equity at which new entries stop (and the breaker trips, params.mode, default HARD)'),
    ('DAILY_LOSS', 'amount', 'loss since the start of the UTC day at which new entries stop (params.unit = fraction for a share of the day''s starting equity; the breaker trips, params.mode, default HARD)'),
    ('MAX_CORRELATION', 'fraction', 'refuse added exposure to an instrument whose returns correlate above this with an open position in the same direction (params: lookback, timeframe)'),
    ('TRADING_HOURS', 'flag', 'entries only on params.days (ISO weekdays) between params.start and params.end in params.tz'),
    ('MIN_VOLUME', 'amount', 'the latest bar''s volume must be at least this'),
    ('MAX_VOLATILITY', 'fraction', 'ATR(params.period, default 14) / close must be at most this'),
    ('REQUIRE_STOP_LOSS', 'flag', 'value 1: every entry must carry a stop-loss'),
    ('MAX_ORDER_VALUE', 'amount', 'notional of one order, in the account currency');

ALTER TABLE risk.limits ADD CONSTRAINT limits_type_known
    FOREIGN KEY (limit_type) REFERENCES risk.limit_types;
COMMENT ON CONSTRAINT limits_type_known ON risk.limits IS
    'unknown limit type: see SELECT * FROM risk.limit_types';

-- Set (insert or change) a limit. NULL account and environment: every account.
CREATE FUNCTION risk.set_limit(limit_type text, value numeric, scope text DEFAULT 'global',
                               scope_key text DEFAULT NULL, account text DEFAULT NULL,
                               environment text DEFAULT NULL, params jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc_id bigint;
    lt risk.limit_types;
    id bigint;
BEGIN
    SELECT * INTO lt FROM risk.limit_types t WHERE t.limit_type = upper(set_limit.limit_type);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown limit type %; known: %', quote_literal(set_limit.limit_type),
            (SELECT string_agg(t.limit_type, ', ' ORDER BY t.limit_type) FROM risk.limit_types t)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF value IS NULL OR value = 'NaN' OR value < 0
       OR (lt.unit = 'fraction' AND value > 1) THEN
        RAISE EXCEPTION '% must be %, got %', lt.limit_type,
            CASE WHEN lt.unit = 'fraction' THEN 'a fraction between 0 and 1' ELSE '>= 0' END,
            COALESCE(value::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF account IS NOT NULL THEN
        acc_id := (trading._account(account)).account_id;
    END IF;
    IF scope NOT IN ('global', 'market', 'strategy', 'symbol') THEN
        RAISE EXCEPTION 'scope must be global, market, strategy or symbol, got %', quote_literal(scope)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF scope = 'market' AND (scope_key IS NULL OR scope_key NOT IN ('crypto', 'forex', 'stock')) THEN
        RAISE EXCEPTION 'a market limit needs scope_key crypto, forex or stock, got %',
            COALESCE(quote_literal(scope_key), 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF scope = 'global' AND scope_key IS NOT NULL THEN
        RAISE EXCEPTION 'a global limit takes no scope_key, got %', quote_literal(scope_key)
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF scope <> 'global' AND scope_key IS NULL THEN
        RAISE EXCEPTION 'a % limit needs a scope_key (the %)', scope,
            CASE scope WHEN 'symbol' THEN 'symbol' ELSE 'strategy name' END
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(COALESCE(params, '{}')) <> 'object' THEN
        RAISE EXCEPTION 'limit params must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- the params the checks read must parse now: a bad one found later would raise on every
    -- order (TRADING_HOURS tz) or on every bar (MAX_DRAWDOWN mode, in the bars trigger)
    BEGIN
        IF params ? 'tz' THEN PERFORM now() AT TIME ZONE (params ->> 'tz'); END IF;
        IF params ? 'start' THEN PERFORM (params ->> 'start')::time; END IF;
        IF params ? 'end' THEN PERFORM (params ->> 'end')::time; END IF;
        IF params ? 'days' AND (jsonb_typeof(params -> 'days') <> 'array' OR EXISTS (
               SELECT 1 FROM jsonb_array_elements(params -> 'days') d WHERE d::text !~ '^[1-7]$')) THEN
            RAISE EXCEPTION 'days must be an array of ISO weekdays 1 (Monday) to 7';
        END IF;
        IF params ? 'timeframe' THEN PERFORM (params ->> 'timeframe')::market.timeframe; END IF;
        IF (params ? 'lookback' AND (params ->> 'lookback')::integer < 3)
           OR (params ? 'period' AND (params ->> 'period')::integer < 1) THEN
            RAISE EXCEPTION 'lookback must be a whole number >= 3 and period >= 1';
        END IF;
        IF params ? 'mode' AND upper(params ->> 'mode') NOT IN ('SOFT', 'HARD', 'FREEZE') THEN
            RAISE EXCEPTION 'mode must be SOFT, HARD or FREEZE';
        END IF;
        IF params ? 'unit' AND params ->> 'unit' NOT IN ('amount', 'fraction') THEN
            RAISE EXCEPTION 'unit must be amount or fraction';
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION '% params %: %', lt.limit_type, params, SQLERRM
            USING ERRCODE = 'invalid_parameter_value';
    END;
    INSERT INTO risk.limits AS l (account_id, environment, scope, scope_key, limit_type, value,
                                  params, updated_by)
    VALUES (acc_id, environment::trading.environment, scope::risk.limit_scope,
            CASE WHEN scope = 'symbol' THEN upper(scope_key) ELSE scope_key END,
            lt.limit_type, value, COALESCE(params, '{}'), session_user)
    ON CONFLICT ON CONSTRAINT limits_unique DO UPDATE
        SET value = EXCLUDED.value, params = EXCLUDED.params, enabled = true,
            updated_at = now(), updated_by = session_user
    RETURNING l.limit_id INTO id;
    PERFORM audit.record('risk.limit_set', 'risk.limits', id::text,
        jsonb_build_object('limit_type', lt.limit_type, 'value', value, 'scope', scope,
                           'scope_key', scope_key, 'account', account,
                           'environment', environment, 'params', params));
    RETURN id;
END
$$;

CREATE FUNCTION risk.remove_limit(limit_id bigint) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM risk.limits l WHERE l.limit_id = remove_limit.limit_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM audit.record('risk.limit_removed', 'risk.limits', limit_id::text, '{}');
    RETURN true;
END
$$;

-- The limits in force for an account: for each (scope, key, type) the most specific row
-- (the account's own before its environment's before everyone's).
CREATE FUNCTION risk.effective_limits(account bigint) RETURNS SETOF risk.limits
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT DISTINCT ON (l.scope, l.scope_key, l.limit_type) l.*
    FROM risk.limits l, trading.accounts a
    WHERE a.account_id = effective_limits.account AND l.enabled
      AND (l.account_id = a.account_id OR l.account_id IS NULL)
      AND (l.environment = a.environment OR l.environment IS NULL)
    ORDER BY l.scope, l.scope_key, l.limit_type, (l.account_id IS NULL), (l.environment IS NULL);
END;

------------------------------------------------------------------------------ breaker
CREATE FUNCTION risk.breaker_mode(account bigint) RETURNS risk.breaker_mode
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN COALESCE((SELECT b.mode FROM risk.breaker_state b WHERE b.account_id = account), 'OK');

------------------------------------------------------------------------------ the check
-- Returns no row when the order may go; otherwise one row: the first denial.
-- opening: the quantity that opens or increases exposure (0 for a pure reduction, which
-- only FREEZE stops). position_strategy: the strategy whose position this is (NULL: net).
CREATE FUNCTION risk.check_order(acc trading.accounts, strat trading.strategies,
                                 inst market.instruments, side trading.order_side,
                                 qty numeric, opening numeric, price numeric,
                                 stop_loss numeric, at timestamptz)
RETURNS TABLE (code text, reason text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    breaker risk.breaker_mode := risk.breaker_mode(acc.account_id);
    eq record;
    fx numeric;
    px numeric;
    dir numeric := CASE WHEN side = 'buy' THEN 1 ELSE -1 END;
    held numeric;
    inst_qty numeric;
    after_qty numeric;
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
    IF breaker = 'FREEZE' THEN
        code := 'BREAKER_FREEZE';
        reason := format('BREAKER_FREEZE: account=%s, reason=%s', acc.name,
                         (SELECT b.reason FROM risk.breaker_state b WHERE b.account_id = acc.account_id));
        RETURN NEXT; RETURN;
    END IF;
    IF opening <= 0 THEN
        RETURN;  -- closing and reducing orders pass every other check
    END IF;
    IF breaker IN ('SOFT', 'HARD') THEN
        code := 'BREAKER_' || breaker;
        reason := format('BREAKER_%s: account=%s, entries stopped until risk.reset_breaker()',
                         breaker, acc.name);
        RETURN NEXT; RETURN;
    END IF;

    SELECT * INTO eq FROM trading.account_equity(acc.account_id);
    fx := trading._fx_or_fail(inst.quote_currency, acc.base_currency, at);
    px := price * fx;
    -- the position on the instrument, with the entry orders not yet filled: an approved
    -- entry counts at once, so that orders decided one after the other (or by sessions
    -- waiting on the account lock) cannot together pass a limit each passes alone
    SELECT COALESCE(sum(trading._signed_qty(p)), 0) INTO held
    FROM trading.positions p WHERE p.account_id = acc.account_id AND p.instrument_id = inst.instrument_id;
    SELECT held + COALESCE(sum(CASE WHEN o.side = 'buy' THEN 1 ELSE -1 END
                                   * (o.quantity - o.filled_quantity)), 0) INTO inst_qty
    FROM trading.orders o
    WHERE o.account_id = acc.account_id AND o.instrument_id = inst.instrument_id AND NOT o.reduce_only
      AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled');
    after_qty := inst_qty + dir * qty;

    FOR l IN SELECT * FROM risk.effective_limits(acc.account_id) el
             WHERE el.scope = 'global'
                OR (el.scope = 'market' AND el.scope_key = inst.market::text)
                OR (el.scope = 'strategy' AND el.scope_key = strat.name)
                OR (el.scope = 'symbol' AND el.scope_key = inst.symbol)
             ORDER BY array_position(ARRAY['global', 'market', 'strategy', 'symbol']::risk.limit_scope[], el.scope),
                      CASE WHEN el.limit_type IN ('REQUIRE_STOP_LOSS', 'MAX_ORDER_VALUE') THEN 1 ELSE 0 END,
                      el.limit_type
    LOOP
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
                IF l.params ->> 'unit' = 'fraction' AND acc.day_start_equity > 0 THEN
                    measure := measure / acc.day_start_equity;
                END IF;
                IF measure >= l.value THEN
                    code := l.limit_type;
                    reason := format('DAILY_LOSS: limit=%s, loss=%s%s', l.value, round(measure, 4),
                                     CASE WHEN l.params ->> 'unit' = 'fraction' THEN ', unit=fraction' ELSE '' END);
                END IF;
            END IF;
        WHEN 'MAX_POSITION_SIZE' THEN
            IF eq.equity > 0 THEN
                measure := abs(after_qty) * px / eq.equity;
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
            -- gross exposure of the scope after this order, as a share of equity
            SELECT COALESCE(sum(abs(CASE WHEN p.instrument_id = inst.instrument_id THEN 0
                                    ELSE trading._signed_qty(p) END
                                * COALESCE(p.last_price, p.average_price)
                                * COALESCE(trading.fx_rate(i.quote_currency, acc.base_currency, NULL), 0))), 0)
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
                           * COALESCE(trading.fx_rate(i.quote_currency, acc.base_currency, NULL), 0))
                FROM trading.orders o JOIN market.instruments i USING (instrument_id)
                WHERE o.account_id = acc.account_id AND o.instrument_id <> inst.instrument_id
                  AND NOT o.reduce_only
                  AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')
                  AND (l.limit_type = 'MAX_LEVERAGE' OR l.scope = 'global'
                       OR (l.scope = 'market' AND i.market::text = l.scope_key)
                       OR (l.scope = 'strategy' AND o.strategy_id = strat.strategy_id))), 0);
            measure := (measure + abs(after_qty) * px) / NULLIF(eq.equity, 0);
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
            IF measure > l.value THEN
                code := l.limit_type;
                reason := format('MAX_VOLATILITY: limit=%s, atr_ratio=%s', l.value, round(measure, 6));
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
            RETURN NEXT; RETURN;
        END IF;
    END LOOP;

    -- Trade level: the position and the cash must exist.
    -- a sell may not go below what is held: buys not yet filled may never fill
    IF held + dir * qty < 0 AND NOT acc.allow_short AND (held >= 0 OR dir < 0) THEN
        code := 'SHORT_NOT_ALLOWED';
        reason := format('SHORT_NOT_ALLOWED: position=%s, sell=%s, account=%s', held, qty, acc.name);
        RETURN NEXT; RETURN;
    END IF;
    IF side = 'buy' THEN
        available := acc.cash - trading._reserved_cash(acc);
        required := qty * px * (1 + acc.taker_fee);
        IF required > available THEN
            code := 'INSUFFICIENT_CASH';
            reason := format('INSUFFICIENT_CASH: available=%s, required=%s', round(available, 2), round(required, 2));
            RETURN NEXT; RETURN;
        END IF;
    END IF;
END
$$;

-- Correlations already computed, per pair of instruments (lower id first), timeframe and
-- lookback, with the last bar time of each side they were computed at: valid until either
-- instrument gets a newer bar.
CREATE TABLE risk.correlation_cache (
    a          bigint NOT NULL,
    b          bigint NOT NULL,
    timeframe  market.timeframe NOT NULL,
    lookback   integer NOT NULL,
    a_ts       timestamptz,
    b_ts       timestamptz,
    value      numeric,
    PRIMARY KEY (a, b, timeframe, lookback)
);

-- Correlation of simple returns of two instruments over their last `lookback` common bars
-- (float arithmetic: it is a statistic, not money), cached until either gets a new bar.
CREATE FUNCTION risk.return_correlation(a bigint, b bigint, tf market.timeframe,
                                        lookback integer, at timestamptz)
RETURNS numeric
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    lo bigint := LEAST(a, b);
    hi bigint := GREATEST(a, b);
    lo_ts timestamptz;
    hi_ts timestamptz;
    cached risk.correlation_cache;
    v numeric;
BEGIN
    SELECT x.ts INTO lo_ts FROM market.bars x
    WHERE x.instrument_id = lo AND x.timeframe = tf AND (at IS NULL OR x.ts <= at)
    ORDER BY x.ts DESC LIMIT 1;
    SELECT x.ts INTO hi_ts FROM market.bars x
    WHERE x.instrument_id = hi AND x.timeframe = tf AND (at IS NULL OR x.ts <= at)
    ORDER BY x.ts DESC LIMIT 1;
    SELECT * INTO cached FROM risk.correlation_cache k
    WHERE k.a = lo AND k.b = hi AND k.timeframe = tf AND k.lookback = return_correlation.lookback;
    IF FOUND AND cached.a_ts IS NOT DISTINCT FROM lo_ts AND cached.b_ts IS NOT DISTINCT FROM hi_ts THEN
        RETURN cached.value;
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
