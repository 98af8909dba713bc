"""Indicators by name (`SMA_20`, `MACD_12_26_9`, `BBANDS_20_2`, ...), computed by TA-Lib.

Each indicator is computed once over a whole series (vectorised, in C); a strategy then
reads the value at the current bar only. Every function here is causal: the value at index
i depends on inputs at indices <= i, so computing on a prefix gives the same values
(tests/test_strategies_indicators.py checks this as a property).

Outputs are keyed by the canonical name, and `name.output` for multi-output indicators:
`MACD_12_26_9.macd|.signal|.hist`, `BBANDS_20_2.upper|.middle|.lower`,
`DONCHIAN_20.upper|.middle|.lower`.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import talib

from strategies.market import FloatArray


class IndicatorError(ValueError):
    """An indicator name that cannot be computed; the message is one line."""


@dataclass(frozen=True, slots=True)
class _Param:
    label: str
    minimum: float
    integer: bool = True


Compute = Callable[[Mapping[str, FloatArray], tuple[float, ...]], tuple[FloatArray, ...]]


@dataclass(frozen=True, slots=True)
class _Kind:
    params: tuple[_Param, ...]
    outputs: tuple[str, ...]
    compute: Compute
    example: str
    lookback: Callable[[tuple[float, ...]], int] = lambda p: int(p[0]) - 1
    # bars after the first value until a recursive smoothing has forgotten its seed
    settle: Callable[[tuple[float, ...]], int] = lambda p: 0


# what is left of the seed (the first value, an average of the first bars) in a recursive
# indicator once it has settled: its weight (1 - alpha)^k after k more bars
_SEED_WEIGHT = 1e-3


def _settling(alpha: float) -> int:
    """Bars for an exponential smoothing of factor `alpha` to weigh its seed <= _SEED_WEIGHT
    (TA-Lib seeds EMA, RSI and ATR with a simple average: values computed from a start
    only a lookback before differ from those of a long history, as a live worker has)."""
    if alpha >= 1.0:
        return 0
    return math.ceil(math.log(_SEED_WEIGHT) / math.log1p(-alpha))


def _period(label: str = "period", minimum: int = 2) -> _Param:
    return _Param(label, minimum)


def _donchian(d: Mapping[str, FloatArray], p: tuple[float, ...]) -> tuple[FloatArray, ...]:
    upper = talib.MAX(d["high"], int(p[0]))
    lower = talib.MIN(d["low"], int(p[0]))
    return upper, (upper + lower) / 2.0, lower


_KINDS: dict[str, _Kind] = {
    "SMA": _Kind(
        (_period(minimum=1),), ("",), lambda d, p: (talib.SMA(d["close"], int(p[0])),), "SMA_20"
    ),
    "EMA": _Kind(
        (_period(minimum=1),),
        ("",),
        lambda d, p: (talib.EMA(d["close"], int(p[0])),),
        "EMA_50",
        settle=lambda p: _settling(2.0 / (int(p[0]) + 1)),
    ),
    "RSI": _Kind(
        (_period(),),
        ("",),
        lambda d, p: (talib.RSI(d["close"], int(p[0])),),
        "RSI_14",
        lambda p: int(p[0]),
        lambda p: _settling(1.0 / int(p[0])),  # Wilder's smoothing
    ),
    "ROC": _Kind(
        (_period(minimum=1),),
        ("",),
        lambda d, p: (talib.ROC(d["close"], int(p[0])),),
        "ROC_10",
        lambda p: int(p[0]),
    ),
    "ATR": _Kind(
        (_period(minimum=1),),
        ("",),
        lambda d, p: (talib.ATR(d["high"], d["low"], d["close"], int(p[0])),),
        "ATR_14",
        lambda p: int(p[0]),
        lambda p: _settling(1.0 / int(p[0])),  # Wilder's smoothing
    ),
    "MACD": _Kind(
        (_period("fast"), _period("slow"), _period("signal", 1)),
        ("macd", "signal", "hist"),
        lambda d, p: tuple(talib.MACD(d["close"], int(p[0]), int(p[1]), int(p[2]))),
        "MACD_12_26_9",
        lambda p: int(p[1]) + int(p[2]) - 2,
        # the slow EMA settles, then the signal line (an EMA of the MACD line)
        lambda p: _settling(2.0 / (int(p[1]) + 1)) + _settling(2.0 / (int(p[2]) + 1)),
    ),
    "BBANDS": _Kind(
        (_period(), _Param("deviations", 0.0, integer=False)),
        ("upper", "middle", "lower"),
        lambda d, p: tuple(talib.BBANDS(d["close"], int(p[0]), p[1], p[1], talib.MA_Type.SMA)),
        "BBANDS_20_2",
    ),
    "DONCHIAN": _Kind((_period(),), ("upper", "middle", "lower"), _donchian, "DONCHIAN_20"),
}
KNOWN: tuple[str, ...] = tuple(sorted(_KINDS))
MAX_PERIOD = 100_000
# a parameter as written in a name: digits (a sign only for the range check to refuse it),
# a decimal one with an optional fraction; no exponent, "+", blanks or "_" as float() takes
_WHOLE = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_INPUTS = ("high", "low", "close")


@dataclass(frozen=True, slots=True)
class Indicator:
    kind: str
    params: tuple[float, ...]

    @property
    def name(self) -> str:
        return _names(self.kind, self.params)[0]

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys of this indicator's outputs in MarketData."""
        return _names(self.kind, self.params)[1]

    @property
    def lookback(self) -> int:
        """How many bars come before the first defined value (its index)."""
        return _KINDS[self.kind].lookback(self.params)

    @property
    def warmup(self) -> int:
        """How many bars come before the first value that does not depend on where the
        series starts: the lookback, plus for a recursive smoothing (EMA, RSI, ATR, MACD)
        the bars until its seed weighs no more than _SEED_WEIGHT."""
        spec = _KINDS[self.kind]
        return spec.lookback(self.params) + spec.settle(self.params)

    def compute(self, ohlcv: Mapping[str, FloatArray]) -> dict[str, FloatArray]:
        values = _KINDS[self.kind].compute(ohlcv, self.params)
        return dict(zip(self.keys, values, strict=True))


@functools.lru_cache(maxsize=4096)
def _names(kind: str, params: tuple[float, ...]) -> tuple[str, tuple[str, ...]]:
    """An indicator's canonical name and its output keys (asked for at every bar)."""
    name = "_".join([kind, *(f"{p:g}" for p in params)])
    return name, tuple(name if not out else f"{name}.{out}" for out in _KINDS[kind].outputs)


def parse_indicator(name: str) -> Indicator:
    """`SMA_20` -> Indicator('SMA', (20,)); raises IndicatorError with a one-line reason."""
    if not isinstance(name, str) or not name.strip():
        raise IndicatorError(f"indicator name must be a non-empty string, got {name!r}")
    return _parse(name)


@functools.lru_cache(maxsize=4096)
def _parse(name: str) -> Indicator:
    # (an error is raised again on every call: lru_cache keeps only results)
    kind, *raw = name.strip().upper().split("_")
    spec = _KINDS.get(kind)
    if spec is None:
        raise IndicatorError(f"unknown indicator {name!r} (known: {', '.join(KNOWN)})")
    if len(raw) != len(spec.params):
        raise IndicatorError(
            f"{name}: {kind} takes {len(spec.params)} parameter(s) "
            f"({', '.join(p.label for p in spec.params)}), e.g. {spec.example}"
        )
    params = tuple(_parse_param(name, p, text) for p, text in zip(spec.params, raw, strict=True))
    if kind == "MACD" and params[0] >= params[1]:
        raise IndicatorError(f"{name}: the fast period must be below the slow period")
    return Indicator(kind, params)


def _parse_param(name: str, param: _Param, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise IndicatorError(f"{name}: {param.label} must be a number, got {text!r}") from None
    if param.integer and not _WHOLE.fullmatch(text):
        raise IndicatorError(
            f"{name}: {param.label} must be a whole number in digits (e.g. 20), got {text!r}"
        )
    if not param.integer and not _DECIMAL.fullmatch(text):
        raise IndicatorError(
            f"{name}: {param.label} must be a plain decimal number (e.g. 2 or 2.5), got {text!r}"
        )
    if not np.isfinite(value) or value < param.minimum or value > MAX_PERIOD:
        raise IndicatorError(
            f"{name}: {param.label} must be between {param.minimum:g} and {MAX_PERIOD}, got {text}"
        )
    return value


def compute_indicators(
    names: Iterable[str], ohlcv: Mapping[str, FloatArray]
) -> dict[str, FloatArray]:
    """Every output of every named indicator over the whole series (each computed once)."""
    columns = {k: np.ascontiguousarray(ohlcv[k], dtype=np.float64) for k in _INPUTS}
    out: dict[str, FloatArray] = {}
    for indicator in dict.fromkeys(parse_indicator(n) for n in names):
        if indicator.keys[0] not in out:
            out.update(indicator.compute(columns))
    return out
