"""Backtest engine: runs strategies over stored bars and reports the results."""
