"""mmats.toml for the runtime: the example parses, and every mistake is one line that
names the entry and the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from workers.runtime import config as rc
from workers.runtime.supervisor import kinds_for

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "mmats.example.toml"


def test_the_example_configuration_parses_and_needs_every_worker():
    cfg = rc.load(EXAMPLE)
    assert [a.name for a in cfg.accounts] == ["binance-adv", "paper-1"]
    adv = cfg.account("binance-adv")
    assert (adv.environment, adv.mode, adv.broker, adv.endpoint) == ("live", "advisory", "ccxt",
                                                                     "live")
    assert cfg.account("paper-1").costs.slippage == "bps:2"
    assert cfg.strategies[0].symbols == ("BTC/USDT@binance", "ETH/USDT@binance")
    assert kinds_for(cfg) == ["ingest", "strategies", "router", "reconciler", "notifier"]
    # a new series starts with history to warm up on (a strategy's slow average)
    assert [f.history_bars for f in cfg.feeds] == [500]
    assert _parse(FEED + "history_bars = 0").feeds[0].history_bars == 0


def _parse(text: str) -> rc.RuntimeConfig:
    return rc.parse(tomllib.loads(text))


ACC = '[[accounts]]\nname = "a"\n'
FEED = ('[[feeds]]\nmarket = "crypto"\nvenue = "ccxt:binance"\nsymbols = ["X"]\n'
        'timeframes = ["1m"]\n')


@pytest.mark.parametrize(("text", "message"), [
    (ACC + 'environment = "live"\nbroker = "ccxt"\nexchange = "binance"\nendpoint = "testnet"\n'
     'credential = "k"', r"#1 \(a\): a live account sends orders to a live endpoint"),
    (ACC + 'environment = "paper"\nbroker = "alpaca"\nendpoint = "live"\ncredential = "k"',
     r"#1 \(a\): a paper account must not send orders to a live endpoint"),
    (ACC + 'broker = "ccxt"\ncredential = "k"', r"broker 'ccxt' needs exchange"),
    (ACC + 'broker = "oanda"', r"broker 'oanda' needs credential"),
    (ACC + 'environment = "live"', r"a live account needs a real broker"),
    (ACC + 'cash = "NaN"', r"cash must be a finite number"),
    (ACC + 'colour = "red"', r"#1 \(a\): unknown key 'colour'"),
    (ACC + ACC, r"the name 'a' appears twice"),
    (ACC + '[accounts.paper]\ncommission = 0.5', r"commission must be <= 0.1"),
    (ACC + '[accounts.paper]\nmaker_fee = -0.0001',
     r"#1 \(a\) paper: maker_fee \(no rebates\) must be >= 0, got -0.0001"),
    (ACC + '[[strategies]]\naccount = "a"\nname = "s"\nsymbols = ["X"]\ntimeframe = "2m"',
     r"timeframe '2m' is not one of 1m"),
    (ACC + '[[strategies]]\naccount = "zz"\nname = "s"\nsymbols = ["X"]',
     r"account 'zz' has no \[\[accounts\]\] entry"),
    (ACC + '[[strategies]]\naccount = "a"\nname = "s"\nsymbols = ["X"]\n'
     '[[strategies]]\naccount = "a"\nname = "s"\nsymbols = ["Y"]',
     r"entry #1 already runs s 1m on a"),
    ('[[feeds]]\nmarket = "crypto"\nvenue = "ccxt:binance"\nsymbols = []\ntimeframes = ["1m"]',
     r"symbols must be a non-empty list"),
    (FEED + 'history_bars = 1.5', r"\[\[feeds\]\] #1 history_bars must be a whole number"),
    (FEED + 'history_bars = -1', r"\[\[feeds\]\] #1 history_bars must be >= 0"),
    ('[router]\nvisibility_seconds = 0', r"visibility_seconds must be >= 1"),
    ('[runtime]\nbar_grace_seconds = -1', r"\[runtime\] bar_grace_seconds must be >= 0"),
    ('[runtime]\nbar_grace_seconds = "soon"', r"bar_grace_seconds must be a number"),
])
def test_mistakes_are_refused_with_one_line_naming_the_entry(text, message):
    with pytest.raises(rc.RuntimeConfigError, match=message) as info:
        _parse(text)
    assert "\n" not in str(info.value)


def test_hostile_strings_stay_data(tmp_path):
    name = "a'; DROP TABLE trading.orders; --"
    with pytest.raises(rc.RuntimeConfigError) as info:
        _parse(f'{ACC}[[strategies]]\naccount = "{name}"\nname = "s"\nsymbols = ["X"]')
    assert repr(name) in str(info.value)
    bad = tmp_path / "bad.toml"
    bad.write_text("[[accounts]\nname=", encoding="utf-8")
    with pytest.raises(rc.RuntimeConfigError, match=r"bad.toml: invalid TOML"):
        rc.load(bad)
    with pytest.raises(rc.RuntimeConfigError, match=r"no such configuration file"):
        rc.load(tmp_path / "missing.toml")


def test_bar_grace_defaults_to_three_seconds_and_is_passed_to_the_strategy_worker():
    from workers.runtime.supervisor import build_worker

    assert _parse(ACC).bar_grace_seconds == 3.0
    cfg = _parse('[runtime]\nbar_grace_seconds = 0.5\n' + ACC + '[[strategies]]\naccount = "a"\n'
                 'name = "s"\nsymbols = ["X"]')
    assert cfg.bar_grace_seconds == 0.5
    worker = build_worker("strategies", cfg, "postgresql://unused")  # (connects at start)
    assert worker.bar_grace_seconds == 0.5  # type: ignore[attr-defined]
