-- 0001_05 (pre): what each role may do. Nobody but mmats_owner writes a table: the
-- other roles read what they need and call functions (SECURITY DEFINER, owned by
-- mmats_owner) for every change. Later migrations grant each new function explicitly.
SET LOCAL ROLE mmats_owner;

REVOKE ALL ON ALL TABLES IN SCHEMA market, trading, risk, ml, audit, pgmq FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA market, trading, risk, ml, audit, pgmq FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA market, trading, risk, ml, audit, pgmq FROM PUBLIC;

-- readonly (Grafana, psql analysis) and api: read everything
GRANT USAGE ON SCHEMA market, trading, risk, ml, audit TO mmats_readonly, mmats_api;
GRANT SELECT ON ALL TABLES IN SCHEMA market, trading, risk, ml, audit
    TO mmats_readonly, mmats_api;
ALTER DEFAULT PRIVILEGES FOR ROLE mmats_owner IN SCHEMA market, trading, risk, ml, audit
    GRANT SELECT ON TABLES TO mmats_readonly, mmats_api;
GRANT EXECUTE ON FUNCTION audit.verify_chain() TO mmats_readonly, mmats_api;
GRANT EXECUTE ON FUNCTION market.timeframe_interval(market.timeframe)
    TO mmats_readonly, mmats_api, mmats_strategy;

-- strategy: market data, its own configuration; it submits signals through a function
-- (granted with that function)
GRANT USAGE ON SCHEMA market, trading TO mmats_strategy;
GRANT SELECT ON ALL TABLES IN SCHEMA market TO mmats_strategy;
ALTER DEFAULT PRIVILEGES FOR ROLE mmats_owner IN SCHEMA market
    GRANT SELECT ON TABLES TO mmats_strategy;
GRANT SELECT ON trading.strategies TO mmats_strategy;

-- router: reads the orders it routes and the instruments' rules; the queue and the
-- fill / reject functions are granted with those functions
GRANT USAGE ON SCHEMA market, trading TO mmats_router;
GRANT SELECT ON market.instruments TO mmats_router;
GRANT SELECT ON trading.orders, trading.accounts TO mmats_router;
