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
    assert kinds_for(cfg) == ["ingest", "strategies", "router", "reconciler"]
    # its notifications, uncommented (they need MMATS_TELEGRAM_TOKEN), add the notifier
    text = EXAMPLE.read_text().replace("\n# [", "\n[").replace("\n# events", "\nevents")
    for key in ("type", "chat_id", "token_env"):
        text = text.replace(f"\n# {key} ", f"\n{key} ")
    assert "[notifications]\nevents" in text
    assert kinds_for(rc.parse(tomllib.loads(text))) == [
        "ingest", "strategies", "router", "reconciler", "notifier"]
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
    with pytest.raises(rc.RuntimeConfigError, match=r": a folder, not a configuration file"):
        rc.load(tmp_path)


def test_bar_grace_defaults_to_three_seconds_and_is_passed_to_the_strategy_worker():
    from workers.runtime.supervisor import build_worker

    assert _parse(ACC).bar_grace_seconds == 3.0
    cfg = _parse('[runtime]\nbar_grace_seconds = 0.5\n' + ACC + '[[strategies]]\naccount = "a"\n'
                 'name = "s"\nsymbols = ["X"]')
    assert cfg.bar_grace_seconds == 0.5
    worker = build_worker("strategies", cfg, "postgresql://unused")  # (connects at start)
    assert worker.bar_grace_seconds == 0.5  # type: ignore[attr-defined]



def test_the_strategy_budget_defaults_to_ten_seconds_and_is_passed_to_the_worker():
    from workers.runtime.supervisor import build_worker

    assert _parse(ACC).strategy_timeout_seconds == 10.0
    cfg = _parse('[runtime]\nstrategy_timeout_seconds = 2.5\n' + ACC + '[[strategies]]\n'
                 'account = "a"\nname = "s"\nsymbols = ["X"]')
    worker = build_worker("strategies", cfg, "postgresql://unused")  # (connects at start)
    assert worker.strategy_timeout_seconds == 2.5  # type: ignore[attr-defined]
    for bad, says in (("0", "must be >= 0.01"), ("-1", "must be >= 0.01"),
                      ('"soon"', "must be a number")):
        with pytest.raises(rc.RuntimeConfigError, match=rf"\[runtime\] "
                           rf"strategy_timeout_seconds {says}"):
            _parse(f"[runtime]\nstrategy_timeout_seconds = {bad}\n")

STRAT = '[[strategies]]\naccount = "a"\nname = "s"\nsymbols = ["X"]\n'


@pytest.mark.parametrize(("text", "message"), [
    # a quoted boolean was read by truthiness: "false" turned shorting on
    (ACC + 'allow_short = "false"',
     r"\[\[accounts\]\] #1 \(a\): allow_short must be true or false .*got 'false'$"),
    (ACC + 'freeze_on_mismatch = "false"',
     r"\[\[accounts\]\] #1 \(a\): freeze_on_mismatch must be true or false"),
    (ACC + "allow_short = 1", r"\[\[accounts\]\] #1 \(a\): allow_short must be true or false"),
    # tables the runtime does not know were silently ignored
    ('[routr]\nvisibility_seconds = 5\n' + ACC, r"unknown table or key 'routr' at the top level"),
    ('[[strategy]]\nname = "s"\n' + ACC, r"unknown table or key 'strategy' at the top level"),
    ('[notification]\nevents = ["fill"]\n', r"unknown table or key 'notification'"),
    ('[[acounts]]\nname = "a"\n', r"unknown table or key 'acounts'"),
    # keys of the wrong type were dropped
    (ACC + 'broker = "ccxt"\nexchange = 5\ncredential = "k"',
     r"#1 \(a\): exchange must be a non-empty string, got 5"),
    (ACC + "credential = 7", r"#1 \(a\): credential must be a non-empty string, got 7"),
    (FEED + "credential = 7", r"\[\[feeds\]\] #1: credential must be a non-empty string"),
    (FEED + 'credential = "k"\ncredential_account = 7',
     r"\[\[feeds\]\] #1: credential_account must be a non-empty string"),
    ('[runtime]\nlog_file = 5', r"\[runtime\]: log_file must be a non-empty string, got 5"),
    # a fraction of a second was cut off
    ("[router]\nvisibility_seconds = 1.9",
     r"\[router\] visibility_seconds must be a whole number, got 1.9"),
    ("[router]\npoll_ms = 20.5", r"\[router\] poll_ms must be a whole number"),
    ("[router]\nbatch = 1.5", r"\[router\] batch must be a whole number"),
    ("[router]\nmax_retries = 2.5", r"\[router\] max_retries must be a whole number"),
    # the paper broker's slippage rule failed only inside the worker (restarted forever)
    (ACC + '[accounts.paper]\nslippage = "bogus:zz"',
     r"#1 \(a\) paper: slippage 'bogus:zz': expected none, bps:N"),
    (ACC + '[accounts.paper]\nslippage = "bps:x"', r"#1 \(a\) paper: slippage 'bps:x'"),
    ('[[feeds]]\nmarket = "crypto"\nvenue = "nope:zz"\nsymbols = ["X"]\ntimeframes = ["1m"]',
     r"\[\[feeds\]\] #1: venue 'nope:zz' is not ccxt:<exchange id>, alpaca or oanda"),
    (ACC + STRAT.replace('"X"', '"A@B@C"'), r"symbol 'A@B@C' must be SYMBOL or SYMBOL@VENUE"),
    ('[runtime]\nlog_file = "/nonexistent/dir/x.log"',
     r"\[runtime\] log_file '/nonexistent/dir/x.log': its folder does not exist"),
])
def test_wrong_types_unknown_tables_and_bad_values_are_refused(text, message):
    with pytest.raises(rc.RuntimeConfigError, match=message) as info:
        _parse(text)
    assert "\n" not in str(info.value)


def test_booleans_are_read_as_written():
    acc = _parse(ACC + "allow_short = true\nfreeze_on_mismatch = false").accounts[0]
    assert (acc.allow_short, acc.freeze_on_mismatch) == (True, False)
    assert _parse(ACC).accounts[0].allow_short is False
    assert _parse("[router]\nvisibility_seconds = 7").router.visibility_seconds == 7


def test_a_feed_with_keys_defaults_to_the_keys_endpoint():
    """A [[feeds]] entry naming a credential and no endpoint read from the LIVE endpoint
    (with a paper account's practice token); now it is resolved from the stored keys."""
    oanda = ('[[feeds]]\nmarket = "forex"\nvenue = "oanda"\nsymbols = ["EUR/USD"]\n'
             'timeframes = ["1m"]\ncredential_account = "paper-1"\ncredential = "k"\n')
    assert _parse(oanda).feeds[0].endpoint is None
    assert _parse(oanda + 'endpoint = "testnet"').feeds[0].endpoint == "testnet"
    assert _parse(FEED).feeds[0].endpoint == "live"  # public data, no keys


def test_unreadable_files_are_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe[runtime]\n")
    with pytest.raises(rc.RuntimeConfigError, match=r"bad.toml: not UTF-8 text") as info:
        rc.load(bad)
    assert "\n" not in str(info.value)
    replay = tmp_path / "replay.toml"
    replay.write_text('[replay]\nsession = "x"\n', encoding="utf-8")
    with pytest.raises(rc.RuntimeConfigError,
                       match=r"replay.toml: \[replay\] table is incomplete or malformed"):
        rc.load(replay)
    logged = tmp_path / "logged.toml"
    logged.write_text('[runtime]\nlog_file = "logs/x.log"\n', encoding="utf-8")
    with pytest.raises(rc.RuntimeConfigError, match=r"logged.toml: \[runtime\] log_file .*"
                       r"its folder does not exist"):
        rc.load(logged)
    (tmp_path / "logs").mkdir()
    assert rc.load(logged).log_file == str(tmp_path / "logs" / "x.log")


def test_the_cli_s_database_table_may_share_the_file():
    """`MMATS_CONFIG` defaults to ./mmats.toml, the file the runtime reads too: its
    [database] table (db.config's) is not the runtime's mistake."""
    assert _parse('[database]\nhome = ".mmats"\n' + ACC).accounts[0].name == "a"
