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
-- It is refused now, naming the account's environment.
CREATE FUNCTION risk._limit_environment() RETURNS trigger
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
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION risk._limit_environment() FROM PUBLIC;
CREATE TRIGGER limits_environment BEFORE INSERT OR UPDATE OF account_id, environment ON risk.limits
    FOR EACH ROW EXECUTE FUNCTION risk._limit_environment();
