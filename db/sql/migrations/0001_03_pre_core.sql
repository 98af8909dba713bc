-- 0001_03 (pre): the core tables and the guarantees they keep by themselves.
-- Owned by mmats_owner; nobody else writes these tables directly.
SET LOCAL ROLE mmats_owner;

------------------------------------------------------------------------------ types
CREATE TYPE market.market_type AS ENUM ('crypto', 'forex', 'stock');
CREATE TYPE market.contract_type AS ENUM ('spot', 'linear', 'inverse');
CREATE TYPE market.timeframe AS ENUM ('1m', '5m', '15m', '1h', '4h', '1d', '1w');

CREATE TYPE trading.environment AS ENUM ('backtest', 'paper', 'live');
CREATE TYPE trading.account_mode AS ENUM ('advisory', 'operator');
CREATE TYPE trading.position_mode AS ENUM ('oneway', 'hedge');
CREATE TYPE trading.aggregation_mode AS ENUM ('consensus', 'weighted', 'priority', 'independent');
CREATE TYPE trading.signal_action AS ENUM ('buy', 'sell', 'close', 'hold');
CREATE TYPE trading.signal_status AS ENUM ('pending', 'advisory', 'approved', 'rejected', 'ignored');
CREATE TYPE trading.order_side AS ENUM ('buy', 'sell');
CREATE TYPE trading.order_type AS ENUM ('market', 'limit', 'stop', 'stop_limit');
CREATE TYPE trading.time_in_force AS ENUM ('GTC', 'IOC', 'FOK', 'GTD');
-- in_flight: sent to the broker (or a cancel was sent) and its answer is not yet known
CREATE TYPE trading.order_status AS ENUM (
    'created', 'in_flight', 'submitted', 'partially_filled', 'filled', 'cancelled',
    'rejected', 'expired');
CREATE TYPE trading.position_leg AS ENUM ('net', 'long', 'short');

CREATE TYPE risk.limit_scope AS ENUM ('global', 'market', 'strategy', 'symbol');
CREATE TYPE risk.breaker_mode AS ENUM ('OK', 'SOFT', 'HARD', 'FREEZE');
CREATE TYPE risk.severity AS ENUM ('info', 'warning', 'critical');

------------------------------------------------------------------------------ helpers
CREATE FUNCTION market.timeframe_interval(tf market.timeframe) RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE tf WHEN '1m' THEN interval '1 minute' WHEN '5m' THEN interval '5 minutes'
               WHEN '15m' THEN interval '15 minutes' WHEN '1h' THEN interval '1 hour'
               WHEN '4h' THEN interval '4 hours' WHEN '1d' THEN interval '1 day'
               WHEN '1w' THEN interval '7 days' END;

------------------------------------------------------------------------------ market
-- A session calendar: when an instrument trades, in its exchange's own time zone.
-- Holidays are rows of market.calendar_holidays (kept by the calendar module).
CREATE TABLE market.calendars (
    calendar_id  text PRIMARY KEY CONSTRAINT calendars_id_format
                     CHECK (calendar_id ~ '^[A-Z0-9][A-Z0-9_]{1,31}$'),
    timezone     text NOT NULL,
    open_time    time NOT NULL,
    close_time   time NOT NULL,
    -- ISO weekdays (1 = Monday) on which a session opens
    weekdays     smallint[] NOT NULL CONSTRAINT calendars_weekdays_valid
                     CHECK (weekdays <@ ARRAY[1, 2, 3, 4, 5, 6, 7]::smallint[]
                            AND cardinality(weekdays) > 0),
    -- a session that crosses midnight (forex: Sunday 17:00 to Friday 17:00 New York)
    -- closes on the next day; continuous = trades around the clock on its weekdays
    continuous   boolean NOT NULL DEFAULT false,
    description  text NOT NULL
);

INSERT INTO market.calendars VALUES
    ('CRYPTO_24X7', 'UTC', '00:00', '00:00', ARRAY[1, 2, 3, 4, 5, 6, 7]::smallint[], true,
     'crypto: every day, around the clock'),
    ('FX_24X5', 'America/New_York', '17:00', '17:00', ARRAY[7, 1, 2, 3, 4]::smallint[], true,
     'forex: from Sunday 17:00 to Friday 17:00 New York time'),
    ('XNYS', 'America/New_York', '09:30', '16:00', ARRAY[1, 2, 3, 4, 5]::smallint[], false,
     'NYSE/Nasdaq regular session, Monday to Friday 09:30-16:00 New York time');

CREATE TABLE market.calendar_holidays (
    calendar_id  text NOT NULL REFERENCES market.calendars,
    day          date NOT NULL,
    name         text NOT NULL,
    -- an early close (e.g. 13:00 on the day after Thanksgiving); NULL = closed all day
    early_close  time,
    PRIMARY KEY (calendar_id, day)
);

CREATE TABLE market.instruments (
    instrument_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    symbol           text NOT NULL CONSTRAINT instruments_symbol_format
                         CHECK (symbol ~ '^[A-Z0-9][A-Z0-9._:/-]{0,39}$'),
    venue            text NOT NULL CONSTRAINT instruments_venue_format
                         CHECK (venue ~ '^[a-z0-9][a-z0-9._-]{0,31}$'),
    market           market.market_type NOT NULL,
    base_currency    text NOT NULL CONSTRAINT instruments_base_currency_format
                         CHECK (base_currency ~ '^[A-Z0-9]{1,12}$'),
    quote_currency   text NOT NULL CONSTRAINT instruments_quote_currency_format
                         CHECK (quote_currency ~ '^[A-Z0-9]{2,12}$'),
    contract_type    market.contract_type NOT NULL DEFAULT 'spot',
    price_tick       numeric NOT NULL CONSTRAINT instruments_price_tick_positive
                         CHECK (price_tick > 0 AND price_tick < 'Infinity'),
    quantity_step    numeric NOT NULL CONSTRAINT instruments_quantity_step_positive
                         CHECK (quantity_step > 0 AND quantity_step < 'Infinity'),
    min_quantity     numeric NOT NULL DEFAULT 0 CONSTRAINT instruments_min_quantity_nonnegative
                         CHECK (min_quantity >= 0 AND min_quantity < 'Infinity'),
    calendar_id      text NOT NULL REFERENCES market.calendars,
    active           boolean NOT NULL DEFAULT true,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT instruments_venue_symbol_unique UNIQUE (venue, symbol),
    CONSTRAINT instruments_stock_is_spot CHECK (market <> 'stock' OR contract_type = 'spot')
);
COMMENT ON CONSTRAINT instruments_symbol_format ON market.instruments IS
    'a symbol is 1-40 characters: upper-case letters, digits and . _ : / -, starting with a letter or digit';
COMMENT ON CONSTRAINT instruments_base_currency_format ON market.instruments IS
    'a base currency or asset is 1-12 upper-case letters or digits (a stock''s ticker, e.g. F)';
COMMENT ON CONSTRAINT instruments_quote_currency_format ON market.instruments IS
    'a quote currency is 2-12 upper-case letters or digits';
COMMENT ON CONSTRAINT instruments_venue_format ON market.instruments IS
    'a venue is 1-32 characters: lower-case letters, digits and . _ -';
COMMENT ON CONSTRAINT instruments_venue_symbol_unique ON market.instruments IS
    'an instrument with this symbol already exists on this venue';

-- One row per (instrument, timeframe, time). Prices and volume are exact numerics.
-- Becomes a hypertable on ts where TimescaleDB is present (see 0001_05); nothing may
-- reference it by foreign key, so that its chunks can be compressed and dropped.
CREATE TABLE market.bars (
    instrument_id  bigint NOT NULL REFERENCES market.instruments,
    timeframe      market.timeframe NOT NULL,
    ts             timestamptz NOT NULL,
    open           numeric NOT NULL,
    high           numeric NOT NULL,
    low            numeric NOT NULL,
    close          numeric NOT NULL,
    volume         numeric NOT NULL DEFAULT 0,
    CONSTRAINT bars_pkey PRIMARY KEY (instrument_id, timeframe, ts),
    CONSTRAINT bars_prices_positive CHECK (open > 0 AND high > 0 AND low > 0 AND close > 0),
    CONSTRAINT bars_low_le_open_close CHECK (low <= LEAST(open, close)),
    CONSTRAINT bars_high_ge_open_close CHECK (high >= GREATEST(open, close)),
    CONSTRAINT bars_volume_nonnegative CHECK (volume >= 0),
    -- NaN compares greater than every number in PostgreSQL (and numeric has had
    -- Infinity since PostgreSQL 14), so the checks above would let a NaN or infinite high
    -- through; refuse them explicitly. Throughout this schema, "x NOT IN ('NaN',
    -- 'Infinity', '-Infinity')" or "x < 'Infinity'" (with x > 0) means: x is a finite number.
    CONSTRAINT bars_no_nan CHECK (open < 'Infinity' AND high < 'Infinity' AND low < 'Infinity'
                                  AND close < 'Infinity' AND volume < 'Infinity')
);
COMMENT ON CONSTRAINT bars_prices_positive ON market.bars IS 'open, high, low and close must be > 0';
COMMENT ON CONSTRAINT bars_low_le_open_close ON market.bars IS 'low must be <= open and <= close';
COMMENT ON CONSTRAINT bars_high_ge_open_close ON market.bars IS 'high must be >= open and >= close';
COMMENT ON CONSTRAINT bars_volume_nonnegative ON market.bars IS 'volume must be >= 0';
COMMENT ON CONSTRAINT bars_no_nan ON market.bars IS
    'prices and volume must be finite numbers, not NaN or Infinity';
COMMENT ON CONSTRAINT bars_pkey ON market.bars IS
    'a bar for this instrument, timeframe and time already exists';
CREATE INDEX bars_ts_idx ON market.bars (ts DESC);

-- Rows an import refused, kept for inspection (with --skip-bad).
CREATE TABLE market.bar_quarantine (
    quarantine_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    import_id      bigint NOT NULL,
    row_number     integer NOT NULL,
    raw            jsonb NOT NULL,
    reason         text NOT NULL,
    quarantined_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE market.imports (
    import_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instrument_id    bigint NOT NULL REFERENCES market.instruments,
    timeframe        market.timeframe NOT NULL,
    file_name        text NOT NULL,
    file_sha256      text NOT NULL CONSTRAINT imports_sha256_format
                         CHECK (file_sha256 ~ '^[0-9a-f]{64}$'),
    rows_read        integer NOT NULL CHECK (rows_read >= 0),
    rows_inserted    integer NOT NULL CHECK (rows_inserted >= 0),
    rows_unchanged   integer NOT NULL CHECK (rows_unchanged >= 0),
    rows_quarantined integer NOT NULL CHECK (rows_quarantined >= 0),
    first_ts         timestamptz,
    last_ts          timestamptz,
    imported_at      timestamptz NOT NULL DEFAULT now(),
    imported_by      text NOT NULL DEFAULT session_user
);
ALTER TABLE market.bar_quarantine
    ADD CONSTRAINT bar_quarantine_import_fk FOREIGN KEY (import_id) REFERENCES market.imports;

------------------------------------------------------------------------------ trading
CREATE TABLE trading.accounts (
    account_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text NOT NULL CONSTRAINT accounts_name_format
                        CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    environment     trading.environment NOT NULL,
    mode            trading.account_mode NOT NULL DEFAULT 'advisory',
    base_currency   text NOT NULL CONSTRAINT accounts_currency_format
                        CHECK (base_currency ~ '^[A-Z0-9]{2,12}$'),
    starting_cash   numeric NOT NULL CONSTRAINT accounts_starting_cash_nonnegative
                        CHECK (starting_cash >= 0 AND starting_cash < 'Infinity'),
    cash            numeric NOT NULL CONSTRAINT accounts_cash_is_number
                        CHECK (cash NOT IN ('NaN', 'Infinity', '-Infinity')),
    position_mode   trading.position_mode NOT NULL DEFAULT 'oneway',
    aggregation     trading.aggregation_mode NOT NULL DEFAULT 'independent',
    allow_short     boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT accounts_name_unique UNIQUE (name)
);
COMMENT ON CONSTRAINT accounts_name_format ON trading.accounts IS
    'an account name is 1-64 characters: letters, digits and _ . -';
COMMENT ON CONSTRAINT accounts_name_unique ON trading.accounts IS
    'an account with this name already exists';

CREATE TABLE trading.strategies (
    strategy_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         text NOT NULL CONSTRAINT strategies_name_format
                     CHECK (name ~ '^[A-Za-z][A-Za-z0-9_.-]{0,63}$'),
    version      text NOT NULL DEFAULT '1' CONSTRAINT strategies_version_format
                     CHECK (version ~ '^[A-Za-z0-9][A-Za-z0-9_.+-]{0,31}$'),
    parameters   jsonb NOT NULL DEFAULT '{}' CONSTRAINT strategies_parameters_object
                     CHECK (jsonb_typeof(parameters) = 'object'),
    enabled      boolean NOT NULL DEFAULT true,
    priority     integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN -1000 AND 1000),
    weight       numeric NOT NULL DEFAULT 1 CONSTRAINT strategies_weight_range
                     CHECK (weight >= 0 AND weight <= 1000),
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT strategies_name_version_unique UNIQUE (name, version)
);

CREATE TABLE trading.signals (
    signal_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id     bigint NOT NULL REFERENCES trading.accounts,
    strategy_id    bigint NOT NULL REFERENCES trading.strategies,
    instrument_id  bigint NOT NULL REFERENCES market.instruments,
    ts             timestamptz NOT NULL,
    action         trading.signal_action NOT NULL,
    size           numeric CONSTRAINT signals_size_fraction CHECK (size >= 0 AND size <= 1),
    stop_loss      numeric CONSTRAINT signals_stop_loss_positive
                       CHECK (stop_loss > 0 AND stop_loss < 'Infinity'),
    take_profit    numeric CONSTRAINT signals_take_profit_positive
                       CHECK (take_profit > 0 AND take_profit < 'Infinity'),
    trailing_stop  numeric CONSTRAINT signals_trailing_stop_positive
                       CHECK (trailing_stop > 0 AND trailing_stop < 'Infinity'),
    confidence     numeric CONSTRAINT signals_confidence_fraction CHECK (confidence >= 0 AND confidence <= 1),
    reasoning      text CONSTRAINT signals_reasoning_length CHECK (length(reasoning) <= 4000),
    metadata       jsonb NOT NULL DEFAULT '{}' CONSTRAINT signals_metadata_object
                       CHECK (jsonb_typeof(metadata) = 'object'),
    status         trading.signal_status NOT NULL DEFAULT 'pending',
    reason_code    text CONSTRAINT signals_reason_code_format
                       CHECK (reason_code ~ '^[A-Z][A-Z0-9_]{0,63}$'),
    reason         text,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX signals_account_ts_idx ON trading.signals (account_id, ts DESC);
CREATE INDEX signals_strategy_idx ON trading.signals (strategy_id, ts DESC);

CREATE TABLE trading.orders (
    order_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id         bigint NOT NULL REFERENCES trading.accounts,
    instrument_id      bigint NOT NULL REFERENCES market.instruments,
    -- NULL only for manual orders; every strategy-owned order names its strategy
    strategy_id        bigint REFERENCES trading.strategies,
    signal_id          bigint REFERENCES trading.signals,
    client_order_id    text NOT NULL CONSTRAINT orders_client_order_id_format
                           CHECK (client_order_id ~ '^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$'),
    broker_order_id    text CONSTRAINT orders_broker_order_id_length
                           CHECK (length(broker_order_id) BETWEEN 1 AND 128),
    side               trading.order_side NOT NULL,
    order_type         trading.order_type NOT NULL,
    time_in_force      trading.time_in_force NOT NULL DEFAULT 'GTC',
    quantity           numeric NOT NULL CONSTRAINT orders_quantity_positive
                           CHECK (quantity > 0 AND quantity < 'Infinity'),
    limit_price        numeric CONSTRAINT orders_limit_price_positive
                           CHECK (limit_price > 0 AND limit_price < 'Infinity'),
    stop_price         numeric CONSTRAINT orders_stop_price_positive
                           CHECK (stop_price > 0 AND stop_price < 'Infinity'),
    expire_at          timestamptz,
    reduce_only        boolean NOT NULL DEFAULT false,
    status             trading.order_status NOT NULL DEFAULT 'created',
    filled_quantity    numeric NOT NULL DEFAULT 0,
    average_fill_price numeric CHECK (average_fill_price > 0 AND average_fill_price < 'Infinity'),
    reason_code        text CONSTRAINT orders_reason_code_format
                           CHECK (reason_code ~ '^[A-Z][A-Z0-9_]{0,63}$'),
    reason             text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT orders_client_order_id_unique UNIQUE (client_order_id),
    CONSTRAINT orders_broker_order_id_unique UNIQUE (account_id, broker_order_id),
    CONSTRAINT orders_limit_price_required
        CHECK ((order_type IN ('limit', 'stop_limit')) = (limit_price IS NOT NULL)),
    CONSTRAINT orders_stop_price_required
        CHECK ((order_type IN ('stop', 'stop_limit')) = (stop_price IS NOT NULL)),
    CONSTRAINT orders_gtd_needs_expiry CHECK ((time_in_force = 'GTD') = (expire_at IS NOT NULL)),
    CONSTRAINT orders_filled_within_quantity
        CHECK (filled_quantity >= 0 AND filled_quantity <= quantity)
);
COMMENT ON CONSTRAINT orders_limit_price_required ON trading.orders IS
    'limit and stop_limit orders need a limit price; market and stop orders must not have one';
COMMENT ON CONSTRAINT orders_stop_price_required ON trading.orders IS
    'stop and stop_limit orders need a stop price; market and limit orders must not have one';
COMMENT ON CONSTRAINT orders_gtd_needs_expiry ON trading.orders IS
    'a GTD order needs expire_at, and only a GTD order may have one';
COMMENT ON CONSTRAINT orders_filled_within_quantity ON trading.orders IS
    'the filled quantity must be between 0 and the order quantity';
COMMENT ON CONSTRAINT orders_client_order_id_unique ON trading.orders IS
    'an order with this client order id already exists';
CREATE INDEX orders_account_status_idx ON trading.orders (account_id, status);
CREATE INDEX orders_open_idx ON trading.orders (account_id)
    WHERE status IN ('created', 'in_flight', 'submitted', 'partially_filled');

-- The legal order-status transitions. The trigger below refuses any other.
CREATE TABLE trading.order_transitions (
    from_status  trading.order_status NOT NULL,
    to_status    trading.order_status NOT NULL,
    PRIMARY KEY (from_status, to_status)
);
INSERT INTO trading.order_transitions (from_status, to_status) VALUES
    ('created', 'in_flight'), ('created', 'submitted'), ('created', 'rejected'),
    ('created', 'cancelled'),
    ('in_flight', 'submitted'), ('in_flight', 'partially_filled'), ('in_flight', 'filled'),
    ('in_flight', 'rejected'), ('in_flight', 'cancelled'), ('in_flight', 'expired'),
    ('submitted', 'in_flight'), ('submitted', 'partially_filled'), ('submitted', 'filled'),
    ('submitted', 'cancelled'), ('submitted', 'rejected'), ('submitted', 'expired'),
    ('partially_filled', 'partially_filled'), ('partially_filled', 'in_flight'),
    ('partially_filled', 'filled'), ('partially_filled', 'cancelled'),
    ('partially_filled', 'expired');

CREATE FUNCTION trading.check_order_transition() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status <> 'created' THEN
            RAISE EXCEPTION 'a new order must start in state created, not %', NEW.status
                USING ERRCODE = 'check_violation', CONSTRAINT = 'order_status_transition';
        END IF;
        RETURN NEW;
    END IF;
    IF NEW.status IS DISTINCT FROM OLD.status
       OR (NEW.status = 'partially_filled' AND NEW.filled_quantity <> OLD.filled_quantity) THEN
        IF NOT EXISTS (SELECT 1 FROM trading.order_transitions t
                       WHERE t.from_status = OLD.status AND t.to_status = NEW.status) THEN
            RAISE EXCEPTION 'illegal order transition % -> % (order %)',
                            OLD.status, NEW.status, OLD.order_id
                USING ERRCODE = 'check_violation', CONSTRAINT = 'order_status_transition',
                      HINT = 'the legal transitions are the rows of trading.order_transitions';
        END IF;
    END IF;
    -- fills are append-only, so the filled quantity only grows; a finished order keeps
    -- the quantities it finished with
    IF NEW.filled_quantity < OLD.filled_quantity THEN
        RAISE EXCEPTION 'order %: the filled quantity cannot decrease (% -> %)',
                        OLD.order_id, OLD.filled_quantity, NEW.filled_quantity
            USING ERRCODE = 'check_violation', CONSTRAINT = 'order_filled_quantity_monotonic';
    END IF;
    IF OLD.status IN ('filled', 'cancelled', 'rejected', 'expired')
       AND (NEW.filled_quantity <> OLD.filled_quantity OR NEW.quantity <> OLD.quantity) THEN
        RAISE EXCEPTION 'order % is %: its quantity and filled quantity cannot change',
                        OLD.order_id, OLD.status
            USING ERRCODE = 'check_violation', CONSTRAINT = 'order_terminal_immutable';
    END IF;
    IF NEW.account_id <> OLD.account_id OR NEW.instrument_id <> OLD.instrument_id
       OR NEW.side <> OLD.side OR NEW.client_order_id <> OLD.client_order_id
       OR NEW.strategy_id IS DISTINCT FROM OLD.strategy_id THEN
        RAISE EXCEPTION 'order % : account, instrument, side, strategy and client order id '
                        'cannot change', OLD.order_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'order_identity_immutable';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
CREATE TRIGGER orders_status_transition
    BEFORE INSERT OR UPDATE ON trading.orders
    FOR EACH ROW EXECUTE FUNCTION trading.check_order_transition();

CREATE TABLE trading.fills (
    fill_id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id           bigint NOT NULL REFERENCES trading.accounts,
    order_id             bigint NOT NULL REFERENCES trading.orders,
    instrument_id        bigint NOT NULL REFERENCES market.instruments,
    strategy_id          bigint REFERENCES trading.strategies,
    broker_fill_id       text NOT NULL CONSTRAINT fills_broker_fill_id_length
                             CHECK (length(broker_fill_id) BETWEEN 1 AND 128),
    side                 trading.order_side NOT NULL,
    quantity             numeric NOT NULL CONSTRAINT fills_quantity_positive
                             CHECK (quantity > 0 AND quantity < 'Infinity'),
    price                numeric NOT NULL CONSTRAINT fills_price_positive
                             CHECK (price > 0 AND price < 'Infinity'),
    commission           numeric NOT NULL DEFAULT 0 CONSTRAINT fills_commission_nonnegative
                             CHECK (commission >= 0 AND commission < 'Infinity'),
    commission_currency  text CHECK (commission_currency ~ '^[A-Z0-9]{2,12}$'),
    liquidity            text CHECK (liquidity IN ('maker', 'taker')),
    ts                   timestamptz NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT fills_broker_fill_id_unique UNIQUE (account_id, broker_fill_id)
);
COMMENT ON CONSTRAINT fills_broker_fill_id_unique ON trading.fills IS
    'this broker fill id was already recorded for this account';
CREATE INDEX fills_order_idx ON trading.fills (order_id);
CREATE INDEX fills_account_ts_idx ON trading.fills (account_id, ts);

CREATE TABLE trading.positions (
    position_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id      bigint NOT NULL REFERENCES trading.accounts,
    instrument_id   bigint NOT NULL REFERENCES market.instruments,
    -- NULL: the account's netted position; a strategy id: that strategy's own
    -- (aggregation mode independent)
    strategy_id     bigint REFERENCES trading.strategies,
    leg             trading.position_leg NOT NULL DEFAULT 'net',
    -- signed for the net leg (short < 0); >= 0 for long and short legs of hedge mode
    quantity        numeric NOT NULL DEFAULT 0 CONSTRAINT positions_quantity_is_number
                        CHECK (quantity NOT IN ('NaN', 'Infinity', '-Infinity')),
    average_price   numeric CONSTRAINT positions_average_price_positive
                        CHECK (average_price > 0 AND average_price < 'Infinity'),
    realized_pnl    numeric NOT NULL DEFAULT 0 CONSTRAINT positions_realized_pnl_is_number
                        CHECK (realized_pnl NOT IN ('NaN', 'Infinity', '-Infinity')),
    commission_paid numeric NOT NULL DEFAULT 0
                        CHECK (commission_paid >= 0 AND commission_paid < 'Infinity'),
    last_price      numeric CHECK (last_price > 0 AND last_price < 'Infinity'),
    stop_loss       numeric CHECK (stop_loss > 0 AND stop_loss < 'Infinity'),
    take_profit     numeric CHECK (take_profit > 0 AND take_profit < 'Infinity'),
    trailing_stop   numeric CHECK (trailing_stop > 0 AND trailing_stop < 'Infinity'),
    opened_at       timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT positions_unique UNIQUE NULLS NOT DISTINCT (account_id, instrument_id, strategy_id, leg),
    CONSTRAINT positions_leg_sign CHECK (leg = 'net' OR quantity >= 0),
    CONSTRAINT positions_open_has_price CHECK (quantity = 0 OR average_price IS NOT NULL)
);

-- Becomes a hypertable on ts where TimescaleDB is present.
CREATE TABLE trading.equity_snapshots (
    account_id       bigint NOT NULL REFERENCES trading.accounts,
    ts               timestamptz NOT NULL,
    cash             numeric NOT NULL,
    positions_value  numeric NOT NULL,
    equity           numeric NOT NULL,
    peak_equity      numeric NOT NULL CONSTRAINT equity_snapshots_peak_is_number
                         CHECK (peak_equity NOT IN ('NaN', 'Infinity', '-Infinity')),
    drawdown         numeric NOT NULL CONSTRAINT equity_snapshots_drawdown_fraction
                         CHECK (drawdown >= 0 AND drawdown <= 1),
    CONSTRAINT equity_snapshots_pkey PRIMARY KEY (account_id, ts),
    -- NaN = NaN is true for numeric: equity must also be finite, or NaN cash would pass
    CONSTRAINT equity_snapshots_sum CHECK (equity = cash + positions_value
                                           AND equity NOT IN ('NaN', 'Infinity', '-Infinity'))
);
COMMENT ON CONSTRAINT equity_snapshots_sum ON trading.equity_snapshots IS
    'equity must equal cash + positions value, all finite numbers';

------------------------------------------------------------------------------ risk
CREATE TABLE risk.limits (
    limit_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- NULL account: applies to every account of the environment (or of all, if NULL too)
    account_id   bigint REFERENCES trading.accounts,
    environment  trading.environment,
    scope        risk.limit_scope NOT NULL,
    -- the market ('crypto'), strategy name or symbol the limit is about; NULL for global
    scope_key    text CONSTRAINT limits_scope_key_length CHECK (length(scope_key) BETWEEN 1 AND 64),
    limit_type   text NOT NULL CONSTRAINT limits_type_format
                     CHECK (limit_type ~ '^[A-Z][A-Z0-9_]{0,63}$'),
    value        numeric NOT NULL CONSTRAINT limits_value_is_number
                     CHECK (value NOT IN ('NaN', 'Infinity', '-Infinity')),
    params       jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(params) = 'object'),
    enabled      boolean NOT NULL DEFAULT true,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    updated_by   text NOT NULL DEFAULT session_user,
    CONSTRAINT limits_scope_key_required CHECK ((scope = 'global') = (scope_key IS NULL)),
    CONSTRAINT limits_unique UNIQUE NULLS NOT DISTINCT
        (account_id, environment, scope, scope_key, limit_type)
);
COMMENT ON CONSTRAINT limits_scope_key_required ON risk.limits IS
    'a global limit has no scope key; market, strategy and symbol limits need one';

-- Every change to a limit: who, when, old and new.
CREATE TABLE risk.limit_history (
    history_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    limit_id     bigint NOT NULL,
    operation    text NOT NULL CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE')),
    old_row      jsonb,
    new_row      jsonb,
    changed_by   text NOT NULL DEFAULT session_user,
    changed_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE FUNCTION risk.record_limit_history() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO risk.limit_history (limit_id, operation, old_row, new_row)
    VALUES (COALESCE(NEW.limit_id, OLD.limit_id), TG_OP,
            CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
            CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END);
    RETURN NULL;
END
$$;
CREATE TRIGGER limits_history
    AFTER INSERT OR UPDATE OR DELETE ON risk.limits
    FOR EACH ROW EXECUTE FUNCTION risk.record_limit_history();

CREATE TABLE risk.breaker_state (
    account_id  bigint PRIMARY KEY REFERENCES trading.accounts,
    mode        risk.breaker_mode NOT NULL DEFAULT 'OK',
    reason      text,
    tripped_at  timestamptz,
    tripped_by  text
);

CREATE TABLE risk.events (
    event_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id   bigint REFERENCES trading.accounts,
    ts           timestamptz NOT NULL DEFAULT now(),
    severity     risk.severity NOT NULL,
    event_type   text NOT NULL CONSTRAINT risk_events_type_format
                     CHECK (event_type ~ '^[A-Z][A-Z0-9_]{0,63}$'),
    message      text NOT NULL,
    details      jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(details) = 'object')
);
CREATE INDEX risk_events_account_ts_idx ON risk.events (account_id, ts DESC);

------------------------------------------------------------------------------ ml
CREATE TABLE ml.models (
    model_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         text NOT NULL CHECK (name ~ '^[A-Za-z][A-Za-z0-9_.-]{0,63}$'),
    version      integer NOT NULL CHECK (version > 0),
    kind         text NOT NULL CHECK (kind ~ '^[a-z][a-z0-9_]{0,31}$'),
    parameters   jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(parameters) = 'object'),
    metrics      jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metrics) = 'object'),
    artifact     bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (name, version)
);

------------------------------------------------------------------------------ audit
-- Append-only, hash-chained: hash = sha256(prev_hash || canonical content).
-- chain_head holds the last link; locking it serialises appends, so the order of
-- event_id is the order of the chain.
CREATE SEQUENCE audit.events_event_id_seq;

CREATE TABLE audit.events (
    event_id     bigint PRIMARY KEY,
    ts           timestamptz NOT NULL,
    actor        text NOT NULL,
    event_type   text NOT NULL CONSTRAINT audit_events_type_format
                     CHECK (event_type ~ '^[a-z][a-z0-9_.]{0,63}$'),
    entity       text NOT NULL,
    entity_id    text,
    payload      jsonb NOT NULL DEFAULT '{}',
    prev_hash    bytea,
    hash         bytea NOT NULL
);
ALTER SEQUENCE audit.events_event_id_seq OWNED BY audit.events.event_id;

CREATE TABLE audit.chain_head (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_event_id  bigint,
    last_hash      bytea
);
INSERT INTO audit.chain_head (singleton) VALUES (true);

CREATE FUNCTION audit.event_hash(prev_hash bytea, event_id bigint, ts timestamptz,
                                 actor text, event_type text, entity text, entity_id text,
                                 payload jsonb) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE
-- the content is serialised as a JSON array: every text field is quoted and escaped, so
-- no field can bleed into the next, and a NULL entity_id (null) differs from any string
-- (PostgreSQL text cannot hold chr(0), so that cannot serve as the NULL marker)
RETURN sha256(COALESCE(prev_hash, '\x'::bytea) || convert_to(
    jsonb_build_array(event_id::text,
                      to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                      actor, event_type, entity, entity_id, payload)::text, 'UTF8'));

CREATE FUNCTION audit.chain_event() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    head audit.chain_head;
BEGIN
    SELECT * INTO head FROM audit.chain_head FOR UPDATE;
    NEW.event_id := nextval('audit.events_event_id_seq');
    NEW.ts := clock_timestamp();
    NEW.actor := COALESCE(NEW.actor, session_user);
    NEW.prev_hash := head.last_hash;
    NEW.hash := audit.event_hash(NEW.prev_hash, NEW.event_id, NEW.ts, NEW.actor,
                                 NEW.event_type, NEW.entity, NEW.entity_id, NEW.payload);
    UPDATE audit.chain_head SET last_event_id = NEW.event_id, last_hash = NEW.hash;
    RETURN NEW;
END
$$;
CREATE TRIGGER events_chain BEFORE INSERT ON audit.events
    FOR EACH ROW EXECUTE FUNCTION audit.chain_event();

CREATE FUNCTION audit.refuse_change() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RAISE EXCEPTION 'audit.events is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'audit events can be added with audit.record(), never changed or removed';
END
$$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON audit.events
    FOR EACH ROW EXECUTE FUNCTION audit.refuse_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON audit.events
    FOR EACH STATEMENT EXECUTE FUNCTION audit.refuse_change();

-- The one way to add an event.
CREATE FUNCTION audit.record(event_type text, entity text, entity_id text,
                             payload jsonb DEFAULT '{}') RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    INSERT INTO audit.events (event_type, entity, entity_id, payload, actor, hash)
    VALUES (event_type, entity, entity_id, COALESCE(payload, '{}'), session_user, '\x'::bytea)
    RETURNING event_id;
END;

-- Walk the chain in order; the first row whose link or hash does not match is returned.
-- No row: the chain is intact (and the head points at its last event).
CREATE FUNCTION audit.verify_chain()
RETURNS TABLE (event_id bigint, problem text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    e audit.events;
    prev bytea := NULL;
    last_id bigint := NULL;
    head audit.chain_head;
BEGIN
    FOR e IN SELECT * FROM audit.events ORDER BY audit.events.event_id LOOP
        IF e.prev_hash IS DISTINCT FROM prev THEN
            event_id := e.event_id;
            problem := CASE WHEN last_id IS NULL
                            THEN 'the first event links to a predecessor that is missing'
                            ELSE format('prev_hash does not match the hash of event %s '
                                        '(an event was removed or changed)', last_id) END;
            RETURN NEXT; RETURN;
        END IF;
        IF e.hash IS DISTINCT FROM audit.event_hash(e.prev_hash, e.event_id, e.ts, e.actor,
                e.event_type, e.entity, e.entity_id, e.payload) THEN
            event_id := e.event_id;
            problem := 'content does not match its hash (the row was changed)';
            RETURN NEXT; RETURN;
        END IF;
        prev := e.hash;
        last_id := e.event_id;
    END LOOP;
    SELECT * INTO head FROM audit.chain_head;
    IF head.last_hash IS DISTINCT FROM prev THEN
        event_id := head.last_event_id;
        problem := format('the chain head names event %s, but the last event is %s '
                          '(the newest events were removed)',
                          head.last_event_id, COALESCE(last_id::text, 'none'));
        RETURN NEXT;
    END IF;
END
$$;
