-- 0004_10 (pre): news sentiment, told to strategies (IStrategy.on_news_sentiment).
--
-- One row per item of news with its sentiment score, about one instrument or, with no
-- instrument, the whole market. The backtest engine tells a strategy the rows of its
-- symbols (and the market-wide ones) whose time is at or before a bar's close, before its
-- on_bar, in time order; the strategy worker does the same with the rows stored by the
-- time it runs the bar. Rows come from `mmats data news FILE` (or any INSERT by the
-- owner); the same item twice (source, instrument, time and headline) is stored once.
SET LOCAL ROLE mmats_owner;

CREATE TABLE market.news_sentiment (
    news_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts             timestamptz NOT NULL CONSTRAINT news_sentiment_ts_range
                       CHECK (ts >= '1970-01-01 00:00+00' AND ts < '2200-01-01 00:00+00'),
    instrument_id  bigint REFERENCES market.instruments,  -- NULL: the whole market
    score          numeric NOT NULL CONSTRAINT news_sentiment_score_range
                       CHECK (score >= -1 AND score <= 1),  -- (NaN is above 1)
    source         text NOT NULL CONSTRAINT news_sentiment_source_format
                       CHECK (source ~ '^[^[:cntrl:]]{1,100}$' AND btrim(source) = source),
    headline       text NOT NULL DEFAULT '' CONSTRAINT news_sentiment_headline_format
                       CHECK (length(headline) <= 500 AND headline !~ '[[:cntrl:]]'),
    extra          jsonb NOT NULL DEFAULT '{}' CONSTRAINT news_sentiment_extra_object
                       CHECK (jsonb_typeof(extra) = 'object'),
    created_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT news_sentiment_once UNIQUE NULLS NOT DISTINCT (source, instrument_id, ts, headline)
);
COMMENT ON CONSTRAINT news_sentiment_ts_range ON market.news_sentiment IS
    'a news time must be from 1970 to 2199';
COMMENT ON CONSTRAINT news_sentiment_score_range ON market.news_sentiment IS
    'a sentiment score must be a number from -1 (bearish) to 1 (bullish)';
COMMENT ON CONSTRAINT news_sentiment_source_format ON market.news_sentiment IS
    'a news source is 1-100 characters, no control characters, no leading or trailing space';
COMMENT ON CONSTRAINT news_sentiment_headline_format ON market.news_sentiment IS
    'a headline is at most 500 characters, no control characters';
COMMENT ON CONSTRAINT news_sentiment_extra_object ON market.news_sentiment IS
    'extra must be a JSON object';
COMMENT ON CONSTRAINT news_sentiment_once ON market.news_sentiment IS
    'this item of news (source, instrument, time, headline) is already stored';
CREATE INDEX news_sentiment_ts_idx ON market.news_sentiment (ts);
CREATE INDEX news_sentiment_instrument_ts_idx ON market.news_sentiment (instrument_id, ts);

-- (the default privileges of 0001_05 give SELECT to the reading roles; said again here,
-- so that the grants do not depend on who ran that migration)
GRANT SELECT ON market.news_sentiment TO mmats_readonly, mmats_api, mmats_strategy;
