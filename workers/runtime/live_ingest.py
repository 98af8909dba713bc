"""The ingest worker of `mmats run` for live feeds: `[[feeds]]` made into a LiveIngest."""

from __future__ import annotations

from typing import Any

import psycopg

from workers.ingest.live import LiveIngest, Subscription
from workers.runtime.config import FeedConfig, RuntimeConfig, RuntimeConfigError
from workers.runtime.worker import Worker


def _venue(cfg: FeedConfig) -> str:
    """The venue a [[feeds]] entry's instruments are stored under."""
    kind, _, exchange = cfg.venue.partition(":")
    return exchange if kind == "ccxt" and exchange else kind


def _feed(url: str, cfg: FeedConfig) -> tuple[Any, str]:
    """(feed, the venue its instruments are stored under)."""
    kind, _, exchange = cfg.venue.partition(":")
    if kind == "ccxt":
        from workers.feeds.ccxt_feed import CcxtFeed

        if not exchange:
            raise RuntimeConfigError(f"[[feeds]] venue {cfg.venue!r}: write ccxt:<exchange id>")
        return CcxtFeed(exchange), exchange
    if kind in ("alpaca", "oanda"):
        from workers import credentials

        if not (cfg.credential and cfg.credential_account):
            raise RuntimeConfigError(f"[[feeds]] {cfg.venue}: market data needs "
                                     "credential_account and credential (mmats creds set)")
        with psycopg.connect(url, autocommit=True) as conn:
            secret = credentials.load(conn, credentials.load_master_key(),
                                      cfg.credential_account, cfg.credential)
        if kind == "alpaca":
            from workers.feeds.alpaca_feed import AlpacaFeed

            return AlpacaFeed(secret), "alpaca"
        from workers.feeds.oanda_feed import OandaFeed

        return OandaFeed(secret, "live" if cfg.endpoint == "live" else "practice"), "oanda"
    raise RuntimeConfigError(f"[[feeds]] venue {cfg.venue!r}: expected ccxt:<id>, alpaca or "
                             "oanda")


class IngestWorker(Worker):
    """Runs a LiveIngest (which keeps its own heartbeat and threads) under the supervisor."""

    kind = "ingest"

    def __init__(self, url: str, ingest: LiveIngest, name: str) -> None:
        super().__init__(url, name)
        self.ingest = ingest

    def run(self, *, until: Any = None) -> None:
        try:
            self.ingest.run()
        finally:
            self.ingest.close()

    def stop(self) -> None:
        self.ingest.stop()


def build_live_ingest(url: str, config: RuntimeConfig, *, name: str = "ingest") -> Worker:
    if not config.feeds:
        raise RuntimeConfigError("no [[feeds]] configured: the ingest worker has nothing to do")
    feeds: dict[str, Any] = {}
    first: dict[str, tuple[int, FeedConfig]] = {}  # venue -> the entry that opened it
    subscriptions = []
    for n, cfg in enumerate(config.feeds, 1):
        venue = _venue(cfg)
        if venue in first:  # one venue, one connection: later entries add series to it
            m, opened = first[venue]
            if (opened.endpoint, opened.credential_account, opened.credential) != (
                    cfg.endpoint, cfg.credential_account, cfg.credential):
                raise RuntimeConfigError(
                    f"[[feeds]] #{n}: venue {venue} is already fed by [[feeds]] #{m} with "
                    "another endpoint or credential (one venue, one connection)")
        else:
            feeds[venue], _ = _feed(url, cfg)
            first[venue] = (n, cfg)
        subscriptions += [Subscription(symbol, cfg.market, venue, tf, cfg.history_bars)
                          for symbol in cfg.symbols for tf in cfg.timeframes]
    return IngestWorker(url, LiveIngest(url, feeds, subscriptions, name=name), name)
