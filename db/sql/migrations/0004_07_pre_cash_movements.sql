-- 0004_07 (pre): cash that moves outside any fill.
--
-- A broker's balance moves for more than fills: a regulatory fee on a sale (Alpaca's FEE
-- activities), overnight financing of a forex position (OANDA's DAILY_FINANCING), a
-- dividend, interest, a deposit or a withdrawal. The ledger knew only fills, so its cash
-- drifted from the broker's until the reconciler called it a BALANCE_MISMATCH (and, left
-- long enough, any account holding positions overnight would have got one). Each such
-- movement is now a row of trading.cash_movements, booked once by trading.book_cash,
-- idempotent on the broker's own id for it; the reconciler books what the broker reports
-- before it compares balances, and an operator books a deposit by hand the same way.
--
-- Fees, financing, dividends, interest and adjustments are profit or loss: they move cash
-- and so equity, which the drawdown and daily-loss rules read. A deposit or a withdrawal
-- is not: it moves cash, the peak equity and the day's starting equity by the same
-- amount, so neither rule sees it as a gain or a loss. A day's starting equity is the
-- last snapshot's equity; one booked after that snapshot and before the next day's first
-- is kept on the account (flows_since_snapshot) and added to it, so a withdrawal
-- overnight is not that day's loss (nor a deposit its gain).
--
-- Also:
-- - trading.mark_in_flight is the gate an order passes on its way to a broker (and
--   acknowledge_order, for an order acknowledged without being sent, as the paper book
--   takes them): under the account's lock it cancels, instead of letting go, an order the
--   account may no longer send: any order under a FREEZE, an opening one (not
--   reduce-only) under SOFT or HARD or once the account is advisory. Before, the breaker and the downgrade stopped only
--   orders not yet created: what was queued went out. Exits still go under SOFT, HARD
--   and advisory (they protect what is held).
-- - trading.fx_rate takes the conversion pair's latest bar at or before the time, whichever
--   venue lists the pair and in whichever direction. It took the direct pair of the lowest
--   instrument id with any bar, and only then the inverse pair: a stale listing on one
--   venue (a bar of 2020) won over the live one on another.
-- - trading._num refuses a number written as text whose magnitude numeric cannot
--   hold (`"1e400000"`, a 200 000-digit string) with the field's name, as it refuses NaN;
--   before, the cast failed with PostgreSQL's bare "value overflows numeric format". It
--   refuses any number of 10^18 or more in size too (`1e1000` was booked: cash no reader
--   taking a float could read). trading._ts refuses a UTC offset beyond 15:59 naming the
--   field (it was PostgreSQL's bare "time zone displacement out of range").
SET LOCAL ROLE mmats_owner;

-- (as in 0003_02, with the UTC offset checked: PostgreSQL takes at most 15:59; no SET
-- clause, as since 0004_06)
CREATE OR REPLACE FUNCTION trading._ts(obj jsonb, field text, what text) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
DECLARE
    raw text := trading._text(obj, field, what, 64);
    m text[];
BEGIN
    IF raw IS NULL THEN
        RETURN NULL;
    END IF;
    -- the common case first, in one plain match: a time of the strict pattern below whose
    -- every field is in range (year >= 1, month 1-12, a day every such month has, hour,
    -- minute, second) passes every check below, so it is cast at once; any other text
    -- (29 February included) takes the checks. The capturing regexp_match costs some
    -- 0.1 ms a call.
    IF raw ~ '^(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])-(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])|(?:0[13-9]|1[0-2])-(?:29|30)|(?:0[13578]|1[02])-31)[T ](?:[01][0-9]|2[0-3]):[0-5][0-9](?::[0-5][0-9](?:\.[0-9]+)?)?(?:[zZ]|[+-](?:0[0-9]|1[0-5])(?::?[0-5][0-9])?)$' THEN
        RETURN raw::timestamptz;
    END IF;
    IF raw !~ '([zZ]|[+-]\d\d(:?\d\d)?)$' THEN
        RAISE EXCEPTION '%.% must be an ISO 8601 time with a UTC offset (e.g. 2024-01-02T15:04:05Z), got %',
            what, field, raw USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- every field checked before the cast (no EXCEPTION block: no subtransaction per call)
    m := regexp_match(raw, '^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?(?:[zZ]|[+-](\d{2})(?::?(\d{2}))?)$');
    IF m IS NULL OR m[1]::int < 1 OR m[2]::int NOT BETWEEN 1 AND 12 OR m[3]::int < 1
       OR m[3]::int > extract(day FROM make_date(m[1]::int, m[2]::int, 1) + interval '1 month - 1 day')
       OR m[4]::int > 23 OR m[5]::int > 59 OR COALESCE(m[6], '0')::int > 59 THEN
        RAISE EXCEPTION '%.% is not a valid time: %', what, field, raw
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF COALESCE(m[7], '0')::int > 15 OR COALESCE(m[8], '0')::int > 59 THEN
        RAISE EXCEPTION '%.% has a UTC offset out of range (-15:59 to +15:59): %', what, field, raw
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN raw::timestamptz;
END
$$;

-- (as in 0003_02, with the range check; no SET clause, as since 0004_06)
CREATE OR REPLACE FUNCTION trading._num(obj jsonb, field text, what text, lo numeric DEFAULT NULL,
                                        hi numeric DEFAULT NULL, lo_inclusive boolean DEFAULT true)
RETURNS numeric
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    raw jsonb := obj -> field;
    kind text;
    txt text;
    v numeric;
BEGIN
    IF raw IS NULL THEN
        RETURN NULL;
    END IF;
    kind := jsonb_typeof(raw);
    IF kind = 'number' THEN
        v := raw::numeric;  -- a JSON number is always finite
    ELSIF kind = 'string' THEN
        txt := raw #>> '{}';
        -- checked before the cast: an EXCEPTION block would cost a subtransaction per call
        IF btrim(txt) !~* '^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$' THEN
            IF lower(btrim(txt)) ~ '^[+-]?(nan|inf|infinity)$' THEN
                RAISE EXCEPTION '%.% must be a finite number, got %', what, field, raw
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
            RAISE EXCEPTION '%.% must be a number, got %', what, field, raw
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        -- numeric holds 131 072 digits before the point and 16 383 after: no price or
        -- quantity comes near 1,000 digits or an exponent of 1,000
        IF length(txt) > 1000 OR (strpos(txt, 'e') > 0 OR strpos(txt, 'E') > 0)
           AND abs(substring(txt FROM '[eE]([+-]?\d+)')::numeric) > 1000 THEN
            RAISE EXCEPTION '%.% is out of range, got %', what, field,
                CASE WHEN length(txt) > 40 THEN left(txt, 40) || '...' ELSE txt END
                USING ERRCODE = 'numeric_value_out_of_range';
        END IF;
        v := txt::numeric;
    ELSIF kind = 'null' THEN
        RETURN NULL;
    ELSE
        RAISE EXCEPTION '%.% must be a number, got %', what, field, raw
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- no price, quantity or amount comes near 10^18 (readers that take a float8 fail
    -- beyond 10^308; a JSON number is not bounded either)
    IF abs(v) >= 1e18 THEN
        RAISE EXCEPTION '%.% is out of range, got %', what, field,
            CASE WHEN length(v::text) > 40 THEN left(v::text, 40) || '...' ELSE v::text END
            USING ERRCODE = 'numeric_value_out_of_range';
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

-- deposits and withdrawals (in the account's currency) booked since its last equity
-- snapshot. (In steps: on PostgreSQL 15 a column added with a default to a table whose
-- row type a SQL-standard function body uses, as trading._position_key's does, is refused.)
ALTER TABLE trading.accounts ADD COLUMN flows_since_snapshot numeric;
UPDATE trading.accounts SET flows_since_snapshot = 0;
ALTER TABLE trading.accounts ALTER COLUMN flows_since_snapshot SET DEFAULT 0,
    ALTER COLUMN flows_since_snapshot SET NOT NULL,
    ADD CONSTRAINT accounts_flows_since_snapshot_is_number
        CHECK (flows_since_snapshot > '-Infinity' AND flows_since_snapshot < 'Infinity');

CREATE TYPE trading.cash_kind AS ENUM
    ('fee', 'financing', 'dividend', 'interest', 'deposit', 'withdrawal', 'adjustment');

CREATE TABLE trading.cash_movements (
    movement_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id      bigint NOT NULL REFERENCES trading.accounts (account_id),
    kind            trading.cash_kind NOT NULL,
    amount          numeric NOT NULL,          -- signed, in `currency`: > 0 credits the account
    currency        text NOT NULL,
    fx              numeric NOT NULL,          -- account currency per unit of `currency`
    -- what the account's cash moved by
    amount_account  numeric NOT NULL GENERATED ALWAYS AS (amount * fx) STORED,
    broker_ref      text NOT NULL,             -- the broker's id of the movement (or the booker's)
    symbol          text,                      -- the instrument it is about, as the broker named it
    instrument_id   bigint REFERENCES market.instruments (instrument_id),  -- that, when known
    ts              timestamptz NOT NULL,      -- when the broker booked it
    description     text,
    booked_at       timestamptz NOT NULL DEFAULT now(),
    booked_by       text NOT NULL DEFAULT session_user,
    CONSTRAINT cash_movements_broker_ref_unique UNIQUE (account_id, broker_ref),
    CONSTRAINT cash_movements_amount_nonzero
        CHECK (amount <> 0 AND amount > '-Infinity' AND amount < 'Infinity'),
    CONSTRAINT cash_movements_sign_of_kind
        CHECK ((kind <> 'deposit' OR amount > 0) AND (kind <> 'withdrawal' OR amount < 0)),
    CONSTRAINT cash_movements_fx_positive CHECK (fx > 0 AND fx < 'Infinity'),
    CONSTRAINT cash_movements_currency_format CHECK (currency ~ '^[A-Z0-9]{2,12}$'),
    CONSTRAINT cash_movements_broker_ref_format CHECK (broker_ref ~ '^[[:print:]]{1,128}$'),
    CONSTRAINT cash_movements_symbol_format CHECK (symbol ~ '^[[:print:]]{1,64}$'),
    CONSTRAINT cash_movements_description_length CHECK (length(description) <= 200)
);
CREATE INDEX cash_movements_account_ts_idx ON trading.cash_movements (account_id, ts);
COMMENT ON TABLE trading.cash_movements IS
    'Cash an account gained or lost outside any fill (fees, financing, dividends, interest, '
    'deposits, withdrawals), each booked once by trading.book_cash';
GRANT SELECT ON trading.cash_movements TO mmats_readonly, mmats_api, mmats_router;

-- Book one movement. In: account, kind, amount (signed, in currency), currency (default
-- the account's), broker_ref (the broker's id for it; required: it is what makes a second
-- booking of the same movement harmless), ts (default now), symbol (the instrument it
-- is about, if any), description. Out:
-- status booked | duplicate, movement_id, currency, amount_account (in the account's
-- currency), cash (the account's, after). A second booking of a broker_ref already
-- booked changes nothing and answers duplicate, unless it disagrees on what the movement
-- was (kind, amount, currency): that is refused, naming both.
CREATE FUNCTION trading.book_cash(movement jsonb) RETURNS jsonb
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
    -- move with it
    UPDATE trading.accounts a
    SET cash = a.cash + moved,
        peak_equity = CASE WHEN k IN ('deposit', 'withdrawal') THEN a.peak_equity + moved
                           ELSE a.peak_equity END,
        day_start_equity = CASE WHEN k IN ('deposit', 'withdrawal') THEN a.day_start_equity + moved
                                ELSE a.day_start_equity END,
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
REVOKE ALL ON FUNCTION trading.book_cash(jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION trading.book_cash(jsonb) TO mmats_router, mmats_api;

-- (as in 0002_06, with the flows booked since the last snapshot; no SET clause, as since
-- 0004_06) Snapshot an account's equity at a time, track its peak and its UTC day, and
-- trip the breaker on a breached drawdown or daily-loss limit. Returns the equity.
CREATE OR REPLACE FUNCTION trading.snapshot_equity(account bigint, at timestamptz) RETURNS numeric
LANGUAGE plpgsql AS $$
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
    -- daily bars every bar is the first of its day), plus the deposits and withdrawals
    -- booked since that snapshot (they are no gain or loss of the new day)
    IF acc.trading_day = day THEN
        day_start := acc.day_start_equity;
    ELSE
        SELECT s.equity + acc.flows_since_snapshot INTO day_start FROM trading.equity_snapshots s
        WHERE s.account_id = account AND s.ts < at ORDER BY s.ts DESC LIMIT 1;
        day_start := COALESCE(day_start, e.equity);
    END IF;
    -- (only when something changed: every bar of every held instrument comes here, and
    -- a new row version per bar makes every later read of the account slower)
    IF (acc.peak_equity, acc.trading_day, acc.day_start_equity, acc.flows_since_snapshot)
       IS DISTINCT FROM (peak, day, day_start, 0) THEN
        UPDATE trading.accounts a SET peak_equity = peak, trading_day = day,
                                      day_start_equity = day_start, flows_since_snapshot = 0
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

-- (as in 0002_02, the latest bar of either direction on any venue) The price of one unit
-- of from_ccy in to_ccy at `at` (the latest stored bar at or before it; NULL: the newest),
-- from the pair FROM/TO or the inverse of TO/FROM, whichever has the later bar (the direct
-- pair on a tie); NULL when no such bar exists.
CREATE OR REPLACE FUNCTION trading.fx_rate(from_ccy text, to_ccy text, at timestamptz DEFAULT NULL)
RETURNS numeric
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    px numeric;
BEGIN
    IF from_ccy = to_ccy THEN
        RETURN 1;
    END IF;
    SELECT CASE WHEN i.base_currency = from_ccy THEN b.close ELSE round(1 / b.close, 12) END
    INTO px
    FROM market.instruments i
    CROSS JOIN LATERAL (SELECT x.ts, x.close FROM market.bars x
                        WHERE x.instrument_id = i.instrument_id
                          AND x.ts <= COALESCE(fx_rate.at, 'infinity')
                        ORDER BY x.ts DESC LIMIT 1) b
    WHERE (i.base_currency = from_ccy AND i.quote_currency = to_ccy)
       OR (i.base_currency = to_ccy AND i.quote_currency = from_ccy)
    ORDER BY b.ts DESC, i.base_currency = from_ccy DESC, i.instrument_id
    LIMIT 1;
    RETURN px;
END
$$;

-- (as in 0002_05, split in two) A status change of an order its caller has found and
-- locked (trading._locked_order), audited; _set_order_status finds and locks it first.
CREATE FUNCTION trading._set_status(acc trading.accounts, o trading.orders,
                                    new_status trading.order_status, reason text,
                                    broker_order_id text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    IF o.status = new_status AND new_status <> 'partially_filled' THEN
        RETURN jsonb_build_object('status', 'unchanged', 'order_id', o.order_id, 'order_status', o.status);
    END IF;
    UPDATE trading.orders x SET status = new_status,
        reason = COALESCE(_set_status.reason, x.reason),
        broker_order_id = COALESCE(_set_status.broker_order_id, x.broker_order_id),
        submitted_at = CASE WHEN new_status IN ('in_flight', 'submitted') THEN COALESCE(x.submitted_at, now())
                            ELSE x.submitted_at END
    WHERE x.order_id = o.order_id;
    PERFORM audit.record('order.' || new_status::text, 'trading.orders', o.order_id::text,
        jsonb_build_object('from', o.status, 'reason', reason, 'broker_order_id', broker_order_id));
    RETURN jsonb_build_object('status', new_status, 'order_id', o.order_id, 'previous', o.status);
END
$$;
REVOKE ALL ON FUNCTION trading._set_status(trading.accounts, trading.orders, trading.order_status,
                                           text, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION trading._set_order_status(order_ref text, new_status trading.order_status,
                                                     reason text, broker_order_id text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    lk record := trading._locked_order(order_ref);
BEGIN
    RETURN trading._set_status(lk.acc, lk.o, new_status, reason, broker_order_id);
END
$$;

-- Why an order may no longer go to a broker, if it may not: any order under a FREEZE; an
-- opening (not reduce-only) one under SOFT or HARD, or once the account is advisory. The
-- order is then cancelled with that reason and the answer says so. (Owner-only, called by
-- mark_in_flight and acknowledge_order with the account locked.)
CREATE FUNCTION trading._gate(acc trading.accounts, o trading.orders)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    brk risk.breaker_state;
    code text;
    why text;
BEGIN
    SELECT * INTO brk FROM risk.breaker_state b WHERE b.account_id = acc.account_id;
    IF brk.mode = 'FREEZE' THEN
        code := 'BREAKER_FREEZE';
    ELSIF brk.mode IN ('SOFT', 'HARD') AND NOT o.reduce_only THEN
        code := 'BREAKER_' || brk.mode::text;
    ELSIF acc.mode = 'advisory' AND NOT o.reduce_only THEN
        code := 'ACCOUNT_ADVISORY';
    ELSE
        RETURN NULL;
    END IF;
    why := CASE WHEN code = 'ACCOUNT_ADVISORY'
                THEN format('%s: account %s is in advisory mode: the order was not sent',
                            code, acc.name)
                ELSE format('%s: account %s has its breaker at %s (%s): the order was not sent',
                            code, acc.name, brk.mode, COALESCE(brk.reason, 'no reason given'))
           END;
    PERFORM trading._set_status(acc, o, 'cancelled', why);
    UPDATE trading.orders x SET reason_code = code WHERE x.order_id = o.order_id;
    RETURN jsonb_build_object('status', 'cancelled', 'order_id', o.order_id,
                              'previous', o.status, 'reason_code', code, 'reason', why);
END
$$;
REVOKE ALL ON FUNCTION trading._gate(trading.accounts, trading.orders) FROM PUBLIC;

-- An order moving towards its broker (created -> in_flight, or -> submitted): one not yet
-- sent passes trading._gate first, which cancels it, with the reason, if the account may
-- no longer send it (the answer then says {"status": "cancelled", ...}).
CREATE FUNCTION trading._advance_to_broker(order_ref text, new_status trading.order_status,
                                           broker_order_id text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    lk record := trading._locked_order(order_ref);
BEGIN
    RETURN COALESCE(CASE WHEN (lk.o).status = 'created' THEN trading._gate(lk.acc, lk.o) END,
                    trading._set_status(lk.acc, lk.o, new_status, NULL, broker_order_id));
END
$$;
REVOKE ALL ON FUNCTION trading._advance_to_broker(text, trading.order_status, text) FROM PUBLIC;

-- The router is about to send the order (its fate is unknown until the broker answers).
CREATE OR REPLACE FUNCTION trading.mark_in_flight(order_ref text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN trading._advance_to_broker(order_ref, 'in_flight');
END
$$;

-- The broker acknowledged the order. One acknowledged without ever being sent (created ->
-- submitted: the paper book takes its orders so) passes the same gate first.
CREATE OR REPLACE FUNCTION trading.acknowledge_order(order_ref text, broker_order_id text)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN trading._advance_to_broker(order_ref, 'submitted', broker_order_id);
END
$$;

-- (as in 0004_05, with four changes) apply_fill: a live account's fill dated more than a
-- day before its order or after now is refused (one bad broker time made a trade held
-- for minus 3,652,058 days); a broker fill id must be printable (a control character in
-- it made a two-line refusal later, and an id no reconciliation could show); `liquidity`
-- is maker or taker in any case, or refused naming the field (it was the fills table's
-- bare check violation, "MAKER" included); a fill marks the account's rows of its
-- instrument at its price (the other strategies' rows and the other hedge leg too: they
-- were left at their old marks, so equity was off until the next bar) unless a bar marked
-- them later than the fill's time (a late fill overwrote a newer mark).
CREATE OR REPLACE FUNCTION trading.apply_fill(fill jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    lk record;
    acc trading.accounts;
    o trading.orders;
    inst market.instruments;
    prior trading.fills;
    broker_id text;
    q numeric; price numeric; commission numeric; comm_ccy text; at timestamptz;
    fx numeric; comm_acct numeric;
    fid bigint;
    key_strategy bigint;          -- trading._position_key(acc, o)
    key_leg trading.position_leg;
    p trading.positions;
    d numeric;          -- signed change of the position
    s numeric;          -- signed position before
    closed numeric := 0;
    remainder numeric;
    gross numeric := 0;
    entry_part numeric := 0;
    exit_part numeric := 0;
    new_filled numeric;
    part_strategy bigint[] := '{}';   -- the position rows (by strategy) the fill moves
    part_qty numeric[] := '{}';       -- and how much of the fill each takes
    pd numeric;         -- signed change of one row
    pc numeric;         -- that row's part of the commission
    comm_done numeric := 0;
    realized numeric := 0;
    liq text;
BEGIN
    IF fill IS NULL OR jsonb_typeof(fill) <> 'object' THEN
        RAISE EXCEPTION 'a fill must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    lk := trading._locked_order(
        COALESCE(trading._text(fill, 'client_order_id', 'fill', 64), trading._text(fill, 'order_id', 'fill', 20)));
    acc := lk.acc;
    o := lk.o;
    broker_id := trading._text(fill, 'broker_fill_id', 'fill', 128);
    IF broker_id IS NULL OR broker_id = '' THEN
        RAISE EXCEPTION 'fill.broker_fill_id is required (it makes applying a fill idempotent)'
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF broker_id !~ '^[[:graph:]]([[:print:]]*[[:graph:]])?$' THEN
        RAISE EXCEPTION 'fill.broker_fill_id must be printable characters, not starting or ending with a space, got %',
            to_json(broker_id)::text USING ERRCODE = 'invalid_parameter_value';
    END IF;
    q := trading._num(fill, 'quantity', 'fill', 0, NULL, false);
    price := trading._num(fill, 'price', 'fill', 0, NULL, false);
    IF q IS NULL OR price IS NULL THEN
        RAISE EXCEPTION 'fill.quantity and fill.price are required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    commission := COALESCE(trading._num(fill, 'commission', 'fill', 0), 0);
    comm_ccy := upper(trading._text(fill, 'commission_currency', 'fill', 12));
    at := COALESCE(trading._ts(fill, 'ts', 'fill'), now());
    -- a live broker's fill cannot come before its order or from the future: a day's skew
    -- is allowed (a backtest's and a replay's fills are dated in market time, not now)
    IF acc.environment = 'live' AND (at > now() + interval '1 day'
                                     OR at < o.created_at - interval '1 day') THEN
        RAISE EXCEPTION 'fill.ts % is % its order % (created %): a broker clock or a wrong fill?',
            at, CASE WHEN at > now() THEN 'more than a day after now, for' ELSE 'more than a day before' END,
            o.order_id, o.created_at USING ERRCODE = 'invalid_parameter_value';
    END IF;
    liq := lower(trading._text(fill, 'liquidity', 'fill', 20));
    IF liq IS NOT NULL AND liq NOT IN ('maker', 'taker') THEN
        RAISE EXCEPTION 'fill.liquidity must be maker or taker, got %', to_json(liq)::text
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    SELECT * INTO inst FROM market.instruments i WHERE i.instrument_id = o.instrument_id;
    -- A fill the order can take, with a rate and a commission currency that are in order,
    -- is recorded at once: the unique constraint on (account, broker fill id) says whether
    -- it repeats one, whatever plan a lookup would have had.
    IF o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')
       AND q <= o.quantity - o.filled_quantity AND inst.contract_type <> 'inverse' THEN
        fx := CASE WHEN inst.quote_currency = acc.base_currency THEN 1
                   ELSE trading.fx_rate(inst.quote_currency, acc.base_currency, at) END;
        comm_acct := trading._commission_in_account(commission, comm_ccy, acc.base_currency,
                                                    inst.quote_currency, inst.base_currency,
                                                    price, fx);
        IF fx IS NOT NULL AND comm_acct IS NOT NULL THEN
            INSERT INTO trading.fills AS f (account_id, order_id, instrument_id, strategy_id,
                broker_fill_id, side, quantity, price, commission, commission_currency, liquidity, ts)
            VALUES (acc.account_id, o.order_id, o.instrument_id, o.strategy_id, broker_id, o.side, q,
                    price, comm_acct, acc.base_currency, liq, at)
            ON CONFLICT ON CONSTRAINT fills_broker_fill_id_unique DO NOTHING
            RETURNING f.fill_id INTO fid;
        END IF;
    END IF;

    IF fid IS NULL THEN
        -- a repeat, or a fill refused below (checked in the same order as before)
        SELECT * INTO prior FROM trading.fills f
        WHERE f.account_id = acc.account_id AND f.broker_fill_id = broker_id;
        IF prior.fill_id IS NULL THEN
            IF o.status NOT IN ('created', 'in_flight', 'submitted', 'partially_filled') THEN
                RAISE EXCEPTION 'order % is %: it takes no fills', o.order_id, o.status
                    USING ERRCODE = 'check_violation';
            END IF;
            IF q > o.quantity - o.filled_quantity THEN
                RAISE EXCEPTION 'fill quantity % exceeds the % remaining on order % (quantity %, filled %)',
                    q, o.quantity - o.filled_quantity, o.order_id, o.quantity, o.filled_quantity
                    USING ERRCODE = 'check_violation';
            END IF;
            IF inst.contract_type = 'inverse' THEN
                RAISE EXCEPTION 'inverse contracts are not supported by the ledger yet (%)', inst.symbol
                    USING ERRCODE = 'feature_not_supported';
            END IF;
        END IF;
        -- a repeated fill is compared in the account currency at the rate of its first arrival
        fx := CASE WHEN inst.quote_currency = acc.base_currency THEN 1
                   ELSE trading._fx_or_fail(inst.quote_currency, acc.base_currency, COALESCE(prior.ts, at)) END;
        comm_acct := trading._commission_in_account(commission, comm_ccy, acc.base_currency,
                                                    inst.quote_currency, inst.base_currency,
                                                    price, fx);
        IF comm_acct IS NULL THEN
            RAISE EXCEPTION 'fill.commission_currency % is neither the account currency % nor a currency of %',
                comm_ccy, acc.base_currency, inst.symbol USING ERRCODE = 'invalid_parameter_value';
        END IF;

        -- the same broker fill again: nothing changes
        IF prior.fill_id IS NOT NULL THEN
            IF prior.order_id <> o.order_id OR prior.quantity <> q OR prior.price <> price
               OR prior.commission <> comm_acct THEN
                RAISE EXCEPTION 'broker fill % was already recorded for order % with quantity % at % (commission % %); refusing different values',
                    quote_literal(broker_id), prior.order_id, prior.quantity, prior.price,
                    prior.commission, prior.commission_currency
                    USING ERRCODE = 'unique_violation';
            END IF;
            RETURN jsonb_build_object('status', 'duplicate', 'fill_id', prior.fill_id,
                                      'order_id', o.order_id, 'order_status', o.status);
        END IF;

        INSERT INTO trading.fills AS f (account_id, order_id, instrument_id, strategy_id, broker_fill_id,
            side, quantity, price, commission, commission_currency, liquidity, ts)
        VALUES (acc.account_id, o.order_id, o.instrument_id, o.strategy_id, broker_id, o.side, q, price,
                comm_acct, acc.base_currency, liq, at)
        RETURNING f.fill_id INTO fid;
    END IF;

    new_filled := o.filled_quantity + q;
    UPDATE trading.orders x
    SET filled_quantity = new_filled,
        average_fill_price = (COALESCE(x.average_fill_price, 0) * x.filled_quantity + price * q) / new_filled,
        status = CASE WHEN new_filled = x.quantity THEN 'filled' ELSE 'partially_filled' END::trading.order_status
    WHERE x.order_id = o.order_id;

    -- trading._position_key(acc, o), in place (a SQL function returning a record is never inlined)
    key_strategy := CASE WHEN acc.aggregation = 'independent' THEN o.strategy_id END;
    key_leg := CASE WHEN acc.position_mode = 'oneway' THEN 'net'::trading.position_leg
                    WHEN o.position_leg <> 'net' THEN o.position_leg
                    WHEN (o.side = 'buy') <> o.reduce_only THEN 'long'::trading.position_leg
                    ELSE 'short'::trading.position_leg END;
    d := CASE WHEN o.side = 'buy' THEN q ELSE -q END;
    -- the rows the fill moves, with their parts of it: one row, except for a manual
    -- reduce-only order on an independent account, which reduces the account's own row
    -- first and then the strategies' rows (oldest first): the account's net position is
    -- what a manual order works on (place_manual_order and the risk gate net every row)
    IF o.reduce_only AND o.strategy_id IS NULL AND acc.aggregation = 'independent' THEN
        FOR p IN SELECT * FROM trading.positions x
                 WHERE x.account_id = acc.account_id AND x.instrument_id = o.instrument_id
                   AND x.leg = key_leg AND sign(trading._signed_qty(x)) = -sign(d)
                 ORDER BY x.strategy_id IS NOT NULL, x.position_id FOR UPDATE
        LOOP
            EXIT WHEN q - COALESCE((SELECT sum(v) FROM unnest(part_qty) v), 0) <= 0;
            part_strategy := part_strategy || p.strategy_id;
            part_qty := part_qty || LEAST(abs(p.quantity),
                                          q - COALESCE((SELECT sum(v) FROM unnest(part_qty) v), 0));
        END LOOP;
        IF COALESCE((SELECT sum(v) FROM unnest(part_qty) v), 0) < q THEN
            RAISE EXCEPTION 'reduce-only order % cannot take a fill of % (position %): it would open or reverse a position',
                o.order_id, d, (SELECT COALESCE(sum(trading._signed_qty(x)), 0) FROM trading.positions x
                                WHERE x.account_id = acc.account_id AND x.instrument_id = o.instrument_id
                                  AND x.leg = key_leg) USING ERRCODE = 'check_violation';
        END IF;
    ELSE
        part_strategy := ARRAY[key_strategy];
        part_qty := ARRAY[q];
    END IF;

    FOR i IN 1 .. cardinality(part_qty) LOOP
        pd := CASE WHEN o.side = 'buy' THEN part_qty[i] ELSE -part_qty[i] END;
        -- the commission pro rata (the last part takes what is left: the parts sum exactly)
        pc := CASE WHEN i = cardinality(part_qty) THEN comm_acct - comm_done
                   ELSE comm_acct * part_qty[i] / q END;
        comm_done := comm_done + pc;
        closed := 0; gross := 0; entry_part := 0; exit_part := 0;
        -- the row, created when missing: an existing row is not inserted again (ON CONFLICT
        -- DO NOTHING), but the identity value that insert drew is still drawn, so that the
        -- ids of later positions are the same
        SELECT * INTO p FROM trading.positions x
        WHERE x.account_id = acc.account_id AND x.instrument_id = o.instrument_id
          AND x.strategy_id IS NOT DISTINCT FROM part_strategy[i] AND x.leg = key_leg FOR UPDATE;
        IF FOUND THEN
            PERFORM nextval('trading.positions_position_id_seq');
        ELSE
            INSERT INTO trading.positions (account_id, instrument_id, strategy_id, leg)
            VALUES (acc.account_id, o.instrument_id, part_strategy[i], key_leg)
            ON CONFLICT ON CONSTRAINT positions_unique DO NOTHING;
            SELECT * INTO p FROM trading.positions x
            WHERE x.account_id = acc.account_id AND x.instrument_id = o.instrument_id
              AND x.strategy_id IS NOT DISTINCT FROM part_strategy[i] AND x.leg = key_leg FOR UPDATE;
        END IF;

        s := trading._signed_qty(p);
        IF (key_leg = 'long' AND s + pd < 0) OR (key_leg = 'short' AND s + pd > 0) THEN
            RAISE EXCEPTION 'fill of % would take the % leg of % past zero (it holds %)',
                pd, key_leg, inst.symbol, abs(s) USING ERRCODE = 'check_violation';
        END IF;

        IF o.reduce_only AND (s = 0 OR sign(pd) = sign(s) OR abs(pd) > abs(s)) THEN
            RAISE EXCEPTION 'reduce-only order % cannot take a fill of % (position %): it would open or reverse a position',
                o.order_id, pd, s USING ERRCODE = 'check_violation';
        END IF;
        IF s <> 0 AND sign(pd) <> sign(s) THEN
            -- reduction (and perhaps a reversal)
            closed := LEAST(abs(pd), abs(s));
            gross := (price * fx - COALESCE(p.average_cost, p.average_price * fx)) * closed * sign(s);
            entry_part := p.open_commission * closed / abs(s);
            exit_part := pc * closed / abs(pd);
            INSERT INTO trading.trades (account_id, instrument_id, strategy_id, side, quantity,
                entry_time, entry_price, exit_time, exit_price, gross_pnl, commission, pnl,
                exit_fill_id, exit_trigger)
            VALUES (acc.account_id, inst.instrument_id,
                    COALESCE(p.strategy_id, p.entry_strategy_id, o.strategy_id),
                    CASE WHEN s > 0 THEN 'long' ELSE 'short' END, closed, COALESCE(p.opened_at, at),
                    p.average_price, at, price, gross, entry_part + exit_part,
                    gross - entry_part - exit_part, fid, o.trigger);
        END IF;
        remainder := abs(pd) - closed;

        UPDATE trading.positions x SET
            quantity = CASE WHEN key_leg = 'short' THEN -(s + pd) ELSE s + pd END,
            average_price = CASE
                WHEN s + pd = 0 THEN NULL
                WHEN remainder > 0 AND closed > 0 THEN price                              -- reversal
                WHEN remainder > 0 THEN (abs(s) * COALESCE(x.average_price, 0) + remainder * price) / (abs(s) + remainder)
                ELSE x.average_price END,
            average_cost = CASE
                WHEN s + pd = 0 THEN NULL
                WHEN remainder > 0 AND closed > 0 THEN price * fx
                WHEN remainder > 0 THEN (abs(s) * COALESCE(x.average_cost, 0) + remainder * price * fx) / (abs(s) + remainder)
                ELSE x.average_cost END,
            realized_pnl = x.realized_pnl + gross - entry_part - exit_part,
            commission_paid = x.commission_paid + pc,
            open_commission = CASE WHEN s + pd = 0 THEN 0
                                   WHEN closed > 0 AND remainder > 0 THEN pc * remainder / abs(pd)
                                   WHEN closed > 0 THEN x.open_commission - entry_part
                                   ELSE x.open_commission + pc END,
            last_price = CASE WHEN x.marked_at IS NULL OR at >= x.marked_at THEN price
                              ELSE x.last_price END,
            opened_at = CASE WHEN s + pd = 0 THEN NULL
                             WHEN s = 0 OR (closed > 0 AND remainder > 0) THEN at ELSE x.opened_at END,
            entry_strategy_id = CASE WHEN s + pd = 0 THEN NULL
                                     WHEN s = 0 OR (closed > 0 AND remainder > 0) THEN o.strategy_id
                                     ELSE x.entry_strategy_id END,
            stop_loss = CASE WHEN s + pd = 0 THEN NULL WHEN remainder > 0 THEN COALESCE(o.stop_loss, CASE WHEN closed = 0 THEN x.stop_loss END) ELSE x.stop_loss END,
            take_profit = CASE WHEN s + pd = 0 THEN NULL WHEN remainder > 0 THEN COALESCE(o.take_profit, CASE WHEN closed = 0 THEN x.take_profit END) ELSE x.take_profit END,
            trailing_stop = CASE WHEN s + pd = 0 THEN NULL WHEN remainder > 0 THEN COALESCE(o.trailing_stop, CASE WHEN closed = 0 THEN x.trailing_stop END) ELSE x.trailing_stop END,
            breakeven = CASE WHEN s + pd = 0 THEN NULL WHEN remainder > 0 THEN COALESCE(o.breakeven, CASE WHEN closed = 0 THEN x.breakeven END) ELSE x.breakeven END,
            trail_anchor = CASE WHEN s + pd = 0 THEN NULL
                                WHEN s = 0 OR (closed > 0 AND remainder > 0) THEN price
                                ELSE x.trail_anchor END,
            updated_at = now()
        WHERE x.position_id = p.position_id;
        realized := realized + gross - entry_part - exit_part;
    END LOOP;

    -- the account's other rows of the instrument (hedge legs, other strategies' rows) are
    -- marked at the same price, unless a bar marked them later than the fill
    UPDATE trading.positions x SET last_price = price
    WHERE x.account_id = acc.account_id AND x.instrument_id = o.instrument_id
      AND x.quantity <> 0 AND x.last_price IS DISTINCT FROM price
      AND (x.marked_at IS NULL OR at >= x.marked_at);

    UPDATE trading.accounts a SET cash = a.cash - d * price * fx - comm_acct,
                                  consecutive_rejections = 0
    WHERE a.account_id = acc.account_id;

    PERFORM audit.record('fill.applied', 'trading.fills', fid::text, jsonb_build_object(
        'order_id', o.order_id, 'broker_fill_id', broker_id, 'side', o.side, 'quantity', q,
        'price', price, 'commission', comm_acct, 'fx', fx, 'realized_pnl', realized));
    RETURN jsonb_build_object('status', 'applied', 'fill_id', fid, 'order_id', o.order_id,
        'order_status', CASE WHEN new_filled = o.quantity THEN 'filled' ELSE 'partially_filled' END,
        'position', CASE WHEN cardinality(part_qty) = 1 THEN s + pd ELSE
            (SELECT sum(trading._signed_qty(x)) FROM trading.positions x
             WHERE x.account_id = acc.account_id AND x.instrument_id = o.instrument_id AND x.leg = key_leg) END,
        'realized_pnl', realized);
END
$$;
