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
