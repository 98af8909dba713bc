"""Broker errors mapped to what the router should do about them.

Every adapter translates its vendor's exceptions and HTTP statuses into exactly one of
these. The router decides by class, never by message text:

- `Retry`: a transient fault (network, 5xx, timeout). Try again with backoff; an order
  already sent stays in flight until the broker's own report settles it.
- `BackOff`: the venue asks us to slow down (rate limit, DDoS protection). Wait at least
  `retry_after` seconds, then retry.
- `Reject`: the venue refused this order for good (insufficient funds, bad size, market
  closed). Record the rejection with `code` and the venue's message; do not retry.
- `Stop`: something is wrong with the account or the credentials (authentication,
  permissions, account suspended, a testnet key pointed at a live endpoint). Stop sending
  for this account and raise the alarm.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base class: `venue` names the adapter, `code` is an UPPER_SNAKE reason code."""

    code = "BROKER_ERROR"

    def __init__(self, message: str, *, venue: str = "", code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.venue = venue
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def __str__(self) -> str:
        text = super().__str__()
        return f"{self.venue}: {text}" if self.venue else text


class Retry(BrokerError):
    code = "BROKER_UNAVAILABLE"


class BackOff(Retry):
    code = "RATE_LIMITED"


class Reject(BrokerError):
    code = "BROKER_REJECTED"


class Stop(BrokerError):
    code = "BROKER_AUTH"


class OrderNotFound(BrokerError):
    """The venue knows no order with that id (a status query, a cancel)."""

    code = "ORDER_NOT_FOUND"


class EnvironmentMismatch(Stop):
    """An order would reach a live endpoint from a non-live account, or with testnet keys."""

    code = "ENVIRONMENT_MISMATCH"
