"""A strategy assigned to an account before its signals (trading.submit_signal refuses an
unassigned one since 0004_11, STRATEGY_NOT_ASSIGNED), for tests whose signals stand for a
configured strategy: the defaults (all the capital, percent of equity), as before."""

from __future__ import annotations

from typing import Any

import psycopg

_ENSURE = """
SELECT trading._strategy(%(strategy)s, %(version)s), trading.assign_strategy(a.name, %(strategy)s)
FROM trading.accounts a
WHERE (a.name = %(account)s OR a.account_id::text = %(account)s)
  AND %(strategy)s ~ '^[a-z][a-z0-9_]{0,63}$'
  AND NOT EXISTS (SELECT 1 FROM trading.account_strategies x
                  JOIN trading.strategies t USING (strategy_id)
                  WHERE x.account_id = a.account_id AND t.name = %(strategy)s)
"""


def ensure_assigned(conn: psycopg.Connection, signal: dict[str, Any]) -> None:
    """Assign the signal's strategy to its account with the defaults, unless it is."""
    account, strategy = signal.get("account"), signal.get("strategy")
    if not isinstance(account, str) or not isinstance(strategy, str):
        return
    row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    if row is not None and row[0]:  # (a test acting as a role has set the account up before)
        version = signal.get("version")
        conn.execute(_ENSURE, {"account": account, "strategy": strategy,
                               "version": version if isinstance(version, str) else None})
