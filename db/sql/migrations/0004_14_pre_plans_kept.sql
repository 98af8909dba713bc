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
