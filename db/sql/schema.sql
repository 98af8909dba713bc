-- MMATS: the current-state schema. Building a database from this file must give the
-- same database as replaying db/sql/migrations/ (tests/test_migrations.py proves it).
-- Edit it together with each new migration.

-- ======== from 0001_01_pre_roles_schemas.sql
-- 0001_01 (pre): roles, schemas and, where the server offers it, TimescaleDB.
-- Runs as the migrating superuser: roles are cluster-wide and created only if missing.
RESET ROLE;

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['mmats_owner', 'mmats_strategy', 'mmats_router', 'mmats_api',
                             'mmats_readonly'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            -- LOGIN without a password: nobody can sign in with it until an administrator
            -- sets one. The owner needs LOGIN because TimescaleDB runs its background
            -- jobs (compression, retention, aggregate refresh) as the hypertable owner.
            EXECUTE format('CREATE ROLE %I LOGIN', r);
        END IF;
    END LOOP;
    ALTER ROLE mmats_owner LOGIN;
END
$$;

DO $$
BEGIN
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO mmats_owner, mmats_strategy, '
                   'mmats_router, mmats_api, mmats_readonly', current_database());
    EXECUTE format('REVOKE CREATE ON DATABASE %I FROM PUBLIC', current_database());
    -- the owner runs the DDL (pgmq's install script creates its schema itself)
    EXECUTE format('GRANT CREATE ON DATABASE %I TO mmats_owner', current_database());
END
$$;

REVOKE CREATE ON SCHEMA public FROM PUBLIC;

CREATE SCHEMA IF NOT EXISTS market AUTHORIZATION mmats_owner;
CREATE SCHEMA IF NOT EXISTS trading AUTHORIZATION mmats_owner;
CREATE SCHEMA IF NOT EXISTS risk AUTHORIZATION mmats_owner;
CREATE SCHEMA IF NOT EXISTS ml AUTHORIZATION mmats_owner;
CREATE SCHEMA IF NOT EXISTS audit AUTHORIZATION mmats_owner;
CREATE SCHEMA IF NOT EXISTS pgmq AUTHORIZATION mmats_owner;

COMMENT ON SCHEMA market IS 'instruments, bars, session calendars, import bookkeeping';
COMMENT ON SCHEMA trading IS 'accounts, strategies, signals, orders, fills, positions, equity';
COMMENT ON SCHEMA risk IS 'risk limits with their history, breaker state, risk events';
COMMENT ON SCHEMA ml IS 'models, predictions, anomalies';
COMMENT ON SCHEMA audit IS 'the append-only, hash-chained event log';

-- TimescaleDB only where the server has it preloaded; elsewhere plain PostgreSQL.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
       AND current_setting('shared_preload_libraries') ~ '(^|[ ,])timescaledb($|[ ,])' THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
    END IF;
END
$$;

-- Functions MMATS creates are not executable by PUBLIC; each role is granted its own.
ALTER DEFAULT PRIVILEGES FOR ROLE mmats_owner REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

-- ======== from 0001_02_pre_pgmq.sql
-- 0001_02 (pre): pgmq, from the SQL bundled with the pinned `pgmq` Python package
-- (no server extension needed), and the queue the order router drains.
SET LOCAL ROLE mmats_owner;

-- mmats:include-pgmq

SELECT pgmq.create('orders');

-- ======== from 0001_03_pre_core.sql
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

-- ======== from 0001_04_pre_timeseries.sql
-- 0001_04 (pre): time-series storage. With TimescaleDB: hypertables, continuous
-- aggregates, compression and retention. Without it: the same names and columns as
-- ordinary tables and materialized views, refreshed by market.refresh_bar_aggregates().
SET LOCAL ROLE mmats_owner;

-- Aggregates are built from 1-minute bars: market.bars_5m, _15m, _1h, _4h, _1d, each
-- with columns (instrument_id, ts, open, high, low, close, volume, bar_count). On
-- TimescaleDB they are real-time (materialized_only = false): bars not yet materialized
-- by the refresh policy are aggregated at query time, so a read never misses new bars.
DO $$
DECLARE
    tf record;
    has_timescale boolean := EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb');
BEGIN
    IF has_timescale THEN
        PERFORM create_hypertable('market.bars', 'ts', chunk_time_interval => interval '7 days');
        PERFORM create_hypertable('trading.equity_snapshots', 'ts',
                                  chunk_time_interval => interval '30 days');
        ALTER TABLE market.bars SET (timescaledb.compress,
            timescaledb.compress_segmentby = 'instrument_id, timeframe',
            timescaledb.compress_orderby = 'ts DESC');
        PERFORM add_compression_policy('market.bars', compress_after => interval '30 days');
        ALTER TABLE trading.equity_snapshots SET (timescaledb.compress,
            timescaledb.compress_segmentby = 'account_id',
            timescaledb.compress_orderby = 'ts DESC');
        PERFORM add_compression_policy('trading.equity_snapshots',
                                       compress_after => interval '90 days');
        -- equity snapshots are fine-grained; keep five years of them
        PERFORM add_retention_policy('trading.equity_snapshots', drop_after => interval '5 years');
    END IF;

    FOR tf IN SELECT * FROM (VALUES ('5m', '5 minutes', '1 hour'),
                                    ('15m', '15 minutes', '2 hours'),
                                    ('1h', '1 hour', '6 hours'),
                                    ('4h', '4 hours', '1 day'),
                                    ('1d', '1 day', '3 days')) AS v(name, width, lag) LOOP
        IF has_timescale THEN
            EXECUTE format($f$
                CREATE MATERIALIZED VIEW market.%I
                    WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
                SELECT instrument_id, time_bucket(%L::interval, ts) AS ts,
                       first(open, ts) AS open, max(high) AS high, min(low) AS low,
                       last(close, ts) AS close, sum(volume) AS volume,
                       count(*) AS bar_count
                FROM market.bars WHERE timeframe = '1m'
                GROUP BY instrument_id, time_bucket(%L::interval, ts)
                WITH NO DATA$f$, 'bars_' || tf.name, tf.width, tf.width);
            PERFORM add_continuous_aggregate_policy(format('market.%I', 'bars_' || tf.name)::regclass,
                start_offset => NULL, end_offset => tf.width::interval,
                schedule_interval => tf.width::interval);
        ELSE
            EXECUTE format($f$
                CREATE MATERIALIZED VIEW market.%I AS
                SELECT instrument_id, date_bin(%L::interval, ts, timestamptz '2000-01-03') AS ts,
                       (array_agg(open ORDER BY ts))[1] AS open, max(high) AS high,
                       min(low) AS low, (array_agg(close ORDER BY ts DESC))[1] AS close,
                       sum(volume) AS volume, count(*) AS bar_count
                FROM market.bars WHERE timeframe = '1m'
                GROUP BY 1, 2
                WITH NO DATA$f$, 'bars_' || tf.name, tf.width);
            EXECUTE format('CREATE UNIQUE INDEX %I ON market.%I (instrument_id, ts)',
                           'bars_' || tf.name || '_key', 'bars_' || tf.name);
        END IF;
        -- a continuous aggregate is a view to PostgreSQL
        EXECUTE format('COMMENT ON %s market.%I IS %L',
                       CASE WHEN has_timescale THEN 'VIEW' ELSE 'MATERIALIZED VIEW' END,
                       'bars_' || tf.name, tf.name || ' bars aggregated from 1m bars');
    END LOOP;
END
$$;

-- Bring the aggregates up to date. On TimescaleDB the policies do it in the background
-- (and refresh_continuous_aggregate() must run outside a transaction), so this only
-- acts on plain PostgreSQL.
CREATE FUNCTION market.refresh_bar_aggregates() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v text;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        RETURN;
    END IF;
    FOREACH v IN ARRAY ARRAY['bars_5m', 'bars_15m', 'bars_1h', 'bars_4h', 'bars_1d'] LOOP
        IF (SELECT relispopulated FROM pg_class WHERE oid = format('market.%I', v)::regclass) THEN
            EXECUTE format('REFRESH MATERIALIZED VIEW CONCURRENTLY market.%I', v);
        ELSE
            EXECUTE format('REFRESH MATERIALIZED VIEW market.%I', v);
        END IF;
    END LOOP;
END
$$;

-- What is stored, per instrument and timeframe (mmats data list, Grafana).
CREATE VIEW market.bar_coverage AS
SELECT i.symbol, i.venue, i.market, b.timeframe, min(b.ts) AS first_ts, max(b.ts) AS last_ts,
       count(*) AS bars
FROM market.bars b JOIN market.instruments i USING (instrument_id)
GROUP BY i.symbol, i.venue, i.market, b.timeframe;

-- ======== from 0001_05_pre_grants.sql
-- 0001_05 (pre): what each role may do. Nobody but mmats_owner writes a table: the
-- other roles read what they need and call functions (SECURITY DEFINER, owned by
-- mmats_owner) for every change. Later migrations grant each new function explicitly.
SET LOCAL ROLE mmats_owner;

REVOKE ALL ON ALL TABLES IN SCHEMA market, trading, risk, ml, audit, pgmq FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA market, trading, risk, ml, audit, pgmq FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA market, trading, risk, ml, audit, pgmq FROM PUBLIC;

-- readonly (Grafana, psql analysis) and api: read everything
GRANT USAGE ON SCHEMA market, trading, risk, ml, audit TO mmats_readonly, mmats_api;
GRANT SELECT ON ALL TABLES IN SCHEMA market, trading, risk, ml, audit
    TO mmats_readonly, mmats_api;
ALTER DEFAULT PRIVILEGES FOR ROLE mmats_owner IN SCHEMA market, trading, risk, ml, audit
    GRANT SELECT ON TABLES TO mmats_readonly, mmats_api;
GRANT EXECUTE ON FUNCTION audit.verify_chain() TO mmats_readonly, mmats_api;
GRANT EXECUTE ON FUNCTION market.timeframe_interval(market.timeframe)
    TO mmats_readonly, mmats_api, mmats_strategy;

-- strategy: market data, its own configuration; it submits signals through a function
-- (granted with that function)
GRANT USAGE ON SCHEMA market, trading TO mmats_strategy;
GRANT SELECT ON ALL TABLES IN SCHEMA market TO mmats_strategy;
ALTER DEFAULT PRIVILEGES FOR ROLE mmats_owner IN SCHEMA market
    GRANT SELECT ON TABLES TO mmats_strategy;
GRANT SELECT ON trading.strategies TO mmats_strategy;

-- router: reads the orders it routes and the instruments' rules; the queue and the
-- fill / reject functions are granted with those functions
GRANT USAGE ON SCHEMA market, trading TO mmats_router;
GRANT SELECT ON market.instruments TO mmats_router;
GRANT SELECT ON trading.orders, trading.accounts TO mmats_router;

-- ======== from 0002_01_pre_trading_tables.sql
-- 0002_01 (pre): what the trading core keeps besides the 0001 tables: account settings,
-- strategy assignments with their sizing, closed trades, protection state on
-- positions and orders, credential records and operator-mode requests.
SET LOCAL ROLE mmats_owner;

CREATE TYPE trading.sizing_method AS ENUM (
    'fixed_fractional', 'percent_equity', 'fixed_quantity', 'fixed_notional',
    'risk_per_trade', 'volatility', 'kelly');
CREATE TYPE trading.order_trigger AS ENUM (
    'signal', 'manual', 'close', 'stop_loss', 'take_profit', 'trailing_stop', 'breakeven',
    'breaker');

ALTER TABLE trading.accounts
    ADD COLUMN taker_fee numeric NOT NULL DEFAULT 0 CONSTRAINT accounts_taker_fee_range
        CHECK (taker_fee >= 0 AND taker_fee < 0.1),
    ADD COLUMN maker_fee numeric NOT NULL DEFAULT 0 CONSTRAINT accounts_maker_fee_range
        CHECK (maker_fee > -0.01 AND maker_fee < 0.1),
    -- CONSENSUS: execute when more than this share of the assigned strategies agree
    ADD COLUMN consensus_share numeric NOT NULL DEFAULT 0.5
        CONSTRAINT accounts_consensus_share_range CHECK (consensus_share >= 0 AND consensus_share < 1),
    -- WEIGHTED: execute when |sum(weight * confidence * direction)| / sum(weight) exceeds this
    ADD COLUMN weighted_threshold numeric NOT NULL DEFAULT 0.5
        CONSTRAINT accounts_weighted_threshold_range
        CHECK (weighted_threshold >= 0 AND weighted_threshold <= 1),
    -- signals of several strategies within this window of each other count together
    ADD COLUMN aggregation_window interval NOT NULL DEFAULT '0 seconds'
        CHECK (aggregation_window >= '0 seconds'),
    ADD COLUMN max_consecutive_rejections integer NOT NULL DEFAULT 5
        CHECK (max_consecutive_rejections > 0),
    ADD COLUMN consecutive_rejections integer NOT NULL DEFAULT 0,
    ADD COLUMN peak_equity numeric,
    ADD COLUMN trading_day date,
    ADD COLUMN day_start_equity numeric;
COMMENT ON CONSTRAINT accounts_taker_fee_range ON trading.accounts IS
    'taker_fee is a fraction of the notional per side, from 0 to 0.1';

-- Which strategies an account runs, with how much of its capital and how they size.
CREATE TABLE trading.account_strategies (
    account_id     bigint NOT NULL REFERENCES trading.accounts,
    strategy_id    bigint NOT NULL REFERENCES trading.strategies,
    allocation     numeric NOT NULL DEFAULT 1 CONSTRAINT account_strategies_allocation_range
                       CHECK (allocation > 0 AND allocation <= 1),
    sizing_method  trading.sizing_method NOT NULL DEFAULT 'percent_equity',
    sizing_params  jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(sizing_params) = 'object'),
    enabled        boolean NOT NULL DEFAULT true,
    PRIMARY KEY (account_id, strategy_id)
);

ALTER TABLE trading.orders
    ADD COLUMN position_leg trading.position_leg NOT NULL DEFAULT 'net',
    ADD COLUMN trigger trading.order_trigger NOT NULL DEFAULT 'signal',
    -- the price at which a protective order was triggered (the simulator fills there,
    -- or at the open when the bar gapped through it)
    ADD COLUMN trigger_price numeric CHECK (trigger_price > 0),
    -- the protection the resulting position takes over
    ADD COLUMN stop_loss numeric CHECK (stop_loss > 0),
    ADD COLUMN take_profit numeric CHECK (take_profit > 0),
    ADD COLUMN trailing_stop numeric CHECK (trailing_stop > 0),
    ADD COLUMN breakeven numeric CHECK (breakeven > 0),
    -- the reference price the order was sized at
    ADD COLUMN reference_price numeric CHECK (reference_price > 0),
    ADD COLUMN submitted_at timestamptz;

-- A fill may arrive before the broker's acknowledgement; a GTD order may expire before
-- it was ever sent.
INSERT INTO trading.order_transitions (from_status, to_status) VALUES
    ('created', 'partially_filled'), ('created', 'filled'), ('created', 'expired');

ALTER TABLE trading.positions
    -- the strategy whose order opened the position (attribution of net positions)
    ADD COLUMN entry_strategy_id bigint REFERENCES trading.strategies,
    -- entry commission not yet attributed to a closed trade
    ADD COLUMN open_commission numeric NOT NULL DEFAULT 0 CHECK (open_commission >= 0),
    -- best price since entry (highest high for a long, lowest low for a short)
    ADD COLUMN trail_anchor numeric CHECK (trail_anchor > 0),
    -- when the price reaches this level, the stop moves to the entry price
    ADD COLUMN breakeven numeric CHECK (breakeven > 0),
    -- close time of the last bar that marked this position
    ADD COLUMN marked_at timestamptz;
CREATE INDEX positions_open_instrument_idx ON trading.positions (instrument_id)
    WHERE quantity <> 0;
CREATE INDEX positions_open_account_idx ON trading.positions (account_id) WHERE quantity <> 0;

-- A closed (or partly closed) round trip, written by apply_fill when a fill reduces a
-- position. pnl is net of the entry commission (pro rata) and the exit commission.
CREATE TABLE trading.trades (
    trade_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id     bigint NOT NULL REFERENCES trading.accounts,
    instrument_id  bigint NOT NULL REFERENCES market.instruments,
    strategy_id    bigint REFERENCES trading.strategies,
    side           text NOT NULL CHECK (side IN ('long', 'short')),
    quantity       numeric NOT NULL CHECK (quantity > 0),
    entry_time     timestamptz NOT NULL,
    entry_price    numeric NOT NULL CHECK (entry_price > 0),
    exit_time      timestamptz NOT NULL,
    exit_price     numeric NOT NULL CHECK (exit_price > 0),
    gross_pnl      numeric NOT NULL,
    commission     numeric NOT NULL CHECK (commission >= 0),
    pnl            numeric NOT NULL,
    exit_fill_id   bigint NOT NULL REFERENCES trading.fills,
    exit_trigger   trading.order_trigger NOT NULL
);
CREATE INDEX trades_account_strategy_idx ON trading.trades (account_id, strategy_id);

-- Credential records (the secrets themselves are stored encrypted by the runtime).
CREATE TABLE trading.credentials (
    credential_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id     bigint NOT NULL REFERENCES trading.accounts,
    venue          text NOT NULL CHECK (venue ~ '^[a-z0-9][a-z0-9._-]{0,31}$'),
    label          text NOT NULL CHECK (label ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    is_live        boolean NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, label)
);

-- Switching to operator mode is two steps: a request returns a token; the
-- confirmation must present it before it expires.
CREATE TABLE trading.mode_requests (
    account_id    bigint PRIMARY KEY REFERENCES trading.accounts,
    token_hash    bytea NOT NULL,
    requested_by  text NOT NULL,
    requested_at  timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL
);

-- ======== from 0002_02_pre_trading_helpers.sql
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

-- ======== from 0002_03_pre_risk_gate.sql
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

-- ======== from 0002_04_pre_signals.sql
-- 0002_04 (pre): accounts, strategy assignment, and the signal path:
-- submit_signal -> aggregation -> sizing -> risk check -> order + pgmq message,
-- all in the caller's transaction.
SET LOCAL ROLE mmats_owner;

CREATE FUNCTION trading.create_account(name text, environment text, mode text DEFAULT 'advisory',
                                       cash numeric DEFAULT 0, currency text DEFAULT 'USD',
                                       position_mode text DEFAULT 'oneway',
                                       aggregation text DEFAULT 'independent',
                                       allow_short boolean DEFAULT false,
                                       taker_fee numeric DEFAULT 0, maker_fee numeric DEFAULT 0)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    id bigint;
BEGIN
    IF environment NOT IN ('backtest', 'paper', 'live') THEN
        RAISE EXCEPTION 'environment must be backtest, paper or live, got %', quote_literal(environment)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF mode NOT IN ('advisory', 'operator') THEN
        RAISE EXCEPTION 'mode must be advisory or operator, got %', quote_literal(mode)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF environment = 'live' AND mode = 'operator' THEN
        RAISE EXCEPTION 'a live account starts in advisory mode; switch it with trading.request_operator_mode() and trading.confirm_operator_mode()'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cash IS NULL OR cash = 'NaN' OR cash < 0 THEN
        RAISE EXCEPTION 'cash must be a number >= 0, got %', COALESCE(cash::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO trading.accounts AS a (name, environment, mode, base_currency, starting_cash, cash,
                                       position_mode, aggregation, allow_short, taker_fee,
                                       maker_fee, peak_equity)
    VALUES (name, environment::trading.environment, mode::trading.account_mode, upper(currency),
            cash, cash, position_mode::trading.position_mode,
            lower(aggregation)::trading.aggregation_mode, allow_short, taker_fee, maker_fee, cash)
    RETURNING a.account_id INTO id;
    INSERT INTO risk.breaker_state (account_id) VALUES (id);
    PERFORM audit.record('account.created', 'trading.accounts', id::text,
        jsonb_build_object('name', name, 'environment', environment, 'mode', mode, 'cash', cash,
                           'currency', upper(currency), 'position_mode', position_mode,
                           'aggregation', lower(aggregation)));
    RETURN id;
END
$$;

-- Assign a strategy to an account with its share of the capital and its sizing.
CREATE FUNCTION trading.assign_strategy(account text, strategy text, allocation numeric DEFAULT 1,
                                        sizing_method text DEFAULT 'percent_equity',
                                        sizing_params jsonb DEFAULT '{}',
                                        priority integer DEFAULT NULL, weight numeric DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts := trading._account(account, true);
    s trading.strategies := trading._strategy(strategy);
BEGIN
    INSERT INTO trading.account_strategies AS x (account_id, strategy_id, allocation, sizing_method,
                                                 sizing_params)
    VALUES (acc.account_id, s.strategy_id, allocation, sizing_method::trading.sizing_method,
            COALESCE(sizing_params, '{}'))
    ON CONFLICT (account_id, strategy_id) DO UPDATE
        SET allocation = EXCLUDED.allocation, sizing_method = EXCLUDED.sizing_method,
            sizing_params = EXCLUDED.sizing_params, enabled = true;
    IF priority IS NOT NULL OR weight IS NOT NULL THEN
        UPDATE trading.strategies t SET priority = COALESCE(assign_strategy.priority, t.priority),
                                        weight = COALESCE(assign_strategy.weight, t.weight)
        WHERE t.strategy_id = s.strategy_id;
    END IF;
    PERFORM audit.record('strategy.assigned', 'trading.account_strategies',
        acc.account_id || ':' || s.strategy_id,
        jsonb_build_object('account', acc.name, 'strategy', s.name, 'allocation', allocation,
                           'sizing_method', sizing_method, 'sizing_params', sizing_params));
END
$$;

-- Create an order row and queue it for the router, in the caller's transaction.
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
                                    client_order_id text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    id bigint;
BEGIN
    INSERT INTO trading.orders AS o (account_id, instrument_id, strategy_id, signal_id,
        client_order_id, side, order_type, time_in_force, quantity, limit_price, stop_price,
        expire_at, reduce_only, position_leg, trigger, trigger_price, stop_loss, take_profit,
        trailing_stop, breakeven, reference_price)
    VALUES (acc.account_id, inst.instrument_id, strategy_id, signal_id,
        COALESCE(client_order_id, 'mm' || acc.account_id || '-' || nextval('trading.client_order_seq')),
        side, order_type, tif, qty, limit_price, stop_price, expire_at, reduce_only, leg, trig,
        trigger_price, stop_loss, take_profit, trailing_stop, breakeven, reference_price)
    RETURNING o.order_id INTO id;
    PERFORM pgmq.send('orders', jsonb_build_object(
        'order_id', id, 'account_id', acc.account_id, 'environment', acc.environment,
        'client_order_id', (SELECT o.client_order_id FROM trading.orders o WHERE o.order_id = id)));
    PERFORM audit.record('order.created', 'trading.orders', id::text, jsonb_build_object(
        'account', acc.name, 'symbol', inst.symbol, 'side', side, 'quantity', qty,
        'type', order_type, 'trigger', trig, 'strategy_id', strategy_id, 'signal_id', signal_id,
        'reference_price', reference_price, 'reduce_only', reduce_only));
    RETURN id;
END
$$;
CREATE SEQUENCE trading.client_order_seq;

-- How many units a strategy's entry takes, before rounding (see README: sizing).
CREATE FUNCTION trading._size(acc trading.accounts, s trading.strategies, inst market.instruments,
                              size numeric, price numeric, fx numeric, stop_loss numeric,
                              at timestamptz, OUT qty numeric, OUT clamp_to_cash boolean)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
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

-- The latest signal of each enabled strategy on an account's symbol within the window.
CREATE FUNCTION trading._votes(account bigint, instrument bigint, since timestamptz, until timestamptz)
RETURNS TABLE (strategy_id bigint, name text, action trading.signal_action, confidence numeric,
               weight numeric, priority integer)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT DISTINCT ON (g.strategy_id) g.strategy_id, st.name, g.action,
           COALESCE(g.confidence, 1), st.weight, st.priority
    FROM trading.signals g JOIN trading.strategies st ON st.strategy_id = g.strategy_id
    WHERE g.account_id = _votes.account AND g.instrument_id = _votes.instrument
      AND g.ts BETWEEN since AND until AND st.enabled AND g.action <> 'hold'
    ORDER BY g.strategy_id, g.ts DESC, g.signal_id DESC;
END;

-- Whether an aggregated account executes this strategy's signal (its own row is among
-- the votes already). Not decided: a reason code and text.
CREATE FUNCTION trading._aggregate(acc trading.accounts, s trading.strategies,
                                   inst market.instruments, action trading.signal_action,
                                   at timestamptz, OUT decided boolean, OUT code text, OUT reason text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    voters integer;
    agree integer;
    score numeric;
    top record;
    since timestamptz := at - acc.aggregation_window;
BEGIN
    decided := true;
    IF acc.aggregation = 'independent' THEN
        RETURN;
    END IF;
    IF acc.aggregation = 'priority' THEN
        SELECT * INTO top FROM trading._votes(acc.account_id, inst.instrument_id, since, at) v
        WHERE v.action <> _aggregate.action ORDER BY v.priority DESC LIMIT 1;
        IF FOUND AND top.priority > s.priority THEN
            decided := false; code := 'OUTRANKED';
            reason := format('OUTRANKED: by=%s, priority=%s, their_action=%s, own_priority=%s',
                             top.name, top.priority, top.action, s.priority);
        END IF;
    ELSIF acc.aggregation = 'consensus' THEN
        SELECT count(*), count(*) FILTER (WHERE v.action = _aggregate.action)
        INTO voters, agree FROM trading._votes(acc.account_id, inst.instrument_id, since, at) v;
        voters := GREATEST(voters, (SELECT count(*) FROM trading.account_strategies x
                                    JOIN trading.strategies st USING (strategy_id)
                                    WHERE x.account_id = acc.account_id AND x.enabled AND st.enabled));
        IF agree::numeric / voters <= acc.consensus_share THEN
            decided := false; code := 'CONSENSUS_NOT_REACHED';
            reason := format('CONSENSUS_NOT_REACHED: agree=%s, of=%s, required_share>%s',
                             agree, voters, acc.consensus_share);
        END IF;
    ELSIF acc.aggregation = 'weighted' THEN
        SELECT COALESCE(sum(v.weight * v.confidence
                            * CASE v.action WHEN 'buy' THEN 1 WHEN 'sell' THEN -1 ELSE 0 END)
                        / NULLIF(sum(v.weight), 0), 0)
        INTO score FROM trading._votes(acc.account_id, inst.instrument_id, since, at) v;
        IF (action = 'buy' AND score <= acc.weighted_threshold)
           OR (action = 'sell' AND score >= -acc.weighted_threshold)
           OR (action = 'close' AND abs(score) > acc.weighted_threshold) THEN
            decided := false; code := 'WEIGHTED_BELOW_THRESHOLD';
            reason := format('WEIGHTED_BELOW_THRESHOLD: score=%s, threshold=%s, action=%s',
                             round(score, 4), acc.weighted_threshold, action);
        END IF;
    END IF;
END
$$;

CREATE FUNCTION trading._finish_signal(signal_id bigint, status trading.signal_status,
                                       code text, reason text, order_id bigint,
                                       extra jsonb DEFAULT '{}')
RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE trading.signals g SET status = _finish_signal.status, reason_code = code,
                                 reason = _finish_signal.reason
    WHERE g.signal_id = _finish_signal.signal_id;
    PERFORM audit.record('signal.' || status::text, 'trading.signals', signal_id::text,
        jsonb_build_object('reason_code', code, 'reason', reason, 'order_id', order_id) || extra);
    RETURN jsonb_build_object('signal_id', signal_id, 'status', status, 'reason_code', code,
                              'reason', reason, 'order_id', order_id) || extra;
END
$$;

-- The one way a strategy's intent becomes an order. See the README for the JSON shape.
CREATE FUNCTION trading.submit_signal(signal jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts;
    s trading.strategies;
    inst market.instruments;
    act trading.signal_action;
    size numeric;
    sl numeric; tp numeric; trail numeric; be numeric; conf numeric;
    at timestamptz;
    sig_id bigint;
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
    IF lower(trading._text(signal, 'action', 'signal', 10)) NOT IN ('buy', 'sell', 'close', 'hold') THEN
        RAISE EXCEPTION 'signal.action must be buy, sell, close or hold, got %', signal -> 'action'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    act := lower(trading._text(signal, 'action', 'signal', 10))::trading.signal_action;
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

    INSERT INTO trading.signals AS g (account_id, strategy_id, instrument_id, ts, action, size,
        stop_loss, take_profit, trailing_stop, confidence, reasoning, metadata)
    VALUES (acc.account_id, s.strategy_id, inst.instrument_id, at, act, size, sl, tp, trail, conf,
            trading._text(signal, 'reasoning', 'signal', 4000), COALESCE(signal -> 'metadata', '{}'))
    RETURNING g.signal_id INTO sig_id;

    IF acc.mode = 'advisory' THEN
        RETURN trading._finish_signal(sig_id, 'advisory', NULL, 'advisory account: recorded, no order', NULL);
    END IF;
    IF act = 'hold' THEN
        RETURN trading._finish_signal(sig_id, 'ignored', 'HOLD', 'hold: nothing to do', NULL);
    END IF;
    IF NOT s.enabled THEN
        RETURN trading._finish_signal(sig_id, 'ignored', 'STRATEGY_DISABLED',
            format('STRATEGY_DISABLED: strategy=%s', s.name), NULL);
    END IF;

    agg := trading._aggregate(acc, s, inst, act, at);
    IF NOT agg.decided THEN
        RETURN trading._finish_signal(sig_id, 'ignored', agg.code, agg.reason, NULL);
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
    SELECT COALESCE(sum(trading._signed_qty(p)), 0) INTO held FROM trading.positions p
    WHERE p.account_id = acc.account_id AND p.instrument_id = inst.instrument_id
      AND p.strategy_id IS NOT DISTINCT FROM pos_strategy AND p.leg = sig_leg;
    -- open orders count toward the position the signal moves from (entries not yet
    -- filled would otherwise be sent twice)
    SELECT COALESCE(sum(q) FILTER (WHERE NOT o.reduce_only), 0), COALESCE(sum(q) FILTER (WHERE o.reduce_only), 0)
    INTO pending_entry, pending_exit
    FROM trading.orders o,
         LATERAL (SELECT CASE WHEN o.side = 'buy' THEN 1 ELSE -1 END * (o.quantity - o.filled_quantity) AS q) x
    WHERE o.account_id = acc.account_id AND o.instrument_id = inst.instrument_id
      AND (pos_strategy IS NULL OR o.strategy_id = pos_strategy) AND o.position_leg = sig_leg
      AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled');
    cur := held + pending_entry + pending_exit;

    price := COALESCE(trading._num(signal, 'price', 'signal', 0, NULL, false),
                      market.latest_close(inst.instrument_id, at));
    IF price IS NULL THEN
        RETURN trading._finish_signal(sig_id, 'rejected', 'NO_PRICE',
            format('NO_PRICE: no bar for %s at or before %s to size the order', inst.symbol, at), NULL);
    END IF;
    fx := trading.fx_rate(inst.quote_currency, acc.base_currency, at);
    IF fx IS NULL THEN
        RETURN trading._finish_signal(sig_id, 'rejected', 'NO_CONVERSION_RATE',
            format('NO_CONVERSION_RATE: from=%s, to=%s', inst.quote_currency, acc.base_currency), NULL);
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
        RETURN trading._finish_signal(sig_id, 'ignored', 'NO_POSITION',
            format('NO_POSITION: nothing to close (held %s, closing orders open for %s)', held, -pending_exit), NULL);
    END IF;
    IF act = 'sell' AND NOT acc.allow_short AND cur <= 0 THEN
        RETURN trading._finish_signal(sig_id, 'rejected', 'SHORT_NOT_ALLOWED',
            format('SHORT_NOT_ALLOWED: position=%s, account=%s', held, acc.name), NULL);
    END IF;
    IF act <> 'close' AND target <> 0 AND abs(target) < inst.min_quantity THEN
        RETURN trading._finish_signal(sig_id, 'rejected', 'QUANTITY_BELOW_MINIMUM',
            format('QUANTITY_BELOW_MINIMUM: quantity=%s, minimum=%s, step=%s',
                   abs(target), inst.min_quantity, inst.quantity_step), NULL);
    END IF;
    IF act = 'buy' AND target <= 0 THEN
        RETURN trading._finish_signal(sig_id, 'rejected', 'QUANTITY_BELOW_MINIMUM',
            format('QUANTITY_BELOW_MINIMUM: quantity=0, step=%s (not enough capital at price %s)',
                   inst.quantity_step, price), NULL);
    END IF;
    IF act = 'sell' AND target = 0 AND cur = 0 THEN
        -- allow_short: the short sized to nothing, and no long to close
        RETURN trading._finish_signal(sig_id, 'rejected', 'QUANTITY_BELOW_MINIMUM',
            format('QUANTITY_BELOW_MINIMUM: quantity=0, step=%s (not enough capital at price %s)',
                   inst.quantity_step, price), NULL);
    END IF;
    -- a target in the same direction and no larger than the current position: nothing to do
    IF (act = 'buy' AND cur >= target) OR (act = 'sell' AND target < 0 AND cur <= target) THEN
        RETURN trading._finish_signal(sig_id, 'ignored', 'ALREADY_AT_TARGET',
            format('ALREADY_AT_TARGET: position=%s, target=%s', cur, target), NULL);
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
        RETURN trading._finish_signal(sig_id, 'rejected', 'QUANTITY_BELOW_MINIMUM',
            format('QUANTITY_BELOW_MINIMUM: quantity=%s, minimum=%s, step=%s (position %s, target %s)',
                   abs(delta), inst.min_quantity, inst.quantity_step, cur, target), NULL);
    END IF;

    -- protection on the wrong side of the price would fire on the next bar
    IF opening > 0 AND ((target > 0 AND (sl >= price OR tp <= price))
                        OR (target < 0 AND (sl <= price OR tp >= price))) THEN
        RETURN trading._finish_signal(sig_id, 'rejected', 'INVALID_PROTECTION',
            format('INVALID_PROTECTION: side=%s, price=%s, stop_loss=%s, take_profit=%s',
                   CASE WHEN target > 0 THEN 'long' ELSE 'short' END, price,
                   COALESCE(sl::text, '-'), COALESCE(tp::text, '-')), NULL);
    END IF;

    SELECT * INTO denial FROM risk.check_order(acc, s, inst, side, abs(delta), opening, price, sl, at);
    IF denial.code IS NOT NULL THEN
        RETURN trading._finish_signal(sig_id, 'rejected', denial.code, denial.reason, NULL);
    END IF;

    oid := trading._emit_order(acc, inst, s.strategy_id, sig_id, side, abs(delta), 'signal', price,
                               reduce_only => opening = 0, leg => sig_leg, stop_loss => sl, take_profit => tp,
                               trailing_stop => trail, breakeven => be);
    RETURN trading._finish_signal(sig_id, 'approved', NULL, NULL, oid,
        jsonb_build_object('side', side, 'quantity', abs(delta), 'reference_price', price));
END
$$;

-- ======== from 0002_05_pre_ledger.sql
-- 0002_05 (pre): the ledger. Fills change positions, cash, realized P&L and orders
-- atomically and idempotently; rejections, cancellations and closing orders.
SET LOCAL ROLE mmats_owner;

-- The average entry price in the account currency, each fill converted at its own rate:
-- realized P&L in the account currency is measured from it, so that a position quoted in
-- another currency realizes the currency move too (what the cash gained or lost).
ALTER TABLE trading.positions
    ADD COLUMN average_cost numeric CONSTRAINT positions_average_cost_positive
        CHECK (average_cost > 0 AND average_cost < 'Infinity');

-- The order named by its id or its client order id; its account locked first, then the
-- order (always in that order, like submit_signal, so that they cannot deadlock).
CREATE FUNCTION trading._locked_order(ref text, OUT acc trading.accounts, OUT o trading.orders)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    account bigint;
    id bigint;
BEGIN
    IF ref IS NULL THEN
        RAISE EXCEPTION 'an order id or client order id is required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- two index lookups (a client order id first), never one OR-ed scan: the plan of an
    -- OR with a cast would read the whole table, or cast a non-number in a generic plan
    SELECT x.order_id, x.account_id INTO id, account FROM trading.orders x
    WHERE x.client_order_id = ref;
    IF NOT FOUND AND ref ~ '^\d{1,18}$' THEN
        SELECT x.order_id, x.account_id INTO id, account FROM trading.orders x
        WHERE x.order_id = ref::bigint;
    END IF;
    IF id IS NULL THEN
        RAISE EXCEPTION 'unknown order %', quote_literal(ref) USING ERRCODE = 'foreign_key_violation';
    END IF;
    SELECT * INTO acc FROM trading.accounts a WHERE a.account_id = account FOR UPDATE;
    SELECT * INTO o FROM trading.orders x WHERE x.order_id = id FOR UPDATE;
END
$$;

-- Which position row an order moves: the strategy's own (independent aggregation) or the
-- account's net one; in hedge mode the long or the short leg.
CREATE FUNCTION trading._position_key(acc trading.accounts, o trading.orders,
                                      OUT strategy_id bigint, OUT leg trading.position_leg)
LANGUAGE sql IMMUTABLE
BEGIN ATOMIC
    SELECT CASE WHEN acc.aggregation = 'independent' THEN o.strategy_id END,
           CASE WHEN acc.position_mode = 'oneway' THEN 'net'::trading.position_leg
                WHEN o.position_leg <> 'net' THEN o.position_leg
                WHEN (o.side = 'buy') <> o.reduce_only THEN 'long'::trading.position_leg
                ELSE 'short'::trading.position_leg END;
END;

CREATE FUNCTION trading.apply_fill(fill jsonb) RETURNS jsonb
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
    key record;
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
    fx := trading._fx_or_fail(inst.quote_currency, acc.base_currency, COALESCE(prior.ts, at));
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

    key := trading._position_key(acc, o);
    d := CASE WHEN o.side = 'buy' THEN q ELSE -q END;
    -- the rows the fill moves, with their parts of it: one row, except for a manual
    -- reduce-only order on an independent account, which reduces the account's own row
    -- first and then the strategies' rows (oldest first): the account's net position is
    -- what a manual order works on (place_manual_order and the risk gate net every row)
    IF o.reduce_only AND o.strategy_id IS NULL AND acc.aggregation = 'independent' THEN
        FOR p IN SELECT * FROM trading.positions x
                 WHERE x.account_id = acc.account_id AND x.instrument_id = o.instrument_id
                   AND x.leg = key.leg AND sign(trading._signed_qty(x)) = -sign(d)
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
                                  AND x.leg = key.leg) USING ERRCODE = 'check_violation';
        END IF;
    ELSE
        part_strategy := ARRAY[key.strategy_id];
        part_qty := ARRAY[q];
    END IF;

    FOR i IN 1 .. cardinality(part_qty) LOOP
        pd := CASE WHEN o.side = 'buy' THEN part_qty[i] ELSE -part_qty[i] END;
        -- the commission pro rata (the last part takes what is left: the parts sum exactly)
        pc := CASE WHEN i = cardinality(part_qty) THEN comm_acct - comm_done
                   ELSE comm_acct * part_qty[i] / q END;
        comm_done := comm_done + pc;
        closed := 0; gross := 0; entry_part := 0; exit_part := 0;
        INSERT INTO trading.positions (account_id, instrument_id, strategy_id, leg)
        VALUES (acc.account_id, o.instrument_id, part_strategy[i], key.leg)
        ON CONFLICT ON CONSTRAINT positions_unique DO NOTHING;
        SELECT * INTO p FROM trading.positions x
        WHERE x.account_id = acc.account_id AND x.instrument_id = o.instrument_id
          AND x.strategy_id IS NOT DISTINCT FROM part_strategy[i] AND x.leg = key.leg FOR UPDATE;

        s := trading._signed_qty(p);
        IF (key.leg = 'long' AND s + pd < 0) OR (key.leg = 'short' AND s + pd > 0) THEN
            RAISE EXCEPTION 'fill of % would take the % leg of % past zero (it holds %)',
                pd, key.leg, inst.symbol, abs(s) USING ERRCODE = 'check_violation';
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
            quantity = CASE WHEN key.leg = 'short' THEN -(s + pd) ELSE s + pd END,
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
             WHERE x.account_id = acc.account_id AND x.instrument_id = o.instrument_id AND x.leg = key.leg) END,
        'realized_pnl', realized);
END
$$;

-- The broker refused the order (or the router gave up on it permanently).
CREATE FUNCTION trading.reject_order(order_ref text, reason_code text, reason text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    lk record;
    acc trading.accounts;
    o trading.orders;
    code text := upper(COALESCE(reason_code, 'BROKER_REJECTED'));
    tripped boolean := false;
BEGIN
    lk := trading._locked_order(order_ref);
    acc := lk.acc;
    o := lk.o;
    IF o.status = 'rejected' THEN
        RETURN jsonb_build_object('status', 'already_rejected', 'order_id', o.order_id);
    END IF;
    IF code !~ '^[A-Z][A-Z0-9_]{0,63}$' THEN
        RAISE EXCEPTION 'reason_code must be UPPER_SNAKE (e.g. INSUFFICIENT_FUNDS), got %', quote_literal(reason_code)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE trading.orders x SET status = 'rejected', reason_code = code, reason = reject_order.reason
    WHERE x.order_id = o.order_id;
    UPDATE trading.accounts a SET consecutive_rejections = a.consecutive_rejections + 1
    WHERE a.account_id = acc.account_id RETURNING * INTO acc;
    PERFORM audit.record('order.rejected', 'trading.orders', o.order_id::text,
        jsonb_build_object('reason_code', code, 'reason', reason,
                           'consecutive_rejections', acc.consecutive_rejections));
    IF acc.consecutive_rejections >= acc.max_consecutive_rejections AND acc.mode = 'operator' THEN
        PERFORM risk._trip(acc, 'SOFT', format('%s consecutive order rejections (last: %s)',
                                               acc.consecutive_rejections, code), 'REJECTION_STREAK');
        UPDATE trading.accounts a SET mode = 'advisory' WHERE a.account_id = acc.account_id;
        PERFORM audit.record('account.downgraded', 'trading.accounts', acc.account_id::text,
            jsonb_build_object('to', 'advisory', 'reason', 'consecutive rejections'));
        tripped := true;
    END IF;
    RETURN jsonb_build_object('status', 'rejected', 'order_id', o.order_id,
                              'consecutive_rejections', acc.consecutive_rejections,
                              'breaker_tripped', tripped);
END
$$;

CREATE FUNCTION trading._set_order_status(order_ref text, new_status trading.order_status,
                                          reason text, broker_order_id text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    lk record;
    acc trading.accounts;
    o trading.orders;
BEGIN
    lk := trading._locked_order(order_ref);
    acc := lk.acc;
    o := lk.o;
    IF o.status = new_status AND new_status <> 'partially_filled' THEN
        RETURN jsonb_build_object('status', 'unchanged', 'order_id', o.order_id, 'order_status', o.status);
    END IF;
    UPDATE trading.orders x SET status = new_status,
        reason = COALESCE(_set_order_status.reason, x.reason),
        broker_order_id = COALESCE(_set_order_status.broker_order_id, x.broker_order_id),
        submitted_at = CASE WHEN new_status IN ('in_flight', 'submitted') THEN COALESCE(x.submitted_at, now())
                            ELSE x.submitted_at END
    WHERE x.order_id = o.order_id;
    PERFORM audit.record('order.' || new_status::text, 'trading.orders', o.order_id::text,
        jsonb_build_object('from', o.status, 'reason', reason, 'broker_order_id', broker_order_id));
    RETURN jsonb_build_object('status', new_status, 'order_id', o.order_id, 'previous', o.status);
END
$$;

CREATE FUNCTION trading.cancel_order(order_ref text, reason text DEFAULT NULL) RETURNS jsonb
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
RETURN trading._set_order_status(order_ref, 'cancelled', COALESCE(reason, 'cancelled'));

CREATE FUNCTION trading.expire_order(order_ref text) RETURNS jsonb
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
RETURN trading._set_order_status(order_ref, 'expired', 'expired');

-- The router is about to send the order (its fate is unknown until the broker answers).
CREATE FUNCTION trading.mark_in_flight(order_ref text) RETURNS jsonb
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
RETURN trading._set_order_status(order_ref, 'in_flight', NULL);

-- The broker acknowledged the order.
CREATE FUNCTION trading.acknowledge_order(order_ref text, broker_order_id text) RETURNS jsonb
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
RETURN trading._set_order_status(order_ref, 'submitted', NULL, broker_order_id);

-- Closing orders for positions of an account (one instrument, or all when NULL), net of
-- closing orders already open. Riskiest first: largest unrealized loss, then exposure.
CREATE FUNCTION trading._close_positions(acc trading.accounts, instrument bigint,
                                         trig trading.order_trigger)
RETURNS bigint[]
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p record;
    ids bigint[] := '{}';
    pending numeric;
    qty numeric;
BEGIN
    IF risk.breaker_mode(acc.account_id) = 'FREEZE' THEN
        RAISE EXCEPTION 'account % is frozen (breaker FREEZE): no orders, closes included, until risk.reset_breaker()', acc.name
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    FOR p IN
        SELECT x.*, i.instrument_id AS iid, trading._signed_qty(x) AS sq,
               (COALESCE(x.last_price, x.average_price) - x.average_price) * trading._signed_qty(x) AS upnl,
               abs(trading._signed_qty(x)) * COALESCE(x.last_price, x.average_price) AS exposure
        FROM trading.positions x JOIN market.instruments i USING (instrument_id)
        WHERE x.account_id = acc.account_id AND x.quantity <> 0
          AND (instrument IS NULL OR x.instrument_id = instrument)
        ORDER BY upnl ASC, exposure DESC, x.position_id
    LOOP
        SELECT COALESCE(sum(o.quantity - o.filled_quantity), 0) INTO pending FROM trading.orders o
        WHERE o.account_id = acc.account_id AND o.instrument_id = p.iid AND o.reduce_only
          AND (p.strategy_id IS NULL OR o.strategy_id = p.strategy_id) AND o.position_leg = p.leg
          AND o.side = CASE WHEN p.sq > 0 THEN 'sell' ELSE 'buy' END::trading.order_side
          AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled');
        qty := abs(p.sq) - pending;
        CONTINUE WHEN qty <= 0;
        ids := ids || trading._emit_order(acc, (SELECT i FROM market.instruments i WHERE i.instrument_id = p.iid),
            p.strategy_id, NULL, CASE WHEN p.sq > 0 THEN 'sell' ELSE 'buy' END::trading.order_side, qty,
            trig, COALESCE(p.last_price, p.average_price), reduce_only => true, leg => p.leg);
    END LOOP;
    RETURN ids;
END
$$;

CREATE FUNCTION trading.close_position(account text, symbol text, venue text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts := trading._account(account, true);
    inst market.instruments := market._instrument(symbol, venue);
    ids bigint[];
BEGIN
    ids := trading._close_positions(acc, inst.instrument_id, 'close');
    PERFORM audit.record('control.close_position', 'trading.accounts', acc.account_id::text,
        jsonb_build_object('symbol', inst.symbol, 'orders', to_jsonb(ids)));
    RETURN jsonb_build_object('account', acc.name, 'symbol', inst.symbol, 'order_ids', to_jsonb(ids));
END
$$;

CREATE FUNCTION trading.close_all(account text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts := trading._account(account, true);
    ids bigint[];
BEGIN
    ids := trading._close_positions(acc, NULL, 'close');
    PERFORM audit.record('control.close_all', 'trading.accounts', acc.account_id::text,
                         jsonb_build_object('orders', to_jsonb(ids)));
    RETURN jsonb_build_object('account', acc.name, 'order_ids', to_jsonb(ids));
END
$$;

-- A trader's own order, through the same risk gate (strategy-scoped limits do not apply).
CREATE FUNCTION trading.place_manual_order(spec jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts;
    inst market.instruments;
    side trading.order_side;
    otype trading.order_type;
    tif trading.time_in_force;
    qty numeric; lp numeric; sp numeric; price numeric;
    cur numeric;
    d numeric;
    opening numeric;
    denial record;
    oid bigint;
BEGIN
    IF spec IS NULL OR jsonb_typeof(spec) <> 'object' THEN
        RAISE EXCEPTION 'an order must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    acc := trading._account(trading._text(spec, 'account', 'order', 64), true);
    inst := market._instrument(trading._text(spec, 'symbol', 'order', 40), trading._text(spec, 'venue', 'order', 32));
    IF acc.mode <> 'operator' THEN
        RAISE EXCEPTION 'account % is in advisory mode: it places no orders', acc.name
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    BEGIN
        side := lower(trading._text(spec, 'side', 'order', 4))::trading.order_side;
        otype := lower(COALESCE(trading._text(spec, 'type', 'order', 12), 'market'))::trading.order_type;
        tif := upper(COALESCE(trading._text(spec, 'time_in_force', 'order', 3), 'GTC'))::trading.time_in_force;
    EXCEPTION WHEN invalid_text_representation THEN
        RAISE EXCEPTION 'order.side must be buy or sell, order.type market, limit, stop or stop_limit, order.time_in_force GTC, IOC, FOK or GTD'
            USING ERRCODE = 'invalid_parameter_value';
    END;
    IF side IS NULL THEN
        RAISE EXCEPTION 'order.side is required (buy or sell)' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    qty := trading._num(spec, 'quantity', 'order', 0, NULL, false);
    IF qty IS NULL THEN
        RAISE EXCEPTION 'order.quantity is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF trading._round_down(qty, inst.quantity_step) <> qty OR qty < inst.min_quantity THEN
        RAISE EXCEPTION 'order.quantity % must be a multiple of % and at least % for %',
            qty, inst.quantity_step, inst.min_quantity, inst.symbol USING ERRCODE = 'invalid_parameter_value';
    END IF;
    lp := trading._num(spec, 'limit_price', 'order', 0, NULL, false);
    sp := trading._num(spec, 'stop_price', 'order', 0, NULL, false);
    price := COALESCE(lp, sp, market.latest_close(inst.instrument_id));
    IF price IS NULL THEN
        RAISE EXCEPTION 'no price for % (no bars and no limit price)', inst.symbol USING ERRCODE = 'no_data_found';
    END IF;
    SELECT COALESCE(sum(trading._signed_qty(p)), 0) INTO cur FROM trading.positions p
    WHERE p.account_id = acc.account_id AND p.instrument_id = inst.instrument_id;
    d := CASE WHEN side = 'buy' THEN qty ELSE -qty END;
    opening := CASE WHEN cur = 0 OR sign(cur) = sign(d) THEN qty ELSE GREATEST(qty - abs(cur), 0) END;
    IF COALESCE((spec ->> 'reduce_only')::boolean, false) AND opening > 0 THEN
        RAISE EXCEPTION 'a reduce_only order of % would open % (position %)', qty, opening, cur
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT * INTO denial FROM risk.check_order(acc, NULL, inst, side, qty, opening, price,
        trading._num(spec, 'stop_loss', 'order', 0, NULL, false), now());
    IF denial.code IS NOT NULL THEN
        PERFORM audit.record('order.refused', 'trading.accounts', acc.account_id::text,
                             jsonb_build_object('reason_code', denial.code, 'reason', denial.reason, 'spec', spec));
        RETURN jsonb_build_object('status', 'rejected', 'reason_code', denial.code, 'reason', denial.reason,
                                  'order_id', NULL);
    END IF;
    oid := trading._emit_order(acc, inst, NULL, NULL, side, qty, 'manual', price,
        reduce_only => opening = 0,
        -- hedge accounts: an entry opens the leg of its side, a reduction closes the other
        leg => CASE WHEN acc.position_mode = 'oneway' THEN 'net'
                    WHEN (side = 'buy') <> (opening = 0) THEN 'long'
                    ELSE 'short' END::trading.position_leg,
        order_type => otype, limit_price => lp, stop_price => sp, tif => tif,
        expire_at => trading._ts(spec, 'expire_at', 'order'),
        stop_loss => trading._num(spec, 'stop_loss', 'order', 0, NULL, false),
        take_profit => trading._num(spec, 'take_profit', 'order', 0, NULL, false),
        client_order_id => trading._text(spec, 'client_order_id', 'order', 64));
    RETURN jsonb_build_object('status', 'approved', 'order_id', oid, 'reason_code', NULL, 'reason', NULL);
END
$$;

-- ======== from 0002_06_pre_protection.sql
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

-- ======== from 0002_07_pre_trading_grants.sql
-- 0002_07 (pre): who may call the trading core. Every write goes through these
-- SECURITY DEFINER functions; no role but mmats_owner writes a table.
SET LOCAL ROLE mmats_owner;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA market, trading, risk FROM PUBLIC;

-- strategy: submit signals, read its own decisions
GRANT EXECUTE ON FUNCTION trading.submit_signal(jsonb) TO mmats_strategy, mmats_api;
GRANT SELECT ON trading.signals, trading.accounts, trading.positions TO mmats_strategy;

-- router: settle orders with the broker's answers
GRANT EXECUTE ON FUNCTION trading.apply_fill(jsonb), trading.reject_order(text, text, text),
    trading.cancel_order(text, text), trading.expire_order(text), trading.mark_in_flight(text),
    trading.acknowledge_order(text, text) TO mmats_router;
GRANT SELECT ON trading.fills, trading.positions TO mmats_router;

-- api: the controls
GRANT EXECUTE ON FUNCTION
    trading.create_account(text, text, text, numeric, text, text, text, boolean, numeric, numeric),
    trading.assign_strategy(text, text, numeric, text, jsonb, integer, numeric),
    trading.cancel_order(text, text), trading.close_position(text, text, text),
    trading.close_all(text), trading.place_manual_order(jsonb),
    trading.request_operator_mode(text), trading.confirm_operator_mode(text, text),
    trading.set_advisory(text, text),
    risk.set_limit(text, numeric, text, text, text, text, jsonb), risk.remove_limit(bigint),
    risk.trip_breaker(text, text, text), risk.reset_breaker(text, text)
    TO mmats_api;

-- read-only helpers for everyone who reads
GRANT EXECUTE ON FUNCTION trading.account_equity(bigint), trading.fx_rate(text, text, timestamptz),
    market.latest_close(bigint, timestamptz), risk.effective_limits(bigint),
    risk.breaker_mode(bigint) TO mmats_readonly, mmats_api, mmats_strategy, mmats_router;
GRANT SELECT ON ALL TABLES IN SCHEMA market, trading, risk TO mmats_readonly, mmats_api;

-- ======== from 0003_01_pre_backtest.sql
-- 0003_01 (pre): backtest runs as rows. A run owns one backtest account; the engine
-- replays stored bars through the trading core's own functions (submit_signal,
-- protect_bars, apply_fill, cancel_order) with backtest.step, and records what it
-- measured: the equity curve, the metrics, Monte Carlo and walk-forward results.
-- Trades are the account's trading.trades rows (the backtest.trades view names them).
RESET ROLE;
CREATE SCHEMA IF NOT EXISTS backtest AUTHORIZATION mmats_owner;
COMMENT ON SCHEMA backtest IS 'backtest runs, their equity curves, metrics, Monte Carlo and walk-forward results';
SET LOCAL ROLE mmats_owner;

CREATE TYPE backtest.run_status AS ENUM ('running', 'finished', 'failed');

CREATE SEQUENCE backtest.run_seq;

CREATE TABLE backtest.runs (
    run_id          bigint PRIMARY KEY DEFAULT nextval('backtest.run_seq'),
    account_id      bigint NOT NULL UNIQUE REFERENCES trading.accounts,
    strategy        text NOT NULL CONSTRAINT runs_strategy_format
                        CHECK (strategy ~ '^[A-Za-z][A-Za-z0-9_.-]{0,63}$'),
    strategy_version text NOT NULL CONSTRAINT runs_strategy_version_format
                        CHECK (strategy_version ~ '^[A-Za-z0-9][A-Za-z0-9_.+-]{0,31}$'),
    params          jsonb NOT NULL DEFAULT '{}' CONSTRAINT runs_params_object
                        CHECK (jsonb_typeof(params) = 'object'),
    symbols         text[] NOT NULL CONSTRAINT runs_symbols_count
                        CHECK (cardinality(symbols) BETWEEN 1 AND 200),
    timeframe       market.timeframe NOT NULL,
    start_ts        timestamptz NOT NULL,
    end_ts          timestamptz NOT NULL,
    starting_cash   numeric NOT NULL CONSTRAINT runs_starting_cash_positive
                        CHECK (starting_cash > 0 AND starting_cash < 'Infinity'),
    currency        text NOT NULL CHECK (currency ~ '^[A-Z0-9]{2,12}$'),
    -- commission, slippage, spread, shorting, seed, limits: every assumption of the run
    settings        jsonb NOT NULL DEFAULT '{}' CONSTRAINT runs_settings_object
                        CHECK (jsonb_typeof(settings) = 'object'),
    label           text CONSTRAINT runs_label_length CHECK (length(label) BETWEEN 1 AND 200),
    -- a walk-forward's windows are runs of their own
    walk_forward_id bigint,
    status          backtest.run_status NOT NULL DEFAULT 'running',
    bars            bigint CHECK (bars >= 0),
    -- SHA-256 of the canonical trade list and open positions: equal runs, equal prints
    fingerprint     text CONSTRAINT runs_fingerprint_format CHECK (fingerprint ~ '^[0-9a-f]{64}$'),
    error           text CONSTRAINT runs_error_length CHECK (length(error) <= 2000),
    -- what the engine counted and checked: signals by status, fills, sanity warnings,
    -- strategy errors
    notes           jsonb NOT NULL DEFAULT '{}' CONSTRAINT runs_notes_object
                        CHECK (jsonb_typeof(notes) = 'object'),
    created_by      text NOT NULL DEFAULT session_user,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    elapsed_seconds double precision CHECK (elapsed_seconds >= 0),
    CONSTRAINT runs_period_order CHECK (end_ts > start_ts),
    CONSTRAINT runs_finished_has_fingerprint CHECK (status <> 'finished' OR fingerprint IS NOT NULL)
);
COMMENT ON CONSTRAINT runs_period_order ON backtest.runs IS 'a run''s end must be after its start';
CREATE INDEX runs_strategy_idx ON backtest.runs (strategy, created_at DESC);

-- One row per metric and scope: the run as a whole, or one strategy, market or symbol.
CREATE TABLE backtest.metrics (
    run_id     bigint NOT NULL REFERENCES backtest.runs ON DELETE CASCADE,
    scope      text NOT NULL CHECK (scope IN ('run', 'strategy', 'market', 'symbol')),
    scope_key  text NOT NULL DEFAULT '' CHECK (length(scope_key) <= 64),
    metric     text NOT NULL CHECK (metric ~ '^[a-z][a-z0-9_]{0,63}$'),
    value      numeric CONSTRAINT metrics_value_is_number
                   CHECK (value NOT IN ('NaN', 'Infinity', '-Infinity')),
    PRIMARY KEY (run_id, scope, scope_key, metric)
);

-- The equity curve at bar closes (sampled for very long runs; the metrics are computed
-- on every bar), with the buy-and-hold benchmark on the same times.
CREATE TABLE backtest.equity (
    run_id     bigint NOT NULL REFERENCES backtest.runs ON DELETE CASCADE,
    ts         timestamptz NOT NULL,
    equity     numeric NOT NULL CHECK (equity NOT IN ('NaN', 'Infinity', '-Infinity')),
    benchmark  numeric CHECK (benchmark NOT IN ('NaN', 'Infinity', '-Infinity')),
    drawdown   double precision NOT NULL CHECK (drawdown >= 0 AND drawdown <= 1e6),
    exposed    boolean NOT NULL,
    PRIMARY KEY (run_id, ts)
);

CREATE TABLE backtest.montecarlo (
    run_id        bigint NOT NULL REFERENCES backtest.runs ON DELETE CASCADE,
    method        text NOT NULL CHECK (method IN ('shuffle', 'bootstrap')),
    paths         integer NOT NULL CHECK (paths BETWEEN 1 AND 100000),
    seed          bigint NOT NULL,
    ruin_level    numeric NOT NULL CHECK (ruin_level > 0 AND ruin_level < 1),
    result        jsonb NOT NULL CHECK (jsonb_typeof(result) = 'object'),
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, method, paths, seed, ruin_level)
);

CREATE TABLE backtest.walk_forwards (
    walk_forward_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    strategy        text NOT NULL CHECK (strategy ~ '^[A-Za-z][A-Za-z0-9_.-]{0,63}$'),
    symbols         text[] NOT NULL CHECK (cardinality(symbols) BETWEEN 1 AND 200),
    timeframe       market.timeframe NOT NULL,
    start_ts        timestamptz NOT NULL,
    end_ts          timestamptz NOT NULL CHECK (end_ts > start_ts),
    settings        jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(settings) = 'object'),
    objective       text NOT NULL CHECK (objective ~ '^[a-z][a-z0-9_]{0,63}$'),
    status          backtest.run_status NOT NULL DEFAULT 'running',
    result          jsonb CHECK (jsonb_typeof(result) = 'object'),
    created_by      text NOT NULL DEFAULT session_user,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
ALTER TABLE backtest.runs ADD CONSTRAINT runs_walk_forward_fk
    FOREIGN KEY (walk_forward_id) REFERENCES backtest.walk_forwards;

CREATE TABLE backtest.walk_forward_windows (
    walk_forward_id bigint NOT NULL REFERENCES backtest.walk_forwards ON DELETE CASCADE,
    window_no       integer NOT NULL CHECK (window_no >= 1),
    train_start     timestamptz NOT NULL,
    train_end       timestamptz NOT NULL,
    test_start      timestamptz NOT NULL,
    test_end        timestamptz NOT NULL,
    params          jsonb NOT NULL CHECK (jsonb_typeof(params) = 'object'),
    train_score     double precision,
    candidates      integer NOT NULL CHECK (candidates >= 1),
    test_run_id     bigint REFERENCES backtest.runs,
    PRIMARY KEY (walk_forward_id, window_no),
    CONSTRAINT walk_forward_windows_order
        CHECK (train_start < train_end AND train_end <= test_start AND test_start < test_end)
);
COMMENT ON CONSTRAINT walk_forward_windows_order ON backtest.walk_forward_windows IS
    'a window trains before it tests: train_start < train_end <= test_start < test_end';

-- the orders of one account by number: backtest.step returns the orders it created
-- (those numbered above the sequence's value before it) with one range probe
CREATE INDEX orders_account_order_idx ON trading.orders (account_id, order_id);

------------------------------------------------------------------------------ views
-- The closed trades of every run, with names instead of ids.
CREATE VIEW backtest.trades AS
SELECT r.run_id, t.trade_id, i.symbol, i.market::text AS market, s.name AS strategy, t.side,
       trim_scale(t.quantity) AS quantity, t.entry_time, trim_scale(t.entry_price) AS entry_price,
       t.exit_time, trim_scale(t.exit_price) AS exit_price, trim_scale(t.gross_pnl) AS gross_pnl,
       trim_scale(t.commission) AS commission, trim_scale(t.pnl) AS pnl,
       t.exit_trigger::text AS exit_trigger
FROM backtest.runs r
JOIN trading.trades t ON t.account_id = r.account_id
JOIN market.instruments i ON i.instrument_id = t.instrument_id
LEFT JOIN trading.strategies s ON s.strategy_id = t.strategy_id;

-- What each run still held at its end, marked at the last close.
CREATE VIEW backtest.open_positions AS
SELECT r.run_id, i.symbol, i.market::text AS market, s.name AS strategy,
       CASE WHEN trading._signed_qty(p) > 0 THEN 'long' ELSE 'short' END AS side,
       trim_scale(abs(p.quantity)) AS quantity, trim_scale(p.average_price) AS average_price,
       trim_scale(p.last_price) AS last_price,
       trim_scale(trading._signed_qty(p) * (p.last_price - p.average_price)) AS unrealized_pnl,
       p.opened_at
FROM backtest.runs r
JOIN trading.positions p ON p.account_id = r.account_id AND p.quantity <> 0
JOIN market.instruments i ON i.instrument_id = p.instrument_id
LEFT JOIN trading.strategies s ON s.strategy_id = COALESCE(p.strategy_id, p.entry_strategy_id);

-- One row per run with its headline figures.
CREATE VIEW backtest.summary AS
SELECT r.run_id, r.strategy, r.strategy_version, r.params, r.symbols, r.timeframe::text AS timeframe,
       r.start_ts, r.end_ts, r.starting_cash, r.currency, r.status, r.bars, r.fingerprint,
       r.created_at, r.elapsed_seconds, r.walk_forward_id, r.label,
       max(m.value) FILTER (WHERE m.metric = 'final_equity') AS final_equity,
       max(m.value) FILTER (WHERE m.metric = 'total_return') AS total_return,
       max(m.value) FILTER (WHERE m.metric = 'sharpe') AS sharpe,
       max(m.value) FILTER (WHERE m.metric = 'max_drawdown') AS max_drawdown,
       max(m.value) FILTER (WHERE m.metric = 'trades') AS trades,
       max(m.value) FILTER (WHERE m.metric = 'win_rate') AS win_rate,
       max(m.value) FILTER (WHERE m.metric = 'buy_and_hold_return') AS buy_and_hold_return
FROM backtest.runs r
LEFT JOIN backtest.metrics m ON m.run_id = r.run_id AND m.scope = 'run'
GROUP BY r.run_id;

------------------------------------------------------------------------------ functions
CREATE FUNCTION backtest._run(run bigint, lock boolean DEFAULT false) RETURNS backtest.runs
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r backtest.runs;
BEGIN
    IF lock THEN
        SELECT * INTO r FROM backtest.runs x WHERE x.run_id = run FOR UPDATE;
    ELSE
        SELECT * INTO r FROM backtest.runs x WHERE x.run_id = run;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown backtest run %', COALESCE(run::text, 'NULL')
            USING ERRCODE = 'foreign_key_violation', HINT = 'list the runs with `mmats backtest list`';
    END IF;
    RETURN r;
END
$$;

-- A run and its account (named bt-<run id>, backtest environment, operator mode, the
-- strategy assigned with all the capital, sized by percent of equity unless the
-- settings say otherwise). Returns the run id.
CREATE FUNCTION backtest.create_run(strategy text, strategy_version text, params jsonb,
                                    symbols text[], timeframe text, start_ts timestamptz,
                                    end_ts timestamptz, cash numeric, currency text,
                                    settings jsonb DEFAULT '{}', label text DEFAULT NULL,
                                    walk_forward_id bigint DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    id bigint := nextval('backtest.run_seq');
    acc bigint;
    s jsonb := COALESCE(settings, '{}');
BEGIN
    IF symbols IS NULL OR cardinality(symbols) = 0 THEN
        RAISE EXCEPTION 'a backtest needs at least one symbol' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF start_ts IS NULL OR end_ts IS NULL OR end_ts <= start_ts THEN
        RAISE EXCEPTION 'a backtest period needs a start before its end, got % to %',
            COALESCE(start_ts::text, 'NULL'), COALESCE(end_ts::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cash IS NULL OR cash = 'NaN' OR cash <= 0 OR cash = 'Infinity' THEN
        RAISE EXCEPTION 'backtest cash must be a number > 0, got %', COALESCE(cash::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF timeframe IS NULL OR timeframe NOT IN (SELECT unnest(enum_range(NULL::market.timeframe))::text) THEN
        RAISE EXCEPTION 'unknown timeframe %, expected one of %', quote_literal(COALESCE(timeframe, 'NULL')),
            array_to_string(enum_range(NULL::market.timeframe), ', ')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    acc := trading.create_account('bt-' || id, 'backtest', 'operator', cash, currency,
        position_mode => COALESCE(s ->> 'position_mode', 'oneway'),
        aggregation => 'independent',
        allow_short => COALESCE((s ->> 'allow_short')::boolean, false),
        taker_fee => COALESCE(trading._num(s, 'taker_fee', 'settings', 0, 0.1), 0),
        maker_fee => COALESCE(trading._num(s, 'maker_fee', 'settings', -0.01, 0.1), 0));
    INSERT INTO backtest.runs (run_id, account_id, strategy, strategy_version, params, symbols,
                               timeframe, start_ts, end_ts, starting_cash, currency, settings,
                               label, walk_forward_id)
    VALUES (id, acc, strategy, strategy_version, COALESCE(params, '{}'),
            ARRAY(SELECT upper(x) FROM unnest(symbols) x), timeframe::market.timeframe,
            start_ts, end_ts, cash, upper(currency), s, label, walk_forward_id);
    -- the strategy's own versioned row, so that its signals find this assignment
    INSERT INTO trading.account_strategies (account_id, strategy_id, allocation, sizing_method,
                                            sizing_params)
    VALUES (acc, (trading._strategy(strategy, strategy_version)).strategy_id,
            COALESCE(trading._num(s, 'allocation', 'settings', 0, 1), 1),
            COALESCE(s ->> 'sizing_method', 'percent_equity')::trading.sizing_method,
            COALESCE(s -> 'sizing_params', '{}'));
    PERFORM audit.record('backtest.created', 'backtest.runs', id::text,
        jsonb_build_object('strategy', strategy, 'version', strategy_version, 'symbols', symbols,
                           'timeframe', timeframe, 'start', start_ts, 'end', end_ts, 'cash', cash,
                           'settings', s));
    RETURN id;
END
$$;

-- The account as the engine needs it after a step: cash, equity and every open position
-- with its protection (what the engine watches to know when to call protect_bars).
CREATE FUNCTION backtest._state(account bigint) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN (
    SELECT jsonb_build_object(
        'cash', e.cash, 'equity', e.equity, 'positions_value', e.positions_value,
        'positions', COALESCE((
            SELECT jsonb_agg(jsonb_build_object(
                'instrument_id', p.instrument_id, 'symbol', i.symbol, 'leg', p.leg,
                'strategy_id', p.strategy_id, 'quantity', trading._signed_qty(p),
                'average_price', p.average_price, 'last_price', p.last_price,
                'stop_loss', p.stop_loss, 'take_profit', p.take_profit,
                'trailing_stop', p.trailing_stop, 'trail_anchor', p.trail_anchor,
                'breakeven', p.breakeven, 'marked_at', p.marked_at,
                'unrealized_pnl', trading._signed_qty(p) * (COALESCE(p.last_price, p.average_price) - p.average_price))
                ORDER BY p.position_id)
            FROM trading.positions p JOIN market.instruments i USING (instrument_id)
            WHERE p.account_id = account AND p.quantity <> 0), '[]'))
    FROM trading.account_equity(account) e);

-- One step of a run: the operations in order, each through the trading core's own
-- function, in one transaction. Operations (JSON objects, "op" names the kind):
--   {"op": "fill", "order_id": N, "broker_fill_id": ..., "quantity", "price", "commission", "ts", "liquidity"}
--                                                                   -> trading.apply_fill
--   {"op": "cancel", "order_id": N, "reason": "..."}                -> trading.cancel_order
--   {"op": "protect", "instrument_id": N, "timeframe": "1m", "from": ts, "to": ts}
--        the stored bars with from <= ts <= to                      -> trading.protect_bars
--   {"op": "signal", ...the signal...} (its account is the run's)   -> trading.submit_signal
-- Every order and fill must belong to the run's account. Returns the results in order,
-- the orders the step created, and the account's state after it.
CREATE FUNCTION backtest.step(run bigint, ops jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r backtest.runs := backtest._run(run);
    acc trading.accounts;
    op jsonb;
    kind text;
    res jsonb;
    results jsonb := '[]';
    pb record;
    n integer := 0;
    -- every order the step creates is returned, the breaker's closing orders included
    -- (protect_bars' equity snapshot may trip it): they are the orders numbered above this
    before bigint := (SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END
                      FROM trading.orders_order_id_seq s);
BEGIN
    IF r.status <> 'running' THEN
        RAISE EXCEPTION 'backtest run % is %: it takes no more steps', run, r.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF ops IS NULL OR jsonb_typeof(ops) <> 'array' THEN
        RAISE EXCEPTION 'backtest.step needs a JSON array of operations' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO acc FROM trading.accounts a WHERE a.account_id = r.account_id;
    FOR op IN SELECT x FROM jsonb_array_elements(ops) x LOOP
        n := n + 1;
        kind := CASE WHEN jsonb_typeof(op) = 'object' THEN op ->> 'op' END;
        IF kind IN ('fill', 'cancel') THEN
            IF NOT EXISTS (SELECT 1 FROM trading.orders o
                           WHERE o.order_id = trading._num(op, 'order_id', 'step', 0)::bigint
                             AND o.account_id = acc.account_id) THEN
                RAISE EXCEPTION 'backtest.step operation %: order % is not an order of run %', n,
                    COALESCE(op ->> 'order_id', 'NULL'), run USING ERRCODE = 'foreign_key_violation';
            END IF;
        END IF;
        CASE kind
        WHEN 'fill' THEN
            res := trading.apply_fill(op - 'op');
        WHEN 'cancel' THEN
            res := trading.cancel_order(op ->> 'order_id', COALESCE(op ->> 'reason', 'cancelled by the simulator'));
        WHEN 'protect' THEN
            pb := trading.protect_bars(trading._num(op, 'instrument_id', 'step', 0)::bigint,
                ARRAY(SELECT b FROM market.bars b
                      WHERE b.instrument_id = trading._num(op, 'instrument_id', 'step', 0)::bigint
                        AND b.timeframe = (op ->> 'timeframe')::market.timeframe
                        AND b.ts BETWEEN trading._ts(op, 'from', 'step') AND trading._ts(op, 'to', 'step')
                      ORDER BY b.ts),
                acc.account_id, true);
            res := jsonb_build_object('order_ids', to_jsonb(pb.order_ids), 'marked_until', pb.marked_until);
        WHEN 'signal' THEN
            res := trading.submit_signal(jsonb_set(op - 'op', '{account}', to_jsonb(acc.name)));
        ELSE
            RAISE EXCEPTION 'backtest.step operation %: unknown op %, expected fill, cancel, protect or signal',
                n, COALESCE(quote_literal(op ->> 'op'), 'NULL') USING ERRCODE = 'invalid_parameter_value';
        END CASE;
        results := results || jsonb_build_array(res);
    END LOOP;
    RETURN jsonb_build_object(
        'results', results,
        'orders', COALESCE((SELECT jsonb_agg(jsonb_build_object(
                'order_id', o.order_id, 'instrument_id', o.instrument_id, 'side', o.side,
                'order_type', o.order_type, 'quantity', o.quantity, 'limit_price', o.limit_price,
                'stop_price', o.stop_price, 'trigger', o.trigger, 'trigger_price', o.trigger_price,
                'reduce_only', o.reduce_only, 'reference_price', o.reference_price,
                'strategy_id', o.strategy_id, 'stop_loss', o.stop_loss,
                'take_profit', o.take_profit, 'trailing_stop', o.trailing_stop,
                'breakeven', o.breakeven) ORDER BY o.order_id)
            FROM trading.orders o WHERE o.account_id = acc.account_id AND o.order_id > before), '[]'),
        'account', backtest._state(acc.account_id));
END
$$;

-- The end of a run: its fingerprint, bar count and timing; its queue messages are
-- removed (a backtest's orders are settled by the simulator, never by a router).
CREATE FUNCTION backtest.finish_run(run bigint, status text, fingerprint text DEFAULT NULL,
                                    bars bigint DEFAULT NULL, elapsed_seconds double precision DEFAULT NULL,
                                    error text DEFAULT NULL, notes jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r backtest.runs := backtest._run(run, true);
BEGIN
    IF r.status <> 'running' THEN
        RAISE EXCEPTION 'backtest run % is already %', run, r.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF status NOT IN ('finished', 'failed') THEN
        RAISE EXCEPTION 'a run finishes as finished or failed, got %', quote_literal(status)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE backtest.runs x SET status = finish_run.status::backtest.run_status,
        fingerprint = finish_run.fingerprint, bars = finish_run.bars,
        elapsed_seconds = finish_run.elapsed_seconds, error = left(finish_run.error, 2000),
        notes = COALESCE(finish_run.notes, '{}'), finished_at = now()
    WHERE x.run_id = run;
    DELETE FROM pgmq.q_orders q WHERE (q.message ->> 'account_id')::bigint = r.account_id;
    PERFORM audit.record('backtest.' || status, 'backtest.runs', run::text,
        jsonb_build_object('fingerprint', fingerprint, 'bars', bars, 'error', left(error, 2000)));
END
$$;

-- The equity curve, in one call per batch of points.
CREATE FUNCTION backtest.record_equity(run bigint, ts timestamptz[], equity numeric[],
                                       benchmark numeric[], drawdown double precision[],
                                       exposed boolean[])
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r backtest.runs := backtest._run(run);
    n integer;
BEGIN
    IF r.status <> 'running' THEN
        RAISE EXCEPTION 'backtest run % is %: its equity curve is final', run, r.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF cardinality(ts) IS DISTINCT FROM cardinality(equity)
       OR cardinality(ts) IS DISTINCT FROM cardinality(drawdown)
       OR cardinality(ts) IS DISTINCT FROM cardinality(exposed)
       OR (benchmark IS NOT NULL AND cardinality(ts) IS DISTINCT FROM cardinality(benchmark)) THEN
        RAISE EXCEPTION 'record_equity needs arrays of one length (ts %, equity %, drawdown %, exposed %)',
            cardinality(ts), cardinality(equity), cardinality(drawdown), cardinality(exposed)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO backtest.equity (run_id, ts, equity, benchmark, drawdown, exposed)
    SELECT run, u.t, u.e, u.b, u.d, u.x
    FROM unnest(ts, equity, COALESCE(benchmark, array_fill(NULL::numeric, ARRAY[cardinality(ts)])),
                drawdown, exposed) AS u(t, e, b, d, x);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Metrics as {"run": {name: value}, "strategy": {key: {name: value}}, "market": ..., "symbol": ...};
-- non-numeric and null values are left out. Replaces the run's earlier metrics.
CREATE FUNCTION backtest.record_metrics(run bigint, metrics jsonb) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r backtest.runs := backtest._run(run);
    n integer;
BEGIN
    IF metrics IS NULL OR jsonb_typeof(metrics) <> 'object' THEN
        RAISE EXCEPTION 'metrics must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM backtest.metrics m WHERE m.run_id = r.run_id;
    INSERT INTO backtest.metrics (run_id, scope, scope_key, metric, value)
    SELECT r.run_id, 'run', '', k, v::text::numeric
    FROM jsonb_each(COALESCE(metrics -> 'run', '{}')) AS x(k, v)
    WHERE jsonb_typeof(v) = 'number'
    UNION ALL
    SELECT r.run_id, g.scope, g.key, k, v::text::numeric
    FROM (SELECT s.scope, e.key, e.value
          FROM unnest(ARRAY['strategy', 'market', 'symbol']) AS s(scope),
               LATERAL jsonb_each(CASE WHEN jsonb_typeof(metrics -> s.scope) = 'object'
                                       THEN metrics -> s.scope ELSE '{}' END) AS e) g,
         LATERAL jsonb_each(CASE WHEN jsonb_typeof(g.value) = 'object' THEN g.value ELSE '{}' END) AS x(k, v)
    WHERE jsonb_typeof(v) = 'number';
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

CREATE FUNCTION backtest.record_montecarlo(run bigint, method text, paths integer, seed bigint,
                                           ruin_level numeric, result jsonb)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r backtest.runs := backtest._run(run);
BEGIN
    INSERT INTO backtest.montecarlo AS m (run_id, method, paths, seed, ruin_level, result)
    VALUES (r.run_id, method, paths, seed, ruin_level, result)
    ON CONFLICT ON CONSTRAINT montecarlo_pkey DO UPDATE SET result = EXCLUDED.result,
        created_at = now();
END
$$;

CREATE FUNCTION backtest.create_walk_forward(strategy text, symbols text[], timeframe text,
                                             start_ts timestamptz, end_ts timestamptz,
                                             objective text, settings jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    id bigint;
BEGIN
    INSERT INTO backtest.walk_forwards AS w (strategy, symbols, timeframe, start_ts, end_ts,
                                             objective, settings)
    VALUES (strategy, ARRAY(SELECT upper(x) FROM unnest(symbols) x), timeframe::market.timeframe,
            start_ts, end_ts, objective, COALESCE(settings, '{}'))
    RETURNING w.walk_forward_id INTO id;
    PERFORM audit.record('walk_forward.created', 'backtest.walk_forwards', id::text,
        jsonb_build_object('strategy', strategy, 'symbols', symbols, 'objective', objective));
    RETURN id;
END
$$;

CREATE FUNCTION backtest.record_window(walk_forward bigint, window_no integer,
                                       train_start timestamptz, train_end timestamptz,
                                       test_start timestamptz, test_end timestamptz,
                                       params jsonb, train_score double precision,
                                       candidates integer, test_run bigint)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    INSERT INTO backtest.walk_forward_windows (walk_forward_id, window_no, train_start, train_end,
        test_start, test_end, params, train_score, candidates, test_run_id)
    VALUES (walk_forward, window_no, train_start, train_end, test_start, test_end, params,
            train_score, candidates, test_run);
END;

CREATE FUNCTION backtest.finish_walk_forward(walk_forward bigint, status text, result jsonb)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE backtest.walk_forwards w SET status = finish_walk_forward.status::backtest.run_status,
        result = finish_walk_forward.result, finished_at = now()
    WHERE w.walk_forward_id = walk_forward AND w.status = 'running';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'walk-forward % is unknown or already finished', walk_forward
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    PERFORM audit.record('walk_forward.' || status, 'backtest.walk_forwards', walk_forward::text,
        jsonb_build_object('windows', (SELECT count(*) FROM backtest.walk_forward_windows x
                                       WHERE x.walk_forward_id = walk_forward)));
END
$$;

-- Fresh statistics for the ledger's tables. A backtest writes thousands of rows into
-- tables that may have been empty when its session planned the trading functions; the
-- plans cached then (e.g. the duplicate-fill lookup taking the account/time index and
-- filtering every fill of the account) stay until the statistics change. The engine
-- calls this a few times as a run grows; it re-plans its session's functions.
CREATE FUNCTION backtest.refresh_statistics() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    ANALYZE trading.fills, trading.orders, trading.signals, trading.positions, trading.trades;
END
$$;

------------------------------------------------------------------------------ grants
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA backtest FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA backtest FROM PUBLIC;
GRANT USAGE ON SCHEMA backtest TO mmats_api, mmats_readonly;
GRANT SELECT ON ALL TABLES IN SCHEMA backtest TO mmats_api, mmats_readonly;
GRANT EXECUTE ON FUNCTION
    backtest.create_run(text, text, jsonb, text[], text, timestamptz, timestamptz, numeric, text, jsonb, text, bigint),
    backtest.step(bigint, jsonb),
    backtest.finish_run(bigint, text, text, bigint, double precision, text, jsonb),
    backtest.record_equity(bigint, timestamptz[], numeric[], numeric[], double precision[], boolean[]),
    backtest.record_metrics(bigint, jsonb),
    backtest.record_montecarlo(bigint, text, integer, bigint, numeric, jsonb),
    backtest.create_walk_forward(text, text[], text, timestamptz, timestamptz, text, jsonb),
    backtest.record_window(bigint, integer, timestamptz, timestamptz, timestamptz, timestamptz, jsonb, double precision, integer, bigint),
    backtest.finish_walk_forward(bigint, text, jsonb),
    backtest.refresh_statistics()
    TO mmats_api;

-- ======== from 0003_02_pre_faster_core.sql
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

-- ======== from 0004_01_pre_runtime.sql
-- 0004_01 (pre): the live and paper runtime. Workers report heartbeats and errors and keep
-- their resume points here; a new bar wakes the strategy worker and the router (NOTIFY);
-- the router drains the order queue only through the functions below; broker secrets are
-- stored encrypted (AES-256-GCM, by the runtime) in a table only the router may read; the
-- reconciler reports what the broker and the ledger disagree on as a risk event.
RESET ROLE;
CREATE SCHEMA IF NOT EXISTS runtime AUTHORIZATION mmats_owner;
COMMENT ON SCHEMA runtime IS 'workers: heartbeats, errors, resume points, broker secrets';
SET LOCAL ROLE mmats_owner;

------------------------------------------------------------------------------ heartbeats
CREATE TABLE runtime.workers (
    name        text PRIMARY KEY CONSTRAINT workers_name_format
                    CHECK (name ~ '^[a-z][a-z0-9_.:-]{0,63}$'),
    kind        text NOT NULL CONSTRAINT workers_kind_known
                    CHECK (kind IN ('supervisor', 'ingest', 'strategies', 'router',
                                    'reconciler', 'notifier', 'replay')),
    state       text NOT NULL CONSTRAINT workers_state_known
                    CHECK (state IN ('starting', 'running', 'degraded', 'stopping', 'stopped',
                                     'failed')),
    pid         integer,
    host        text CHECK (length(host) <= 255),
    started_at  timestamptz NOT NULL DEFAULT now(),
    beat_at     timestamptz NOT NULL DEFAULT now(),
    beats       bigint NOT NULL DEFAULT 1,
    detail      jsonb NOT NULL DEFAULT '{}' CONSTRAINT workers_detail_object
                    CHECK (jsonb_typeof(detail) = 'object')
);

-- A worker says it is alive (and what it is doing). 'starting' begins a new life.
CREATE FUNCTION runtime.heartbeat(name text, kind text, state text DEFAULT 'running',
                                  pid integer DEFAULT NULL, host text DEFAULT NULL,
                                  detail jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF detail IS NULL OR jsonb_typeof(detail) <> 'object' THEN
        RAISE EXCEPTION 'heartbeat detail must be a JSON object, got %', COALESCE(detail::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO runtime.workers AS w (name, kind, state, pid, host, detail)
    VALUES (heartbeat.name, heartbeat.kind, heartbeat.state, heartbeat.pid, heartbeat.host,
            heartbeat.detail)
    ON CONFLICT ON CONSTRAINT workers_pkey DO UPDATE SET
        kind = EXCLUDED.kind, state = EXCLUDED.state, pid = EXCLUDED.pid, host = EXCLUDED.host,
        detail = EXCLUDED.detail, beat_at = now(),
        beats = CASE WHEN EXCLUDED.state = 'starting' THEN 1 ELSE w.beats + 1 END,
        started_at = CASE WHEN EXCLUDED.state = 'starting' THEN now() ELSE w.started_at END;
END
$$;

------------------------------------------------------------------------------ errors
CREATE TABLE runtime.errors (
    error_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts          timestamptz NOT NULL DEFAULT now(),
    worker      text NOT NULL CHECK (length(worker) BETWEEN 1 AND 64),
    account_id  bigint REFERENCES trading.accounts,
    kind        text NOT NULL CONSTRAINT errors_kind_format CHECK (kind ~ '^[A-Z][A-Z0-9_]{0,63}$'),
    message     text NOT NULL CHECK (length(message) BETWEEN 1 AND 2000),
    details     jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(details) = 'object')
);
CREATE INDEX errors_ts_idx ON runtime.errors (ts DESC);

-- A worker's error worth a human's attention (it is audited, so notifications see it).
CREATE FUNCTION runtime.report_error(worker text, kind text, message text,
                                     account text DEFAULT NULL, details jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc bigint;
    id bigint;
    code text := upper(kind);
    text_ text := left(COALESCE(NULLIF(message, ''), 'error'), 2000);
BEGIN
    IF code !~ '^[A-Z][A-Z0-9_]{0,63}$' THEN
        RAISE EXCEPTION 'error kind must be UPPER_SNAKE (e.g. FEED_STALE), got %', quote_literal(kind)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF account IS NOT NULL THEN
        acc := (trading._account(account)).account_id;
    END IF;
    INSERT INTO runtime.errors (worker, account_id, kind, message, details)
    VALUES (left(report_error.worker, 64), acc, code, text_, COALESCE(report_error.details, '{}'))
    RETURNING error_id INTO id;
    PERFORM audit.record('worker.error', 'runtime.errors', id::text, jsonb_build_object(
        'worker', left(report_error.worker, 64), 'kind', code, 'message', text_,
        'account', account));
    RETURN id;
END
$$;

------------------------------------------------------------------------------ resume points
-- Where a worker has got to: the strategy worker's last bar per assignment (advanced in
-- the same transaction as the signal it produced, so a crash repeats nothing and skips
-- nothing), the notifier's last audit event, the paper broker's last settled bar.
CREATE TABLE runtime.cursors (
    name        text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 200),
    seq         bigint,
    at          timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Moves forward only: an older position than the stored one changes nothing. Whoever
-- waits for a resume point (the replay for the strategies, a strategy for the paper
-- broker) LISTENs on mmats_cursor: the move is announced at commit.
CREATE FUNCTION runtime.advance_cursor(name text, seq bigint DEFAULT NULL,
                                       at timestamptz DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO runtime.cursors AS c (name, seq, at) VALUES (advance_cursor.name,
        advance_cursor.seq, advance_cursor.at)
    ON CONFLICT ON CONSTRAINT cursors_pkey DO UPDATE SET
        seq = GREATEST(c.seq, EXCLUDED.seq), at = GREATEST(c.at, EXCLUDED.at),
        updated_at = now();
    PERFORM pg_notify('mmats_cursor', left(advance_cursor.name, 200));
END
$$;

------------------------------------------------------------------------------ new bars wake workers
-- The bars trigger of 0002_06 also says, once per statement and per instrument and
-- timeframe, that bars arrived (delivered at commit): {"instrument_id", "timeframe",
-- "first", "last", "n"}. Protection has run by then, in the same transaction.
CREATE OR REPLACE FUNCTION market.bars_inserted() RETURNS trigger
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

------------------------------------------------------------------------------ replay venues
-- A replay session (`mmats paper --feed replay`) copies its symbols onto a venue of its
-- own, `replay<N>`. Such an instrument is found only when its venue is named: a symbol
-- given without a venue still means the real instrument, however many sessions ran.
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
        FOR inst IN SELECT * FROM market.instruments i
                    WHERE i.symbol = upper(_instrument.symbol) AND i.venue !~ '^replay[0-9]+$' LOOP
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
             WHERE i.symbol = upper(_instrument.symbol) AND i.venue !~ '^replay[0-9]+$')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN inst;
END
$$;

------------------------------------------------------------------------------ the order queue
-- The router drains pgmq's `orders` queue through these three functions, never the
-- queue's tables: it cannot lose or forge a message. Backtest orders never reach a
-- broker (their engine fills them), so the router is not shown them.
CREATE INDEX q_orders_routable_idx ON pgmq.q_orders (vt, msg_id)
    WHERE (message ->> 'environment') IN ('paper', 'live');

-- A routable order wakes the router at commit (mmats_orders, the account id); backtest
-- orders only cost the WHEN test.
CREATE FUNCTION trading.order_queued() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_notify('mmats_orders', COALESCE(NEW.message ->> 'account_id', ''));
    RETURN NULL;
END
$$;
CREATE TRIGGER q_orders_wake_router AFTER INSERT ON pgmq.q_orders
    FOR EACH ROW WHEN ((NEW.message ->> 'environment') IN ('paper', 'live'))
    EXECUTE FUNCTION trading.order_queued();

CREATE FUNCTION trading.read_orders(vt_seconds integer, qty integer,
                                    accounts bigint[] DEFAULT NULL)
RETURNS SETOF pgmq.message_record
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF vt_seconds IS NULL OR vt_seconds < 1 OR vt_seconds > 86400 THEN
        RAISE EXCEPTION 'visibility timeout must be 1 to 86400 seconds, got %', vt_seconds
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF qty IS NULL OR qty < 1 OR qty > 1000 THEN
        RAISE EXCEPTION 'read_orders takes 1 to 1000 messages at a time, got %', qty
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH cte AS (
        SELECT q.msg_id FROM pgmq.q_orders q
        WHERE q.vt <= clock_timestamp() AND (q.message ->> 'environment') IN ('paper', 'live')
          AND (accounts IS NULL OR (q.message ->> 'account_id')::bigint = ANY (accounts))
        ORDER BY q.msg_id
        LIMIT qty
        FOR UPDATE SKIP LOCKED)
    UPDATE pgmq.q_orders m
    SET last_read_at = clock_timestamp(),
        vt = clock_timestamp() + make_interval(secs => vt_seconds),
        read_ct = m.read_ct + 1
    FROM cte WHERE m.msg_id = cte.msg_id
    RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.last_read_at, m.vt, m.message, m.headers;
END
$$;

-- Done with a message: the database has recorded the outcome of its order. Archived, not
-- deleted, so the queue's history stays readable (pgmq.a_orders).
CREATE FUNCTION trading.archive_order_message(msg_id bigint) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found_ boolean;
BEGIN
    WITH gone AS (DELETE FROM pgmq.q_orders q WHERE q.msg_id = archive_order_message.msg_id
                  RETURNING q.*)
    INSERT INTO pgmq.a_orders (msg_id, read_ct, enqueued_at, last_read_at, vt, message, headers)
    SELECT g.msg_id, g.read_ct, g.enqueued_at, g.last_read_at, g.vt, g.message, g.headers FROM gone g;
    GET DIAGNOSTICS found_ = ROW_COUNT;
    PERFORM pg_notify('mmats_cursor', 'queue');  -- the replay waits for an empty queue
    RETURN found_;
END
$$;

-- Not yet: look at the message again in `seconds` (a retry with backoff, an order that
-- waits for its next bar).
CREATE FUNCTION trading.delay_order_message(msg_id bigint, seconds numeric) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found_ boolean;
BEGIN
    IF seconds IS NULL OR seconds < 0 OR seconds > 86400 THEN
        RAISE EXCEPTION 'a message may be delayed 0 to 86400 seconds, got %', seconds
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE pgmq.q_orders q SET vt = clock_timestamp() + make_interval(secs => seconds::double precision)
    WHERE q.msg_id = delay_order_message.msg_id;
    GET DIAGNOSTICS found_ = ROW_COUNT;
    RETURN found_;
END
$$;

------------------------------------------------------------------------------ a strategy's own events
-- What the strategy worker tells a strategy (on_order_filled, on_order_rejected): the
-- fills of its own orders after a fill id, and its orders refused or cancelled after a
-- time. The strategy role cannot read the order book or the fills; this is its own part.
CREATE FUNCTION trading.strategy_events(account bigint, strategy bigint, after_fill bigint,
                                        after_change timestamptz)
RETURNS TABLE (kind text, id bigint, order_id bigint, symbol text, side text,
               quantity numeric, price numeric, commission numeric, ts timestamptz,
               signal_id bigint, reason_code text, reason text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT 'fill', f.fill_id, f.order_id, i.symbol, f.side::text, f.quantity, f.price,
           f.commission, f.ts, o.signal_id, NULL::text, NULL::text
    FROM trading.fills f
    JOIN trading.orders o ON o.order_id = f.order_id
    JOIN market.instruments i ON i.instrument_id = f.instrument_id
    WHERE f.account_id = strategy_events.account AND o.strategy_id = strategy_events.strategy
      AND f.fill_id > strategy_events.after_fill
    UNION ALL
    SELECT o.status::text, o.order_id, o.order_id, i.symbol, o.side::text,
           o.quantity - o.filled_quantity, NULL, NULL, o.updated_at, o.signal_id,
           COALESCE(o.reason_code, CASE WHEN o.reason ~ '^[A-Z][A-Z0-9_]{0,63}:'
                                        THEN split_part(o.reason, ':', 1) END,
                    upper(o.status::text)),
           o.reason
    FROM trading.orders o JOIN market.instruments i ON i.instrument_id = o.instrument_id
    WHERE o.account_id = strategy_events.account AND o.strategy_id = strategy_events.strategy
      AND o.status IN ('rejected', 'cancelled', 'expired')
      AND o.updated_at > strategy_events.after_change
    ORDER BY 9, 1, 2;
END;

------------------------------------------------------------------------------ reconciliation
-- The reconciler found the broker and the ledger disagreeing: a critical risk event,
-- audited, and (if the account is configured so) a FREEZE.
CREATE FUNCTION risk.report_mismatch(account text, kind text, message text,
                                     details jsonb DEFAULT '{}', freeze_account boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts := trading._account(account, true);
    code text := upper(kind);
    id bigint;
    mode risk.breaker_mode;
BEGIN
    IF code !~ '^[A-Z][A-Z0-9_]{0,63}$' THEN
        RAISE EXCEPTION 'mismatch kind must be UPPER_SNAKE (e.g. POSITION_MISMATCH), got %', quote_literal(kind)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF details IS NULL OR jsonb_typeof(details) <> 'object' THEN
        RAISE EXCEPTION 'mismatch details must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO risk.events (account_id, severity, event_type, message, details)
    VALUES (acc.account_id, 'critical', code, left(COALESCE(message, code), 2000), details)
    RETURNING event_id INTO id;
    PERFORM audit.record('reconcile.mismatch', 'risk.events', id::text, jsonb_build_object(
        'account', acc.name, 'kind', code, 'message', left(message, 2000), 'details', details));
    IF freeze_account THEN
        mode := risk._trip(acc, 'FREEZE', left(format('reconciliation: %s', message), 500), code);
    END IF;
    RETURN jsonb_build_object('event_id', id, 'account', acc.name, 'kind', code,
                              'frozen', COALESCE(freeze_account, false));
END
$$;

------------------------------------------------------------------------------ credentials
-- trading.credentials (0002_01) holds what a credential is; its secret lives here,
-- encrypted by the runtime with AES-256-GCM under the master key (key_id names which),
-- with the record's identity as associated data. Only the router (which talks to the
-- brokers) may read it; nobody may read the plaintext, because the database never has it.
ALTER TABLE trading.credentials ADD COLUMN endpoint text;
UPDATE trading.credentials SET endpoint = CASE WHEN is_live THEN 'live' ELSE 'testnet' END;
ALTER TABLE trading.credentials
    ALTER COLUMN endpoint SET NOT NULL,
    ADD CONSTRAINT credentials_endpoint_known CHECK (endpoint IN ('paper', 'testnet', 'live')),
    ADD CONSTRAINT credentials_live_is_live_endpoint CHECK (is_live = (endpoint = 'live')),
    ADD COLUMN fields text[] NOT NULL DEFAULT '{}'
        CONSTRAINT credentials_fields_format
        CHECK (array_to_string(fields, ',') ~ '^([a-z][a-z0-9_]{0,31}(,|$))*$'),
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN rotated_at timestamptz;

CREATE TABLE runtime.credential_secrets (
    credential_id  bigint PRIMARY KEY REFERENCES trading.credentials ON DELETE CASCADE,
    key_id         text NOT NULL CHECK (key_id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    nonce          bytea NOT NULL CONSTRAINT credential_nonce_96_bits CHECK (length(nonce) = 12),
    ciphertext     bytea NOT NULL CONSTRAINT credential_ciphertext_has_tag
                       CHECK (length(ciphertext) BETWEEN 17 AND 65536),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Store (or replace: a rotation) a credential. A live account holds live keys only; a
-- paper account paper or testnet keys only; a backtest account none.
CREATE FUNCTION trading.set_credential(account text, label text, venue text, endpoint text,
                                       fields text[], key_id text, nonce bytea,
                                       ciphertext bytea)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts := trading._account(account, true);
    cred trading.credentials;
    rotated boolean := false;
BEGIN
    IF endpoint IS NULL OR endpoint NOT IN ('paper', 'testnet', 'live') THEN
        RAISE EXCEPTION 'endpoint must be paper, testnet or live, got %', quote_nullable(endpoint)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF acc.environment = 'backtest' THEN
        RAISE EXCEPTION 'account % is a backtest account: it talks to no broker and holds no credentials', acc.name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF acc.environment = 'live' AND endpoint <> 'live' THEN
        RAISE EXCEPTION 'account % is live: it takes live keys only, not % keys', acc.name, endpoint
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF acc.environment = 'paper' AND endpoint = 'live' THEN
        RAISE EXCEPTION 'account % is a paper account: live keys are refused (use testnet or paper keys, or a live account)', acc.name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT c.* INTO cred FROM trading.credentials c
    WHERE c.account_id = acc.account_id AND c.label = set_credential.label FOR UPDATE;
    IF FOUND THEN
        IF cred.venue <> set_credential.venue OR cred.endpoint <> set_credential.endpoint THEN
            RAISE EXCEPTION 'credential % of account % is for % (%): remove it before storing one for % (%)',
                cred.label, acc.name, cred.venue, cred.endpoint, set_credential.venue, set_credential.endpoint
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        UPDATE trading.credentials c SET fields = set_credential.fields, updated_at = now(),
            rotated_at = now()
        WHERE c.credential_id = cred.credential_id RETURNING * INTO cred;
        rotated := true;
    ELSE
        INSERT INTO trading.credentials (account_id, venue, label, is_live, endpoint, fields)
        VALUES (acc.account_id, set_credential.venue, set_credential.label,
                set_credential.endpoint = 'live', set_credential.endpoint, set_credential.fields)
        RETURNING * INTO cred;
    END IF;
    INSERT INTO runtime.credential_secrets AS s (credential_id, key_id, nonce, ciphertext)
    VALUES (cred.credential_id, set_credential.key_id, set_credential.nonce, set_credential.ciphertext)
    ON CONFLICT (credential_id) DO UPDATE SET key_id = EXCLUDED.key_id, nonce = EXCLUDED.nonce,
        ciphertext = EXCLUDED.ciphertext, updated_at = now();
    PERFORM audit.record(CASE WHEN rotated THEN 'credential.rotated' ELSE 'credential.set' END,
        'trading.credentials', cred.credential_id::text, jsonb_build_object(
            'account', acc.name, 'label', cred.label, 'venue', cred.venue,
            'endpoint', cred.endpoint, 'fields', to_jsonb(cred.fields), 'key_id', key_id));
    RETURN jsonb_build_object('credential_id', cred.credential_id, 'account', acc.name,
                              'label', cred.label, 'venue', cred.venue, 'endpoint', cred.endpoint,
                              'rotated', rotated);
END
$$;

CREATE FUNCTION trading.remove_credential(account text, label text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts := trading._account(account, true);
    cred trading.credentials;
BEGIN
    DELETE FROM trading.credentials c
    WHERE c.account_id = acc.account_id AND c.label = remove_credential.label
    RETURNING * INTO cred;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account % has no credential %', acc.name, quote_literal(label)
            USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM audit.record('credential.removed', 'trading.credentials', cred.credential_id::text,
        jsonb_build_object('account', acc.name, 'label', cred.label, 'venue', cred.venue,
                           'endpoint', cred.endpoint));
    RETURN jsonb_build_object('account', acc.name, 'label', cred.label, 'removed', true);
END
$$;

------------------------------------------------------------------------------ grants
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA runtime FROM PUBLIC;
REVOKE ALL ON FUNCTION trading.strategy_events(bigint, bigint, bigint, timestamptz),
    trading.read_orders(integer, integer, bigint[]),
    trading.archive_order_message(bigint), trading.delay_order_message(bigint, numeric),
    risk.report_mismatch(text, text, text, jsonb, boolean),
    trading.set_credential(text, text, text, text, text[], text, bytea, bytea),
    trading.remove_credential(text, text) FROM PUBLIC;

GRANT USAGE ON SCHEMA runtime TO mmats_strategy, mmats_router, mmats_api, mmats_readonly;
GRANT SELECT ON runtime.workers, runtime.errors, runtime.cursors
    TO mmats_readonly, mmats_api, mmats_strategy, mmats_router;
GRANT EXECUTE ON FUNCTION trading.strategy_events(bigint, bigint, bigint, timestamptz)
    TO mmats_strategy;
GRANT EXECUTE ON FUNCTION runtime.heartbeat(text, text, text, integer, text, jsonb),
    runtime.report_error(text, text, text, text, jsonb),
    runtime.advance_cursor(text, bigint, timestamptz)
    TO mmats_strategy, mmats_router, mmats_api;

-- trading.account_equity (granted to every reader in 0002_07) is inlined into its caller's
-- query, which then needs this pure helper too
GRANT EXECUTE ON FUNCTION trading._signed_qty(trading.positions)
    TO mmats_strategy, mmats_router, mmats_api, mmats_readonly;
-- the bars the trading core prices an instrument with: the paper broker fills on them,
-- and a strategy waits for the paper broker to have settled them
GRANT EXECUTE ON FUNCTION market.finest_timeframe(bigint) TO mmats_strategy, mmats_router;

-- the router: the queue, the broker's secrets, what a paper fill needs, reconciliation
-- (risk: report_mismatch and breaker_mode, granted in 0002_07, live in that schema)
GRANT USAGE ON SCHEMA pgmq, risk TO mmats_router;
GRANT EXECUTE ON FUNCTION trading.read_orders(integer, integer, bigint[]),
    trading.archive_order_message(bigint), trading.delay_order_message(bigint, numeric),
    risk.report_mismatch(text, text, text, jsonb, boolean),
    trading.on_bar(bigint, market.timeframe, timestamptz, numeric, numeric, numeric, numeric, bigint)
    TO mmats_router;
GRANT SELECT ON runtime.credential_secrets, trading.credentials, market.bars, trading.signals
    TO mmats_router;

-- the api: credentials are managed here (it never reads a secret back: which key
-- encrypted a record, yes)
GRANT SELECT (credential_id, key_id, updated_at) ON runtime.credential_secrets TO mmats_api;
GRANT EXECUTE ON FUNCTION
    trading.set_credential(text, text, text, text, text[], text, bytea, bytea),
    trading.remove_credential(text, text) TO mmats_api;

-- ======== from 0004_02_pre_fills_by_account.sql
-- 0004_02 (pre): an account's fills are found by fill id, not by time. The live path asks
-- for "the fills of this account after fill N" at every bar (trading.strategy_events,
-- before a strategy sees its bar, and the paper session's echo). Where the planner cannot
-- tell that N is recent (a SQL function's parameters, a plan cached while the table was
-- small), the (account_id, ts) index answered it by reading every fill the account ever
-- had, so a long-running account paid more at each bar than at the last. An index on
-- (account_id, fill_id) reads only the new ones whatever the estimate. Nothing reads fills
-- by account and time, so it replaces the old index rather than adding a second one.
SET LOCAL ROLE mmats_owner;

DROP INDEX trading.fills_account_ts_idx;
CREATE INDEX fills_account_fill_idx ON trading.fills (account_id, fill_id);
COMMENT ON INDEX trading.fills_account_fill_idx IS
    'an account''s fills after a fill id (trading.strategy_events, resume points)';

-- ======== from 0004_03_pre_protection_locks.sql
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

-- ======== from 0004_04_pre_set_based_protection.sql
-- 0004_04 (pre): bar protection in a fixed number of statements, whatever the number of
-- positions and instruments. It decides exactly as before (the same first bar touching
-- the stop or the target, the same trigger and price, the exits already on their way
-- counted first, the same orders in the same order, the same marks:
-- tests/test_protection_reference.py compares it with the function it replaces on random
-- books and bars); what changes is the cost. protect_bars ran three statements per
-- position, and the bars trigger ran protect_bars once per instrument: a live step of ten
-- symbols held by a few accounts took dozens of statements, each with its executor
-- start-up. Now trading._protect locks the accounts, then one statement judges and marks
-- every position of a set of instruments (locked in account and position order, as
-- before), and the few hits come back to be turned into orders one by one (in
-- instrument, account and position order, as the per-instrument calls made them). Only
-- the positions whose stop or target the batch's range could reach are judged bar by
-- bar; the running highs and lows, and the marks, are computed once per instrument and
-- last mark. protect_bars is _protect of one instrument plus its equity snapshots; the
-- bars trigger calls _protect once for the whole insert. _emit_order reads no position,
-- so marking before the orders are made changes nothing they see.
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
    PERFORM 1 FROM trading.accounts a
    WHERE a.account_id IN (
        SELECT x.account_id FROM trading.positions x JOIN trading.accounts ac USING (account_id)
        WHERE x.instrument_id = ANY (_protect.instruments) AND x.quantity <> 0
          AND (_protect.account IS NULL AND ac.environment IN ('live', 'paper')
               OR x.account_id = _protect.account))
    ORDER BY a.account_id FOR UPDATE;
    IF NOT FOUND THEN
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
               COALESCE(x.marked_at, '-infinity') AS mark
        FROM trading.positions x JOIN trading.accounts ac USING (account_id)
        WHERE x.instrument_id = ANY (_protect.instruments) AND x.quantity <> 0
          AND (_protect.account IS NULL AND ac.environment IN ('live', 'paper')
               OR x.account_id = _protect.account)
        ORDER BY x.account_id, x.position_id
        FOR UPDATE OF x),
    raw AS MATERIALIZED (
        SELECT u.instrument_id, u.open AS o, u.high AS h, u.low AS l, u.close AS c,
               u.ts + market.timeframe_interval(u.timeframe) AS ct,
               market.timeframe_interval(u.timeframe) AS span
        FROM unnest(_protect.bars) u
        WHERE u.instrument_id = ANY (_protect.instruments)),
    -- bars closing at the same time: the one of the finest timeframe
    b AS MATERIALIZED (
        SELECT DISTINCT ON (r.instrument_id, r.ct) r.instrument_id, r.o, r.h, r.l, r.c, r.ct
        FROM raw r ORDER BY r.instrument_id, r.ct, r.span),
    -- per (instrument, last mark), over all the bars newer than the mark: the highest
    -- high, the lowest low, the last close (of the finest timeframe among the bars
    -- closing last) and its time. A position with no newer bar is left as it is.
    span AS MATERIALIZED (
        SELECT k.instrument_id, k.mark, max(r.h) AS hi, min(r.l) AS lo, max(r.ct) AS ct,
               (array_agg(r.c ORDER BY r.ct DESC, r.span))[1] AS c
        FROM (SELECT DISTINCT p.instrument_id, p.mark FROM pos p) k
        JOIN raw r ON r.instrument_id = k.instrument_id AND r.ct > k.mark
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
END
$$;

CREATE OR REPLACE FUNCTION trading.protect_bars(instrument bigint, bars market.bars[],
                                     account bigint DEFAULT NULL, snapshot boolean DEFAULT true,
                                     OUT order_ids bigint[], OUT touched bigint[],
                                     OUT marked_until timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    a bigint;
BEGIN
    r := trading._protect(ARRAY[protect_bars.instrument], protect_bars.bars, protect_bars.account);
    order_ids := r.order_ids;
    touched := r.touched;
    marked_until := r.marked_until;
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

-- ======== from 0004_05_pre_fill_by_constraint.sql
-- 0004_05 (pre): apply_fill records a new fill without looking for it first. It looked
-- the broker fill id up in trading.fills before inserting; in a plan cached while the
-- table was small (a fresh database, before its first autoanalyze), that lookup took the
-- (account_id, fill_id) index and read every fill of the account, so each fill cost more
-- than the last until the statistics caught up. A fill the order can take is now inserted
-- with ON CONFLICT on the (account_id, broker_fill_id) constraint, which finds a repeat
-- through that constraint's own index; only a repeat, or a fill to be refused, is looked
-- up, and everything it answers is as before (the same duplicates, the same refusals in
-- the same order, a repeat compared at the rate of its first arrival).
SET LOCAL ROLE mmats_owner;

-- A fill's commission in the account currency, from the currency it was charged in: the
-- account's, the instrument's quote (at the rate fx) or its base (at price and fx); NULL
-- for any other currency. (SQL, so that the callers' plans inline it.)
CREATE FUNCTION trading._commission_in_account(commission numeric, ccy text,
                                               account_ccy text, quote_ccy text,
                                               base_ccy text, price numeric, fx numeric)
RETURNS numeric
LANGUAGE sql IMMUTABLE
RETURN CASE WHEN ccy IS NULL OR ccy = account_ccy THEN commission
            WHEN ccy = quote_ccy THEN commission * fx
            WHEN ccy = base_ccy THEN commission * price * fx END;

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
    -- A fill the order can take, with a rate and a commission currency that are in order,
    -- is recorded at once: the unique constraint on (account, broker fill id) says whether
    -- it repeats one, whatever plan a lookup would have had.
    IF o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')
       AND q <= o.quantity - o.filled_quantity AND inst.contract_type <> 'inverse'
       AND (jsonb_typeof(fill -> 'liquidity') IS NULL OR jsonb_typeof(fill -> 'liquidity') = 'null'
            OR fill ->> 'liquidity' IN ('maker', 'taker')) THEN
        fx := CASE WHEN inst.quote_currency = acc.base_currency THEN 1
                   ELSE trading.fx_rate(inst.quote_currency, acc.base_currency, at) END;
        comm_acct := trading._commission_in_account(commission, comm_ccy, acc.base_currency,
                                                    inst.quote_currency, inst.base_currency,
                                                    price, fx);
        IF fx IS NOT NULL AND comm_acct IS NOT NULL THEN
            INSERT INTO trading.fills AS f (account_id, order_id, instrument_id, strategy_id,
                broker_fill_id, side, quantity, price, commission, commission_currency, liquidity, ts)
            VALUES (acc.account_id, o.order_id, o.instrument_id, o.strategy_id, broker_id, o.side, q,
                    price, comm_acct, acc.base_currency, trading._text(fill, 'liquidity', 'fill', 5), at)
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

        -- (refused as before by the fills table's checks, e.g. an unknown liquidity)
        INSERT INTO trading.fills AS f (account_id, order_id, instrument_id, strategy_id, broker_fill_id,
            side, quantity, price, commission, commission_currency, liquidity, ts)
        VALUES (acc.account_id, o.order_id, o.instrument_id, o.strategy_id, broker_id, o.side, q, price,
                comm_acct, acc.base_currency, trading._text(fill, 'liquidity', 'fill', 5), at)
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


-- ======== from 0004_06_pre_lighter_calls.sql
-- 0004_06 (pre): lighter internal calls; a backtest's protective orders name their bar.
--
-- 1. The internal helpers run in their callers' search path. Only mmats_owner may execute
--    them (every other role reaches them through the public functions, which are SECURITY
--    DEFINER and pin search_path = pg_catalog, pg_temp), and their bodies name every
--    table and function by schema. A SET clause made each call save, set and restore the
--    search path, and made every cached plan check it again: some thirty calls per
--    signal and fill (the JSON parsers alone, twenty-five). tests/test_roles.py checks
--    that a function without a pinned search path is executable by the owner alone, or
--    is a SQL function (inlined into its caller's plan), and is never SECURITY DEFINER.
--    The trigger functions of tables only the owner writes (audit.events, trading.orders
--    and the order queue) run in the writer's path the same way.
-- 2. Fewer statements where one does: risk.return_correlation finds both last bars and
--    the cached value in one statement (three before; the correlation rule calls it for
--    every other instrument held); trading._locked_order finds an order named by its
--    id in one lookup (a client order id first, as before: two statements when the
--    reference was an order id, as the backtest's fills name theirs).
-- 3. trading._protect judges only the positions of the accounts it has locked. Its first
--    statement locks the accounts holding the instruments; a position opened by a fill
--    committed after that statement (its account not locked) was still judged, and
--    locked, by the second: the account-first lock order was broken (the router's
--    paper book and a bar insert deadlocked on it), and an exit being decided for that
--    account could meet a protective one. Such a position is judged from the next
--    insert on (a paper fill's own bar is judged by the router, with trading.on_bar, as
--    it applies the fill).
-- 4. trading.lock_accounts: a worker's transaction that writes to several accounts (the
--    strategy worker's step, the router's paper book) takes them all first, in id order.
--    Every audit event locks the chain head until commit; a transaction that wrote one
--    for an account and then locked the next waited for a bar insert that held that
--    next account and wanted the chain head for its own event (a deadlock, broken by
--    the server after a second).
-- 5. backtest.step returns each created order's triggered_at, so that the engine fills a
--    protective order on the bar whose prices fired it, as the paper broker does, instead
--    of looking for the first bar of the batch whose range held the trigger price.
SET LOCAL ROLE mmats_owner;

ALTER FUNCTION trading._num(jsonb, text, text, numeric, numeric, boolean) RESET search_path;
ALTER FUNCTION trading._text(jsonb, text, text, integer) RESET search_path;
ALTER FUNCTION trading._ts(jsonb, text, text) RESET search_path;
ALTER FUNCTION trading._account(text, boolean) RESET search_path;
ALTER FUNCTION market._instrument(text, text) RESET search_path;
ALTER FUNCTION trading._strategy(text, text) RESET search_path;
ALTER FUNCTION trading._fx_or_fail(text, text, timestamptz) RESET search_path;
ALTER FUNCTION trading._open_order_qty(bigint, bigint, trading.order_side) RESET search_path;
ALTER FUNCTION trading._reserved_cash(trading.accounts) RESET search_path;
ALTER FUNCTION market.atr(bigint, market.timeframe, integer, timestamptz) RESET search_path;
ALTER FUNCTION trading._size(trading.accounts, trading.strategies, market.instruments, numeric,
                             numeric, numeric, numeric, timestamptz) RESET search_path;
ALTER FUNCTION trading._votes(bigint, bigint, timestamptz, timestamptz) RESET search_path;
ALTER FUNCTION trading._aggregate(trading.accounts, trading.strategies, market.instruments,
                                  trading.signal_action, timestamptz) RESET search_path;
ALTER FUNCTION trading._finish_signal(bigint, trading.signal_status, text, text, bigint, jsonb)
    RESET search_path;
ALTER FUNCTION trading._set_order_status(text, trading.order_status, text, text) RESET search_path;
ALTER FUNCTION trading._close_positions(trading.accounts, bigint, trading.order_trigger)
    RESET search_path;
ALTER FUNCTION risk._trip(trading.accounts, risk.breaker_mode, text, text) RESET search_path;
ALTER FUNCTION trading.snapshot_equity(bigint, timestamptz) RESET search_path;
ALTER FUNCTION risk.check_order(trading.accounts, trading.strategies, market.instruments,
                                trading.order_side, numeric, numeric, numeric, numeric,
                                timestamptz) RESET search_path;
ALTER FUNCTION risk._check_order(trading.accounts, trading.strategies, market.instruments,
                                 trading.order_side, numeric, numeric, numeric, numeric,
                                 timestamptz) RESET search_path;
ALTER FUNCTION trading._emit_order(trading.accounts, market.instruments, bigint, bigint,
    trading.order_side, numeric, trading.order_trigger, numeric, boolean, trading.position_leg,
    trading.order_type, numeric, numeric, trading.time_in_force, timestamptz, numeric, numeric,
    numeric, numeric, numeric, text, timestamptz) RESET search_path;
ALTER FUNCTION backtest._run(bigint, boolean) RESET search_path;
ALTER FUNCTION backtest._state(bigint) RESET search_path;
ALTER FUNCTION audit.chain_event() RESET search_path;
ALTER FUNCTION trading.check_order_transition() RESET search_path;
ALTER FUNCTION trading.order_queued() RESET search_path;

-- (as in 0003_02, the cache hit in one statement)
CREATE OR REPLACE FUNCTION risk.return_correlation(a bigint, b bigint, tf market.timeframe,
                                                   lookback integer, at timestamptz)
RETURNS numeric
LANGUAGE plpgsql AS $$
DECLARE
    lo bigint := LEAST(a, b);
    hi bigint := GREATEST(a, b);
    lo_ts timestamptz;
    hi_ts timestamptz;
    hit boolean;
    cached numeric;
    v numeric;
BEGIN
    SELECT t.lo_ts, t.hi_ts,
           k.a IS NOT NULL AND k.a_ts IS NOT DISTINCT FROM t.lo_ts
                           AND k.b_ts IS NOT DISTINCT FROM t.hi_ts,
           k.value
    INTO lo_ts, hi_ts, hit, cached
    FROM (SELECT (SELECT x.ts FROM market.bars x
                  WHERE x.instrument_id = lo AND x.timeframe = tf
                    AND x.ts <= COALESCE(at, 'infinity')
                  ORDER BY x.ts DESC LIMIT 1) AS lo_ts,
                 (SELECT x.ts FROM market.bars x
                  WHERE x.instrument_id = hi AND x.timeframe = tf
                    AND x.ts <= COALESCE(at, 'infinity')
                  ORDER BY x.ts DESC LIMIT 1) AS hi_ts) t
    LEFT JOIN risk.correlation_cache k
           ON k.a = lo AND k.b = hi AND k.timeframe = tf
          AND k.lookback = return_correlation.lookback;
    IF hit THEN
        RETURN cached;
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

-- (as in 0002_05, one lookup: the client order id first, then the order id)
CREATE OR REPLACE FUNCTION trading._locked_order(ref text, OUT acc trading.accounts,
                                                 OUT o trading.orders)
LANGUAGE plpgsql AS $$
DECLARE
    account bigint;
    id bigint;
BEGIN
    IF ref IS NULL THEN
        RAISE EXCEPTION 'an order id or client order id is required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- two index probes in one statement, never one OR-ed scan (the plan of an OR with a
    -- cast would read the whole table, or cast a non-number in a generic plan); the
    -- second probe runs only when the first finds nothing and ref is a number
    SELECT x.order_id, x.account_id INTO id, account FROM (
        SELECT c.order_id, c.account_id, 1 AS rank FROM trading.orders c
        WHERE c.client_order_id = ref
        UNION ALL
        SELECT n.order_id, n.account_id, 2 FROM trading.orders n
        WHERE n.order_id = CASE WHEN ref ~ '^\d{1,18}$' THEN ref::bigint END) x
    ORDER BY x.rank LIMIT 1;
    IF id IS NULL THEN
        RAISE EXCEPTION 'unknown order %', quote_literal(ref) USING ERRCODE = 'foreign_key_violation';
    END IF;
    SELECT * INTO acc FROM trading.accounts a WHERE a.account_id = account FOR UPDATE;
    SELECT * INTO o FROM trading.orders x WHERE x.order_id = id FOR UPDATE;
END
$$;

-- (as in 0004_04, with the positions of the locked accounts only)
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
               COALESCE(x.marked_at, '-infinity') AS mark
        FROM trading.positions x
        WHERE x.instrument_id = ANY (_protect.instruments) AND x.quantity <> 0
          AND x.account_id = ANY (locked)
        ORDER BY x.account_id, x.position_id
        FOR UPDATE OF x),
    raw AS MATERIALIZED (
        SELECT u.instrument_id, u.open AS o, u.high AS h, u.low AS l, u.close AS c,
               u.ts + market.timeframe_interval(u.timeframe) AS ct,
               market.timeframe_interval(u.timeframe) AS span
        FROM unnest(_protect.bars) u
        WHERE u.instrument_id = ANY (_protect.instruments)),
    -- bars closing at the same time: the one of the finest timeframe
    b AS MATERIALIZED (
        SELECT DISTINCT ON (r.instrument_id, r.ct) r.instrument_id, r.o, r.h, r.l, r.c, r.ct
        FROM raw r ORDER BY r.instrument_id, r.ct, r.span),
    -- per (instrument, last mark), over all the bars newer than the mark: the highest
    -- high, the lowest low, the last close (of the finest timeframe among the bars
    -- closing last) and its time. A position with no newer bar is left as it is.
    span AS MATERIALIZED (
        SELECT k.instrument_id, k.mark, max(r.h) AS hi, min(r.l) AS lo, max(r.ct) AS ct,
               (array_agg(r.c ORDER BY r.ct DESC, r.span))[1] AS c
        FROM (SELECT DISTINCT p.instrument_id, p.mark FROM pos p) k
        JOIN raw r ON r.instrument_id = k.instrument_id AND r.ct > k.mark
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
END
$$;

-- Lock accounts in id order, for a transaction that writes to several: taken first, before
-- any audit event, so that no two writers wait for each other on an account and on the
-- audit chain's head.
CREATE FUNCTION trading.lock_accounts(accounts bigint[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM 1 FROM trading.accounts a WHERE a.account_id = ANY (accounts)
    ORDER BY a.account_id FOR UPDATE;
END
$$;
REVOKE ALL ON FUNCTION trading.lock_accounts(bigint[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION trading.lock_accounts(bigint[]) TO mmats_strategy, mmats_router;

-- (as in 0003_01, with each order's triggered_at)
-- One step of a run: the operations in order, each through the trading core's own
-- function, in one transaction. Operations (JSON objects, "op" names the kind):
--   {"op": "fill", "order_id": N, "broker_fill_id": ..., "quantity", "price", "commission", "ts", "liquidity"}
--                                                                   -> trading.apply_fill
--   {"op": "cancel", "order_id": N, "reason": "..."}                -> trading.cancel_order
--   {"op": "protect", "instrument_id": N, "timeframe": "1m", "from": ts, "to": ts}
--        the stored bars with from <= ts <= to                      -> trading.protect_bars
--   {"op": "signal", ...the signal...} (its account is the run's)   -> trading.submit_signal
-- Every order and fill must belong to the run's account. Returns the results in order,
-- the orders the step created, and the account's state after it.
CREATE OR REPLACE FUNCTION backtest.step(run bigint, ops jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r backtest.runs := backtest._run(run);
    acc trading.accounts;
    op jsonb;
    kind text;
    res jsonb;
    results jsonb := '[]';
    pb record;
    n integer := 0;
    -- every order the step creates is returned, the breaker's closing orders included
    -- (protect_bars' equity snapshot may trip it): they are the orders numbered above this
    before bigint := (SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END
                      FROM trading.orders_order_id_seq s);
BEGIN
    IF r.status <> 'running' THEN
        RAISE EXCEPTION 'backtest run % is %: it takes no more steps', run, r.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF ops IS NULL OR jsonb_typeof(ops) <> 'array' THEN
        RAISE EXCEPTION 'backtest.step needs a JSON array of operations' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO acc FROM trading.accounts a WHERE a.account_id = r.account_id;
    FOR op IN SELECT x FROM jsonb_array_elements(ops) x LOOP
        n := n + 1;
        kind := CASE WHEN jsonb_typeof(op) = 'object' THEN op ->> 'op' END;
        IF kind IN ('fill', 'cancel') THEN
            IF NOT EXISTS (SELECT 1 FROM trading.orders o
                           WHERE o.order_id = trading._num(op, 'order_id', 'step', 0)::bigint
                             AND o.account_id = acc.account_id) THEN
                RAISE EXCEPTION 'backtest.step operation %: order % is not an order of run %', n,
                    COALESCE(op ->> 'order_id', 'NULL'), run USING ERRCODE = 'foreign_key_violation';
            END IF;
        END IF;
        CASE kind
        WHEN 'fill' THEN
            res := trading.apply_fill(op - 'op');
        WHEN 'cancel' THEN
            res := trading.cancel_order(op ->> 'order_id', COALESCE(op ->> 'reason', 'cancelled by the simulator'));
        WHEN 'protect' THEN
            pb := trading.protect_bars(trading._num(op, 'instrument_id', 'step', 0)::bigint,
                ARRAY(SELECT b FROM market.bars b
                      WHERE b.instrument_id = trading._num(op, 'instrument_id', 'step', 0)::bigint
                        AND b.timeframe = (op ->> 'timeframe')::market.timeframe
                        AND b.ts BETWEEN trading._ts(op, 'from', 'step') AND trading._ts(op, 'to', 'step')
                      ORDER BY b.ts),
                acc.account_id, true);
            res := jsonb_build_object('order_ids', to_jsonb(pb.order_ids), 'marked_until', pb.marked_until);
        WHEN 'signal' THEN
            res := trading.submit_signal(jsonb_set(op - 'op', '{account}', to_jsonb(acc.name)));
        ELSE
            RAISE EXCEPTION 'backtest.step operation %: unknown op %, expected fill, cancel, protect or signal',
                n, COALESCE(quote_literal(op ->> 'op'), 'NULL') USING ERRCODE = 'invalid_parameter_value';
        END CASE;
        results := results || jsonb_build_array(res);
    END LOOP;
    RETURN jsonb_build_object(
        'results', results,
        'orders', COALESCE((SELECT jsonb_agg(jsonb_build_object(
                'order_id', o.order_id, 'instrument_id', o.instrument_id, 'side', o.side,
                'order_type', o.order_type, 'quantity', o.quantity, 'limit_price', o.limit_price,
                'stop_price', o.stop_price, 'trigger', o.trigger, 'trigger_price', o.trigger_price,
                'reduce_only', o.reduce_only, 'reference_price', o.reference_price,
                'strategy_id', o.strategy_id, 'stop_loss', o.stop_loss,
                'take_profit', o.take_profit, 'trailing_stop', o.trailing_stop,
                'breakeven', o.breakeven, 'triggered_at', o.triggered_at) ORDER BY o.order_id)
            FROM trading.orders o WHERE o.account_id = acc.account_id AND o.order_id > before), '[]'),
        'account', backtest._state(acc.account_id));
END
$$;

-- ======== from 0004_07_pre_cash_movements.sql
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

-- ======== from 0004_08_pre_gate_at_market.sql
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

-- ======== from 0004_09_pre_protection_per_row.sql
-- 0004_09 (pre): protection and emergency closes per position row.
--
-- 1. trading._close_positions (close_position, close_all, the HARD breaker) and
--    trading._protect count as a row's exits on their way only the open reduce-only
--    orders that will reduce that row, matched as trading.apply_fill books their fills.
--    The account's own row (manual orders, strategy NULL) of an independent account
--    counted every reduce-only order of the instrument, a strategy's close for its own
--    row included: close_all sent that strategy's row its close and then nothing for the
--    account's row when the strategy's row came first (riskiest first), and a stop hit
--    on the account's row sent no order while a strategy's close was open. The leg is
--    the order's leg as the fill books it (a reduce-only 'net' order on a hedge account
--    reduces the long leg for a sell, the short leg for a buy).
-- 2. trading._protect judges and marks a position never marked from its opening fill's
--    time on (positions.opened_at), not from the beginning of time: trading.apply_fill
--    does not set marked_at, so the first bar inserted of any age (a bar backfilled after
--    a reconnect, an import of history) fired the stop on prices from before the
--    position existed and marked it at that old close. The bar holding the fill (closing
--    after it) is still judged: the backtest and the paper broker fill a market order at
--    a bar's open and judge that bar. As before, only bars closing after the mark are
--    judged and marked, so the mark never moves backwards.
-- 3. backtest._run's hint for an unknown run names `mmats runs`.
SET LOCAL ROLE mmats_owner;

-- (as in 0002_05, search path reset in 0004_06) the pending exits of a row are the open
-- reduce-only orders that will reduce that row (its strategy's on an independent account,
-- NULL matching NULL; its own leg), not every such order of the instrument for the
-- account's own row: close_all and the HARD breaker left that row open
CREATE OR REPLACE FUNCTION trading._close_positions(acc trading.accounts, instrument bigint,
                                         trig trading.order_trigger)
RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    p record;
    ids bigint[] := '{}';
    pending numeric;
    qty numeric;
BEGIN
    IF risk.breaker_mode(acc.account_id) = 'FREEZE' THEN
        RAISE EXCEPTION 'account % is frozen (breaker FREEZE): no orders, closes included, until risk.reset_breaker()', acc.name
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    FOR p IN
        SELECT x.*, i.instrument_id AS iid, trading._signed_qty(x) AS sq,
               (COALESCE(x.last_price, x.average_price) - x.average_price) * trading._signed_qty(x) AS upnl,
               abs(trading._signed_qty(x)) * COALESCE(x.last_price, x.average_price) AS exposure
        FROM trading.positions x JOIN market.instruments i USING (instrument_id)
        WHERE x.account_id = acc.account_id AND x.quantity <> 0
          AND (instrument IS NULL OR x.instrument_id = instrument)
        ORDER BY upnl ASC, exposure DESC, x.position_id
    LOOP
        -- the open exits that will reduce this row, as trading.apply_fill books their fills:
        -- on an independent account an order's fill books to its own strategy's row (a
        -- manual order's, strategy NULL, to the account's own row), on any other account
        -- to the one row of the leg; a reduce-only order's leg is its own on a hedge
        -- account (a 'net' one: long for a sell, short for a buy), 'net' on a one-way
        -- one. A manual exit on an independent account reduces the account's row first
        -- and what exceeds that row the strategies' rows, oldest first: the part of that
        -- excess that reaches this strategy row is counted too.
        SELECT COALESCE(sum(e.rest) FILTER (WHERE e.row_strategy IS NOT DISTINCT FROM p.strategy_id), 0)
             + CASE WHEN acc.aggregation = 'independent' AND p.strategy_id IS NOT NULL THEN
                   LEAST(abs(p.sq), GREATEST(0,
                       COALESCE(sum(e.rest) FILTER (WHERE e.row_strategy IS NULL), 0)
                       - (SELECT COALESCE(sum(abs(y.quantity)), 0) FROM trading.positions y
                          WHERE y.account_id = acc.account_id AND y.instrument_id = p.iid
                            AND y.leg = p.leg AND sign(trading._signed_qty(y)) = sign(p.sq)
                            AND (y.strategy_id IS NULL OR y.position_id < p.position_id))))
                   ELSE 0 END
        INTO pending
        FROM (SELECT CASE WHEN acc.aggregation = 'independent' THEN o.strategy_id END AS row_strategy,
                     o.quantity - o.filled_quantity AS rest
              FROM trading.orders o
              WHERE o.account_id = acc.account_id AND o.instrument_id = p.iid AND o.reduce_only
                AND o.side = CASE WHEN p.sq > 0 THEN 'sell' ELSE 'buy' END::trading.order_side
                AND CASE WHEN acc.position_mode = 'oneway' THEN 'net'::trading.position_leg
                         WHEN o.position_leg <> 'net' THEN o.position_leg
                         WHEN o.side = 'buy' THEN 'short'::trading.position_leg
                         ELSE 'long'::trading.position_leg END = p.leg
                AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')) e;
        qty := abs(p.sq) - pending;
        CONTINUE WHEN qty <= 0;
        ids := ids || trading._emit_order(acc, (SELECT i FROM market.instruments i WHERE i.instrument_id = p.iid),
            p.strategy_id, NULL, CASE WHEN p.sq > 0 THEN 'sell' ELSE 'buy' END::trading.order_side, qty,
            trig, COALESCE(p.last_price, p.average_price), reduce_only => true, leg => p.leg);
    END LOOP;
    RETURN ids;
END
$$;

-- (as in 0004_06) the exits already on their way to a hit position are matched to its row
-- as in _close_positions (a strategy's close no longer silences a stop on the account's
-- own row); a position never marked is judged from its opening fill on, not on bars that
-- closed before it was held
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
    raw AS MATERIALIZED (
        SELECT u.instrument_id, u.open AS o, u.high AS h, u.low AS l, u.close AS c,
               u.ts + market.timeframe_interval(u.timeframe) AS ct,
               market.timeframe_interval(u.timeframe) AS span
        FROM unnest(_protect.bars) u
        WHERE u.instrument_id = ANY (_protect.instruments)),
    -- bars closing at the same time: the one of the finest timeframe
    b AS MATERIALIZED (
        SELECT DISTINCT ON (r.instrument_id, r.ct) r.instrument_id, r.o, r.h, r.l, r.c, r.ct
        FROM raw r ORDER BY r.instrument_id, r.ct, r.span),
    -- per (instrument, last mark), over all the bars newer than the mark: the highest
    -- high, the lowest low, the last close (of the finest timeframe among the bars
    -- closing last) and its time. A position with no newer bar is left as it is.
    span AS MATERIALIZED (
        SELECT k.instrument_id, k.mark, max(r.h) AS hi, min(r.l) AS lo, max(r.ct) AS ct,
               (array_agg(r.c ORDER BY r.ct DESC, r.span))[1] AS c
        FROM (SELECT DISTINCT p.instrument_id, p.mark FROM pos p) k
        JOIN raw r ON r.instrument_id = k.instrument_id AND r.ct > k.mark
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

-- (as in 0003_01, search path reset in 0004_06) the hint names the command that lists the
-- runs, `mmats runs` (there is no `mmats backtest list`)
CREATE OR REPLACE FUNCTION backtest._run(run bigint, lock boolean DEFAULT false) RETURNS backtest.runs
LANGUAGE plpgsql AS $$
DECLARE
    r backtest.runs;
BEGIN
    IF lock THEN
        SELECT * INTO r FROM backtest.runs x WHERE x.run_id = run FOR UPDATE;
    ELSE
        SELECT * INTO r FROM backtest.runs x WHERE x.run_id = run;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown backtest run %', COALESCE(run::text, 'NULL')
            USING ERRCODE = 'foreign_key_violation', HINT = 'list the runs with `mmats runs`';
    END IF;
    RETURN r;
END
$$;

-- ======== from 0004_10_pre_news_sentiment.sql
-- 0004_10 (pre): news sentiment, told to strategies (IStrategy.on_news_sentiment).
--
-- One row per item of news with its sentiment score, about one instrument or, with no
-- instrument, the whole market. The backtest engine tells a strategy the rows of its
-- symbols (and the market-wide ones) whose time is at or before a bar's close, before its
-- on_bar, in time order; the strategy worker does the same with the rows stored by the
-- time it runs the bar. Rows come from `mmats data news FILE` (or any INSERT by the
-- owner); the same item twice (source, instrument, time and headline) is stored once.
SET LOCAL ROLE mmats_owner;

CREATE TABLE market.news_sentiment (
    news_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts             timestamptz NOT NULL CONSTRAINT news_sentiment_ts_range
                       CHECK (ts >= '1970-01-01 00:00+00' AND ts < '2200-01-01 00:00+00'),
    instrument_id  bigint REFERENCES market.instruments,  -- NULL: the whole market
    score          numeric NOT NULL CONSTRAINT news_sentiment_score_range
                       CHECK (score >= -1 AND score <= 1),  -- (NaN is above 1)
    source         text NOT NULL CONSTRAINT news_sentiment_source_format
                       CHECK (source ~ '^[^[:cntrl:]]{1,100}$' AND btrim(source) = source),
    headline       text NOT NULL DEFAULT '' CONSTRAINT news_sentiment_headline_format
                       CHECK (length(headline) <= 500 AND headline !~ '[[:cntrl:]]'),
    extra          jsonb NOT NULL DEFAULT '{}' CONSTRAINT news_sentiment_extra_object
                       CHECK (jsonb_typeof(extra) = 'object'),
    created_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT news_sentiment_once UNIQUE NULLS NOT DISTINCT (source, instrument_id, ts, headline)
);
COMMENT ON CONSTRAINT news_sentiment_ts_range ON market.news_sentiment IS
    'a news time must be from 1970 to 2199';
COMMENT ON CONSTRAINT news_sentiment_score_range ON market.news_sentiment IS
    'a sentiment score must be a number from -1 (bearish) to 1 (bullish)';
COMMENT ON CONSTRAINT news_sentiment_source_format ON market.news_sentiment IS
    'a news source is 1-100 characters, no control characters, no leading or trailing space';
COMMENT ON CONSTRAINT news_sentiment_headline_format ON market.news_sentiment IS
    'a headline is at most 500 characters, no control characters';
COMMENT ON CONSTRAINT news_sentiment_extra_object ON market.news_sentiment IS
    'extra must be a JSON object';
COMMENT ON CONSTRAINT news_sentiment_once ON market.news_sentiment IS
    'this item of news (source, instrument, time, headline) is already stored';
CREATE INDEX news_sentiment_ts_idx ON market.news_sentiment (ts);
CREATE INDEX news_sentiment_instrument_ts_idx ON market.news_sentiment (instrument_id, ts);

-- (the default privileges of 0001_05 give SELECT to the reading roles; said again here,
-- so that the grants do not depend on who ran that migration)
GRANT SELECT ON market.news_sentiment TO mmats_readonly, mmats_api, mmats_strategy;

-- ======== from 0004_11_pre_exits_and_fields.sql
-- 0004_11 (pre): exits never exceed what is held; a HARD breaker closes what fills after
-- it; signals, orders, fills and cash movements refuse what they do not understand.
--
-- Found by a review that raced real sessions and fed hostile input to the SQL API; each
-- was reproduced first.
-- 1. Exits on their way: trading.place_manual_order counted only the positions, not the
--    reduce-only orders already open (a stop that fired, a strategy's close, an earlier
--    manual sell), so a manual sell of a whole position was approved as reduce-only next
--    to them and a 10-share position had 20 shares of exits; at a broker without a
--    reduce-only flag the second really sells (short 10 at the broker, flat in the
--    ledger). It now reduces only what those exits leave, and the rest is an opening
--    order that meets every check (SHORT_NOT_ALLOWED on a long-only account). A
--    strategy's close on an independent account did not count a manual exit that
--    reaches its row (trading.apply_fill books a manual exit to the account's own row
--    first, then to the strategies' rows): trading._row_exits, the matching of
--    trading._close_positions (0004_09), is now one function used by both.
-- 2. HARD and a fill after it: an entry already at the broker when the breaker tripped
--    HARD filled afterwards and the position stayed open, with no exit, for as long as
--    the breaker held. trading.apply_fill now closes what a fill leaves open on a HARD
--    account (the booking itself is trading._book_fill, renamed from apply_fill).
-- 3. trading.submit_signal sized a strategy not assigned to the account with all of its
--    capital (a misspelt name traded the whole account): STRATEGY_NOT_ASSIGNED.
-- 4. Unknown fields were ignored ("stoploss": no stop; "sizee": the whole allotment;
--    "comission": no fee): submit_signal, place_manual_order, apply_fill and book_cash
--    refuse them, naming them and the known ones (trading._known_fields).
-- 5. place_manual_order priced its risk checks at the stop price (a buy stop at 0.01
--    with the market at 40 000 is a market buy; it passed MAX_ORDER_VALUE and the cash
--    check); it now takes the worst price the order may fill at. A GTD order must
--    expire in the future; a limit or stop order needs its price (named, not a bare
--    constraint violation); reduce_only must be a boolean; a client order id of the form
--    MMATS gives its own orders (mm<account>-<n>) is refused (it took another account's
--    next order id, failing that account's next signal).
-- 6. A paper or live signal dated more than 5 minutes ahead is refused; signal metadata
--    is at most 16 kB of JSON.
-- 7. trading.book_cash refuses a withdrawal from a paper or backtest account beyond the
--    cash not promised to open buy orders (approved buys were left unfunded, cash went
--    negative at their fill).
-- 8. risk.set_limit stored limits that could never apply: MAX_OPEN_POSITIONS 2.5, DAILY_LOSS
--    500 in unit fraction, TRADING_HOURS {"strat": "09:00"} (a misspelt parameter, never
--    read); refused. A symbol or strategy scope nothing is called yet is a warning.
SET LOCAL ROLE mmats_owner;

-- A JSON document's fields are all among `known`, or this raises naming the others.
CREATE FUNCTION trading._known_fields(doc jsonb, known text[], what text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    unknown text;
BEGIN
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
REVOKE ALL ON FUNCTION trading._known_fields(jsonb, text[], text) FROM PUBLIC;

-- The open exits that will reduce one position row (its account, instrument, strategy or
-- NULL, leg, signed quantity and id), matched as trading.apply_fill books their fills: on
-- an independent account an order's fill books to its own strategy's row (a manual
-- order's, strategy NULL, to the account's own row), on any other account to the one row
-- of the leg; a reduce-only order's leg is its own on a hedge account (a 'net' one: long
-- for a sell, short for a buy), 'net' on a one-way one. A manual exit on an independent
-- account reduces the account's row first and what exceeds that row the strategies' rows,
-- oldest first: the part of that excess that reaches this strategy row is counted too.
CREATE FUNCTION trading._row_exits(acc trading.accounts, instrument bigint, row_strategy bigint,
                                   row_leg trading.position_leg, sq numeric, row_position bigint)
RETURNS numeric
LANGUAGE sql STABLE AS $$
    SELECT COALESCE(sum(e.rest) FILTER (WHERE e.for_row IS NOT DISTINCT FROM _row_exits.row_strategy), 0)
         + CASE WHEN acc.aggregation = 'independent' AND _row_exits.row_strategy IS NOT NULL THEN
               LEAST(abs(_row_exits.sq), GREATEST(0,
                   COALESCE(sum(e.rest) FILTER (WHERE e.for_row IS NULL), 0)
                   - (SELECT COALESCE(sum(abs(y.quantity)), 0) FROM trading.positions y
                      WHERE y.account_id = acc.account_id AND y.instrument_id = _row_exits.instrument
                        AND y.leg = _row_exits.row_leg
                        AND sign(trading._signed_qty(y)) = sign(_row_exits.sq)
                        AND (y.strategy_id IS NULL OR y.position_id < _row_exits.row_position))))
               ELSE 0 END
    FROM (SELECT CASE WHEN acc.aggregation = 'independent' THEN o.strategy_id END AS for_row,
                 o.quantity - o.filled_quantity AS rest
          FROM trading.orders o
          WHERE o.account_id = acc.account_id AND o.instrument_id = _row_exits.instrument
            AND o.reduce_only
            AND o.side = CASE WHEN _row_exits.sq > 0 THEN 'sell' ELSE 'buy' END::trading.order_side
            AND CASE WHEN acc.position_mode = 'oneway' THEN 'net'::trading.position_leg
                     WHEN o.position_leg <> 'net' THEN o.position_leg
                     WHEN o.side = 'buy' THEN 'short'::trading.position_leg
                     ELSE 'long'::trading.position_leg END = _row_exits.row_leg
            AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')) e
$$;
REVOKE ALL ON FUNCTION trading._row_exits(trading.accounts, bigint, bigint, trading.position_leg,
                                          numeric, bigint) FROM PUBLIC;

-- (as in 0004_09) the row's exits by trading._row_exits
CREATE OR REPLACE FUNCTION trading._close_positions(acc trading.accounts, instrument bigint,
                                         trig trading.order_trigger)
RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    p record;
    ids bigint[] := '{}';
    pending numeric;
    qty numeric;
BEGIN
    IF risk.breaker_mode(acc.account_id) = 'FREEZE' THEN
        RAISE EXCEPTION 'account % is frozen (breaker FREEZE): no orders, closes included, until risk.reset_breaker()', acc.name
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    FOR p IN
        SELECT x.*, i.instrument_id AS iid, trading._signed_qty(x) AS sq,
               (COALESCE(x.last_price, x.average_price) - x.average_price) * trading._signed_qty(x) AS upnl,
               abs(trading._signed_qty(x)) * COALESCE(x.last_price, x.average_price) AS exposure
        FROM trading.positions x JOIN market.instruments i USING (instrument_id)
        WHERE x.account_id = acc.account_id AND x.quantity <> 0
          AND (instrument IS NULL OR x.instrument_id = instrument)
        ORDER BY upnl ASC, exposure DESC, x.position_id
    LOOP
        -- the open exits that will reduce this row (trading._row_exits)
        pending := trading._row_exits(acc, p.iid, p.strategy_id, p.leg, p.sq, p.position_id);
        qty := abs(p.sq) - pending;
        CONTINUE WHEN qty <= 0;
        ids := ids || trading._emit_order(acc, (SELECT i FROM market.instruments i WHERE i.instrument_id = p.iid),
            p.strategy_id, NULL, CASE WHEN p.sq > 0 THEN 'sell' ELSE 'buy' END::trading.order_side, qty,
            trig, COALESCE(p.last_price, p.average_price), reduce_only => true, leg => p.leg);
    END LOOP;
    RETURN ids;
END
$$;

-- (as in 0004_08) with the fields checked, STRATEGY_NOT_ASSIGNED, a paper or live signal not
-- ahead of the clock, the metadata bounded, and the exits on their way to a strategy's row
-- counted with the part of a manual exit that reaches it
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

-- (as in 0002_05) exits on their way counted; priced at the worst fill; its fields checked
CREATE OR REPLACE FUNCTION trading.place_manual_order(spec jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    held numeric;
    exits numeric;
    market_px numeric;
    ro boolean;
    coid text;
    expire timestamptz;
    acc trading.accounts;
    inst market.instruments;
    side trading.order_side;
    otype trading.order_type;
    tif trading.time_in_force;
    qty numeric; lp numeric; sp numeric; price numeric;
    cur numeric;
    d numeric;
    opening numeric;
    denial record;
    oid bigint;
BEGIN
    IF spec IS NULL OR jsonb_typeof(spec) <> 'object' THEN
        RAISE EXCEPTION 'an order must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM trading._known_fields(spec, '{account,symbol,venue,side,type,time_in_force,quantity,
        limit_price,stop_price,expire_at,reduce_only,stop_loss,take_profit,client_order_id}', 'order');
    IF spec ? 'reduce_only' AND jsonb_typeof(spec -> 'reduce_only') NOT IN ('boolean', 'null') THEN
        RAISE EXCEPTION 'order.reduce_only must be true or false, got %', left((spec -> 'reduce_only')::text, 40)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    ro := COALESCE((spec ->> 'reduce_only')::boolean, false);
    coid := trading._text(spec, 'client_order_id', 'order', 64);
    IF coid ~ '^mm[0-9]+-[0-9]+$' THEN
        RAISE EXCEPTION 'order.client_order_id % has the form of the ids MMATS gives its own orders (mm<account>-<n>): choose another',
            to_json(coid)::text USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF coid IS NOT NULL AND coid !~ '^[[:print:]]{1,64}$' THEN
        RAISE EXCEPTION 'order.client_order_id must be 1 to 64 printable characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    acc := trading._account(trading._text(spec, 'account', 'order', 64), true);
    inst := market._instrument(trading._text(spec, 'symbol', 'order', 40), trading._text(spec, 'venue', 'order', 32));
    IF acc.mode <> 'operator' THEN
        RAISE EXCEPTION 'account % is in advisory mode: it places no orders', acc.name
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    BEGIN
        side := lower(trading._text(spec, 'side', 'order', 4))::trading.order_side;
        otype := lower(COALESCE(trading._text(spec, 'type', 'order', 12), 'market'))::trading.order_type;
        tif := upper(COALESCE(trading._text(spec, 'time_in_force', 'order', 3), 'GTC'))::trading.time_in_force;
    EXCEPTION WHEN invalid_text_representation THEN
        RAISE EXCEPTION 'order.side must be buy or sell, order.type market, limit, stop or stop_limit, order.time_in_force GTC, IOC, FOK or GTD'
            USING ERRCODE = 'invalid_parameter_value';
    END;
    IF side IS NULL THEN
        RAISE EXCEPTION 'order.side is required (buy or sell)' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    qty := trading._num(spec, 'quantity', 'order', 0, NULL, false);
    IF qty IS NULL THEN
        RAISE EXCEPTION 'order.quantity is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF trading._round_down(qty, inst.quantity_step) <> qty OR qty < inst.min_quantity THEN
        RAISE EXCEPTION 'order.quantity % must be a multiple of % and at least % for %',
            qty, inst.quantity_step, inst.min_quantity, inst.symbol USING ERRCODE = 'invalid_parameter_value';
    END IF;
    lp := trading._num(spec, 'limit_price', 'order', 0, NULL, false);
    sp := trading._num(spec, 'stop_price', 'order', 0, NULL, false);
    IF otype IN ('limit', 'stop_limit') AND lp IS NULL THEN
        RAISE EXCEPTION 'order.limit_price is required for a % order', otype USING ERRCODE = 'invalid_parameter_value';
    ELSIF otype IN ('stop', 'stop_limit') AND sp IS NULL THEN
        RAISE EXCEPTION 'order.stop_price is required for a % order', otype USING ERRCODE = 'invalid_parameter_value';
    END IF;
    expire := trading._ts(spec, 'expire_at', 'order');
    IF tif = 'GTD' AND expire IS NULL THEN
        RAISE EXCEPTION 'order.expire_at is required for a GTD order' USING ERRCODE = 'invalid_parameter_value';
    ELSIF tif = 'GTD' AND expire <= now() AND acc.environment = 'live' THEN
        -- (live only: a paper session replaying stored bars lives at their time)
        RAISE EXCEPTION 'order.expire_at % is not in the future (now %)', expire, now()
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- the risk checks price the order at the worst it may fill at: a buy limit at its
    -- limit, anything else at its limit or stop or the market, whichever is higher (a buy
    -- stop far below the market fills at the market at once: priced at its stop it passed
    -- every value limit)
    market_px := market.latest_close(inst.instrument_id);
    price := CASE WHEN side = 'buy' AND lp IS NOT NULL THEN lp
                  ELSE GREATEST(COALESCE(lp, sp), market_px) END;
    IF price IS NULL THEN
        RAISE EXCEPTION 'no price for % (no bars and no limit price)', inst.symbol USING ERRCODE = 'no_data_found';
    END IF;
    SELECT COALESCE(sum(trading._signed_qty(p)), 0) INTO held FROM trading.positions p
    WHERE p.account_id = acc.account_id AND p.instrument_id = inst.instrument_id;
    -- what will be held once the exits already on their way have filled (a stop that fired,
    -- a strategy's close, an earlier manual exit): this order reduces only what they leave
    SELECT -sign(held) * COALESCE(sum(o.quantity - o.filled_quantity), 0)
    INTO exits FROM trading.orders o
    WHERE o.account_id = acc.account_id AND o.instrument_id = inst.instrument_id AND o.reduce_only
      AND o.side = CASE WHEN held > 0 THEN 'sell' ELSE 'buy' END::trading.order_side
      AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled');
    cur := CASE WHEN sign(held + exits) = sign(held) THEN held + exits ELSE 0 END;
    d := CASE WHEN side = 'buy' THEN qty ELSE -qty END;
    opening := CASE WHEN cur = 0 OR sign(cur) = sign(d) THEN qty ELSE GREATEST(qty - abs(cur), 0) END;
    IF ro AND opening > 0 THEN
        RAISE EXCEPTION 'a reduce_only order of % would open % (position %, exits already on their way for %)',
            qty, opening, held, -exits USING ERRCODE = 'check_violation';
    END IF;
    -- a long-only account sells only what the exits on their way leave (the gate counts
    -- what is held, so a second exit passed it as a short)
    IF side = 'sell' AND NOT acc.allow_short AND opening > 0 AND exits <> 0 THEN
        denial := NULL;
        SELECT 'SHORT_NOT_ALLOWED' AS code,
               format('SHORT_NOT_ALLOWED: position=%s, exits on their way=%s, sell=%s, account=%s',
                      held, -exits, qty, acc.name) AS reason INTO denial;
    ELSE
        SELECT * INTO denial FROM risk.check_order(acc, NULL, inst, side, qty, opening, price,
        trading._num(spec, 'stop_loss', 'order', 0, NULL, false), now());
    END IF;
    IF denial.code IS NOT NULL THEN
        PERFORM audit.record('order.refused', 'trading.accounts', acc.account_id::text,
                             jsonb_build_object('reason_code', denial.code, 'reason', denial.reason, 'spec', spec));
        RETURN jsonb_build_object('status', 'rejected', 'reason_code', denial.code, 'reason', denial.reason,
                                  'order_id', NULL);
    END IF;
    oid := trading._emit_order(acc, inst, NULL, NULL, side, qty, 'manual', price,
        reduce_only => opening = 0,
        -- hedge accounts: an entry opens the leg of its side, a reduction closes the other
        leg => CASE WHEN acc.position_mode = 'oneway' THEN 'net'
                    WHEN (side = 'buy') <> (opening = 0) THEN 'long'
                    ELSE 'short' END::trading.position_leg,
        order_type => otype, limit_price => lp, stop_price => sp, tif => tif,
        expire_at => expire,
        stop_loss => trading._num(spec, 'stop_loss', 'order', 0, NULL, false),
        take_profit => trading._num(spec, 'take_profit', 'order', 0, NULL, false),
        client_order_id => coid);
    RETURN jsonb_build_object('status', 'approved', 'order_id', oid, 'reason_code', NULL, 'reason', NULL);
END
$$;

-- (as in 0004_08) fields checked; a paper or backtest withdrawal only from available cash
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
    PERFORM trading._known_fields(movement, '{account,kind,amount,currency,broker_ref,description,
        ts,symbol}', what);
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
    -- in a paper or backtest account the ledger is the bank: no more may leave it than
    -- the cash not already promised to approved buys (a live account's withdrawal is
    -- what the broker reports: booked as it happened)
    IF k = 'withdrawal' AND acc.environment IN ('paper', 'backtest')
       AND -amt * rate > acc.cash - trading._reserved_cash(acc) THEN
        RAISE EXCEPTION 'book_cash: a withdrawal of % % from % is more than its available cash % (cash % less % for open buy orders)',
            -amt, ccy, acc.name, acc.cash - trading._reserved_cash(acc), acc.cash, trading._reserved_cash(acc)
            USING ERRCODE = 'check_violation';
    END IF;
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

-- (as in 0002_03) a value that cannot apply is refused: a count not whole, a flag not 0 or 1,
-- a fraction above 1 in unit fraction, an unknown parameter; an unknown symbol or strategy
-- is a warning
CREATE OR REPLACE FUNCTION risk.set_limit(limit_type text, value numeric, scope text DEFAULT 'global',
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
    IF value >= 1e18 THEN
        RAISE EXCEPTION '% must be less than 10^18, got %', lt.limit_type, left(value::text, 40)
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF lt.unit = 'count' AND value <> trunc(value) THEN
        RAISE EXCEPTION '% counts positions: a whole number, got %', lt.limit_type, value
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF params ->> 'unit' = 'fraction' AND value > 1 THEN
        RAISE EXCEPTION '% as a fraction must be between 0 and 1, got % (unit amount is money)',
            lt.limit_type, value USING ERRCODE = 'invalid_parameter_value';
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
    -- a misspelt parameter was stored and never read ({"strat": "09:00"}: no hours)
    PERFORM trading._known_fields(COALESCE(params, '{}'),
        '{tz,start,end,days,timeframe,lookback,period,mode,unit,note}', lt.limit_type || ' params');
    -- a key nothing has yet applies to nothing until it does: said, and kept (limits may
    -- be set before the feed creates the instrument or the strategy first signals)
    IF scope = 'symbol' AND NOT EXISTS (SELECT 1 FROM market.instruments i
                                        WHERE i.symbol = upper(scope_key)) THEN
        RAISE WARNING 'no instrument is called % yet: this % limit applies to none until one is',
            quote_literal(upper(scope_key)), lt.limit_type;
    ELSIF scope = 'strategy' AND NOT EXISTS (SELECT 1 FROM trading.strategies t
                                             WHERE t.name = scope_key) THEN
        RAISE WARNING 'no strategy is called % yet: this % limit applies to none until one is',
            quote_literal(scope_key), lt.limit_type;
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

-- apply_fill = the booking (0004_07, unchanged, now trading._book_fill), its fields checked
-- first; then, on an account whose breaker is HARD, what the fill leaves open is closed (an
-- entry at the broker when the breaker tripped filled after it and stayed open)
ALTER FUNCTION trading.apply_fill(jsonb) RENAME TO _book_fill;
REVOKE ALL ON FUNCTION trading._book_fill(jsonb) FROM PUBLIC, mmats_router, mmats_api;
CREATE FUNCTION trading.apply_fill(fill jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    res jsonb;
    acc trading.accounts;
    iid bigint;
BEGIN
    IF jsonb_typeof(fill) = 'object' THEN
        PERFORM trading._known_fields(fill, '{order_id,client_order_id,broker_fill_id,quantity,
            price,commission,commission_currency,liquidity,ts}', 'fill');
    END IF;
    res := trading._book_fill(fill);
    IF res ->> 'status' = 'applied' THEN
        SELECT o.instrument_id INTO iid
        FROM trading.orders o JOIN risk.breaker_state b USING (account_id)
        WHERE o.order_id = (res ->> 'order_id')::bigint AND b.mode = 'HARD';
        IF FOUND THEN
            SELECT a.* INTO acc FROM trading.accounts a JOIN trading.orders o USING (account_id)
            WHERE o.order_id = (res ->> 'order_id')::bigint;
            res := res || jsonb_build_object('breaker_orders',
                to_jsonb(trading._close_positions(acc, iid, 'breaker')));
        END IF;
    END IF;
    RETURN res;
END
$$;
REVOKE ALL ON FUNCTION trading.apply_fill(jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION trading.apply_fill(jsonb) TO mmats_router, mmats_api;

-- ======== from 0004_12_pre_lighter_gate.sql
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

-- ======== from 0004_13_pre_cancels_reach_the_venue.sql
-- 0004_13 (pre): a trader's cancel reaches the venue; client order ids unique per database.
--
-- 1. trading.cancel_order marked an order cancelled in the ledger whatever its state, and
--    it was granted to mmats_api, the controls' role. A trader cancelling a buy working
--    at Alpaca got "cancelled"; the router archived the order's message without a word to
--    the venue; the order went on working there and filled, a position the ledger did not
--    hold. trading.request_cancel is the trader's cancel now. An order that never left the
--    database is cancelled at once: one not yet taken by the router (created), a
--    backtest's, one in the paper book (the ledger is that book: broker id paper-...). An
--    order at a venue (in flight, submitted, partly filled) is marked cancel-requested and
--    queued for the router, which asks its venue to cancel it and records what the venue
--    answers: cancelled, or the fills that came first. trading.cancel_order stays what the
--    router and the backtest's simulator call once a cancellation has happened; mmats_api
--    may no longer call it.
-- 2. The gate (trading._gate) lets no order whose cancel was requested go to a venue
--    again (CANCEL_REQUESTED): an order in flight that its venue turns out not to have is
--    cancelled instead of sent again.
-- 3. close_all, close_position and a HARD breaker left the account's open entry orders
--    working: a resting buy limit filled after the account had been flattened (a HARD
--    breaker then closed it again, at a second spread and commission). They now cancel
--    the open orders that are not reduce-only (of that instrument for close_position), by
--    trading.request_cancel's rules. SOFT and FREEZE cancel nothing.
--    A closing order whose cancel was requested is still counted by the closes, since the
--    venue may fill it yet: close_position and close_all mark it (close_requested_at) and
--    say so (waiting_order_ids), and once it is cancelled its position is closed again,
--    as it is for any such order while the breaker is HARD. A closing order cannot be
--    cancelled by hand while the breaker is HARD, nor an order of a backtest still running.
-- 4. backtest._state says the account's breaker, so that the backtest engine drops the
--    orders the ledger cancelled on its own (a HARD breaker's).
-- 5. Client order ids were mm<account>-<n>, n from a sequence: a second database trading
--    the same broker account (a reset, the demo's, a test installation) gave its orders
--    the ids of the first one's. Alpaca and OANDA refused them as duplicates; a venue that
--    found an old order under the id had it taken for the new one. Ids are now
--    mm<account>-<n>-<tag>, the tag 8 hex digits drawn once per database
--    (trading.installation). A manual order may not take an id of either form.
SET LOCAL ROLE mmats_owner;

------------------------------------------------------------------------------ ids
CREATE TABLE trading.installation (
    only_row   boolean PRIMARY KEY DEFAULT true CONSTRAINT installation_one_row CHECK (only_row),
    tag        text NOT NULL CONSTRAINT installation_tag_format CHECK (tag ~ '^[0-9a-f]{8}$'),
    created_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE trading.installation IS
    'this database: the random tag in the client order ids it gives (mm<account>-<n>-<tag>), so that two databases trading one broker account never give the same id';
INSERT INTO trading.installation (tag) VALUES (substr(md5(gen_random_uuid()::text), 1, 8));
GRANT SELECT ON trading.installation TO mmats_readonly, mmats_api;

-- (as in 0004_04, the client order id with the database's tag)
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
                                               client_order_id text DEFAULT NULL,
                                               triggered_at timestamptz DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    id bigint;
    coid text;
BEGIN
    INSERT INTO trading.orders AS o (account_id, instrument_id, strategy_id, signal_id,
        client_order_id, side, order_type, time_in_force, quantity, limit_price, stop_price,
        expire_at, reduce_only, position_leg, trigger, trigger_price, stop_loss, take_profit,
        trailing_stop, breakeven, reference_price, triggered_at)
    VALUES (acc.account_id, inst.instrument_id, strategy_id, signal_id,
        COALESCE(client_order_id, 'mm' || acc.account_id || '-' || nextval('trading.client_order_seq')
                                  || '-' || (SELECT t.tag FROM trading.installation t)),
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

------------------------------------------------------------------------------ cancels
ALTER TABLE trading.orders ADD COLUMN cancel_requested_at timestamptz;
COMMENT ON COLUMN trading.orders.cancel_requested_at IS
    'when a cancel was requested (trading.request_cancel) while the order was at its venue; the venue''s answer, recorded by the router, settles it';

ALTER TABLE trading.orders ADD COLUMN close_requested_at timestamptz;
COMMENT ON COLUMN trading.orders.close_requested_at IS
    'a closing order whose cancel was requested when close_position or close_all ran: once it is cancelled, its position is closed again';

-- A cancel of an order its caller has found and locked (trading._locked_order): at once
-- when the order never left the database, else marked and queued for the router.
CREATE FUNCTION trading._request_cancel(acc trading.accounts, o trading.orders, reason text)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    why text := COALESCE(reason, 'cancel requested');
BEGIN
    IF o.status IN ('filled', 'rejected', 'expired') THEN
        RAISE EXCEPTION 'order % is %: there is nothing left to cancel', o.client_order_id, o.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    ELSIF o.status = 'cancelled' THEN
        RETURN jsonb_build_object('status', 'unchanged', 'order_id', o.order_id,
                                  'order_status', o.status);
    ELSIF o.status = 'created' OR acc.environment = 'backtest'
          OR (o.status IN ('submitted', 'partially_filled') AND o.broker_order_id LIKE 'paper-%') THEN
        -- not taken by the router yet (its gate finds it cancelled), a backtest's, or in
        -- the paper book, which is the ledger itself
        RETURN trading._set_status(acc, o, 'cancelled', why);
    ELSIF o.cancel_requested_at IS NOT NULL THEN
        RETURN jsonb_build_object('status', 'cancel_requested', 'order_id', o.order_id,
                                  'order_status', o.status, 'requested_at', o.cancel_requested_at);
    END IF;
    UPDATE trading.orders x SET cancel_requested_at = now() WHERE x.order_id = o.order_id;
    INSERT INTO pgmq.q_orders AS q (vt, message, headers)
    VALUES (clock_timestamp(), jsonb_build_object(
        'order_id', o.order_id, 'account_id', acc.account_id, 'environment', acc.environment,
        'client_order_id', o.client_order_id, 'cancel', true, 'reason', why), NULL);
    PERFORM audit.record('order.cancel_requested', 'trading.orders', o.order_id::text,
        jsonb_build_object('status', o.status, 'reason', why));
    RETURN jsonb_build_object('status', 'cancel_requested', 'order_id', o.order_id,
                              'order_status', o.status, 'requested_at', now());
END
$$;
REVOKE ALL ON FUNCTION trading._request_cancel(trading.accounts, trading.orders, text) FROM PUBLIC;

-- A running backtest's account is its engine's: the simulator holds its orders' book and
-- the run's fingerprint is its trades, so nothing is placed, closed, cancelled or tripped
-- there by hand (request_cancel, close_position, close_all, place_manual_order,
-- risk.trip_breaker). A backtest account of no running run (made by hand in psql, or
-- whose run has ended) is controlled as any other.
CREATE FUNCTION trading._refuse_running_backtest(acc trading.accounts, what text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    running bigint;
BEGIN
    IF acc.environment = 'backtest' THEN
        SELECT r.run_id INTO running FROM backtest.runs r
        WHERE r.account_id = acc.account_id AND r.status = 'running' ORDER BY r.run_id LIMIT 1;
        IF running IS NOT NULL THEN
            RAISE EXCEPTION '%: account % belongs to backtest run %, still running: its orders are the run''s, not placed, closed or cancelled by hand',
                what, acc.name, running USING ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
    END IF;
END
$$;
REVOKE ALL ON FUNCTION trading._refuse_running_backtest(trading.accounts, text) FROM PUBLIC;

-- The trader's cancel (order id or client order id). Answers {"status": "cancelled"} when
-- done at once, {"status": "cancel_requested"} when the router will ask the venue,
-- {"status": "unchanged"} for an order already cancelled; an order filled, rejected or
-- expired is refused.
CREATE FUNCTION trading.request_cancel(order_ref text, reason text DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    lk record := trading._locked_order(order_ref);
BEGIN
    IF reason IS NOT NULL AND (length(reason) NOT BETWEEN 1 AND 500 OR reason ~ '[^[:print:]]') THEN
        RAISE EXCEPTION 'a cancel''s reason must be 1 to 500 printable characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM trading._refuse_running_backtest(lk.acc, format('order %s', (lk.o).client_order_id));
    IF (lk.o).reduce_only AND (lk.acc).mode = 'operator'
          AND (lk.o).status IN ('created', 'in_flight', 'submitted', 'partially_filled')
          AND risk.breaker_mode((lk.acc).account_id) = 'HARD' THEN
        RAISE EXCEPTION 'order % closes a position of account %, whose breaker is HARD: it is not cancelled until risk.reset_breaker()',
            (lk.o).client_order_id, (lk.acc).name USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN trading._request_cancel(lk.acc, lk.o, reason);
END
$$;
REVOKE ALL ON FUNCTION trading.request_cancel(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION trading.request_cancel(text, text) TO mmats_api;
REVOKE EXECUTE ON FUNCTION trading.cancel_order(text, text) FROM mmats_api;

-- The open orders of an account (of one instrument, or all when NULL) that are not
-- reduce-only, cancelled by trading._request_cancel's rules: their ids.
CREATE FUNCTION trading._cancel_entries(acc trading.accounts, instrument bigint, reason text)
RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    o trading.orders;
    ids bigint[] := '{}';
BEGIN
    FOR o IN
        SELECT * FROM trading.orders x
        WHERE x.account_id = acc.account_id AND NOT x.reduce_only
          AND x.status IN ('created', 'in_flight', 'submitted', 'partially_filled')
          AND (instrument IS NULL OR x.instrument_id = instrument)
        ORDER BY x.order_id
        FOR UPDATE
    LOOP
        PERFORM trading._request_cancel(acc, o, reason);
        ids := ids || o.order_id;
    END LOOP;
    RETURN ids;
END
$$;
REVOKE ALL ON FUNCTION trading._cancel_entries(trading.accounts, bigint, text) FROM PUBLIC;

-- (as in 0004_07, an order whose cancel was requested never goes to a venue again)
CREATE OR REPLACE FUNCTION trading._gate(acc trading.accounts, o trading.orders)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    brk risk.breaker_state;
    code text;
    why text;
BEGIN
    SELECT * INTO brk FROM risk.breaker_state b WHERE b.account_id = acc.account_id;
    IF o.cancel_requested_at IS NOT NULL THEN
        code := 'CANCEL_REQUESTED';
    ELSIF brk.mode = 'FREEZE' THEN
        code := 'BREAKER_FREEZE';
    ELSIF brk.mode IN ('SOFT', 'HARD') AND NOT o.reduce_only THEN
        code := 'BREAKER_' || brk.mode::text;
    ELSIF acc.mode = 'advisory' AND NOT o.reduce_only THEN
        code := 'ACCOUNT_ADVISORY';
    ELSE
        RETURN NULL;
    END IF;
    why := CASE WHEN code = 'CANCEL_REQUESTED'
                THEN format('%s: a cancel was requested at %s: the order was not sent again',
                            code, o.cancel_requested_at)
                WHEN code = 'ACCOUNT_ADVISORY'
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

-- (as in 0004_12) an order cancelled before the router could send it (trading.request_cancel
-- on an order just read) is answered as the gate answers, not refused as an illegal change
CREATE OR REPLACE FUNCTION trading._advance_to_broker(order_ref text, new_status trading.order_status,
                                           broker_order_id text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    lk record := trading._locked_order(order_ref);
BEGIN
    IF (lk.o).status = 'cancelled' THEN
        RETURN jsonb_build_object('status', 'cancelled', 'order_id', (lk.o).order_id,
                                  'previous', 'cancelled', 'reason_code', (lk.o).reason_code,
                                  'reason', (lk.o).reason);
    END IF;
    RETURN COALESCE(CASE WHEN (lk.o).status = 'created'
                              OR (new_status = 'in_flight' AND (lk.o).status = 'in_flight')
                         THEN trading._gate(lk.acc, lk.o) END,
                    trading._set_status(lk.acc, lk.o, new_status, NULL, broker_order_id));
END
$$;

-- A closing order whose cancel was requested, now cancelled: its position is closed again
-- when the breaker is HARD or a close asked for it (close_requested_at), unless FREEZE
-- stops every order. The new closing orders' ids.
CREATE FUNCTION trading._close_again(acc trading.accounts, o trading.orders) RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    brk risk.breaker_mode := risk.breaker_mode(acc.account_id);
    ids bigint[];
BEGIN
    IF acc.mode <> 'operator' OR acc.environment = 'backtest' OR brk = 'FREEZE'
       OR NOT (brk = 'HARD' OR o.close_requested_at IS NOT NULL) THEN
        RETURN '{}';
    END IF;
    ids := trading._close_positions(acc, o.instrument_id,
                                    CASE WHEN brk = 'HARD' THEN 'breaker' ELSE 'close' END::trading.order_trigger);
    PERFORM audit.record('control.close_after_cancel', 'trading.orders', o.order_id::text,
        jsonb_build_object('breaker', brk, 'close_requested_at', o.close_requested_at,
                           'orders', to_jsonb(ids)));
    RETURN ids;
END
$$;
REVOKE ALL ON FUNCTION trading._close_again(trading.accounts, trading.orders) FROM PUBLIC;

-- (as in 0004_07, a closing order cancelled on request closes its position again:
-- trading._close_again)
CREATE OR REPLACE FUNCTION trading._set_status(acc trading.accounts, o trading.orders,
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
    IF new_status = 'cancelled' AND o.reduce_only AND o.cancel_requested_at IS NOT NULL THEN
        PERFORM trading._close_again(acc, o);
    END IF;
    RETURN jsonb_build_object('status', new_status, 'order_id', o.order_id, 'previous', o.status);
END
$$;

-- The closing orders of an account (of one instrument, or all when NULL) whose cancel was
-- requested: marked so that their cancellation closes their position again
-- (trading._close_again); their ids.
CREATE FUNCTION trading._close_after_cancel(acc trading.accounts, instrument bigint)
RETURNS bigint[]
LANGUAGE sql AS $$
    WITH marked AS (
        UPDATE trading.orders x SET close_requested_at = COALESCE(x.close_requested_at, now())
        WHERE x.account_id = acc.account_id AND x.reduce_only
          AND x.cancel_requested_at IS NOT NULL
          AND x.status IN ('created', 'in_flight', 'submitted', 'partially_filled')
          AND (instrument IS NULL OR x.instrument_id = instrument)
        RETURNING x.order_id)
    SELECT COALESCE(array_agg(m.order_id ORDER BY m.order_id), '{}') FROM marked m
$$;
REVOKE ALL ON FUNCTION trading._close_after_cancel(trading.accounts, bigint) FROM PUBLIC;

------------------------------------------------------------------------------ controls
-- (as in 0002_05, the instrument's open entries cancelled too)
CREATE OR REPLACE FUNCTION trading.close_position(account text, symbol text, venue text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts := trading._account(account, true);
    inst market.instruments := market._instrument(symbol, venue);
    ids bigint[];
    cancelled bigint[];
    waiting bigint[];
BEGIN
    PERFORM trading._refuse_running_backtest(acc, format('close_position %s', inst.symbol));
    ids := trading._close_positions(acc, inst.instrument_id, 'close');
    waiting := trading._close_after_cancel(acc, inst.instrument_id);
    cancelled := trading._cancel_entries(acc, inst.instrument_id,
                                         'close_position: the position was closed');
    PERFORM audit.record('control.close_position', 'trading.accounts', acc.account_id::text,
        jsonb_build_object('symbol', inst.symbol, 'orders', to_jsonb(ids),
                           'cancelled', to_jsonb(cancelled), 'waiting', to_jsonb(waiting)));
    RETURN jsonb_build_object('account', acc.name, 'symbol', inst.symbol, 'order_ids', to_jsonb(ids),
                              'cancelled_order_ids', to_jsonb(cancelled),
                              'waiting_order_ids', to_jsonb(waiting));
END
$$;

-- (as in 0002_05, the open entries cancelled too)
CREATE OR REPLACE FUNCTION trading.close_all(account text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts := trading._account(account, true);
    ids bigint[];
    cancelled bigint[];
    waiting bigint[];
BEGIN
    PERFORM trading._refuse_running_backtest(acc, 'close_all');
    ids := trading._close_positions(acc, NULL, 'close');
    waiting := trading._close_after_cancel(acc, NULL);
    cancelled := trading._cancel_entries(acc, NULL, 'close_all: every position was closed');
    PERFORM audit.record('control.close_all', 'trading.accounts', acc.account_id::text,
                         jsonb_build_object('orders', to_jsonb(ids), 'cancelled', to_jsonb(cancelled),
                                            'waiting', to_jsonb(waiting)));
    RETURN jsonb_build_object('account', acc.name, 'order_ids', to_jsonb(ids),
                              'cancelled_order_ids', to_jsonb(cancelled),
                              'waiting_order_ids', to_jsonb(waiting));
END
$$;

-- (as in 0002_06, HARD cancels the open entries too, an advisory account's as well)
CREATE OR REPLACE FUNCTION risk._trip(acc trading.accounts, mode risk.breaker_mode, reason text,
                                      event_type text DEFAULT 'BREAKER_TRIPPED')
RETURNS risk.breaker_mode
LANGUAGE plpgsql AS $$
DECLARE
    current risk.breaker_mode := risk.breaker_mode(acc.account_id);
    ids bigint[] := '{}';
    cancelled bigint[] := '{}';
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
    IF mode = 'HARD' THEN
        -- an advisory account sends no closes, but the entries it left at a venue (while
        -- it was an operator) are cancelled all the same
        IF acc.mode = 'operator' THEN
            ids := trading._close_positions(acc, NULL, 'breaker');
        END IF;
        cancelled := trading._cancel_entries(acc, NULL, format('breaker HARD: %s', reason));
    END IF;
    INSERT INTO risk.events (account_id, severity, event_type, message, details)
    VALUES (acc.account_id, 'critical', upper(event_type),
            format('breaker %s on %s: %s', mode, acc.name, reason),
            jsonb_build_object('mode', mode, 'previous', current, 'closing_orders', to_jsonb(ids),
                               'cancelled_orders', to_jsonb(cancelled)));
    PERFORM audit.record('risk.breaker_tripped', 'trading.accounts', acc.account_id::text,
        jsonb_build_object('mode', mode, 'previous', current, 'reason', reason,
                           'closing_orders', to_jsonb(ids), 'cancelled_orders', to_jsonb(cancelled)));
    RETURN mode;
END
$$;

-- (as in 0002_06, refused on a running backtest's account: trading._refuse_running_backtest)
CREATE OR REPLACE FUNCTION risk.trip_breaker(account text, mode text, reason text) RETURNS jsonb
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
    PERFORM trading._refuse_running_backtest(acc, format('a %s breaker trip', upper(mode)));
    m := risk._trip(acc, upper(mode)::risk.breaker_mode, reason, 'BREAKER_MANUAL');
    RETURN jsonb_build_object('account', acc.name, 'mode', m,
        'open_orders', (SELECT count(*) FROM trading.orders o WHERE o.account_id = acc.account_id
                        AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')));
END
$$;

-- (as in 0003_01, with the account's breaker)
CREATE OR REPLACE FUNCTION backtest._state(account bigint) RETURNS jsonb
LANGUAGE sql STABLE
RETURN (
    SELECT jsonb_build_object(
        'cash', e.cash, 'equity', e.equity, 'positions_value', e.positions_value,
        'breaker', risk.breaker_mode(account),
        'positions', COALESCE((
            SELECT jsonb_agg(jsonb_build_object(
                'instrument_id', p.instrument_id, 'symbol', i.symbol, 'leg', p.leg,
                'strategy_id', p.strategy_id, 'quantity', trading._signed_qty(p),
                'average_price', p.average_price, 'last_price', p.last_price,
                'stop_loss', p.stop_loss, 'take_profit', p.take_profit,
                'trailing_stop', p.trailing_stop, 'trail_anchor', p.trail_anchor,
                'breakeven', p.breakeven, 'marked_at', p.marked_at,
                'unrealized_pnl', trading._signed_qty(p) * (COALESCE(p.last_price, p.average_price) - p.average_price))
                ORDER BY p.position_id)
            FROM trading.positions p JOIN market.instruments i USING (instrument_id)
            WHERE p.account_id = account AND p.quantity <> 0), '[]'))
    FROM trading.account_equity(account) e);

-- (as in 0004_11, neither form of the ids MMATS gives its own orders may be taken)
CREATE OR REPLACE FUNCTION trading.place_manual_order(spec jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    held numeric;
    exits numeric;
    market_px numeric;
    ro boolean;
    coid text;
    expire timestamptz;
    acc trading.accounts;
    inst market.instruments;
    side trading.order_side;
    otype trading.order_type;
    tif trading.time_in_force;
    qty numeric; lp numeric; sp numeric; price numeric;
    cur numeric;
    d numeric;
    opening numeric;
    denial record;
    oid bigint;
BEGIN
    IF spec IS NULL OR jsonb_typeof(spec) <> 'object' THEN
        RAISE EXCEPTION 'an order must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM trading._known_fields(spec, '{account,symbol,venue,side,type,time_in_force,quantity,
        limit_price,stop_price,expire_at,reduce_only,stop_loss,take_profit,client_order_id}', 'order');
    IF spec ? 'reduce_only' AND jsonb_typeof(spec -> 'reduce_only') NOT IN ('boolean', 'null') THEN
        RAISE EXCEPTION 'order.reduce_only must be true or false, got %', left((spec -> 'reduce_only')::text, 40)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    ro := COALESCE((spec ->> 'reduce_only')::boolean, false);
    coid := trading._text(spec, 'client_order_id', 'order', 64);
    IF coid ~ '^mm[0-9]+-[0-9]+(-[0-9a-f]{8})?$' THEN
        RAISE EXCEPTION 'order.client_order_id % has the form of the ids MMATS gives its own orders (mm<account>-<n>-<tag>): choose another',
            to_json(coid)::text USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF coid IS NOT NULL AND coid !~ '^[[:print:]]{1,64}$' THEN
        RAISE EXCEPTION 'order.client_order_id must be 1 to 64 printable characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    acc := trading._account(trading._text(spec, 'account', 'order', 64), true);
    inst := market._instrument(trading._text(spec, 'symbol', 'order', 40), trading._text(spec, 'venue', 'order', 32));
    PERFORM trading._refuse_running_backtest(acc, 'a manual order');
    IF acc.mode <> 'operator' THEN
        RAISE EXCEPTION 'account % is in advisory mode: it places no orders', acc.name
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    BEGIN
        side := lower(trading._text(spec, 'side', 'order', 4))::trading.order_side;
        otype := lower(COALESCE(trading._text(spec, 'type', 'order', 12), 'market'))::trading.order_type;
        tif := upper(COALESCE(trading._text(spec, 'time_in_force', 'order', 3), 'GTC'))::trading.time_in_force;
    EXCEPTION WHEN invalid_text_representation THEN
        RAISE EXCEPTION 'order.side must be buy or sell, order.type market, limit, stop or stop_limit, order.time_in_force GTC, IOC, FOK or GTD'
            USING ERRCODE = 'invalid_parameter_value';
    END;
    IF side IS NULL THEN
        RAISE EXCEPTION 'order.side is required (buy or sell)' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    qty := trading._num(spec, 'quantity', 'order', 0, NULL, false);
    IF qty IS NULL THEN
        RAISE EXCEPTION 'order.quantity is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF trading._round_down(qty, inst.quantity_step) <> qty OR qty < inst.min_quantity THEN
        RAISE EXCEPTION 'order.quantity % must be a multiple of % and at least % for %',
            qty, inst.quantity_step, inst.min_quantity, inst.symbol USING ERRCODE = 'invalid_parameter_value';
    END IF;
    lp := trading._num(spec, 'limit_price', 'order', 0, NULL, false);
    sp := trading._num(spec, 'stop_price', 'order', 0, NULL, false);
    IF otype IN ('limit', 'stop_limit') AND lp IS NULL THEN
        RAISE EXCEPTION 'order.limit_price is required for a % order', otype USING ERRCODE = 'invalid_parameter_value';
    ELSIF otype IN ('stop', 'stop_limit') AND sp IS NULL THEN
        RAISE EXCEPTION 'order.stop_price is required for a % order', otype USING ERRCODE = 'invalid_parameter_value';
    END IF;
    expire := trading._ts(spec, 'expire_at', 'order');
    IF tif = 'GTD' AND expire IS NULL THEN
        RAISE EXCEPTION 'order.expire_at is required for a GTD order' USING ERRCODE = 'invalid_parameter_value';
    ELSIF tif = 'GTD' AND expire <= now() AND acc.environment = 'live' THEN
        -- (live only: a paper session replaying stored bars lives at their time)
        RAISE EXCEPTION 'order.expire_at % is not in the future (now %)', expire, now()
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- the risk checks price the order at the worst it may fill at: a buy limit at its
    -- limit, anything else at its limit or stop or the market, whichever is higher (a buy
    -- stop far below the market fills at the market at once: priced at its stop it passed
    -- every value limit)
    market_px := market.latest_close(inst.instrument_id);
    price := CASE WHEN side = 'buy' AND lp IS NOT NULL THEN lp
                  ELSE GREATEST(COALESCE(lp, sp), market_px) END;
    IF price IS NULL THEN
        RAISE EXCEPTION 'no price for % (no bars and no limit price)', inst.symbol USING ERRCODE = 'no_data_found';
    END IF;
    SELECT COALESCE(sum(trading._signed_qty(p)), 0) INTO held FROM trading.positions p
    WHERE p.account_id = acc.account_id AND p.instrument_id = inst.instrument_id;
    -- what will be held once the exits already on their way have filled (a stop that fired,
    -- a strategy's close, an earlier manual exit): this order reduces only what they leave
    SELECT -sign(held) * COALESCE(sum(o.quantity - o.filled_quantity), 0)
    INTO exits FROM trading.orders o
    WHERE o.account_id = acc.account_id AND o.instrument_id = inst.instrument_id AND o.reduce_only
      AND o.side = CASE WHEN held > 0 THEN 'sell' ELSE 'buy' END::trading.order_side
      AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled');
    cur := CASE WHEN sign(held + exits) = sign(held) THEN held + exits ELSE 0 END;
    d := CASE WHEN side = 'buy' THEN qty ELSE -qty END;
    opening := CASE WHEN cur = 0 OR sign(cur) = sign(d) THEN qty ELSE GREATEST(qty - abs(cur), 0) END;
    IF ro AND opening > 0 THEN
        RAISE EXCEPTION 'a reduce_only order of % would open % (position %, exits already on their way for %)',
            qty, opening, held, -exits USING ERRCODE = 'check_violation';
    END IF;
    -- a long-only account sells only what the exits on their way leave (the gate counts
    -- what is held, so a second exit passed it as a short)
    IF side = 'sell' AND NOT acc.allow_short AND opening > 0 AND exits <> 0 THEN
        denial := NULL;
        SELECT 'SHORT_NOT_ALLOWED' AS code,
               format('SHORT_NOT_ALLOWED: position=%s, exits on their way=%s, sell=%s, account=%s',
                      held, -exits, qty, acc.name) AS reason INTO denial;
    ELSE
        SELECT * INTO denial FROM risk.check_order(acc, NULL, inst, side, qty, opening, price,
        trading._num(spec, 'stop_loss', 'order', 0, NULL, false), now());
    END IF;
    IF denial.code IS NOT NULL THEN
        PERFORM audit.record('order.refused', 'trading.accounts', acc.account_id::text,
                             jsonb_build_object('reason_code', denial.code, 'reason', denial.reason, 'spec', spec));
        RETURN jsonb_build_object('status', 'rejected', 'reason_code', denial.code, 'reason', denial.reason,
                                  'order_id', NULL);
    END IF;
    oid := trading._emit_order(acc, inst, NULL, NULL, side, qty, 'manual', price,
        reduce_only => opening = 0,
        -- hedge accounts: an entry opens the leg of its side, a reduction closes the other
        leg => CASE WHEN acc.position_mode = 'oneway' THEN 'net'
                    WHEN (side = 'buy') <> (opening = 0) THEN 'long'
                    ELSE 'short' END::trading.position_leg,
        order_type => otype, limit_price => lp, stop_price => sp, tif => tif,
        expire_at => expire,
        stop_loss => trading._num(spec, 'stop_loss', 'order', 0, NULL, false),
        take_profit => trading._num(spec, 'take_profit', 'order', 0, NULL, false),
        client_order_id => coid);
    RETURN jsonb_build_object('status', 'approved', 'order_id', oid, 'reason_code', NULL, 'reason', NULL);
END
$$;

------------------------------------------------------------------------------ messages
-- The sentence a refused write shows instead of the constraint's name (db/errors.describe)
COMMENT ON CONSTRAINT accounts_currency_format ON trading.accounts IS
    'an account''s currency is 2-12 upper-case letters or digits (e.g. USD, USDT)';
COMMENT ON CONSTRAINT limits_scope_key_length ON risk.limits IS
    'a limit''s scope key (a market, strategy or symbol) is 1-64 characters';
COMMENT ON CONSTRAINT credentials_label_check ON trading.credentials IS
    'a credentials label is 1-64 characters: letters, digits and _ . -, starting with a letter or digit';
COMMENT ON CONSTRAINT credentials_venue_check ON trading.credentials IS
    'a venue is 1-32 characters: lower-case letters, digits and . _ -';

------------------------------------------------------------------------------ flags
-- A flag limit (REQUIRE_STOP_LOSS, TRADING_HOURS) is on while it exists: its value is 1
-- (risk.limit_types says so); 7 was accepted and read as on. Removing the limit
-- (risk.remove_limit, `mmats risk remove`) turns it off.
CREATE FUNCTION risk._flag_value() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NEW.value <> 1 AND EXISTS (SELECT 1 FROM risk.limit_types t
                                  WHERE t.limit_type = NEW.limit_type AND t.unit = 'flag') THEN
        RAISE EXCEPTION '% is a flag: its value is 1 (remove the limit to turn it off), got %',
            NEW.limit_type, NEW.value USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION risk._flag_value() FROM PUBLIC;
CREATE TRIGGER limits_flag_value BEFORE INSERT OR UPDATE OF value, limit_type ON risk.limits
    FOR EACH ROW EXECUTE FUNCTION risk._flag_value();

-- ======== from 0004_14_pre_plans_kept.sql
-- 0004_14 (pre): trading._row_exits keeps its plan on PostgreSQL 15 to 17; a limit for an
-- account and another environment is refused.
--
-- A LANGUAGE sql function whose body reads a table is not inlined into its caller, and
-- before PostgreSQL 18 such a function plans its body again on every call. _row_exits
-- (the closing orders already on their way to one position row) is called by every close
-- signal on an independent account and by every row trading._close_positions closes; its
-- query took 0.26 ms per call to plan on PostgreSQL 15, 13 times what it costs on 18,
-- where SQL functions cache their plans (benchmarks/bench_trading_core.py, track_functions:
-- 256 us per call on 15, 20 us on 18). As PL/pgSQL, whose statements keep their plans for
-- the session, the same query is planned once. The docker-compose stack runs
-- PostgreSQL 17. Same arguments, same result, same rules.

SET LOCAL ROLE mmats_owner;

CREATE OR REPLACE FUNCTION trading._row_exits(acc trading.accounts, instrument bigint,
                                              row_strategy bigint, row_leg trading.position_leg,
                                              sq numeric, row_position bigint)
RETURNS numeric
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
    SELECT COALESCE(sum(e.rest) FILTER (WHERE e.for_row IS NOT DISTINCT FROM _row_exits.row_strategy), 0)
         + CASE WHEN acc.aggregation = 'independent' AND _row_exits.row_strategy IS NOT NULL THEN
               LEAST(abs(_row_exits.sq), GREATEST(0,
                   COALESCE(sum(e.rest) FILTER (WHERE e.for_row IS NULL), 0)
                   - (SELECT COALESCE(sum(abs(y.quantity)), 0) FROM trading.positions y
                      WHERE y.account_id = acc.account_id AND y.instrument_id = _row_exits.instrument
                        AND y.leg = _row_exits.row_leg
                        AND sign(trading._signed_qty(y)) = sign(_row_exits.sq)
                        AND (y.strategy_id IS NULL OR y.position_id < _row_exits.row_position))))
               ELSE 0 END
    FROM (SELECT CASE WHEN acc.aggregation = 'independent' THEN o.strategy_id END AS for_row,
                 o.quantity - o.filled_quantity AS rest
          FROM trading.orders o
          WHERE o.account_id = acc.account_id AND o.instrument_id = _row_exits.instrument
            AND o.reduce_only
            AND o.side = CASE WHEN _row_exits.sq > 0 THEN 'sell' ELSE 'buy' END::trading.order_side
            AND CASE WHEN acc.position_mode = 'oneway' THEN 'net'::trading.position_leg
                     WHEN o.position_leg <> 'net' THEN o.position_leg
                     WHEN o.side = 'buy' THEN 'short'::trading.position_leg
                     ELSE 'long'::trading.position_leg END = _row_exits.row_leg
            AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')) e);
END
$$;

-- A limit for one account and another environment never applied (an account keeps its
-- environment): risk.set_limit('MAX_DRAWDOWN', 0.1, account => 'paper1',
-- environment => 'live') was stored and said "set" while paper1's drawdown went unchecked.
-- It is refused now, naming the account's environment. A MAX_DRAWDOWN or DAILY_LOSS of 0
-- (or less) is refused too: reached at once (a drawdown of 0 is "at the limit"), it
-- tripped the breaker on the first bar, even in profit, and refused every entry.
CREATE FUNCTION risk._limit_sane() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts;
BEGIN
    IF NEW.account_id IS NOT NULL AND NEW.environment IS NOT NULL THEN
        SELECT * INTO acc FROM trading.accounts a WHERE a.account_id = NEW.account_id;
        IF acc.environment <> NEW.environment THEN
            RAISE EXCEPTION 'a % limit for account % would never apply: it is a % account (leave the environment out, or set it to %)',
                NEW.environment, quote_ident(acc.name), acc.environment, acc.environment
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    IF NEW.limit_type IN ('MAX_DRAWDOWN', 'DAILY_LOSS') AND NEW.value <= 0 THEN
        RAISE EXCEPTION 'a % limit of % is reached at once: it would trip the breaker on the first bar, even in profit (give a value above 0, or disable the limit)',
            NEW.limit_type, NEW.value USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION risk._limit_sane() FROM PUBLIC;
CREATE TRIGGER limits_sane BEFORE INSERT OR UPDATE OF account_id, environment, limit_type, value
    ON risk.limits FOR EACH ROW EXECUTE FUNCTION risk._limit_sane();

-- A fill names its order by order_id or client_order_id. The booking looks a reference up
-- as a client order id first, then as an order id, so {"order_id": 3} found another order
-- whose client order id was "3" (a manual order could choose its id),
-- {"client_order_id": "3"} with no such client id was booked to order 3, and a fill naming
-- order 3 and client id "x" of another order was booked to the latter. An order_id is an
-- order id now (the fill goes on by that order's client id, which is unique), a client id
-- no order has is unknown, and a fill naming two orders is refused. On an advisory
-- account a fill under a HARD breaker sends no closing orders (risk._trip closes only
-- operator accounts: an advisory one sends no orders).
CREATE OR REPLACE FUNCTION trading.apply_fill(fill jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    res jsonb;
    acc trading.accounts;
    iid bigint;
    ref text;
    coid text;
    named text;
BEGIN
    IF jsonb_typeof(fill) = 'object' THEN
        PERFORM trading._known_fields(fill, '{order_id,client_order_id,broker_fill_id,quantity,
            price,commission,commission_currency,liquidity,ts}', 'fill');
        ref := fill ->> 'order_id';  -- (checked here: the booking's general reading costs more)
        IF ref IS NOT NULL THEN
            IF ref !~ '^[0-9]{1,18}$' THEN
                RAISE EXCEPTION 'fill.order_id must be a whole number (the order''s id), got %',
                    quote_literal(left(ref, 40)) USING ERRCODE = 'invalid_parameter_value';
            END IF;
            SELECT o.client_order_id INTO named FROM trading.orders o WHERE o.order_id = ref::bigint;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'unknown order %', quote_literal(ref) USING ERRCODE = 'foreign_key_violation';
            END IF;
            coid := trading._text(fill, 'client_order_id', 'fill', 64);
            IF coid IS NOT NULL AND coid <> named THEN
                RAISE EXCEPTION 'fill.order_id % and fill.client_order_id % name different orders (order % is %)',
                    ref, quote_literal(coid), ref, quote_literal(named)
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
            fill := (fill - 'order_id') || jsonb_build_object('client_order_id', named);
        ELSE
            -- a client id no order has is unknown (the lookup would take it for an order id)
            coid := trading._text(fill, 'client_order_id', 'fill', 64);
            IF coid IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM trading.orders o WHERE o.client_order_id = coid) THEN
                RAISE EXCEPTION 'unknown order %', quote_literal(coid) USING ERRCODE = 'foreign_key_violation';
            END IF;
        END IF;
    END IF;
    res := trading._book_fill(fill);
    IF res ->> 'status' = 'applied' THEN
        SELECT o.instrument_id INTO iid
        FROM trading.orders o JOIN risk.breaker_state b USING (account_id)
        WHERE o.order_id = (res ->> 'order_id')::bigint AND b.mode = 'HARD';
        IF FOUND THEN
            SELECT a.* INTO acc FROM trading.accounts a JOIN trading.orders o USING (account_id)
            WHERE o.order_id = (res ->> 'order_id')::bigint;
            IF acc.mode = 'operator' THEN  -- (an advisory account sends no orders, as risk._trip)
                res := res || jsonb_build_object('breaker_orders',
                    to_jsonb(trading._close_positions(acc, iid, 'breaker')));
            END IF;
        END IF;
    END IF;
    RETURN res;
END
$$;

-- place_manual_order (0004_13) with two more refusals: a client order id of digits only
-- (an order id is written so: trading._locked_order, which the cancels use, looks a
-- reference up as a client id first, so "cancel 12" could find that order instead of
-- order 12), and protection on the wrong side of the entry (a buy's stop at or above its
-- price, a sell's below), refused as a signal's is (INVALID_PROTECTION): the stop fired
-- on the next bar, closing what was just opened.
CREATE OR REPLACE FUNCTION trading.place_manual_order(spec jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    held numeric;
    exits numeric;
    market_px numeric;
    ro boolean;
    coid text;
    expire timestamptz;
    acc trading.accounts;
    inst market.instruments;
    side trading.order_side;
    otype trading.order_type;
    tif trading.time_in_force;
    qty numeric; lp numeric; sp numeric; price numeric;
    sl numeric; tp numeric; entry numeric;
    cur numeric;
    d numeric;
    opening numeric;
    denial record;
    oid bigint;
BEGIN
    IF spec IS NULL OR jsonb_typeof(spec) <> 'object' THEN
        RAISE EXCEPTION 'an order must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM trading._known_fields(spec, '{account,symbol,venue,side,type,time_in_force,quantity,
        limit_price,stop_price,expire_at,reduce_only,stop_loss,take_profit,client_order_id}', 'order');
    IF spec ? 'reduce_only' AND jsonb_typeof(spec -> 'reduce_only') NOT IN ('boolean', 'null') THEN
        RAISE EXCEPTION 'order.reduce_only must be true or false, got %', left((spec -> 'reduce_only')::text, 40)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    ro := COALESCE((spec ->> 'reduce_only')::boolean, false);
    coid := trading._text(spec, 'client_order_id', 'order', 64);
    IF coid ~ '^mm[0-9]+-[0-9]+(-[0-9a-f]{8})?$' THEN
        RAISE EXCEPTION 'order.client_order_id % has the form of the ids MMATS gives its own orders (mm<account>-<n>-<tag>): choose another',
            to_json(coid)::text USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF coid IS NOT NULL AND coid !~ '^[[:print:]]{1,64}$' THEN
        RAISE EXCEPTION 'order.client_order_id must be 1 to 64 printable characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF coid ~ '^[0-9]+$' THEN
        RAISE EXCEPTION 'order.client_order_id % is all digits, as order ids are: choose one with a letter',
            to_json(coid)::text USING ERRCODE = 'invalid_parameter_value';
    END IF;
    acc := trading._account(trading._text(spec, 'account', 'order', 64), true);
    inst := market._instrument(trading._text(spec, 'symbol', 'order', 40), trading._text(spec, 'venue', 'order', 32));
    PERFORM trading._refuse_running_backtest(acc, 'a manual order');
    IF acc.mode <> 'operator' THEN
        RAISE EXCEPTION 'account % is in advisory mode: it places no orders', acc.name
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    BEGIN
        side := lower(trading._text(spec, 'side', 'order', 4))::trading.order_side;
        otype := lower(COALESCE(trading._text(spec, 'type', 'order', 12), 'market'))::trading.order_type;
        tif := upper(COALESCE(trading._text(spec, 'time_in_force', 'order', 3), 'GTC'))::trading.time_in_force;
    EXCEPTION WHEN invalid_text_representation THEN
        RAISE EXCEPTION 'order.side must be buy or sell, order.type market, limit, stop or stop_limit, order.time_in_force GTC, IOC, FOK or GTD'
            USING ERRCODE = 'invalid_parameter_value';
    END;
    IF side IS NULL THEN
        RAISE EXCEPTION 'order.side is required (buy or sell)' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    qty := trading._num(spec, 'quantity', 'order', 0, NULL, false);
    IF qty IS NULL THEN
        RAISE EXCEPTION 'order.quantity is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF trading._round_down(qty, inst.quantity_step) <> qty OR qty < inst.min_quantity THEN
        RAISE EXCEPTION 'order.quantity % must be a multiple of % and at least % for %',
            qty, inst.quantity_step, inst.min_quantity, inst.symbol USING ERRCODE = 'invalid_parameter_value';
    END IF;
    lp := trading._num(spec, 'limit_price', 'order', 0, NULL, false);
    sp := trading._num(spec, 'stop_price', 'order', 0, NULL, false);
    IF otype IN ('limit', 'stop_limit') AND lp IS NULL THEN
        RAISE EXCEPTION 'order.limit_price is required for a % order', otype USING ERRCODE = 'invalid_parameter_value';
    ELSIF otype IN ('stop', 'stop_limit') AND sp IS NULL THEN
        RAISE EXCEPTION 'order.stop_price is required for a % order', otype USING ERRCODE = 'invalid_parameter_value';
    END IF;
    expire := trading._ts(spec, 'expire_at', 'order');
    IF tif = 'GTD' AND expire IS NULL THEN
        RAISE EXCEPTION 'order.expire_at is required for a GTD order' USING ERRCODE = 'invalid_parameter_value';
    ELSIF tif = 'GTD' AND expire <= now() AND acc.environment = 'live' THEN
        -- (live only: a paper session replaying stored bars lives at their time)
        RAISE EXCEPTION 'order.expire_at % is not in the future (now %)', expire, now()
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- the risk checks price the order at the worst it may fill at: a buy limit at its
    -- limit, anything else at its limit or stop or the market, whichever is higher (a buy
    -- stop far below the market fills at the market at once: priced at its stop it passed
    -- every value limit)
    market_px := market.latest_close(inst.instrument_id);
    price := CASE WHEN side = 'buy' AND lp IS NOT NULL THEN lp
                  ELSE GREATEST(COALESCE(lp, sp), market_px) END;
    IF price IS NULL THEN
        RAISE EXCEPTION 'no price for % (no bars and no limit price)', inst.symbol USING ERRCODE = 'no_data_found';
    END IF;
    SELECT COALESCE(sum(trading._signed_qty(p)), 0) INTO held FROM trading.positions p
    WHERE p.account_id = acc.account_id AND p.instrument_id = inst.instrument_id;
    -- what will be held once the exits already on their way have filled (a stop that fired,
    -- a strategy's close, an earlier manual exit): this order reduces only what they leave
    SELECT -sign(held) * COALESCE(sum(o.quantity - o.filled_quantity), 0)
    INTO exits FROM trading.orders o
    WHERE o.account_id = acc.account_id AND o.instrument_id = inst.instrument_id AND o.reduce_only
      AND o.side = CASE WHEN held > 0 THEN 'sell' ELSE 'buy' END::trading.order_side
      AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled');
    cur := CASE WHEN sign(held + exits) = sign(held) THEN held + exits ELSE 0 END;
    d := CASE WHEN side = 'buy' THEN qty ELSE -qty END;
    opening := CASE WHEN cur = 0 OR sign(cur) = sign(d) THEN qty ELSE GREATEST(qty - abs(cur), 0) END;
    IF acc.position_mode = 'hedge' AND opening > 0 THEN
        opening := qty;  -- (it goes out whole, as an entry on the leg of its side)
    END IF;
    IF ro AND opening > 0 THEN
        RAISE EXCEPTION 'a reduce_only order of % would open % (position %, exits already on their way for %)',
            qty, opening, held, -exits USING ERRCODE = 'check_violation';
    END IF;
    sl := trading._num(spec, 'stop_loss', 'order', 0, NULL, false);
    tp := trading._num(spec, 'take_profit', 'order', 0, NULL, false);
    -- where it fills: a marketable limit at the market, a stop beyond the market at its stop
    entry := CASE WHEN otype = 'limit' AND side = 'buy' THEN LEAST(lp, COALESCE(market_px, lp))
                  WHEN otype = 'limit' THEN GREATEST(lp, COALESCE(market_px, lp))
                  WHEN otype = 'stop' AND side = 'buy' THEN GREATEST(sp, COALESCE(market_px, sp))
                  WHEN otype = 'stop' THEN LEAST(sp, COALESCE(market_px, sp))
                  ELSE COALESCE(lp, market_px) END;
    -- protection on the wrong side of the entry would fire on the next bar (as a signal's)
    IF opening > 0 AND ((side = 'buy' AND (sl >= entry OR tp <= entry))
                        OR (side = 'sell' AND (sl <= entry OR tp >= entry))) THEN
        SELECT 'INVALID_PROTECTION' AS code,
               format('INVALID_PROTECTION: side=%s, price=%s, stop_loss=%s, take_profit=%s',
                      CASE WHEN side = 'buy' THEN 'long' ELSE 'short' END, entry,
                      COALESCE(sl::text, '-'), COALESCE(tp::text, '-')) AS reason INTO denial;
    -- a long-only account sells only what the exits on their way leave (the gate counts
    -- what is held, so a second exit passed it as a short)
    ELSIF side = 'sell' AND NOT acc.allow_short AND opening > 0 AND exits <> 0 THEN
        denial := NULL;
        SELECT 'SHORT_NOT_ALLOWED' AS code,
               format('SHORT_NOT_ALLOWED: position=%s, exits on their way=%s, sell=%s, account=%s',
                      held, -exits, qty, acc.name) AS reason INTO denial;
    ELSE
        SELECT * INTO denial FROM risk.check_order(acc, NULL, inst, side, qty, opening, price,
        sl, now());
    END IF;
    IF denial.code IS NOT NULL THEN
        PERFORM audit.record('order.refused', 'trading.accounts', acc.account_id::text,
                             jsonb_build_object('reason_code', denial.code, 'reason', denial.reason, 'spec', spec));
        RETURN jsonb_build_object('status', 'rejected', 'reason_code', denial.code, 'reason', denial.reason,
                                  'order_id', NULL);
    END IF;
    oid := trading._emit_order(acc, inst, NULL, NULL, side, qty, 'manual', price,
        reduce_only => opening = 0,
        -- hedge accounts: an entry opens the leg of its side, a reduction closes the other
        leg => CASE WHEN acc.position_mode = 'oneway' THEN 'net'
                    WHEN (side = 'buy') <> (opening = 0) THEN 'long'
                    ELSE 'short' END::trading.position_leg,
        order_type => otype, limit_price => lp, stop_price => sp, tif => tif,
        expire_at => expire,
        stop_loss => sl, take_profit => tp,
        client_order_id => coid);
    RETURN jsonb_build_object('status', 'approved', 'order_id', oid, 'reason_code', NULL, 'reason', NULL);
END
$$;

-- The strategy role moves only its own resume points. With runtime.advance_cursor it
-- could move any (forward only, but as far as it liked): the paper broker's
-- (paper:<instrument>:<timeframe>), so bars went unsettled, the reconciler's or the
-- notifier's, so fills went unreconciled and events untold; and its heartbeat could stand
-- in for another worker's, so a dead router showed as running. It has its own two
-- functions now, for the cursors a strategy worker keeps (strategy:, events: and news:
-- <account>:<strategy>:<timeframe>) and the heartbeat of a 'strategies' worker.
CREATE FUNCTION runtime.advance_strategy_cursor(name text, seq bigint DEFAULT NULL,
                                                at timestamptz DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF name IS NULL OR name !~ '^(strategy|events|news):' THEN
        RAISE EXCEPTION 'a strategy worker moves only its own resume points (strategy:, events: or news:...), not %',
            quote_literal(left(name, 200)) USING ERRCODE = 'insufficient_privilege';
    END IF;
    PERFORM runtime.advance_cursor(name, seq, at);
END
$$;

CREATE FUNCTION runtime.strategy_heartbeat(name text, state text DEFAULT 'running',
                                           pid integer DEFAULT NULL, host text DEFAULT NULL,
                                           detail jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    other text;
BEGIN
    SELECT w.kind INTO other FROM runtime.workers w WHERE w.name = strategy_heartbeat.name;
    IF other IS DISTINCT FROM 'strategies' AND other IS NOT NULL THEN
        RAISE EXCEPTION 'worker % is a % worker: a strategy worker beats only its own heart',
            quote_literal(strategy_heartbeat.name), other USING ERRCODE = 'insufficient_privilege';
    END IF;
    PERFORM runtime.heartbeat(name, 'strategies', state, pid, host, detail);
END
$$;
REVOKE ALL ON FUNCTION runtime.advance_strategy_cursor(text, bigint, timestamptz),
    runtime.strategy_heartbeat(text, text, integer, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION runtime.advance_cursor(text, bigint, timestamptz),
    runtime.heartbeat(text, text, text, integer, text, jsonb) FROM mmats_strategy;
GRANT EXECUTE ON FUNCTION runtime.advance_strategy_cursor(text, bigint, timestamptz),
    runtime.strategy_heartbeat(text, text, integer, text, jsonb) TO mmats_strategy;

-- submit_signal (0004_12) decides a live or paper signal at the present: one stamped
-- before its instrument's latest bar was sized and checked at the close of its own time
-- (a signal back-dated 29 days passed the gate at the price of 29 days ago, and the
-- trading hours of that time), while its order met today's market. It is judged at the
-- latest bar's time now, on that bar's close; the signal row keeps the time it states. A
-- backtest's signals are stamped by the engine, at the bar it is on.
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
    at timestamptz;       -- the time the signal is decided at
    sig_ts timestamptz;   -- the time it states (its row keeps it)
    last_ts timestamptz;  -- a live or paper account's latest bar of the instrument
    last_px numeric;
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
    IF signal ->> 'version' IS NULL THEN
        -- no version: the one this account trades (a signal naming a new version made
        -- that the newest, and every versionless signal after it was refused
        -- STRATEGY_NOT_ASSIGNED, closes included)
        SELECT t.* INTO s FROM trading.strategies t
        JOIN trading.account_strategies x ON x.strategy_id = t.strategy_id
                                         AND x.account_id = acc.account_id
        WHERE t.name = signal ->> 'strategy'
        ORDER BY t.created_at DESC LIMIT 1;
    END IF;
    IF s.strategy_id IS NULL THEN  -- (and the name's checks, when it is not found so)
        s := trading._strategy(trading._text(signal, 'strategy', 'signal', 64),
                               trading._text(signal, 'version', 'signal', 32));
    END IF;
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
    sig_ts := at;
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
    -- and no earlier than the instrument's latest bar: a signal stamped before it
    -- (back-dated, or a worker catching up) is judged at that bar's time and price, the
    -- market its order meets
    IF acc.environment IN ('live', 'paper') THEN
        SELECT b.ts, b.close INTO last_ts, last_px FROM market.bars b
        WHERE b.instrument_id = inst.instrument_id ORDER BY b.ts DESC LIMIT 1;
        at := GREATEST(at, last_ts);  -- (so last_px is latest_close(instrument, at))
    END IF;

    IF acc.aggregation = 'independent' THEN
        -- in the order the INSERT evaluates them: its id, then the reasoning
        sig_id := nextval('trading.signals_signal_id_seq');
        reasoning := trading._text(signal, 'reasoning', 'signal', 4000);
        meta := COALESCE(signal -> 'metadata', '{}');
    ELSE
        INSERT INTO trading.signals AS g (account_id, strategy_id, instrument_id, ts, action, size,
            stop_loss, take_profit, trailing_stop, confidence, reasoning, metadata)
        VALUES (acc.account_id, s.strategy_id, inst.instrument_id, sig_ts, act, size, sl, tp, trail, conf,
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
                VALUES (sig_id, acc.account_id, s.strategy_id, inst.instrument_id, sig_ts, act, size, sl,
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
        market_px := COALESCE(CASE WHEN acc.environment IN ('live', 'paper') THEN last_px
                                   ELSE market.latest_close(inst.instrument_id, at) END, price);
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
        IF act = 'sell' AND target = 0 AND cur <= 0 THEN
            -- allow_short: the short sized to nothing, and no long to close (a short held
            -- is not bought back by a sell)
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
        -- (and a breakeven level behind the price, which would move the stop to the entry
        -- on the first bar)
        IF opening > 0 AND ((target > 0 AND (sl >= market_px OR tp <= market_px OR be <= market_px))
                            OR (target < 0 AND (sl <= market_px OR tp >= market_px OR be >= market_px))) THEN
            f_status := 'rejected'; f_code := 'INVALID_PROTECTION';
            f_reason := format('INVALID_PROTECTION: side=%s, price=%s, stop_loss=%s, take_profit=%s%s',
                               CASE WHEN target > 0 THEN 'long' ELSE 'short' END, market_px,
                               COALESCE(sl::text, '-'), COALESCE(tp::text, '-'),
                               CASE WHEN be IS NOT NULL THEN ', breakeven=' || be END);
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
        VALUES (sig_id, acc.account_id, s.strategy_id, inst.instrument_id, sig_ts, act, size, sl, tp,
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

-- The votes of CONSENSUS, WEIGHTED and PRIORITY accounts are those of the strategies the
-- account trades: a signal of a strategy not assigned to it (recorded, rejected
-- STRATEGY_NOT_ASSIGNED) was counted, so a misspelt or foreign strategy could outvote or
-- outrank the assigned ones, and block every entry of a consensus account.
CREATE OR REPLACE FUNCTION trading._votes(account bigint, instrument bigint, since timestamptz,
                                          until timestamptz)
RETURNS TABLE (strategy_id bigint, name text, action trading.signal_action, confidence numeric,
               weight numeric, priority integer)
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT DISTINCT ON (g.strategy_id) g.strategy_id, st.name, g.action,
           COALESCE(g.confidence, 1), st.weight, st.priority
    FROM trading.signals g JOIN trading.strategies st ON st.strategy_id = g.strategy_id
    JOIN trading.account_strategies x ON x.account_id = g.account_id
                                     AND x.strategy_id = g.strategy_id
    WHERE g.account_id = _votes.account AND g.instrument_id = _votes.instrument
      AND g.ts BETWEEN since AND until AND st.enabled AND x.enabled AND g.action <> 'hold'
    ORDER BY g.strategy_id, g.ts DESC, g.signal_id DESC;
END;

-- risk._check_order (0004_12) with two fixes. MAX_VOLATILITY measured the ATR against
-- the price it was given, a signal's own or a manual order's limit: a buy limit at 600
-- with the market at 100 made an ATR ratio of 0.10 read 0.017 and pass a limit of 0.02 (the
-- order fills at the market at once). It is measured against the market's close now.
-- TRADING_HOURS with a window past midnight (start 22:00, end 06:00) refused every order
-- (no time is both after 22:00 and before 06:00): such a window wraps now.
CREATE OR REPLACE FUNCTION risk._check_order(acc trading.accounts, strat trading.strategies,
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
            -- (a window whose start is after its end runs past midnight: 22:00-06:00; the
            -- days are those of the local time)
            IF NOT (l.params -> 'days' IS NULL
                    OR (l.params -> 'days') @> to_jsonb(extract(isodow FROM local_ts)::integer))
               OR NOT (CASE  -- (in parentheses: PL/pgSQL ends the IF at a bare THEN)
                   WHEN NOT l.params ? 'end' THEN
                       local_ts::time >= COALESCE((l.params ->> 'start')::time, '00:00')
                   WHEN COALESCE((l.params ->> 'start')::time, '00:00') <= (l.params ->> 'end')::time THEN
                       local_ts::time >= COALESCE((l.params ->> 'start')::time, '00:00')
                       AND local_ts::time < (l.params ->> 'end')::time
                   ELSE local_ts::time >= (l.params ->> 'start')::time
                        OR local_ts::time < (l.params ->> 'end')::time END) THEN
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
                COALESCE((l.params ->> 'period')::integer, 14), at)
                / COALESCE(market.latest_close(inst.instrument_id, at), price);  -- (the market's)
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

-- trading._size (0004_12) sizes risk_per_trade from the stop's distance to the market or
-- to the signal's price, whichever is greater. With the signal's price alone, a short
-- whose price was above the market was sized on a distance nearly nil: a stop at 110, a
-- price of 109.9 with the market at 100, sized 10,000 units for a risk of 1,000.
CREATE OR REPLACE FUNCTION trading._size(acc trading.accounts, s trading.strategies, inst market.instruments,
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
        -- the stop's distance from the market or from the signal's price, whichever is
        -- greater (the smaller order): a short's price above the market is nearer its stop
        qty := risk_amount / (GREATEST(abs(price - stop_loss),
                                       abs(COALESCE(market.latest_close(inst.instrument_id, at), price)
                                           - stop_loss)) * fx);
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

-- risk.trip_breaker with no mode said "null value in column "mode" of relation
-- "breaker_state" violates not-null constraint"; it names the modes now.
CREATE OR REPLACE FUNCTION risk.trip_breaker(account text, mode text, reason text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts := trading._account(account, true);
    m risk.breaker_mode;
BEGIN
    IF mode IS NULL OR upper(mode) NOT IN ('SOFT', 'HARD', 'FREEZE') THEN
        RAISE EXCEPTION 'breaker mode must be SOFT, HARD or FREEZE, got %', COALESCE(quote_literal(mode), 'nothing')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'tripping the breaker needs a reason' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM trading._refuse_running_backtest(acc, format('a %s breaker trip', upper(mode)));
    m := risk._trip(acc, upper(mode)::risk.breaker_mode, reason, 'BREAKER_MANUAL');
    RETURN jsonb_build_object('account', acc.name, 'mode', m,
        'open_orders', (SELECT count(*) FROM trading.orders o WHERE o.account_id = acc.account_id
                        AND o.status IN ('created', 'in_flight', 'submitted', 'partially_filled')));
END
$$;

-- assign_strategy checks the sizing parameters, as every function checks its fields: a
-- misspelt one ({"risk_pct": 0.05}) sized at the default risk of 1 %, a missing quantity
-- or a period of 1e12 raised at the first signal, rolling the signal back with it.
CREATE FUNCTION trading._check_sizing(method text, params jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    m trading.sizing_method;
    n numeric;
BEGIN
    BEGIN
        m := method::trading.sizing_method;
    EXCEPTION WHEN invalid_text_representation THEN
        RAISE EXCEPTION 'sizing method must be one of %, got %',
            array_to_string(enum_range(NULL::trading.sizing_method)::text[], ', '),
            quote_literal(method) USING ERRCODE = 'invalid_parameter_value';
    END;
    IF params IS NULL OR jsonb_typeof(params) = 'null' THEN
        RETURN;
    ELSIF jsonb_typeof(params) <> 'object' THEN
        RAISE EXCEPTION 'sizing_params must be a JSON object, got %', left(params::text, 40)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM trading._known_fields(params, CASE m
        WHEN 'fixed_quantity' THEN '{quantity}'
        WHEN 'fixed_notional' THEN '{amount}'
        WHEN 'risk_per_trade' THEN '{risk}'
        WHEN 'volatility' THEN '{risk,period,timeframe,multiple}'
        WHEN 'kelly' THEN '{min_trades,fallback,fraction,cap}'
        ELSE '{}' END::text[], format('sizing_params of %s sizing', m));
    IF m = 'fixed_quantity' AND trading._num(params, 'quantity', 'sizing_params', 0, NULL, false) IS NULL THEN
        RAISE EXCEPTION 'fixed_quantity sizing needs sizing_params.quantity' USING ERRCODE = 'invalid_parameter_value';
    ELSIF m = 'fixed_notional' AND trading._num(params, 'amount', 'sizing_params', 0, NULL, false) IS NULL THEN
        RAISE EXCEPTION 'fixed_notional sizing needs sizing_params.amount' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- the ranges _size reads them with
    PERFORM trading._num(params, 'risk', 'sizing_params', 0, 1),
            trading._num(params, 'multiple', 'sizing_params', 0, NULL, false),
            trading._num(params, 'fallback', 'sizing_params', 0, 1),
            trading._num(params, 'fraction', 'sizing_params', 0, 1),
            trading._num(params, 'cap', 'sizing_params', 0, 1);
    n := trading._num(params, 'period', 'sizing_params', 1);
    IF n <> trunc(n) OR n > 100000 THEN
        RAISE EXCEPTION 'sizing_params.period must be a whole number of bars from 1 to 100000, got %', n
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    n := trading._num(params, 'min_trades', 'sizing_params', 0);
    IF n <> trunc(n) OR n > 100000 THEN
        RAISE EXCEPTION 'sizing_params.min_trades must be a whole number from 0 to 100000, got %', n
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF params ? 'timeframe' THEN
        BEGIN
            PERFORM (params ->> 'timeframe')::market.timeframe;
        EXCEPTION WHEN invalid_text_representation THEN
            RAISE EXCEPTION 'sizing_params.timeframe must be one of %, got %',
                array_to_string(enum_range(NULL::market.timeframe)::text[], ', '),
                left((params -> 'timeframe')::text, 40) USING ERRCODE = 'invalid_parameter_value';
        END;
    END IF;
END
$$;
REVOKE ALL ON FUNCTION trading._check_sizing(text, jsonb) FROM PUBLIC;

CREATE OR REPLACE FUNCTION trading.assign_strategy(account text, strategy text, allocation numeric DEFAULT 1,
                                        sizing_method text DEFAULT 'percent_equity',
                                        sizing_params jsonb DEFAULT '{}',
                                        priority integer DEFAULT NULL, weight numeric DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts := trading._account(account, true);
    s trading.strategies := trading._strategy(strategy);
BEGIN
    PERFORM trading._check_sizing(sizing_method, sizing_params);
    INSERT INTO trading.account_strategies AS x (account_id, strategy_id, allocation, sizing_method,
                                                 sizing_params)
    VALUES (acc.account_id, s.strategy_id, allocation, sizing_method::trading.sizing_method,
            COALESCE(sizing_params, '{}'))
    ON CONFLICT (account_id, strategy_id) DO UPDATE
        SET allocation = EXCLUDED.allocation, sizing_method = EXCLUDED.sizing_method,
            sizing_params = EXCLUDED.sizing_params, enabled = true;
    IF priority IS NOT NULL OR weight IS NOT NULL THEN
        UPDATE trading.strategies t SET priority = COALESCE(assign_strategy.priority, t.priority),
                                        weight = COALESCE(assign_strategy.weight, t.weight)
        WHERE t.strategy_id = s.strategy_id;
    END IF;
    PERFORM audit.record('strategy.assigned', 'trading.account_strategies',
        acc.account_id || ':' || s.strategy_id,
        jsonb_build_object('account', acc.name, 'strategy', s.name, 'allocation', allocation,
                           'sizing_method', sizing_method, 'sizing_params', sizing_params));
END
$$;
