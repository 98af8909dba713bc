"""The strategy interface, its data types, indicators and example strategies.

Pure Python: nothing here imports the database, brokers or workers, so the same strategy
file runs unchanged in backtest, paper and live. A user strategy needs only:

    from strategies import IStrategy, ParamSpec, StrategyContext
"""

from strategies.base import IStrategy, SignalOutput
from strategies.events import NewsSentiment, OrderFilled, OrderRejected
from strategies.market import (
    AccountState,
    Bar,
    Environment,
    MarketData,
    PositionState,
    StrategyContext,
)
from strategies.params import ParamError, ParamSpec
from strategies.signal import Action, SignalError, TradeSignal

__all__ = [
    "AccountState",
    "Action",
    "Bar",
    "Environment",
    "IStrategy",
    "MarketData",
    "NewsSentiment",
    "OrderFilled",
    "OrderRejected",
    "ParamError",
    "ParamSpec",
    "PositionState",
    "SignalError",
    "SignalOutput",
    "StrategyContext",
    "TradeSignal",
]
