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
