-- 0004_01 (pre): the live and paper runtime. Workers report heartbeats and errors and keep
-- their resume points here; a new bar wakes the strategy worker and the router (NOTIFY);
-- the router drains the order queue only through the functions below; broker secrets are
-- stored encrypted (AES-256-GCM, by the runtime) in a table only the router may read; the
-- reconciler reports what the broker and the ledger disagree on as a risk event.
RESET ROLE;
CREATE SCHEMA IF NOT EXISTS runtime AUTHORIZATION mmats_owner;
COMMENT ON SCHEMA runtime IS 'workers: heartbeats, errors, resume points, broker secrets';
SET LOCAL ROLE mmats_owner;

------------------------------------------------------------------------------ heartbeats
CREATE TABLE runtime.workers (
    name        text PRIMARY KEY CONSTRAINT workers_name_format
                    CHECK (name ~ '^[a-z][a-z0-9_.:-]{0,63}$'),
    kind        text NOT NULL CONSTRAINT workers_kind_known
                    CHECK (kind IN ('supervisor', 'ingest', 'strategies', 'router',
                                    'reconciler', 'notifier', 'replay')),
    state       text NOT NULL CONSTRAINT workers_state_known
                    CHECK (state IN ('starting', 'running', 'degraded', 'stopping', 'stopped',
                                     'failed')),
    pid         integer,
    host        text CHECK (length(host) <= 255),
    started_at  timestamptz NOT NULL DEFAULT now(),
    beat_at     timestamptz NOT NULL DEFAULT now(),
    beats       bigint NOT NULL DEFAULT 1,
    detail      jsonb NOT NULL DEFAULT '{}' CONSTRAINT workers_detail_object
                    CHECK (jsonb_typeof(detail) = 'object')
);

-- A worker says it is alive (and what it is doing). 'starting' begins a new life.
CREATE FUNCTION runtime.heartbeat(name text, kind text, state text DEFAULT 'running',
                                  pid integer DEFAULT NULL, host text DEFAULT NULL,
                                  detail jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF detail IS NULL OR jsonb_typeof(detail) <> 'object' THEN
        RAISE EXCEPTION 'heartbeat detail must be a JSON object, got %', COALESCE(detail::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO runtime.workers AS w (name, kind, state, pid, host, detail)
    VALUES (heartbeat.name, heartbeat.kind, heartbeat.state, heartbeat.pid, heartbeat.host,
            heartbeat.detail)
    ON CONFLICT ON CONSTRAINT workers_pkey DO UPDATE SET
        kind = EXCLUDED.kind, state = EXCLUDED.state, pid = EXCLUDED.pid, host = EXCLUDED.host,
        detail = EXCLUDED.detail, beat_at = now(),
        beats = CASE WHEN EXCLUDED.state = 'starting' THEN 1 ELSE w.beats + 1 END,
        started_at = CASE WHEN EXCLUDED.state = 'starting' THEN now() ELSE w.started_at END;
END
$$;

------------------------------------------------------------------------------ errors
CREATE TABLE runtime.errors (
    error_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts          timestamptz NOT NULL DEFAULT now(),
    worker      text NOT NULL CHECK (length(worker) BETWEEN 1 AND 64),
    account_id  bigint REFERENCES trading.accounts,
    kind        text NOT NULL CONSTRAINT errors_kind_format CHECK (kind ~ '^[A-Z][A-Z0-9_]{0,63}$'),
    message     text NOT NULL CHECK (length(message) BETWEEN 1 AND 2000),
    details     jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(details) = 'object')
);
CREATE INDEX errors_ts_idx ON runtime.errors (ts DESC);

-- A worker's error worth a human's attention (it is audited, so notifications see it).
CREATE FUNCTION runtime.report_error(worker text, kind text, message text,
                                     account text DEFAULT NULL, details jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc bigint;
    id bigint;
    code text := upper(kind);
    text_ text := left(COALESCE(NULLIF(message, ''), 'error'), 2000);
BEGIN
    IF code !~ '^[A-Z][A-Z0-9_]{0,63}$' THEN
        RAISE EXCEPTION 'error kind must be UPPER_SNAKE (e.g. FEED_STALE), got %', quote_literal(kind)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF account IS NOT NULL THEN
        acc := (trading._account(account)).account_id;
    END IF;
    INSERT INTO runtime.errors (worker, account_id, kind, message, details)
    VALUES (left(report_error.worker, 64), acc, code, text_, COALESCE(report_error.details, '{}'))
    RETURNING error_id INTO id;
    PERFORM audit.record('worker.error', 'runtime.errors', id::text, jsonb_build_object(
        'worker', left(report_error.worker, 64), 'kind', code, 'message', text_,
        'account', account));
    RETURN id;
END
$$;

------------------------------------------------------------------------------ resume points
-- Where a worker has got to: the strategy worker's last bar per assignment (advanced in
-- the same transaction as the signal it produced, so a crash repeats nothing and skips
-- nothing), the notifier's last audit event, the paper broker's last settled bar.
CREATE TABLE runtime.cursors (
    name        text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 200),
    seq         bigint,
    at          timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Moves forward only: an older position than the stored one changes nothing. Whoever
-- waits for a resume point (the replay for the strategies, a strategy for the paper
-- broker) LISTENs on mmats_cursor: the move is announced at commit.
CREATE FUNCTION runtime.advance_cursor(name text, seq bigint DEFAULT NULL,
                                       at timestamptz DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO runtime.cursors AS c (name, seq, at) VALUES (advance_cursor.name,
        advance_cursor.seq, advance_cursor.at)
    ON CONFLICT ON CONSTRAINT cursors_pkey DO UPDATE SET
        seq = GREATEST(c.seq, EXCLUDED.seq), at = GREATEST(c.at, EXCLUDED.at),
        updated_at = now();
    PERFORM pg_notify('mmats_cursor', left(advance_cursor.name, 200));
END
$$;

------------------------------------------------------------------------------ new bars wake workers
-- The bars trigger of 0002_06 also says, once per statement and per instrument and
-- timeframe, that bars arrived (delivered at commit): {"instrument_id", "timeframe",
-- "first", "last", "n"}. Protection has run by then, in the same transaction.
CREATE OR REPLACE FUNCTION market.bars_inserted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    inst bigint;
    r record;
    touched bigint[] := '{}';
    until timestamptz;
    a bigint;
BEGIN
    FOR inst IN
        SELECT i.instrument_id FROM (SELECT DISTINCT nb.instrument_id FROM new_bars nb) i
        WHERE EXISTS (SELECT 1 FROM trading.positions p JOIN trading.accounts ac USING (account_id)
                      WHERE p.instrument_id = i.instrument_id AND p.quantity <> 0
                        AND ac.environment IN ('live', 'paper'))
        ORDER BY i.instrument_id
    LOOP
        r := trading.protect_bars(inst, ARRAY(SELECT nb::market.bars FROM new_bars nb
                                              WHERE nb.instrument_id = inst),
                                  NULL, false);
        touched := touched || r.touched;
        until := GREATEST(until, r.marked_until);
    END LOOP;
    FOR a IN SELECT DISTINCT x FROM unnest(touched) x ORDER BY 1 LOOP
        PERFORM trading.snapshot_equity(a, until);
    END LOOP;
    FOR r IN
        SELECT nb.instrument_id, nb.timeframe, min(nb.ts) AS first, max(nb.ts) AS last,
               count(*) AS n
        FROM new_bars nb GROUP BY nb.instrument_id, nb.timeframe
        ORDER BY nb.instrument_id, nb.timeframe
    LOOP
        PERFORM pg_notify('mmats_bars', json_build_object(
            'instrument_id', r.instrument_id, 'timeframe', r.timeframe, 'first', r.first,
            'last', r.last, 'n', r.n)::text);
    END LOOP;
    RETURN NULL;
END
$$;

------------------------------------------------------------------------------ replay venues
-- A replay session (`mmats paper --feed replay`) copies its symbols onto a venue of its
-- own, `replay<N>`. Such an instrument is found only when its venue is named: a symbol
-- given without a venue still means the real instrument, however many sessions ran.
CREATE OR REPLACE FUNCTION market._instrument(symbol text, venue text DEFAULT NULL)
RETURNS market.instruments
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    inst market.instruments;
    n integer := 0;
BEGIN
    IF symbol IS NULL THEN
        RAISE EXCEPTION 'a symbol is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF _instrument.venue IS NULL THEN
        FOR inst IN SELECT * FROM market.instruments i
                    WHERE i.symbol = upper(_instrument.symbol) AND i.venue !~ '^replay[0-9]+$' LOOP
            n := n + 1;
            EXIT WHEN n > 1;
        END LOOP;
    ELSE
        SELECT * INTO inst FROM market.instruments i
        WHERE i.venue = _instrument.venue AND i.symbol = upper(_instrument.symbol);
        IF FOUND THEN
            n := 1;
        END IF;
    END IF;
    IF n = 0 THEN
        RAISE EXCEPTION 'unknown symbol %',
            quote_literal(symbol) || COALESCE(' on venue ' || quote_literal(_instrument.venue), '')
            USING ERRCODE = 'foreign_key_violation',
                  HINT = 'import its bars first (mmats data import) so the instrument exists';
    ELSIF n > 1 THEN
        RAISE EXCEPTION 'symbol % exists on several venues (%): name the venue', symbol,
            (SELECT string_agg(i.venue, ', ' ORDER BY i.venue) FROM market.instruments i
             WHERE i.symbol = upper(_instrument.symbol) AND i.venue !~ '^replay[0-9]+$')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN inst;
END
$$;

------------------------------------------------------------------------------ the order queue
-- The router drains pgmq's `orders` queue through these three functions, never the
-- queue's tables: it cannot lose or forge a message. Backtest orders never reach a
-- broker (their engine fills them), so the router is not shown them.
CREATE INDEX q_orders_routable_idx ON pgmq.q_orders (vt, msg_id)
    WHERE (message ->> 'environment') IN ('paper', 'live');

-- A routable order wakes the router at commit (mmats_orders, the account id); backtest
-- orders only cost the WHEN test.
CREATE FUNCTION trading.order_queued() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_notify('mmats_orders', COALESCE(NEW.message ->> 'account_id', ''));
    RETURN NULL;
END
$$;
CREATE TRIGGER q_orders_wake_router AFTER INSERT ON pgmq.q_orders
    FOR EACH ROW WHEN ((NEW.message ->> 'environment') IN ('paper', 'live'))
    EXECUTE FUNCTION trading.order_queued();

CREATE FUNCTION trading.read_orders(vt_seconds integer, qty integer,
                                    accounts bigint[] DEFAULT NULL)
RETURNS SETOF pgmq.message_record
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF vt_seconds IS NULL OR vt_seconds < 1 OR vt_seconds > 86400 THEN
        RAISE EXCEPTION 'visibility timeout must be 1 to 86400 seconds, got %', vt_seconds
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF qty IS NULL OR qty < 1 OR qty > 1000 THEN
        RAISE EXCEPTION 'read_orders takes 1 to 1000 messages at a time, got %', qty
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH cte AS (
        SELECT q.msg_id FROM pgmq.q_orders q
        WHERE q.vt <= clock_timestamp() AND (q.message ->> 'environment') IN ('paper', 'live')
          AND (accounts IS NULL OR (q.message ->> 'account_id')::bigint = ANY (accounts))
        ORDER BY q.msg_id
        LIMIT qty
        FOR UPDATE SKIP LOCKED)
    UPDATE pgmq.q_orders m
    SET last_read_at = clock_timestamp(),
        vt = clock_timestamp() + make_interval(secs => vt_seconds),
        read_ct = m.read_ct + 1
    FROM cte WHERE m.msg_id = cte.msg_id
    RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.last_read_at, m.vt, m.message, m.headers;
END
$$;

-- Done with a message: the database has recorded the outcome of its order. Archived, not
-- deleted, so the queue's history stays readable (pgmq.a_orders).
CREATE FUNCTION trading.archive_order_message(msg_id bigint) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found_ boolean;
BEGIN
    WITH gone AS (DELETE FROM pgmq.q_orders q WHERE q.msg_id = archive_order_message.msg_id
                  RETURNING q.*)
    INSERT INTO pgmq.a_orders (msg_id, read_ct, enqueued_at, last_read_at, vt, message, headers)
    SELECT g.msg_id, g.read_ct, g.enqueued_at, g.last_read_at, g.vt, g.message, g.headers FROM gone g;
    GET DIAGNOSTICS found_ = ROW_COUNT;
    PERFORM pg_notify('mmats_cursor', 'queue');  -- the replay waits for an empty queue
    RETURN found_;
END
$$;

-- Not yet: look at the message again in `seconds` (a retry with backoff, an order that
-- waits for its next bar).
CREATE FUNCTION trading.delay_order_message(msg_id bigint, seconds numeric) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found_ boolean;
BEGIN
    IF seconds IS NULL OR seconds < 0 OR seconds > 86400 THEN
        RAISE EXCEPTION 'a message may be delayed 0 to 86400 seconds, got %', seconds
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE pgmq.q_orders q SET vt = clock_timestamp() + make_interval(secs => seconds::double precision)
    WHERE q.msg_id = delay_order_message.msg_id;
    GET DIAGNOSTICS found_ = ROW_COUNT;
    RETURN found_;
END
$$;

------------------------------------------------------------------------------ a strategy's own events
-- What the strategy worker tells a strategy (on_order_filled, on_order_rejected): the
-- fills of its own orders after a fill id, and its orders refused or cancelled after a
-- time. The strategy role cannot read the order book or the fills; this is its own part.
CREATE FUNCTION trading.strategy_events(account bigint, strategy bigint, after_fill bigint,
                                        after_change timestamptz)
RETURNS TABLE (kind text, id bigint, order_id bigint, symbol text, side text,
               quantity numeric, price numeric, commission numeric, ts timestamptz,
               signal_id bigint, reason_code text, reason text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT 'fill', f.fill_id, f.order_id, i.symbol, f.side::text, f.quantity, f.price,
           f.commission, f.ts, o.signal_id, NULL::text, NULL::text
    FROM trading.fills f
    JOIN trading.orders o ON o.order_id = f.order_id
    JOIN market.instruments i ON i.instrument_id = f.instrument_id
    WHERE f.account_id = strategy_events.account AND o.strategy_id = strategy_events.strategy
      AND f.fill_id > strategy_events.after_fill
    UNION ALL
    SELECT o.status::text, o.order_id, o.order_id, i.symbol, o.side::text,
           o.quantity - o.filled_quantity, NULL, NULL, o.updated_at, o.signal_id,
           COALESCE(o.reason_code, CASE WHEN o.reason ~ '^[A-Z][A-Z0-9_]{0,63}:'
                                        THEN split_part(o.reason, ':', 1) END,
                    upper(o.status::text)),
           o.reason
    FROM trading.orders o JOIN market.instruments i ON i.instrument_id = o.instrument_id
    WHERE o.account_id = strategy_events.account AND o.strategy_id = strategy_events.strategy
      AND o.status IN ('rejected', 'cancelled', 'expired')
      AND o.updated_at > strategy_events.after_change
    ORDER BY 9, 1, 2;
END;

------------------------------------------------------------------------------ reconciliation
-- The reconciler found the broker and the ledger disagreeing: a critical risk event,
-- audited, and (if the account is configured so) a FREEZE.
CREATE FUNCTION risk.report_mismatch(account text, kind text, message text,
                                     details jsonb DEFAULT '{}', freeze_account boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts := trading._account(account, true);
    code text := upper(kind);
    id bigint;
    mode risk.breaker_mode;
BEGIN
    IF code !~ '^[A-Z][A-Z0-9_]{0,63}$' THEN
        RAISE EXCEPTION 'mismatch kind must be UPPER_SNAKE (e.g. POSITION_MISMATCH), got %', quote_literal(kind)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF details IS NULL OR jsonb_typeof(details) <> 'object' THEN
        RAISE EXCEPTION 'mismatch details must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO risk.events (account_id, severity, event_type, message, details)
    VALUES (acc.account_id, 'critical', code, left(COALESCE(message, code), 2000), details)
    RETURNING event_id INTO id;
    PERFORM audit.record('reconcile.mismatch', 'risk.events', id::text, jsonb_build_object(
        'account', acc.name, 'kind', code, 'message', left(message, 2000), 'details', details));
    IF freeze_account THEN
        mode := risk._trip(acc, 'FREEZE', left(format('reconciliation: %s', message), 500), code);
    END IF;
    RETURN jsonb_build_object('event_id', id, 'account', acc.name, 'kind', code,
                              'frozen', COALESCE(freeze_account, false));
END
$$;

------------------------------------------------------------------------------ credentials
-- trading.credentials (0002_01) holds what a credential is; its secret lives here,
-- encrypted by the runtime with AES-256-GCM under the master key (key_id names which),
-- with the record's identity as associated data. Only the router (which talks to the
-- brokers) may read it; nobody may read the plaintext, because the database never has it.
ALTER TABLE trading.credentials ADD COLUMN endpoint text;
UPDATE trading.credentials SET endpoint = CASE WHEN is_live THEN 'live' ELSE 'testnet' END;
ALTER TABLE trading.credentials
    ALTER COLUMN endpoint SET NOT NULL,
    ADD CONSTRAINT credentials_endpoint_known CHECK (endpoint IN ('paper', 'testnet', 'live')),
    ADD CONSTRAINT credentials_live_is_live_endpoint CHECK (is_live = (endpoint = 'live')),
    ADD COLUMN fields text[] NOT NULL DEFAULT '{}'
        CONSTRAINT credentials_fields_format
        CHECK (array_to_string(fields, ',') ~ '^([a-z][a-z0-9_]{0,31}(,|$))*$'),
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN rotated_at timestamptz;

CREATE TABLE runtime.credential_secrets (
    credential_id  bigint PRIMARY KEY REFERENCES trading.credentials ON DELETE CASCADE,
    key_id         text NOT NULL CHECK (key_id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    nonce          bytea NOT NULL CONSTRAINT credential_nonce_96_bits CHECK (length(nonce) = 12),
    ciphertext     bytea NOT NULL CONSTRAINT credential_ciphertext_has_tag
                       CHECK (length(ciphertext) BETWEEN 17 AND 65536),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Store (or replace: a rotation) a credential. A live account holds live keys only; a
-- paper account paper or testnet keys only; a backtest account none.
CREATE FUNCTION trading.set_credential(account text, label text, venue text, endpoint text,
                                       fields text[], key_id text, nonce bytea,
                                       ciphertext bytea)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts := trading._account(account, true);
    cred trading.credentials;
    rotated boolean := false;
BEGIN
    IF endpoint IS NULL OR endpoint NOT IN ('paper', 'testnet', 'live') THEN
        RAISE EXCEPTION 'endpoint must be paper, testnet or live, got %', quote_nullable(endpoint)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF acc.environment = 'backtest' THEN
        RAISE EXCEPTION 'account % is a backtest account: it talks to no broker and holds no credentials', acc.name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF acc.environment = 'live' AND endpoint <> 'live' THEN
        RAISE EXCEPTION 'account % is live: it takes live keys only, not % keys', acc.name, endpoint
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF acc.environment = 'paper' AND endpoint = 'live' THEN
        RAISE EXCEPTION 'account % is a paper account: live keys are refused (use testnet or paper keys, or a live account)', acc.name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT c.* INTO cred FROM trading.credentials c
    WHERE c.account_id = acc.account_id AND c.label = set_credential.label FOR UPDATE;
    IF FOUND THEN
        IF cred.venue <> set_credential.venue OR cred.endpoint <> set_credential.endpoint THEN
            RAISE EXCEPTION 'credential % of account % is for % (%): remove it before storing one for % (%)',
                cred.label, acc.name, cred.venue, cred.endpoint, set_credential.venue, set_credential.endpoint
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        UPDATE trading.credentials c SET fields = set_credential.fields, updated_at = now(),
            rotated_at = now()
        WHERE c.credential_id = cred.credential_id RETURNING * INTO cred;
        rotated := true;
    ELSE
        INSERT INTO trading.credentials (account_id, venue, label, is_live, endpoint, fields)
        VALUES (acc.account_id, set_credential.venue, set_credential.label,
                set_credential.endpoint = 'live', set_credential.endpoint, set_credential.fields)
        RETURNING * INTO cred;
    END IF;
    INSERT INTO runtime.credential_secrets AS s (credential_id, key_id, nonce, ciphertext)
    VALUES (cred.credential_id, set_credential.key_id, set_credential.nonce, set_credential.ciphertext)
    ON CONFLICT (credential_id) DO UPDATE SET key_id = EXCLUDED.key_id, nonce = EXCLUDED.nonce,
        ciphertext = EXCLUDED.ciphertext, updated_at = now();
    PERFORM audit.record(CASE WHEN rotated THEN 'credential.rotated' ELSE 'credential.set' END,
        'trading.credentials', cred.credential_id::text, jsonb_build_object(
            'account', acc.name, 'label', cred.label, 'venue', cred.venue,
            'endpoint', cred.endpoint, 'fields', to_jsonb(cred.fields), 'key_id', key_id));
    RETURN jsonb_build_object('credential_id', cred.credential_id, 'account', acc.name,
                              'label', cred.label, 'venue', cred.venue, 'endpoint', cred.endpoint,
                              'rotated', rotated);
END
$$;

CREATE FUNCTION trading.remove_credential(account text, label text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    acc trading.accounts := trading._account(account, true);
    cred trading.credentials;
BEGIN
    DELETE FROM trading.credentials c
    WHERE c.account_id = acc.account_id AND c.label = remove_credential.label
    RETURNING * INTO cred;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account % has no credential %', acc.name, quote_literal(label)
            USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM audit.record('credential.removed', 'trading.credentials', cred.credential_id::text,
        jsonb_build_object('account', acc.name, 'label', cred.label, 'venue', cred.venue,
                           'endpoint', cred.endpoint));
    RETURN jsonb_build_object('account', acc.name, 'label', cred.label, 'removed', true);
END
$$;

------------------------------------------------------------------------------ grants
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA runtime FROM PUBLIC;
REVOKE ALL ON FUNCTION trading.strategy_events(bigint, bigint, bigint, timestamptz),
    trading.read_orders(integer, integer, bigint[]),
    trading.archive_order_message(bigint), trading.delay_order_message(bigint, numeric),
    risk.report_mismatch(text, text, text, jsonb, boolean),
    trading.set_credential(text, text, text, text, text[], text, bytea, bytea),
    trading.remove_credential(text, text) FROM PUBLIC;

GRANT USAGE ON SCHEMA runtime TO mmats_strategy, mmats_router, mmats_api, mmats_readonly;
GRANT SELECT ON runtime.workers, runtime.errors, runtime.cursors
    TO mmats_readonly, mmats_api, mmats_strategy, mmats_router;
GRANT EXECUTE ON FUNCTION trading.strategy_events(bigint, bigint, bigint, timestamptz)
    TO mmats_strategy;
GRANT EXECUTE ON FUNCTION runtime.heartbeat(text, text, text, integer, text, jsonb),
    runtime.report_error(text, text, text, text, jsonb),
    runtime.advance_cursor(text, bigint, timestamptz)
    TO mmats_strategy, mmats_router, mmats_api;

-- trading.account_equity (granted to every reader in 0002_07) is inlined into its caller's
-- query, which then needs this pure helper too
GRANT EXECUTE ON FUNCTION trading._signed_qty(trading.positions)
    TO mmats_strategy, mmats_router, mmats_api, mmats_readonly;
-- the bars the trading core prices an instrument with: the paper broker fills on them,
-- and a strategy waits for the paper broker to have settled them
GRANT EXECUTE ON FUNCTION market.finest_timeframe(bigint) TO mmats_strategy, mmats_router;

-- the router: the queue, the broker's secrets, what a paper fill needs, reconciliation
-- (risk: report_mismatch and breaker_mode, granted in 0002_07, live in that schema)
GRANT USAGE ON SCHEMA pgmq, risk TO mmats_router;
GRANT EXECUTE ON FUNCTION trading.read_orders(integer, integer, bigint[]),
    trading.archive_order_message(bigint), trading.delay_order_message(bigint, numeric),
    risk.report_mismatch(text, text, text, jsonb, boolean),
    trading.on_bar(bigint, market.timeframe, timestamptz, numeric, numeric, numeric, numeric, bigint)
    TO mmats_router;
GRANT SELECT ON runtime.credential_secrets, trading.credentials, market.bars, trading.signals
    TO mmats_router;

-- the api: credentials are managed here (it never reads a secret back: which key
-- encrypted a record, yes)
GRANT SELECT (credential_id, key_id, updated_at) ON runtime.credential_secrets TO mmats_api;
GRANT EXECUTE ON FUNCTION
    trading.set_credential(text, text, text, text, text[], text, bytea, bytea),
    trading.remove_credential(text, text) TO mmats_api;
