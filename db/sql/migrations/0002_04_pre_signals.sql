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
