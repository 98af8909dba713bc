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


def _feed(url: str, cfg: FeedConfig, n: int = 1) -> tuple[Any, str]:
    """(feed, the venue its instruments are stored under)."""
    feed, venue, _ = _open(url, cfg, n)
    return feed, venue


def _open(url: str, cfg: FeedConfig, n: int = 1) -> tuple[Any, str, str]:
    """(feed, the venue its instruments are stored under, the endpoint it reads from).

    A feed reading with stored keys reads from the keys' own endpoint unless the entry
    names one; a live endpoint takes live keys of a live account (a paper account's
    practice token is never sent to a live endpoint)."""
    where = f"[[feeds]] #{n} ({cfg.venue})"
    kind, _, exchange = cfg.venue.partition(":")
    if kind == "ccxt":
        from workers.feeds.ccxt_feed import CcxtFeed

        if not exchange:
            raise RuntimeConfigError(f"{where}: write venue = 'ccxt:<exchange id>'")
        # public market data: no keys are sent, whatever the entry names
        return CcxtFeed(exchange), exchange, cfg.endpoint or "live"
    if kind in ("alpaca", "oanda"):
        from workers import credentials

        if not (cfg.credential and cfg.credential_account):
            raise RuntimeConfigError(f"{where}: market data needs "
                                     "credential_account and credential (mmats creds set)")
        with psycopg.connect(url, autocommit=True) as conn:
            info = credentials.get_info(conn, cfg.credential_account, cfg.credential)
            if info is None:
                raise RuntimeConfigError(
                    f"{where}: account {cfg.credential_account} has no credential "
                    f"{cfg.credential!r} (mmats creds set)")
            endpoint = cfg.endpoint or info.endpoint
            if endpoint == "live" and (info.endpoint != "live" or info.environment != "live"):
                raise RuntimeConfigError(
                    f"{where}: endpoint 'live' may not use credential {cfg.credential!r} of "
                    f"{info.environment} account {info.account} ({info.endpoint} keys): a live "
                    "feed takes live keys of a live account (or set endpoint = "
                    f"{info.endpoint!r})")
            secret = credentials.load(conn, credentials.load_master_key(),
                                      cfg.credential_account, cfg.credential)
        if kind == "alpaca":
            from workers.feeds.alpaca_feed import AlpacaFeed

            return AlpacaFeed(secret), "alpaca", endpoint
        from workers.feeds.oanda_feed import OandaFeed

        return (OandaFeed(secret, "live" if endpoint == "live" else "practice"), "oanda",
                endpoint)
    raise RuntimeConfigError(f"{where}: venue {cfg.venue!r}: expected ccxt:<id>, alpaca or "
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
    # venue -> the entry that opened it and the endpoint its feed reads from
    first: dict[str, tuple[int, FeedConfig, str]] = {}
    subscriptions = []
    for n, cfg in enumerate(config.feeds, 1):
        venue = _venue(cfg)
        if venue in first:  # one venue, one connection: later entries add series to it
            m, opened, endpoint = first[venue]
            if ((cfg.endpoint or endpoint) != endpoint
                    or (opened.credential_account, opened.credential)
                    != (cfg.credential_account, cfg.credential)):
                raise RuntimeConfigError(
                    f"[[feeds]] #{n}: venue {venue} is already fed by [[feeds]] #{m} with "
                    "another endpoint or credential (one venue, one connection)")
        else:
            feeds[venue], _, endpoint = _open(url, cfg, n)
            first[venue] = (n, cfg, endpoint)
        subscriptions += [Subscription(symbol, cfg.market, venue, tf, cfg.history_bars)
                          for symbol in cfg.symbols for tf in cfg.timeframes]
    return IngestWorker(url, LiveIngest(url, feeds, subscriptions, name=name), name)
