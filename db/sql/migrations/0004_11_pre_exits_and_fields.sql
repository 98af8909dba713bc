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
