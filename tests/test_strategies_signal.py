"""TradeSignal validation and JSON shape; ParamSpec; core data types (pure Python)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from strategies.market import AccountState, Bar, Environment, PositionState, StrategyContext
from strategies.params import ParamError, ParamSpec, resolve_params
from strategies.signal import SignalError, TradeSignal

TS = datetime(2024, 3, 1, 14, 30, tzinfo=UTC)


def make(**kw: object) -> TradeSignal:
    base: dict[str, object] = {
        "strategy": "sma_crossover",
        "version": "1.0.0",
        "symbol": "BTC/USDT",
        "action": "buy",
        "ts": TS,
    }
    base.update(kw)
    return TradeSignal(**base)  # type: ignore[arg-type]


def test_defaults_and_json_shape() -> None:
    s = make(
        venue="binance",
        stop_loss=Decimal("61000.5"),
        take_profit=Decimal("70000"),
        trailing_stop=Decimal("1500"),
        confidence=Decimal("0.8"),
        reasoning="cross",
        metadata={"breakeven": Decimal("64000"), "note": [1, 2]},
    )
    assert s.size == Decimal(1)
    payload = json.loads(s.to_json())
    assert payload == {
        "strategy": "sma_crossover",
        "version": "1.0.0",
        "symbol": "BTC/USDT",
        "venue": "binance",
        "action": "buy",
        "size": "1",
        "stop_loss": "61000.5",
        "take_profit": "70000",
        "trailing_stop": "1500",
        "confidence": "0.8",
        "reasoning": "cross",
        "ts": "2024-03-01T14:30:00+00:00",
        "metadata": {"breakeven": "64000", "note": [1, 2]},
    }
    assert "account" not in payload  # the runner adds it


def test_optional_fields_are_omitted_and_ts_is_normalised_to_utc() -> None:
    paris = timezone(timedelta(hours=1))
    s = make(action="close", ts=datetime(2024, 3, 1, 15, 30, tzinfo=paris))
    payload = s.to_dict()
    assert payload["ts"] == "2024-03-01T14:30:00+00:00"
    for key in ("venue", "stop_loss", "take_profit", "trailing_stop", "confidence", "price"):
        assert key not in payload


def test_numbers_are_coerced_to_decimal_exactly() -> None:
    s = make(size=0.1, stop_loss=99, take_profit="120.25")  # floats go through repr
    assert s.size == Decimal("0.1") and s.stop_loss == Decimal(99)
    assert s.take_profit == Decimal("120.25")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"action": "long"}, "signal.action must be buy, sell, close or hold, got 'long'"),
        ({"size": Decimal("1.5")}, "signal.size must be between 0 and 1, got 1.5"),
        ({"size": Decimal("-0.1")}, "signal.size must be between 0 and 1"),
        ({"confidence": Decimal(2)}, "signal.confidence must be between 0 and 1"),
        ({"stop_loss": Decimal(0)}, "signal.stop_loss must be greater than 0, got 0"),
        ({"trailing_stop": Decimal(-5)}, "signal.trailing_stop must be greater than 0"),
        ({"stop_loss": float("nan")}, "signal.stop_loss must be a finite number"),
        ({"size": True}, "signal.size must be a number, got bool"),
        ({"ts": datetime(2024, 3, 1)}, "signal.ts must be timezone-aware (UTC)"),
        ({"ts": "2024-03-01"}, "signal.ts must be a datetime"),
        ({"strategy": ""}, "signal.strategy must not be empty"),
        ({"symbol": "X" * 41}, "signal.symbol is longer than 40 characters"),
        ({"reasoning": "r" * 4001}, "signal.reasoning is longer than 4000 characters"),
        ({"venue": 3}, "signal.venue must be a string"),
        (
            {"stop_loss": Decimal(110), "take_profit": Decimal(100)},
            "a buy needs stop_loss < take_profit, got 110 >= 100",
        ),
        (
            {"action": "sell", "stop_loss": Decimal(90), "take_profit": Decimal(100)},
            "a sell needs stop_loss > take_profit",
        ),
        ({"metadata": {"breakeven": 0}}, "signal.metadata.breakeven must be greater than 0"),
        ({"metadata": {"x": object()}}, "signal.metadata must be JSON-serialisable"),
        ({"metadata": {"x": float("inf")}}, "signal.metadata must be JSON-serialisable"),
        ({"metadata": [1]}, "signal.metadata must be a mapping"),
    ],
)
def test_validation_messages_are_one_line(kw: dict[str, object], message: str) -> None:
    with pytest.raises(SignalError) as info:
        make(**kw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_signal_is_frozen_and_metadata_read_only() -> None:
    s = make(metadata={"a": 1})
    with pytest.raises(AttributeError):
        s.size = Decimal("0.5")  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.metadata["a"] = 2  # type: ignore[index]


def test_bar_requires_aware_time_and_consistent_prices() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        Bar(datetime(2024, 1, 1), Decimal(1), Decimal(1), Decimal(1), Decimal(1))
    with pytest.raises(ValueError, match="need low <= open, close <= high"):
        Bar(TS, Decimal(10), Decimal(9), Decimal(8), Decimal(9))


def test_account_position_defaults_to_flat() -> None:
    acc = AccountState(
        cash=Decimal(100),
        equity=Decimal(100),
        positions={"A": PositionState(Decimal(-2), Decimal(10))},
    )
    assert acc.position("A").is_short and acc.position("B").is_flat
    ctx = StrategyContext(Environment.PAPER, TS, {}, acc, {"x": 1})
    with pytest.raises(TypeError):
        ctx.params["x"] = 2  # type: ignore[index]
    assert Environment("live") is Environment.LIVE


def test_param_spec_validation_and_grid() -> None:
    specs = {
        "fast": ParamSpec(10, low=2, high=10, step=4, maximum=10),
        "k": ParamSpec(2.0, low=1.0, high=2.0, step=0.5),
        "short": ParamSpec(False, choices=(False, True)),
    }
    assert resolve_params(specs, {}) == {"fast": 10, "k": 2.0, "short": False}
    assert resolve_params(specs, {"k": 1})["k"] == 1.0
    assert specs["fast"].grid() == [2, 6, 10]
    assert specs["k"].grid() == [1.0, 1.5, 2.0]
    assert specs["short"].grid() == [False, True]
    with pytest.raises(ParamError, match="parameter fast must be <= 10, got 11"):
        resolve_params(specs, {"fast": 11})
    with pytest.raises(ParamError, match="parameter fast must be int, got '5'"):
        resolve_params(specs, {"fast": "5"})
    with pytest.raises(ParamError, match=r"unknown parameter\(s\) slow"):
        resolve_params(specs, {"slow": 5})
    with pytest.raises(ParamError, match="low 5 is above high 1"):
        ParamSpec(3, low=5, high=1)
