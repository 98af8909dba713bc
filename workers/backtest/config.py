"""What a backtest run is asked to do, validated before anything is written."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from db.numbers import MAX_NUMBER, parse_number
from db.structured import json_values, loads_json, loads_toml
from workers.backtest.simulator import Costs, SimulatorError, Slippage

TIMEFRAMES = ("1m", "5m", "15m", "1h", "4h", "1d", "1w")


class BacktestError(ValueError):
    """A backtest that cannot run as asked; str() is one line saying what and where."""


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One risk limit for the run's account (`--limits FILE`), as risk.set_limit takes it."""

    limit_type: str
    value: Decimal
    scope: str = "global"
    key: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    where: str = "a limit"  # where it was given, for a refusal: "--limits FILE: limit N"


@dataclass(frozen=True)
class BacktestConfig:
    strategy: str
    symbols: tuple[str, ...]
    timeframe: str
    start: datetime
    end: datetime
    params: Mapping[str, object] = field(default_factory=dict)
    cash: Decimal = Decimal(10000)
    currency: str | None = None  # default: the quote currency of the symbols
    commission: Decimal = Decimal(0)  # taker fee, a fraction per side
    maker_fee: Decimal | None = None  # default: the commission
    slippage: Slippage = field(default_factory=Slippage)
    spread: Mapping[str, Decimal] = field(default_factory=dict)  # symbol ("*" = any) -> fraction
    allow_short: bool = False
    limits: tuple[LimitSpec, ...] = ()
    strategy_dirs: tuple[Path, ...] = ()
    seed: int = 0
    label: str | None = None
    walk_forward_id: int | None = None
    warmup: bool = True  # feed the bars before `start` to the indicators
    equity_points: int = 100_000  # at most this many points of the curve are stored

    def __post_init__(self) -> None:
        if not self.symbols:
            raise BacktestError("a backtest needs at least one --symbol")
        if len(set(s.upper() for s in self.symbols)) != len(self.symbols):
            raise BacktestError(f"--symbol given twice: {', '.join(self.symbols)}")
        if self.timeframe not in TIMEFRAMES:
            raise BacktestError(
                f"--timeframe {self.timeframe!r}: expected one of {', '.join(TIMEFRAMES)}")
        for name in ("start", "end"):
            ts = getattr(self, name)
            if ts.tzinfo is None or ts.utcoffset() is None:
                raise BacktestError(f"{name} must be timezone-aware (UTC), got {ts}")
        if self.end <= self.start:
            raise BacktestError(
                f"--to {self.end.isoformat()} must be after --from {self.start.isoformat()}")
        if not self.cash.is_finite() or self.cash <= 0:
            shown = str(self.cash) if len(str(self.cash)) <= 40 else _shortened(str(self.cash))
            raise BacktestError(f"--cash must be a number > 0, got {shown}")
        if self.cash >= MAX_NUMBER:
            raise BacktestError(f"--cash {_shortened(str(self.cash))} is out of range: it must "
                                "be less than 10^18")
        if self.equity_points < 2:
            raise BacktestError("equity_points must be at least 2")
        for key in self.spread:
            if key != "*" and not any(_names(key, s) for s in self.symbols):
                raise BacktestError(f"--spread names {key}, which is not a symbol of the run "
                                    f"({', '.join(self.symbols)})")
        try:
            self.costs_for("*")
            for key in self.spread:
                name, _, venue = key.partition("@")
                self.costs_for(name, venue or None)
        except SimulatorError as exc:
            if exc.field is None:
                raise BacktestError(str(exc)) from None
            # the simulator names its fields; the user gave options
            flag = {"taker_fee": "--commission", "maker_fee": "--maker-fee",
                    "spread": "--spread"}[exc.field]
            raise BacktestError(f"{flag} {exc.detail}") from None

    def spread_for(self, symbol: str, venue: str | None = None) -> Decimal:
        """The spread of `symbol` (on `venue`): given for SYMBOL@venue, else for SYMBOL,
        else for every symbol ("*")."""
        for key in ((f"{symbol}@{venue}".upper(),) if venue else ()) + (symbol.upper(), "*"):
            if key in self.spread:
                return self.spread[key]
        return Decimal(0)

    def costs_for(self, symbol: str, venue: str | None = None) -> Costs:
        maker = self.commission if self.maker_fee is None else self.maker_fee
        return Costs(taker_fee=self.commission, maker_fee=maker, slippage=self.slippage,
                     spread=self.spread_for(symbol, venue))

    def settings(self) -> dict[str, Any]:
        """Every assumption, as stored with the run."""
        return {
            "taker_fee": str(self.commission),
            "maker_fee": str(self.commission if self.maker_fee is None else self.maker_fee),
            "slippage": str(self.slippage),
            "spread": {k: str(v) for k, v in sorted(self.spread.items())},
            "allow_short": self.allow_short,
            "seed": self.seed,
            "warmup": self.warmup,
            "limits": [
                {"type": lim.limit_type, "value": str(lim.value), "scope": lim.scope,
                 "key": lim.key, "params": dict(lim.params)} for lim in self.limits],
        }


def symbol_ref(text: str) -> str:
    """`btc/usdt@crypto` -> `BTC/USDT@crypto`: symbols are upper case, venues lower case."""
    name, sep, venue = text.strip().partition("@")
    return name.upper() + (sep + venue.lower() if sep else "")


def parse_time(text: str, what: str) -> datetime:
    """A date or ISO-8601 time; without an offset it is UTC."""
    try:
        ts = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BacktestError(
            f"{what} {text!r} is not a date or time (use YYYY-MM-DD or ISO-8601)") from None
    try:
        return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    except OverflowError:  # (0001-01-01T00:00+01:00 is before the year 1 in UTC)
        raise BacktestError(f"{what} {text!r} is out of range in UTC") from None


def _shortened(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def parse_decimal(text: str, what: str) -> Decimal:
    """A number of the run's settings (`db.numbers.parse_number`'s bounds)."""
    return parse_number(text, what, BacktestError)


def parse_params(text: str | None) -> dict[str, object]:
    """`fast=10,slow=30,allow_short=true` -> typed values (int, float, bool or str)."""
    out: dict[str, object] = {}
    if not text:
        return out
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, raw = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise BacktestError(f"--params {part.strip()!r}: expected name=value")
        if name in out:
            raise BacktestError(f"--params: {name} given twice")
        out[name] = _scalar(raw.strip())
    return out


def _scalar(raw: str) -> object:
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _names(key: str, symbol: str) -> bool:
    """Whether a --spread key (SYMBOL or SYMBOL@venue, upper case) names a --symbol."""
    k_name, _, k_venue = key.upper().partition("@")
    s_name, _, s_venue = symbol.strip().upper().partition("@")
    return k_name == s_name and (not k_venue or not s_venue or k_venue == s_venue)


def parse_spread(text: str | None) -> dict[str, Decimal]:
    """`0.0002` (every symbol) or `BTC/USDT=0.0002,EUR/USD=0.00005`."""
    if not text:
        return {}
    if "=" not in text:
        return {"*": parse_decimal(text, "--spread")}
    out: dict[str, Decimal] = {}
    for part in text.split(","):
        symbol, sep, raw = part.partition("=")
        if not sep or not symbol.strip():
            raise BacktestError(f"--spread {part.strip()!r}: expected SYMBOL=fraction")
        out[symbol.strip().upper()] = parse_decimal(raw, f"--spread for {symbol.strip()}")
    return out


def load_limits(path: str | Path) -> tuple[LimitSpec, ...]:
    """Risk limits for the run's account from TOML (`[[limit]]` tables) or JSON (a list):
    each with `type`, `value` and optionally `scope`, `key`, `params`."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as exc:
        raise BacktestError(f"--limits {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise BacktestError(f"--limits {p}: not UTF-8 text (byte "
                            f"{exc.object[exc.start:exc.start + 1]!r} at offset {exc.start})"
                            ) from None
    try:
        if p.suffix.lower() == ".json":
            items = loads_json(text)
        else:
            document = loads_toml(text)
            json_values(document, "limits")
            unknown = set(document) - {"limit"}
            if unknown:  # ([[limits]] for [[limit]]: a run without its limits)
                raise ValueError(f"unknown table(s) {', '.join(sorted(unknown))}: the limits are "
                                 "[[limit]] tables")
            items = document.get("limit", [])
    except ValueError as exc:
        raise BacktestError(f"--limits {p}: {exc}") from None
    if not isinstance(items, list):
        raise BacktestError(f"--limits {p}: expected a list of limits ([[limit]] tables in TOML)")
    limits = tuple(_limit(item, p, n) for n, item in enumerate(items, 1))
    seen: dict[tuple[str, str, str | None], str] = {}
    for spec in limits:  # (the last of two silently won: 0.5, then 0.2, kept 0.2)
        ident = (spec.limit_type, spec.scope.lower(),
                 None if spec.key is None else spec.key.upper())
        if ident in seen:
            raise BacktestError(f"{spec.where}: the same limit as {seen[ident].rsplit(': ', 1)[1]}"
                                f" ({spec.limit_type}, {spec.scope}"
                                + (f" {spec.key}" if spec.key else "") + "): give it once")
        seen[ident] = spec.where
    return limits


def _limit(item: object, path: Path, n: int) -> LimitSpec:
    where = f"--limits {path}: limit {n}"
    if not isinstance(item, dict):
        raise BacktestError(f"{where}: expected a table with type and value")
    unknown = set(item) - {"type", "value", "scope", "key", "params"}
    if unknown:
        raise BacktestError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    if not isinstance(item.get("type"), str) or "value" not in item:
        raise BacktestError(f"{where}: needs a type (e.g. MAX_POSITION_SIZE) and a value")
    params = item.get("params", {})
    if not isinstance(params, dict):
        raise BacktestError(f"{where}: params must be a table")
    key = item.get("key")
    if key is not None and not isinstance(key, str | int):  # (["a"] became the symbol ['A'])
        raise BacktestError(f"{where}: key must be text (a market, strategy or symbol)")
    if not isinstance(item.get("scope", "global"), str):
        raise BacktestError(f"{where}: scope must be text (global, market, strategy or symbol)")
    return LimitSpec(
        limit_type=item["type"].upper(),
        value=parse_decimal(str(item["value"]), f"{where} value"),
        scope=str(item.get("scope", "global")),
        key=None if key is None else str(key),
        params=params,
        where=where,
    )
