"""Market data feeds: history backfill and live polling from ccxt, Alpaca and OANDA."""
