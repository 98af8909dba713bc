-- 0004_14 (pre): trading._row_exits keeps its plan on PostgreSQL 15 to 17.
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
