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
