"""A broker adapter for a configured account, with its decrypted credentials.

The account's `endpoint` (paper | testnet | live) picks the venue's endpoint; the stored
credential's own endpoint is returned beside the adapter so the router can refuse, and
say why, an order that would reach a live endpoint with testnet keys.
"""

from __future__ import annotations

from typing import Any

import psycopg

from workers.brokers import errors
from workers.brokers.base import Broker
from workers.runtime.config import AccountConfig, RuntimeConfigError


def _credentials(conn: psycopg.Connection, acc: AccountConfig) -> tuple[dict[str, str], str]:
    from workers import credentials

    if acc.credential is None:
        raise RuntimeConfigError(f"account {acc.name}: broker {acc.broker!r} needs a credential")
    info = credentials.get_info(conn, acc.name, acc.credential)
    if info is None:
        raise RuntimeConfigError(
            f"account {acc.name}: no credential {acc.credential!r} stored (mmats creds set "
            f"{acc.name} {acc.credential} --venue ... --endpoint {acc.endpoint} --field ...)")
    secret = credentials.load(conn, credentials.load_master_key(), acc.name, acc.credential)
    return secret, info.endpoint


def make_broker(conn: psycopg.Connection, acc: AccountConfig) -> tuple[Broker, str]:
    """(adapter, the endpoint its keys were stored for)."""
    secret, key_endpoint = _credentials(conn, acc)
    if acc.endpoint == "live" and key_endpoint != "live":
        raise errors.EnvironmentMismatch(
            f"account {acc.name}: its credential {acc.credential!r} holds {key_endpoint} keys, "
            "which may not trade on a live endpoint")
    broker: Any
    if acc.broker == "ccxt":
        from workers.brokers.ccxt_broker import CcxtBroker

        assert acc.exchange is not None
        broker = CcxtBroker(acc.exchange, secret,
                            "live" if acc.endpoint == "live" else "testnet")
    elif acc.broker == "alpaca":
        from workers.brokers.alpaca_broker import AlpacaBroker

        broker = AlpacaBroker(secret, "live" if acc.endpoint == "live" else "paper")
    elif acc.broker == "oanda":
        from workers.brokers.oanda_broker import OandaBroker

        broker = OandaBroker(secret, "live" if acc.endpoint == "live" else "practice")
    else:
        raise RuntimeConfigError(f"account {acc.name}: unknown broker {acc.broker!r}")
    return broker, key_endpoint
