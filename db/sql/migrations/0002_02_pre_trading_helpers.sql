-- 0002_02 (pre): lookups, input parsing, prices, currency conversion and equity, used by
-- the signal, order and fill functions.
SET LOCAL ROLE mmats_owner;

CREATE INDEX bars_instrument_ts_idx ON market.bars (instrument_id, ts DESC);

-- A number from a JSON object, checked: a clear error names the field and the value.
CREATE FUNCTION trading._num(obj jsonb, field text, what text, lo numeric DEFAULT NULL,
                             hi numeric DEFAULT NULL, lo_inclusive boolean DEFAULT true)
RETURNS numeric
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    raw jsonb := obj -> field;
    v numeric;
BEGIN
    IF raw IS NULL OR jsonb_typeof(raw) = 'null' THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(raw) NOT IN ('number', 'string') THEN
        RAISE EXCEPTION '%.% must be a number, got %', what, field, raw
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- checked before the cast: an EXCEPTION block would cost a subtransaction per call,
    -- and this runs several times for every signal and fill
    IF jsonb_typeof(raw) = 'string'
       AND btrim(raw #>> '{}') !~* '^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$' THEN
        IF lower(btrim(raw #>> '{}')) ~ '^[+-]?(nan|inf|infinity)$' THEN
            RAISE EXCEPTION '%.% must be a finite number, got %', what, field, raw
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        RAISE EXCEPTION '%.% must be a number, got %', what, field, raw
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v := (raw #>> '{}')::numeric;
    IF v = 'NaN' OR v IN ('Infinity', '-Infinity') THEN
        RAISE EXCEPTION '%.% must be a finite number, got %', what, field, raw
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (lo IS NOT NULL AND (v < lo OR (v = lo AND NOT lo_inclusive)))
       OR (hi IS NOT NULL AND v > hi) THEN
        RAISE EXCEPTION '%.% must be %, got %', what, field,
            CASE WHEN hi IS NULL THEN (CASE WHEN lo_inclusive THEN '>= ' ELSE '> ' END) || lo
                 WHEN lo IS NULL THEN '<= ' || hi
                 ELSE 'between ' || lo || ' and ' || hi END, v
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN v;
END
$$;

CREATE FUNCTION trading._text(obj jsonb, field text, what text, max_length integer DEFAULT 200)
RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    raw jsonb := obj -> field;
BEGIN
    IF raw IS NULL OR jsonb_typeof(raw) = 'null' THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(raw) NOT IN ('string', 'number') THEN
        RAISE EXCEPTION '%.% must be a string, got %', what, field, raw
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF length(raw #>> '{}') > max_length THEN
        RAISE EXCEPTION '%.% is longer than % characters', what, field, max_length
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN raw #>> '{}';
END
$$;

CREATE FUNCTION trading._ts(obj jsonb, field text, what text) RETURNS timestamptz
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    raw text := trading._text(obj, field, what, 64);
    m text[];
BEGIN
    IF raw IS NULL THEN
        RETURN NULL;
    END IF;
    IF raw !~ '([zZ]|[+-]\d\d(:?\d\d)?)$' THEN
        RAISE EXCEPTION '%.% must be an ISO 8601 time with a UTC offset (e.g. 2024-01-02T15:04:05Z), got %',
            what, field, raw USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- every field checked before the cast (no EXCEPTION block: no subtransaction per call)
    m := regexp_match(raw, '^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?(?:[zZ]|[+-]\d{2}(?::?\d{2})?)$');
    IF m IS NULL OR m[1]::int < 1 OR m[2]::int NOT BETWEEN 1 AND 12 OR m[3]::int < 1
       OR m[3]::int > extract(day FROM make_date(m[1]::int, m[2]::int, 1) + interval '1 month - 1 day')
       OR m[4]::int > 23 OR m[5]::int > 59 OR COALESCE(m[6], '0')::int > 59 THEN
        RAISE EXCEPTION '%.% is not a valid time: %', what, field, raw
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN raw::timestamptz;
END
$$;

-- The account named (or numbered) by ref, locked for the rest of the transaction when
-- lock is true: every decision that reads the account's limits, cash or positions holds
-- this lock, so two sessions cannot both pass the same limit.
CREATE FUNCTION trading._account(ref text, lock boolean DEFAULT false) RETURNS trading.accounts
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts;
    id bigint;
BEGIN
    IF ref IS NULL THEN
        RAISE EXCEPTION 'an account is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- by name first, then by number; never one OR-ed condition (a generic plan would
    -- cast every name to bigint)
    SELECT a.account_id INTO id FROM trading.accounts a WHERE a.name = ref;
    IF id IS NULL AND ref ~ '^\d{1,18}$' THEN
        id := ref::bigint;
    END IF;
    IF lock THEN
        SELECT * INTO acc FROM trading.accounts a WHERE a.account_id = id FOR UPDATE;
    ELSE
        SELECT * INTO acc FROM trading.accounts a WHERE a.account_id = id;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown account %', quote_literal(ref)
            USING ERRCODE = 'foreign_key_violation',
                  HINT = 'create it with trading.create_account() or `mmats account create`';
    END IF;
    RETURN acc;
END
$$;

CREATE FUNCTION market._instrument(symbol text, venue text DEFAULT NULL)
RETURNS market.instruments
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    inst market.instruments;
    n integer;
BEGIN
    IF symbol IS NULL THEN
        RAISE EXCEPTION 'a symbol is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT count(*) INTO n FROM market.instruments i
    WHERE i.symbol = upper(_instrument.symbol) AND (_instrument.venue IS NULL OR i.venue = _instrument.venue);
    IF n = 0 THEN
        RAISE EXCEPTION 'unknown symbol %',
            quote_literal(symbol) || COALESCE(' on venue ' || quote_literal(_instrument.venue), '')
            USING ERRCODE = 'foreign_key_violation',
                  HINT = 'import its bars first (mmats data import) so the instrument exists';
    ELSIF n > 1 THEN
        RAISE EXCEPTION 'symbol % exists on several venues (%): name the venue', symbol,
            (SELECT string_agg(i.venue, ', ' ORDER BY i.venue) FROM market.instruments i
             WHERE i.symbol = upper(_instrument.symbol))
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO inst FROM market.instruments i
    WHERE i.symbol = upper(_instrument.symbol) AND (_instrument.venue IS NULL OR i.venue = _instrument.venue);
    RETURN inst;
END
$$;

-- The strategy by name (and version), registered on first use so that every signal is
-- attributed to a strategy row.
CREATE FUNCTION trading._strategy(name text, version text DEFAULT NULL)
RETURNS trading.strategies
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s trading.strategies;
BEGIN
    IF name IS NULL THEN
        RAISE EXCEPTION 'a strategy name is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO s FROM trading.strategies t
    WHERE t.name = _strategy.name AND (_strategy.version IS NULL OR t.version = _strategy.version)
    ORDER BY t.created_at DESC LIMIT 1;
    IF NOT FOUND THEN
        INSERT INTO trading.strategies (name, version) VALUES (_strategy.name, COALESCE(_strategy.version, '1'))
        ON CONFLICT ON CONSTRAINT strategies_name_version_unique DO NOTHING;
        SELECT * INTO s FROM trading.strategies t
        WHERE t.name = _strategy.name AND t.version = COALESCE(_strategy.version, '1');
    END IF;
    RETURN s;
END
$$;

-- The latest close at or before a time (any timeframe).
CREATE FUNCTION market.latest_close(instrument bigint, at timestamptz DEFAULT NULL)
RETURNS numeric
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN (SELECT b.close FROM market.bars b
        WHERE b.instrument_id = instrument AND (at IS NULL OR b.ts <= at)
        ORDER BY b.ts DESC LIMIT 1);

-- How many units of `to_ccy` one unit of `from_ccy` buys, from the latest bar of a pair
-- that connects them (FROM/TO or TO/FROM). NULL when no such bar exists.
CREATE FUNCTION trading.fx_rate(from_ccy text, to_ccy text, at timestamptz DEFAULT NULL)
RETURNS numeric
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    px numeric;
BEGIN
    IF from_ccy = to_ccy THEN
        RETURN 1;
    END IF;
    SELECT market.latest_close(i.instrument_id, at) INTO px FROM market.instruments i
    WHERE i.base_currency = from_ccy AND i.quote_currency = to_ccy
      AND market.latest_close(i.instrument_id, at) IS NOT NULL
    ORDER BY i.instrument_id LIMIT 1;
    IF px IS NOT NULL THEN
        RETURN px;
    END IF;
    SELECT market.latest_close(i.instrument_id, at) INTO px FROM market.instruments i
    WHERE i.base_currency = to_ccy AND i.quote_currency = from_ccy
      AND market.latest_close(i.instrument_id, at) IS NOT NULL
    ORDER BY i.instrument_id LIMIT 1;
    IF px IS NOT NULL THEN
        RETURN round(1 / px, 12);
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION trading._fx_or_fail(from_ccy text, to_ccy text, at timestamptz) RETURNS numeric
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r numeric := trading.fx_rate(from_ccy, to_ccy, at);
BEGIN
    IF r IS NULL THEN
        RAISE EXCEPTION 'no conversion rate from % to %: no bar for %/% or %/% at or before %',
            from_ccy, to_ccy, from_ccy, to_ccy, to_ccy, from_ccy, COALESCE(at::text, 'now')
            USING ERRCODE = 'no_data_found',
                  HINT = 'import bars of the conversion pair (mmats data import)';
    END IF;
    RETURN r;
END
$$;

-- Signed quantity of a position row (the short leg of hedge mode counts negative).
CREATE FUNCTION trading._signed_qty(p trading.positions) RETURNS numeric
LANGUAGE sql IMMUTABLE
RETURN CASE WHEN p.leg = 'short' THEN -p.quantity ELSE p.quantity END;

-- Market value of every open position of an account, in the account's currency, and its
-- equity (cash + that value). Positions are marked at their last price.
CREATE FUNCTION trading.account_equity(account bigint)
RETURNS TABLE (cash numeric, positions_value numeric, gross_exposure numeric, equity numeric)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    WITH v AS (
        SELECT trading._signed_qty(p) * COALESCE(p.last_price, p.average_price)
               * COALESCE(trading.fx_rate(i.quote_currency, a.base_currency, NULL), 0) AS value
        FROM trading.positions p
        JOIN market.instruments i USING (instrument_id)
        JOIN trading.accounts a USING (account_id)
        WHERE p.account_id = account AND p.quantity <> 0)
    SELECT a.cash, COALESCE((SELECT sum(value) FROM v), 0),
           COALESCE((SELECT sum(abs(value)) FROM v), 0),
           a.cash + COALESCE((SELECT sum(value) FROM v), 0)
    FROM trading.accounts a WHERE a.account_id = account;
END;

CREATE FUNCTION trading._round_down(qty numeric, step numeric) RETURNS numeric
LANGUAGE sql IMMUTABLE
RETURN CASE WHEN qty <= 0 THEN 0 ELSE trunc(qty / step) * step END;

-- Remaining quantity of an account's open orders per instrument and side.
CREATE FUNCTION trading._open_order_qty(account bigint, instrument bigint, side trading.order_side)
RETURNS numeric
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN COALESCE((SELECT sum(o.quantity - o.filled_quantity) FROM trading.orders o
                 WHERE o.account_id = account AND o.instrument_id = instrument
                   AND o.side = _open_order_qty.side
                   AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')), 0);

-- Cash committed to open buy orders (at their reference or limit price, with fees).
CREATE FUNCTION trading._reserved_cash(acc trading.accounts) RETURNS numeric
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN COALESCE((
    SELECT sum((o.quantity - o.filled_quantity)
               * COALESCE(o.limit_price, o.reference_price, market.latest_close(o.instrument_id))
               * COALESCE(trading.fx_rate(i.quote_currency, acc.base_currency, NULL), 1)
               * (1 + acc.taker_fee))
    FROM trading.orders o JOIN market.instruments i USING (instrument_id)
    WHERE o.account_id = acc.account_id AND o.side = 'buy' AND NOT o.reduce_only
      AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')), 0);

-- Average true range over the last `period` bars of a timeframe, at or before a time.
CREATE FUNCTION market.atr(instrument bigint, tf market.timeframe, period integer,
                           at timestamptz DEFAULT NULL) RETURNS numeric
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN (
    WITH recent AS (
        SELECT b.ts, b.high, b.low, b.close FROM market.bars b
        WHERE b.instrument_id = instrument AND b.timeframe = tf AND (at IS NULL OR b.ts <= at)
        ORDER BY b.ts DESC LIMIT period + 1),
    tr AS (
        SELECT GREATEST(high - low, abs(high - lag(close) OVER w), abs(low - lag(close) OVER w))
                   AS true_range,
               lag(close) OVER w AS prev_close
        FROM recent WINDOW w AS (ORDER BY ts))
    SELECT CASE WHEN count(*) >= period THEN avg(true_range) END
    FROM tr WHERE prev_close IS NOT NULL);

-- The timeframe an instrument's bars are most finely stored in (for volatility and
-- volume checks that name no timeframe).
CREATE FUNCTION market.finest_timeframe(instrument bigint) RETURNS market.timeframe
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN (SELECT b.timeframe FROM market.bars b WHERE b.instrument_id = instrument
        ORDER BY b.ts DESC, b.timeframe LIMIT 1);
