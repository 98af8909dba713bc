-- 0001_01 (pre): roles, schemas and, where the server offers it, TimescaleDB.
-- Runs as the migrating superuser: roles are cluster-wide and created only if missing.
RESET ROLE;

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['mmats_owner', 'mmats_strategy', 'mmats_router', 'mmats_api',
                             'mmats_readonly'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            -- LOGIN without a password: nobody can sign in with it until an administrator
            -- sets one. The owner needs LOGIN because TimescaleDB runs its background
            -- jobs (compression, retention, aggregate refresh) as the hypertable owner.
            EXECUTE format('CREATE ROLE %I LOGIN', r);
        END IF;
    END LOOP;
    ALTER ROLE mmats_owner LOGIN;
END
$$;

DO $$
BEGIN
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO mmats_owner, mmats_strategy, '
                   'mmats_router, mmats_api, mmats_readonly', current_database());
    EXECUTE format('REVOKE CREATE ON DATABASE %I FROM PUBLIC', current_database());
    -- the owner runs the DDL (pgmq's install script creates its schema itself)
    EXECUTE format('GRANT CREATE ON DATABASE %I TO mmats_owner', current_database());
END
$$;

REVOKE CREATE ON SCHEMA public FROM PUBLIC;

CREATE SCHEMA IF NOT EXISTS market AUTHORIZATION mmats_owner;
CREATE SCHEMA IF NOT EXISTS trading AUTHORIZATION mmats_owner;
CREATE SCHEMA IF NOT EXISTS risk AUTHORIZATION mmats_owner;
CREATE SCHEMA IF NOT EXISTS ml AUTHORIZATION mmats_owner;
CREATE SCHEMA IF NOT EXISTS audit AUTHORIZATION mmats_owner;
CREATE SCHEMA IF NOT EXISTS pgmq AUTHORIZATION mmats_owner;

COMMENT ON SCHEMA market IS 'instruments, bars, session calendars, import bookkeeping';
COMMENT ON SCHEMA trading IS 'accounts, strategies, signals, orders, fills, positions, equity';
COMMENT ON SCHEMA risk IS 'risk limits with their history, breaker state, risk events';
COMMENT ON SCHEMA ml IS 'models, predictions, anomalies';
COMMENT ON SCHEMA audit IS 'the append-only, hash-chained event log';

-- TimescaleDB only where the server has it preloaded; elsewhere plain PostgreSQL.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
       AND current_setting('shared_preload_libraries') ~ '(^|[ ,])timescaledb($|[ ,])' THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
    END IF;
END
$$;

-- Functions MMATS creates are not executable by PUBLIC; each role is granted its own.
ALTER DEFAULT PRIVILEGES FOR ROLE mmats_owner REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
