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

