"""Broker adapters behind one contract (`base.Broker`): paper, ccxt, Alpaca, OANDA."""
