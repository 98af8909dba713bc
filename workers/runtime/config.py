"""The runtime's configuration: the `[runtime]`, `[[accounts]]`, `[[strategies]]`,
`[[feeds]]`, `[router]` and `[notifications]` tables of mmats.toml.

Everything is validated before a worker starts, and every error is one line naming the
table, the entry and the key (`[[strategies]] #2 (sma on paper-1): timeframe '2m' is not
one of 1m, 5m, ...`). Secrets never belong here: a broker's keys are stored with
`mmats creds set` and named by their label.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db.errors import MmatsError
from db.numbers import parse_number
from db.structured import json_values, loads_toml

if TYPE_CHECKING:
    from workers.runtime.replay import ReplaySession

TIMEFRAMES = ("1m", "5m", "15m", "1h", "4h", "1d", "1w")
ENVIRONMENTS = ("paper", "live")
BROKERS = ("paper", "ccxt", "alpaca", "oanda")
ENDPOINTS = ("paper", "testnet", "live")
TABLES = ("runtime", "accounts", "strategies", "feeds", "router", "notifications", "replay")


class RuntimeConfigError(MmatsError):
    """mmats.toml asks for something the runtime cannot do."""


@dataclass(frozen=True)
class PaperCosts:
    """The paper broker's fill rules (the backtest simulator's)."""

    commission: Decimal = Decimal("0.001")
    maker_fee: Decimal | None = None
    slippage: str = "none"  # none | bps:N | atr:F | volume:F
    spread: Decimal = Decimal(0)
    latency_ms: int = 0


@dataclass(frozen=True)
class AccountConfig:
    name: str
    environment: str  # paper | live
    mode: str = "advisory"
    cash: Decimal = Decimal(10000)
    currency: str = "USD"
    broker: str = "paper"  # paper | ccxt | alpaca | oanda
    exchange: str | None = None  # ccxt's exchange id
    endpoint: str = "paper"  # paper | testnet | live: where the broker's orders go
    credential: str | None = None  # a label of `mmats creds`
    allow_short: bool = False
    freeze_on_mismatch: bool = False
    costs: PaperCosts = field(default_factory=PaperCosts)


@dataclass(frozen=True)
class StrategyConfig:
    account: str
    name: str
    symbols: tuple[str, ...]
    timeframe: str
    params: Mapping[str, Any] = field(default_factory=dict)
    allocation: Decimal = Decimal(1)
    sizing_method: str = "percent_equity"
    sizing_params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.account}:{self.name}:{self.timeframe}:{','.join(self.symbols)}"


@dataclass(frozen=True)
class FeedConfig:
    market: str  # crypto | stock | forex
    venue: str  # ccxt:binance | alpaca | oanda | replay
    symbols: tuple[str, ...]
    timeframes: tuple[str, ...]
    # paper | testnet | live; None: the named credential's own endpoint (resolved when
    # the feed opens), live for a feed that needs no keys
    endpoint: str | None = None
    credential_account: str | None = None
    credential: str | None = None
    # bars of history fetched for a series with nothing stored yet (page by page)
    history_bars: int = 500


@dataclass(frozen=True)
class RouterConfig:
    visibility_seconds: int = 30
    poll_ms: int = 50
    batch: int = 50
    status_poll_seconds: float = 2.0
    max_retries: int = 8


@dataclass(frozen=True)
class RuntimeConfig:
    accounts: tuple[AccountConfig, ...] = ()
    strategies: tuple[StrategyConfig, ...] = ()
    feeds: tuple[FeedConfig, ...] = ()
    router: RouterConfig = field(default_factory=RouterConfig)
    notifications: Mapping[str, Any] = field(default_factory=dict)
    strategy_dirs: tuple[Path, ...] = ()
    heartbeat_seconds: float = 5.0
    bar_grace_seconds: float = 3.0  # a multi-symbol entry's wait for a bar of the same time
    strategy_timeout_seconds: float = 10.0  # each on_bar call's time budget
    log_file: str | None = None
    source: Path | None = None
    replay: ReplaySession | None = None  # a replay session's feed (`mmats paper`)

    def account(self, name: str) -> AccountConfig:
        for acc in self.accounts:
            if acc.name == name:
                return acc
        raise RuntimeConfigError(f"no [[accounts]] entry named {name!r}")


def _dec(value: object, where: str, lo: Decimal | None = None,
         hi: Decimal | None = None) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise RuntimeConfigError(f"{where} must be a number, got {value!r}")
    # (the trading core's bounds: under 10^18, at most 18 decimal places; cash = 1e30 was
    # stored, `mmats account create --cash 1e30` refused)
    number = parse_number(str(value), where, RuntimeConfigError)
    if lo is not None and number < lo:
        raise RuntimeConfigError(f"{where} must be >= {lo}, got {value!r}")
    if hi is not None and number > hi:
        raise RuntimeConfigError(f"{where} must be <= {hi}, got {value!r}")
    return number


def _str(table: Mapping[str, Any], key: str, where: str, default: str | None = None,
         choices: tuple[str, ...] | None = None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value:
        raise RuntimeConfigError(f"{where}: {key} must be a non-empty string, got {value!r}")
    if "\x00" in value:  # (names, symbols and paths: neither the database nor a path takes it)
        raise RuntimeConfigError(f"{where}: {key} contains a NUL character")
    if choices is not None and value not in choices:
        raise RuntimeConfigError(f"{where}: {key} {value!r} is not one of {', '.join(choices)}")
    return value


def _bool(table: Mapping[str, Any], key: str, where: str, default: bool = False) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise RuntimeConfigError(f"{where}: {key} must be true or false (a TOML boolean, "
                                 f"unquoted), got {value!r}")
    return value


def _opt_str(table: Mapping[str, Any], key: str, where: str) -> str | None:
    """An optional key that, when given, is a non-empty string."""
    if key not in table:
        return None
    return _str(table, key, where)


def _strings(table: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = table.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(
            isinstance(v, str) and v and "\x00" not in v for v in value):
        raise RuntimeConfigError(f"{where}: {key} must be a non-empty list of strings "
                                 "(without NUL characters)")
    return tuple(value)


def _only(table: Mapping[str, Any], keys: set[str], where: str) -> None:
    unknown = sorted(set(table) - keys)
    if unknown:
        raise RuntimeConfigError(f"{where}: unknown key {unknown[0]!r} "
                                 f"(known: {', '.join(sorted(keys))})")


def _costs(table: Mapping[str, Any], where: str) -> PaperCosts:
    _only(table, {"commission", "maker_fee", "slippage", "spread", "latency_ms"}, where)
    slippage = table.get("slippage", "none")
    if not isinstance(slippage, str):
        raise RuntimeConfigError(f"{where}: slippage must be a string like 'bps:5'")
    from workers.backtest.simulator import SimulatorError, Slippage

    try:
        Slippage.parse(slippage)  # the paper broker's own rule
    except SimulatorError as exc:
        raise RuntimeConfigError(f"{where}: {exc}") from None
    latency = table.get("latency_ms", 0)
    if isinstance(latency, bool) or not isinstance(latency, int) or not 0 <= latency <= 60_000:
        raise RuntimeConfigError(f"{where}: latency_ms must be an integer 0..60000")
    maker = table.get("maker_fee")
    return PaperCosts(
        commission=_dec(table.get("commission", "0.001"), f"{where}: commission", Decimal(0),
                        Decimal("0.1")),
        maker_fee=None if maker is None else _dec(maker, f"{where}: maker_fee (no rebates)",
                                                  Decimal(0), Decimal("0.1")),
        slippage=slippage, spread=_dec(table.get("spread", 0), f"{where}: spread", Decimal(0),
                                       Decimal("0.1")),
        latency_ms=latency)


def _ccxt_exchange(exchange: str, where: str) -> None:
    """A ccxt exchange id (an unknown one passed, and its worker died on it in a loop)."""
    import ccxt  # (only for a configuration that names one: the worker imports it anyway)

    if exchange not in ccxt.exchanges:
        raise RuntimeConfigError(f"{where}: {exchange!r} is not an exchange ccxt knows "
                                 "(e.g. binance, bybit, okx, coinbase, kraken)")


ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _currency(text: str, where: str) -> str:
    if not re.fullmatch(r"[A-Z0-9]{2,12}", text.upper()):
        raise RuntimeConfigError(f"{where}: currency {text!r} must be 2-12 letters or digits "
                                 "(e.g. USD, USDT)")
    return text.upper()


def _account(table: Mapping[str, Any], n: int) -> AccountConfig:
    where = f"[[accounts]] #{n}"
    name = _str(table, "name", where)
    if not ACCOUNT_NAME.fullmatch(name):  # (as the database checks it, before anything runs)
        raise RuntimeConfigError(f"{where}: name {name!r} must be 1-64 letters, digits and "
                                 "_ . -, starting with a letter or digit")
    where = f"[[accounts]] #{n} ({name})"
    _only(table, {"name", "environment", "mode", "cash", "currency", "broker", "exchange",
                  "endpoint", "credential", "allow_short", "freeze_on_mismatch", "paper"}, where)
    environment = _str(table, "environment", where, "paper", ENVIRONMENTS)
    broker = _str(table, "broker", where, "paper", BROKERS)
    default_endpoint = "live" if environment == "live" else (
        "paper" if broker == "paper" else "testnet")
    endpoint = _str(table, "endpoint", where, default_endpoint, ENDPOINTS)
    if environment == "live" and endpoint != "live":
        raise RuntimeConfigError(f"{where}: a live account sends orders to a live endpoint, "
                                 f"not {endpoint!r}")
    if environment != "live" and endpoint == "live":
        raise RuntimeConfigError(
            f"{where}: a {environment} account must not send orders to a live endpoint "
            "(use endpoint = 'testnet' or 'paper', or make it a live account)")
    if broker == "paper" and environment == "live":
        raise RuntimeConfigError(f"{where}: a live account needs a real broker, not 'paper'")
    exchange = _opt_str(table, "exchange", where)
    if broker == "ccxt" and exchange is None:
        raise RuntimeConfigError(f"{where}: broker 'ccxt' needs exchange = '<ccxt id>'")
    if broker == "ccxt" and exchange is not None:
        _ccxt_exchange(exchange, f"{where}: exchange")
    credential = _opt_str(table, "credential", where)
    if broker != "paper" and credential is None:
        raise RuntimeConfigError(f"{where}: broker {broker!r} needs credential = '<label>' "
                                 "(stored with `mmats creds set`)")
    paper = table.get("paper", {})
    if not isinstance(paper, dict):
        raise RuntimeConfigError(f"{where}: paper must be a table")
    return AccountConfig(
        name=name, environment=environment,
        mode=_str(table, "mode", where, "advisory", ("advisory", "operator")),
        cash=_dec(table.get("cash", 10000), f"{where}: cash", Decimal(0)),
        currency=_currency(_str(table, "currency", where, "USD"), where),
        broker=broker, exchange=exchange, endpoint=endpoint, credential=credential,
        allow_short=_bool(table, "allow_short", where),
        freeze_on_mismatch=_bool(table, "freeze_on_mismatch", where),
        costs=_costs(paper, f"{where} paper"))


def _strategy(table: Mapping[str, Any], n: int, accounts: set[str]) -> StrategyConfig:
    where = f"[[strategies]] #{n}"
    _only(table, {"account", "name", "symbols", "timeframe", "params", "allocation",
                  "sizing_method", "sizing_params"}, where)
    name = _str(table, "name", where)
    account = _str(table, "account", where)
    where = f"[[strategies]] #{n} ({name} on {account})"
    if account not in accounts:
        raise RuntimeConfigError(f"{where}: account {account!r} has no [[accounts]] entry")
    params = table.get("params", {})
    sizing_params = table.get("sizing_params", {})
    if not isinstance(params, dict) or not isinstance(sizing_params, dict):
        raise RuntimeConfigError(f"{where}: params and sizing_params must be tables")
    symbols = []
    for s in _strings(table, "symbols", where):
        symbol, at, venue = s.partition("@")
        if not symbol or (at and not venue) or "@" in venue:
            raise RuntimeConfigError(f"{where}: symbol {s!r} must be SYMBOL or SYMBOL@VENUE")
        symbols.append(symbol.upper() + at + venue)
    return StrategyConfig(
        account=account, name=name, symbols=tuple(symbols),
        timeframe=_str(table, "timeframe", where, "1m", TIMEFRAMES), params=params,
        allocation=_dec(table.get("allocation", 1), f"{where}: allocation", Decimal(0),
                        Decimal(1)),
        sizing_method=_str(table, "sizing_method", where, "percent_equity"),
        sizing_params=sizing_params)


def _feed(table: Mapping[str, Any], n: int) -> FeedConfig:
    where = f"[[feeds]] #{n}"
    _only(table, {"market", "venue", "symbols", "timeframes", "endpoint", "credential",
                  "credential_account", "history_bars"}, where)
    timeframes = _strings(table, "timeframes", where)
    bad = [t for t in timeframes if t not in TIMEFRAMES]
    if bad:
        raise RuntimeConfigError(f"{where}: timeframe {bad[0]!r} is not one of "
                                 f"{', '.join(TIMEFRAMES)}")
    venue = _str(table, "venue", where)
    kind, colon, exchange = venue.partition(":")
    if not ((kind == "ccxt" and colon and exchange) or venue in ("alpaca", "oanda")):
        raise RuntimeConfigError(f"{where}: venue {venue!r} is not ccxt:<exchange id>, alpaca "
                                 "or oanda")
    if kind == "ccxt":
        _ccxt_exchange(exchange, f"{where}: venue")
    credential = _opt_str(table, "credential", where)
    cred_account = _opt_str(table, "credential_account", where)
    # a feed reading with stored keys reads from their endpoint unless told otherwise
    # (never a practice token sent to a live endpoint); the check that a live endpoint
    # gets live keys of a live account is made when the feed opens (the keys are stored)
    endpoint = (_str(table, "endpoint", where, None, ENDPOINTS) if "endpoint" in table
                else None if credential is not None else "live")
    return FeedConfig(market=_str(table, "market", where, None, ("crypto", "stock", "forex")),
                      venue=venue, symbols=_strings(table, "symbols", where),
                      timeframes=timeframes, endpoint=endpoint,
                      credential=credential, credential_account=cred_account,
                      history_bars=_count(table.get("history_bars", 500),
                                          f"{where} history_bars", 100_000))


def _count(value: object, where: str, most: int, least: int = 0) -> int:
    number = _dec(value, where, Decimal(least), Decimal(most))
    if number != number.to_integral_value():
        raise RuntimeConfigError(f"{where} must be a whole number, got {value!r}")
    return int(number)


def _router(table: Mapping[str, Any]) -> RouterConfig:
    where = "[router]"
    _only(table, {"visibility_seconds", "poll_ms", "batch", "status_poll_seconds",
                  "max_retries"}, where)
    return RouterConfig(
        visibility_seconds=_count(table.get("visibility_seconds", 30),
                                  f"{where} visibility_seconds", 86400, 1),
        poll_ms=_count(table.get("poll_ms", 50), f"{where} poll_ms", 60000, 1),
        batch=_count(table.get("batch", 50), f"{where} batch", 1000, 1),
        status_poll_seconds=float(_dec(table.get("status_poll_seconds", 2),
                                       f"{where} status_poll_seconds", Decimal("0.01"))),
        max_retries=_count(table.get("max_retries", 8), f"{where} max_retries", 100, 1))


def parse(raw: Mapping[str, Any], source: Path | None = None) -> RuntimeConfig:
    """The runtime configuration from a parsed TOML document."""
    # ([database] is the CLI's, read by db.config: one mmats.toml may hold both)
    unknown = [k for k in raw if k not in TABLES and k != "database"]
    if unknown:
        raise RuntimeConfigError(f"unknown table or key {unknown[0]!r} at the top level "
                                 f"(known: {', '.join((*TABLES, 'database'))})")
    accounts_raw = raw.get("accounts", [])
    strategies_raw = raw.get("strategies", [])
    feeds_raw = raw.get("feeds", [])
    for key, value in (("accounts", accounts_raw), ("strategies", strategies_raw),
                       ("feeds", feeds_raw)):
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise RuntimeConfigError(f"[[{key}]] must be an array of tables")
    accounts = tuple(_account(t, n) for n, t in enumerate(accounts_raw, 1))
    names = [a.name for a in accounts]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise RuntimeConfigError(f"[[accounts]]: the name {duplicate!r} appears twice")
    strategies = tuple(_strategy(t, n, set(names)) for n, t in enumerate(strategies_raw, 1))
    seen: dict[tuple[str, str, str], int] = {}
    for n, st in enumerate(strategies, 1):
        entry = (st.account, st.name, st.timeframe)
        if entry in seen:
            raise RuntimeConfigError(
                f"[[strategies]] #{n} ({st.name} on {st.account}): entry #{seen[entry]} "
                f"already runs {st.name} {st.timeframe} on {st.account}; give one entry all "
                "its symbols")
        seen[entry] = n
    feeds = tuple(_feed(t, n) for n, t in enumerate(feeds_raw, 1))
    section = raw.get("runtime", {})
    router = raw.get("router", {})
    notifications = raw.get("notifications", {})
    if not all(isinstance(t, dict) for t in (section, router, notifications)):
        raise RuntimeConfigError("[runtime], [router] and [notifications] must be tables")
    _only(section, {"strategy_dirs", "heartbeat_seconds", "bar_grace_seconds",
                    "strategy_timeout_seconds", "log_file"},
          "[runtime]")
    dirs = section.get("strategy_dirs", [])
    if not isinstance(dirs, list) or not all(isinstance(d, str) and "\x00" not in d
                                             for d in dirs):
        raise RuntimeConfigError("[runtime] strategy_dirs must be a list of folder paths "
                                 "(without NUL characters)")
    base = source.parent if source is not None else Path.cwd()
    log_file = None
    if "log_file" in section:
        log_file = base / _str(section, "log_file", "[runtime]")
        if not log_file.parent.is_dir():
            raise RuntimeConfigError(f"[runtime] log_file {str(log_file)!r}: its folder "
                                     "does not exist")
        if log_file.is_dir():
            raise RuntimeConfigError(f"[runtime] log_file {str(log_file)!r} is a folder")
        if not os.access(log_file if log_file.exists() else log_file.parent, os.W_OK):
            raise RuntimeConfigError(f"[runtime] log_file {str(log_file)!r} is not writable")
    replay = None
    if "replay" in raw:
        from workers.runtime.replay import ReplayError, ReplaySession

        if not isinstance(raw["replay"], dict):
            raise RuntimeConfigError("[replay] must be a table")
        try:
            replay = ReplaySession.from_table(raw["replay"])
        except ReplayError as exc:
            raise RuntimeConfigError(str(exc)) from None
    return RuntimeConfig(
        accounts=accounts, strategies=strategies, feeds=feeds, router=_router(router),
        notifications=notifications,
        strategy_dirs=tuple((base / d).resolve() for d in dirs),
        heartbeat_seconds=float(_dec(section.get("heartbeat_seconds", 5),
                                     "[runtime] heartbeat_seconds", Decimal("0.1"))),
        bar_grace_seconds=float(_dec(section.get("bar_grace_seconds", 3),
                                     "[runtime] bar_grace_seconds", Decimal(0),
                                     Decimal(3600))),
        strategy_timeout_seconds=float(_dec(section.get("strategy_timeout_seconds", 10),
                                            "[runtime] strategy_timeout_seconds",
                                            Decimal("0.01"), Decimal(3600))),
        log_file=str(log_file.resolve()) if log_file is not None else None,
        source=source, replay=replay)


def load(path: str | Path) -> RuntimeConfig:
    p = Path(path)
    if p.is_dir():
        raise RuntimeConfigError(f"{p}: a folder, not a configuration file")
    if not p.is_file():
        raise RuntimeConfigError(f"{p}: no such configuration file")
    try:
        raw = loads_toml(p.read_bytes().decode("utf-8"))
        # (TOML dates and times are no JSON: strategy and sizing parameters are stored as it)
        json_values(raw, "config", nul=False)
    except ValueError as exc:
        if isinstance(exc, UnicodeDecodeError):
            raise RuntimeConfigError(f"{p}: not UTF-8 text (byte {exc.start}): a TOML file is "
                                     "UTF-8") from None
        raise RuntimeConfigError(f"{p}: {str(exc).replace('not valid TOML', 'invalid TOML')}"
                                 ) from None
    except OSError as exc:
        raise RuntimeConfigError(f"{p}: cannot be read: {exc.strerror or exc}") from None
    try:
        return parse(raw, p.resolve())
    except RuntimeConfigError as exc:
        raise RuntimeConfigError(f"{p}: {exc}") from None
