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
