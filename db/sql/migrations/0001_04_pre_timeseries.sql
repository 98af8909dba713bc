-- 0001_04 (pre): time-series storage. With TimescaleDB: hypertables, continuous
-- aggregates, compression and retention. Without it: the same names and columns as
-- ordinary tables and materialized views, refreshed by market.refresh_bar_aggregates().
SET LOCAL ROLE mmats_owner;

-- Aggregates are built from 1-minute bars: market.bars_5m, _15m, _1h, _4h, _1d, each
-- with columns (instrument_id, ts, open, high, low, close, volume, bar_count). On
-- TimescaleDB they are real-time (materialized_only = false): bars not yet materialized
-- by the refresh policy are aggregated at query time, so a read never misses new bars.
DO $$
DECLARE
    tf record;
    has_timescale boolean := EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb');
BEGIN
    IF has_timescale THEN
        PERFORM create_hypertable('market.bars', 'ts', chunk_time_interval => interval '7 days');
        PERFORM create_hypertable('trading.equity_snapshots', 'ts',
                                  chunk_time_interval => interval '30 days');
        ALTER TABLE market.bars SET (timescaledb.compress,
            timescaledb.compress_segmentby = 'instrument_id, timeframe',
            timescaledb.compress_orderby = 'ts DESC');
        PERFORM add_compression_policy('market.bars', compress_after => interval '30 days');
        ALTER TABLE trading.equity_snapshots SET (timescaledb.compress,
            timescaledb.compress_segmentby = 'account_id',
            timescaledb.compress_orderby = 'ts DESC');
        PERFORM add_compression_policy('trading.equity_snapshots',
                                       compress_after => interval '90 days');
        -- equity snapshots are fine-grained; keep five years of them
        PERFORM add_retention_policy('trading.equity_snapshots', drop_after => interval '5 years');
    END IF;

    FOR tf IN SELECT * FROM (VALUES ('5m', '5 minutes', '1 hour'),
                                    ('15m', '15 minutes', '2 hours'),
                                    ('1h', '1 hour', '6 hours'),
                                    ('4h', '4 hours', '1 day'),
                                    ('1d', '1 day', '3 days')) AS v(name, width, lag) LOOP
        IF has_timescale THEN
            EXECUTE format($f$
                CREATE MATERIALIZED VIEW market.%I
                    WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
                SELECT instrument_id, time_bucket(%L::interval, ts) AS ts,
                       first(open, ts) AS open, max(high) AS high, min(low) AS low,
                       last(close, ts) AS close, sum(volume) AS volume,
                       count(*) AS bar_count
                FROM market.bars WHERE timeframe = '1m'
                GROUP BY instrument_id, time_bucket(%L::interval, ts)
                WITH NO DATA$f$, 'bars_' || tf.name, tf.width, tf.width);
            PERFORM add_continuous_aggregate_policy(format('market.%I', 'bars_' || tf.name)::regclass,
                start_offset => NULL, end_offset => tf.width::interval,
                schedule_interval => tf.width::interval);
        ELSE
            EXECUTE format($f$
                CREATE MATERIALIZED VIEW market.%I AS
                SELECT instrument_id, date_bin(%L::interval, ts, timestamptz '2000-01-03') AS ts,
                       (array_agg(open ORDER BY ts))[1] AS open, max(high) AS high,
                       min(low) AS low, (array_agg(close ORDER BY ts DESC))[1] AS close,
                       sum(volume) AS volume, count(*) AS bar_count
                FROM market.bars WHERE timeframe = '1m'
                GROUP BY 1, 2
                WITH NO DATA$f$, 'bars_' || tf.name, tf.width);
            EXECUTE format('CREATE UNIQUE INDEX %I ON market.%I (instrument_id, ts)',
                           'bars_' || tf.name || '_key', 'bars_' || tf.name);
        END IF;
        -- a continuous aggregate is a view to PostgreSQL
        EXECUTE format('COMMENT ON %s market.%I IS %L',
                       CASE WHEN has_timescale THEN 'VIEW' ELSE 'MATERIALIZED VIEW' END,
                       'bars_' || tf.name, tf.name || ' bars aggregated from 1m bars');
    END LOOP;
END
$$;

-- Bring the aggregates up to date. On TimescaleDB the policies do it in the background
-- (and refresh_continuous_aggregate() must run outside a transaction), so this only
-- acts on plain PostgreSQL.
CREATE FUNCTION market.refresh_bar_aggregates() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v text;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        RETURN;
    END IF;
    FOREACH v IN ARRAY ARRAY['bars_5m', 'bars_15m', 'bars_1h', 'bars_4h', 'bars_1d'] LOOP
        IF (SELECT relispopulated FROM pg_class WHERE oid = format('market.%I', v)::regclass) THEN
            EXECUTE format('REFRESH MATERIALIZED VIEW CONCURRENTLY market.%I', v);
        ELSE
            EXECUTE format('REFRESH MATERIALIZED VIEW market.%I', v);
        END IF;
    END LOOP;
END
$$;

-- What is stored, per instrument and timeframe (mmats data list, Grafana).
CREATE VIEW market.bar_coverage AS
SELECT i.symbol, i.venue, i.market, b.timeframe, min(b.ts) AS first_ts, max(b.ts) AS last_ts,
       count(*) AS bars
FROM market.bars b JOIN market.instruments i USING (instrument_id)
GROUP BY i.symbol, i.venue, i.market, b.timeframe;
