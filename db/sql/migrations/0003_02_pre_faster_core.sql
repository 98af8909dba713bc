-- 0003_02 (pre): the same trading core, cheaper per call. Every function keeps its
-- signature, results, rows, errors (message and SQLSTATE), audit events and locks; what
-- changes is how much work a call does. A backtest calls submit_signal and apply_fill
-- once per signal and fill, each in its own transaction, so a cost paid once per call or
-- once per transaction counts as much as the work itself:
--   * _ts checked every time with a capturing regexp_match (about 0.1 ms a call, twice
--     per signal and fill): a well-formed time is now recognised by one plain match and
--     cast; any other text takes the same checks as before;
--   * _emit_order sent the queue message through pgmq.send, which builds and plans its
--     INSERT as dynamic SQL on every call: it now inserts that same row itself;
--   * a signal on an independent account (the backtest's, the usual one) is written once,
--     with its outcome, instead of inserted as pending and then updated (the update
--     re-ran the table's 8 checks and, the row being the transaction's own, its 3 foreign
--     keys);
--   * SQL helpers that could not be inlined (SET search_path, a subquery body, a record
--     result) cost a SQL function call each (on PostgreSQL 15, a plan per call site and
--     transaction): account_equity and effective_limits lose the SET (their bodies are
--     parsed when they are created, so the search path never mattered to them) and the
--     planner inlines them into the callers' cached plans; the audit hash, the position
--     key and the breaker mode are computed in place; audit.record, _reserved_cash,
--     latest_close and atr are PL/pgSQL (planned once per session);
--   * generic plans: "at IS NULL OR ts <= at" (latest_close, atr, return_correlation)
--     could only filter the bars newer than at, which a backtest has all stored: the
--     bound is now an index condition;
--   * fewer statements: an existing position row is no longer re-inserted (ON CONFLICT DO
--     NOTHING; its identity value is still drawn), an account or an instrument is found
--     in one lookup, adjacent reads are one statement, the order's client id comes back
--     from its INSERT, same-currency conversions skip the rate lookup, the equity that
--     only limits read is computed when a limit needs it, and submit_signal asks the
--     risk check without a set-returning call.
SET LOCAL ROLE mmats_owner;

------------------------------------------------------------------------------ parsers
CREATE OR REPLACE FUNCTION trading._num(obj jsonb, field text, what text, lo numeric DEFAULT NULL,
                                        hi numeric DEFAULT NULL, lo_inclusive boolean DEFAULT true)
RETURNS numeric
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
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
        v := txt::numeric;
    ELSIF kind = 'null' THEN
        RETURN NULL;
    ELSE
        RAISE EXCEPTION '%.% must be a number, got %', what, field, raw
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

CREATE OR REPLACE FUNCTION trading._text(obj jsonb, field text, what text, max_length integer DEFAULT 200)
RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    raw jsonb := obj -> field;
    kind text;
    txt text;
BEGIN
    IF raw IS NULL THEN
        RETURN NULL;
    END IF;
    kind := jsonb_typeof(raw);
    IF kind = 'string' OR kind = 'number' THEN
        txt := raw #>> '{}';
        IF length(txt) > max_length THEN
            RAISE EXCEPTION '%.% is longer than % characters', what, field, max_length
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        RETURN txt;
    ELSIF kind = 'null' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION '%.% must be a string, got %', what, field, raw
        USING ERRCODE = 'invalid_parameter_value';
END
$$;

CREATE OR REPLACE FUNCTION trading._ts(obj jsonb, field text, what text) RETURNS timestamptz
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
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
    IF raw ~ '^(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])-(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])|(?:0[13-9]|1[0-2])-(?:29|30)|(?:0[13578]|1[02])-31)[T ](?:[01][0-9]|2[0-3]):[0-5][0-9](?::[0-5][0-9](?:\.[0-9]+)?)?(?:[zZ]|[+-][0-9]{2}(?::?[0-9]{2})?)$' THEN
        RETURN raw::timestamptz;
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

------------------------------------------------------------------------------ lookups
-- One statement: the account by name (locked at once when asked), else by number.
CREATE OR REPLACE FUNCTION trading._account(ref text, lock boolean DEFAULT false) RETURNS trading.accounts
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts;
BEGIN
    IF ref IS NULL THEN
        RAISE EXCEPTION 'an account is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- by name first, then by number; never one OR-ed condition (a generic plan would
    -- cast every name to bigint)
    IF lock THEN
        SELECT * INTO acc FROM trading.accounts a WHERE a.name = ref FOR UPDATE;
        IF NOT FOUND AND ref ~ '^\d{1,18}$' THEN
            SELECT * INTO acc FROM trading.accounts a WHERE a.account_id = ref::bigint FOR UPDATE;
        END IF;
    ELSE
        SELECT * INTO acc FROM trading.accounts a WHERE a.name = ref;
        IF NOT FOUND AND ref ~ '^\d{1,18}$' THEN
            SELECT * INTO acc FROM trading.accounts a WHERE a.account_id = ref::bigint;
        END IF;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown account %', quote_literal(ref)
            USING ERRCODE = 'foreign_key_violation',
                  HINT = 'create it with trading.create_account() or `mmats account create`';
    END IF;
    RETURN acc;
END
$$;

-- One statement: the instrument and whether the symbol is ambiguous (an index lookup
-- when the venue is named).
CREATE OR REPLACE FUNCTION market._instrument(symbol text, venue text DEFAULT NULL)
RETURNS market.instruments
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    inst market.instruments;
    n integer := 0;
BEGIN
    IF symbol IS NULL THEN
        RAISE EXCEPTION 'a symbol is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF _instrument.venue IS NULL THEN
        FOR inst IN SELECT * FROM market.instruments i WHERE i.symbol = upper(_instrument.symbol) LOOP
            n := n + 1;
            EXIT WHEN n > 1;
        END LOOP;
    ELSE
        SELECT * INTO inst FROM market.instruments i
        WHERE i.venue = _instrument.venue AND i.symbol = upper(_instrument.symbol);
        IF FOUND THEN
            n := 1;
        END IF;
    END IF;
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
    RETURN inst;
END
$$;

------------------------------------------------------------------------------ audit
-- PL/pgSQL rather than SQL: its INSERT is planned once per session (a SQL function is
-- planned again in every transaction on PostgreSQL 15).
CREATE OR REPLACE FUNCTION audit.record(event_type text, entity text, entity_id text,
                                        payload jsonb DEFAULT '{}') RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    id bigint;
BEGIN
    INSERT INTO audit.events AS e (event_type, entity, entity_id, payload, actor, hash)
    VALUES (event_type, entity, entity_id, COALESCE(payload, '{}'), session_user, '\x'::bytea)
    RETURNING e.event_id INTO id;
    RETURN id;
END
$$;

-- The hash is audit.event_hash's expression, written out: that SQL function is declared
-- IMMUTABLE over STABLE parts, so the planner never inlines it and every event paid a
-- SQL function call. audit.verify_chain() still checks every row with audit.event_hash.
CREATE OR REPLACE FUNCTION audit.chain_event() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    prev bytea;
BEGIN
    SELECT h.last_hash INTO prev FROM audit.chain_head h FOR UPDATE;
    NEW.event_id := nextval('audit.events_event_id_seq');
    NEW.ts := clock_timestamp();
    NEW.actor := COALESCE(NEW.actor, session_user);
    NEW.prev_hash := prev;
    NEW.hash := sha256(COALESCE(NEW.prev_hash, '\x'::bytea) || convert_to(
        jsonb_build_array(NEW.event_id::text,
                          to_char(NEW.ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                          NEW.actor, NEW.event_type, NEW.entity, NEW.entity_id, NEW.payload)::text,
        'UTF8'));
    UPDATE audit.chain_head SET last_event_id = NEW.event_id, last_hash = NEW.hash;
    RETURN NEW;
END
$$;

------------------------------------------------------------------------------ prices
-- PL/pgSQL (planned once per session; as SQL functions these cost 0.05-0.1 ms a call),
-- with the time bound an index condition: the generic plan of "at IS NULL OR ts <= at"
-- can only filter, reading every newer bar first, and a backtest has stored them all.
CREATE OR REPLACE FUNCTION market.latest_close(instrument bigint, at timestamptz DEFAULT NULL)
RETURNS numeric
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT b.close FROM market.bars b
            WHERE b.instrument_id = latest_close.instrument
              AND b.ts <= COALESCE(latest_close.at, 'infinity')
            ORDER BY b.ts DESC LIMIT 1);
END
$$;

CREATE OR REPLACE FUNCTION market.atr(instrument bigint, tf market.timeframe, period integer,
                                      at timestamptz DEFAULT NULL) RETURNS numeric
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (
        WITH recent AS (
            SELECT b.ts, b.high, b.low, b.close FROM market.bars b
            WHERE b.instrument_id = atr.instrument AND b.timeframe = atr.tf
              AND b.ts <= COALESCE(atr.at, 'infinity')
            ORDER BY b.ts DESC LIMIT atr.period + 1),
        tr AS (
            SELECT GREATEST(r.high - r.low, abs(r.high - lag(r.close) OVER w),
                            abs(r.low - lag(r.close) OVER w)) AS true_range,
                   lag(r.close) OVER w AS prev_close
            FROM recent r WINDOW w AS (ORDER BY r.ts))
        SELECT CASE WHEN count(*) >= atr.period THEN avg(t.true_range) END
        FROM tr t WHERE t.prev_close IS NOT NULL);
END
$$;

------------------------------------------------------------------------------ equity, limits
-- Without SET search_path (these bodies are parsed when created: no name in them is
-- looked up at run time), so that the planner inlines them into the calling query. A
-- position quoted in the account's currency is worth its quantity at its price: no rate
-- lookup (fx_rate answers 1 for a currency to itself).
CREATE OR REPLACE FUNCTION trading.account_equity(account bigint)
RETURNS TABLE (cash numeric, positions_value numeric, gross_exposure numeric, equity numeric)
LANGUAGE sql STABLE
BEGIN ATOMIC
    WITH v AS (
        SELECT trading._signed_qty(p) * COALESCE(p.last_price, p.average_price)
               * CASE WHEN i.quote_currency = a.base_currency THEN 1
                      ELSE COALESCE(trading.fx_rate(i.quote_currency, a.base_currency, NULL), 0) END AS value
        FROM trading.positions p
        JOIN market.instruments i USING (instrument_id)
        JOIN trading.accounts a USING (account_id)
        WHERE p.account_id = account AND p.quantity <> 0)
    SELECT a.cash, COALESCE((SELECT sum(value) FROM v), 0),
           COALESCE((SELECT sum(abs(value)) FROM v), 0),
           a.cash + COALESCE((SELECT sum(value) FROM v), 0)
    FROM trading.accounts a WHERE a.account_id = account;
END;

CREATE OR REPLACE FUNCTION risk.effective_limits(account bigint) RETURNS SETOF risk.limits
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT DISTINCT ON (l.scope, l.scope_key, l.limit_type) l.*
    FROM risk.limits l, trading.accounts a
    WHERE a.account_id = effective_limits.account AND l.enabled
      AND (l.account_id = a.account_id OR l.account_id IS NULL)
      AND (l.environment = a.environment OR l.environment IS NULL)
    ORDER BY l.scope, l.scope_key, l.limit_type, (l.account_id IS NULL), (l.environment IS NULL);
END;

-- PL/pgSQL: planned once per session (the SQL function is never inlined: its body is a
-- subquery).
CREATE OR REPLACE FUNCTION trading._reserved_cash(acc trading.accounts) RETURNS numeric
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN COALESCE((
        SELECT sum((o.quantity - o.filled_quantity)
                   * COALESCE(o.limit_price, o.reference_price, market.latest_close(o.instrument_id))
                   * CASE WHEN i.quote_currency = acc.base_currency THEN 1
                          ELSE COALESCE(trading.fx_rate(i.quote_currency, acc.base_currency, NULL), 1) END
                   * (1 + acc.taker_fee))
        FROM trading.orders o JOIN market.instruments i USING (instrument_id)
        WHERE o.account_id = acc.account_id AND o.side = 'buy' AND NOT o.reduce_only
          AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')), 0);
END
$$;

------------------------------------------------------------------------------ orders
-- The order's client id comes back from its INSERT, and the queue message is the row
-- pgmq.send('orders', msg) inserts (vt = clock_timestamp(), no headers), written
-- directly: pgmq.send builds and plans that INSERT as dynamic SQL on every call.
CREATE OR REPLACE FUNCTION trading._emit_order(acc trading.accounts, inst market.instruments,
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
                                               client_order_id text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    id bigint;
    coid text;
BEGIN
    INSERT INTO trading.orders AS o (account_id, instrument_id, strategy_id, signal_id,
        client_order_id, side, order_type, time_in_force, quantity, limit_price, stop_price,
        expire_at, reduce_only, position_leg, trigger, trigger_price, stop_loss, take_profit,
        trailing_stop, breakeven, reference_price)
    VALUES (acc.account_id, inst.instrument_id, strategy_id, signal_id,
        COALESCE(client_order_id, 'mm' || acc.account_id || '-' || nextval('trading.client_order_seq')),
        side, order_type, tif, qty, limit_price, stop_price, expire_at, reduce_only, leg, trig,
        trigger_price, stop_loss, take_profit, trailing_stop, breakeven, reference_price)
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

------------------------------------------------------------------------------ the check
-- risk.check_order's body as a plain function (a code and a reason, both NULL when the
-- order may go): submit_signal calls it directly, without a set-returning call's
-- tuplestore. risk.check_order answers from it, as before.
CREATE FUNCTION risk._check_order(acc trading.accounts, strat trading.strategies,
                                  inst market.instruments, side trading.order_side,
                                  qty numeric, opening numeric, price numeric,
                                  stop_loss numeric, at timestamptz,
                                  OUT code text, OUT reason text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
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

-- Returns no row when the order may go; otherwise one row: the first denial.
-- opening: the quantity that opens or increases exposure (0 for a pure reduction, which
-- only FREEZE stops). position_strategy: the strategy whose position this is (NULL: net).
CREATE OR REPLACE FUNCTION risk.check_order(acc trading.accounts, strat trading.strategies,
                                            inst market.instruments, side trading.order_side,
                                            qty numeric, opening numeric, price numeric,
                                            stop_loss numeric, at timestamptz)
RETURNS TABLE (code text, reason text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    d record;
BEGIN
    d := risk._check_order(acc, strat, inst, side, qty, opening, price, stop_loss, at);
    IF d.code IS NOT NULL THEN
        code := d.code;
        reason := d.reason;
        RETURN NEXT;
    END IF;
END
$$;

-- As before, with the time bound of the last-bar lookups an index condition (see
-- market.latest_close).
CREATE OR REPLACE FUNCTION risk.return_correlation(a bigint, b bigint, tf market.timeframe,
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
    WHERE x.instrument_id = lo AND x.timeframe = tf AND x.ts <= COALESCE(at, 'infinity')
    ORDER BY x.ts DESC LIMIT 1;
    SELECT x.ts INTO hi_ts FROM market.bars x
    WHERE x.instrument_id = hi AND x.timeframe = tf AND x.ts <= COALESCE(at, 'infinity')
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


------------------------------------------------------------------------------ signals
-- The one way a strategy's intent becomes an order. See the README for the JSON shape.
-- On an independent account nothing reads the signal row before its outcome is known
-- (the votes of the other aggregation modes do), so the row is written once, with its
-- outcome, under the id its INSERT would have drawn at that point; an approved signal is
-- written before its order (which refers to it). Hedge-mode closes and the other
-- aggregation modes insert it as pending and settle it with _finish_signal, as before.
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

        price := COALESCE(trading._num(signal, 'price', 'signal', 0, NULL, false),
                          market.latest_close(inst.instrument_id, at));
        IF price IS NULL THEN
            f_status := 'rejected'; f_code := 'NO_PRICE';
            f_reason := format('NO_PRICE: no bar for %s at or before %s to size the order', inst.symbol, at);
            EXIT decide;
        END IF;
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
        IF opening > 0 AND ((target > 0 AND (sl >= price OR tp <= price))
                            OR (target < 0 AND (sl <= price OR tp >= price))) THEN
            f_status := 'rejected'; f_code := 'INVALID_PROTECTION';
            f_reason := format('INVALID_PROTECTION: side=%s, price=%s, stop_loss=%s, take_profit=%s',
                               CASE WHEN target > 0 THEN 'long' ELSE 'short' END, price,
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

------------------------------------------------------------------------------ fills
-- As before, with the position key computed in place, the same-currency rate without a
-- lookup, and an existing position row locked without being inserted again first.
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
    END IF;
    q := trading._num(fill, 'quantity', 'fill', 0, NULL, false);
    price := trading._num(fill, 'price', 'fill', 0, NULL, false);
    IF q IS NULL OR price IS NULL THEN
        RAISE EXCEPTION 'fill.quantity and fill.price are required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    commission := COALESCE(trading._num(fill, 'commission', 'fill', 0), 0);
    comm_ccy := upper(trading._text(fill, 'commission_currency', 'fill', 12));
    at := COALESCE(trading._ts(fill, 'ts', 'fill'), now());

    SELECT * INTO inst FROM market.instruments i WHERE i.instrument_id = o.instrument_id;
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
    comm_acct := CASE WHEN comm_ccy IS NULL OR comm_ccy = acc.base_currency THEN commission
                      WHEN comm_ccy = inst.quote_currency THEN commission * fx
                      WHEN comm_ccy = inst.base_currency THEN commission * price * fx
                      ELSE NULL END;
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
            comm_acct, acc.base_currency, trading._text(fill, 'liquidity', 'fill', 5), at)
    RETURNING f.fill_id INTO fid;

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
            last_price = price,
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


------------------------------------------------------------------------------ grants
REVOKE ALL ON FUNCTION risk._check_order(trading.accounts, trading.strategies, market.instruments,
    trading.order_side, numeric, numeric, numeric, numeric, timestamptz) FROM PUBLIC;
