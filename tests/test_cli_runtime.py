"""`mmats run`, `mmats worker` and `mmats paper`: a configuration is checked whole before
anything is written (one line naming the entry on any mistake), and `mmats paper` writes
a session file that is valid TOML whatever the strings it was given."""

from __future__ import annotations

import re
import textwrap
import tomllib
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from api.cli_runtime import _toml_str, prepare_replay, run_command, worker_command
from db.errors import MmatsError
from workers.backtest.config import parse_time
from workers.runtime import config as rc
from workers.runtime.supervisor import check_config


class WorkersStarted(Exception):
    """`mmats run` got as far as starting its workers."""


@pytest.fixture(autouse=True)
def no_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise WorkersStarted

    monkeypatch.setattr("workers.runtime.supervisor.Supervisor.run", refuse)
    monkeypatch.setattr("workers.runtime.supervisor.Supervisor.start", refuse)


def _run(db_url: str, tmp_path: Path, text: str, command=run_command, *args: str):
    path = tmp_path / "mmats.toml"
    path.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(command, [*args, "--config", str(path)],
                                env={"MMATS_DATABASE_URL": db_url,
                                     "MMATS_HOME": str(tmp_path / "home")})
    return result.exception, result.output


def _written(db_url: str) -> list[tuple[str, ...]]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return [*conn.execute("SELECT 'account', name FROM trading.accounts").fetchall(),
                *conn.execute("SELECT 'strategy', name FROM trading.strategies").fetchall()]


ACC = '[[accounts]]\nname = "q1"\n'
SMA = ('[[strategies]]\naccount = "q1"\nname = "sma_crossover"\nsymbols = ["BTC/USDT@binance"]\n'
       '[strategies.params]\nfast = 5\n')
FEED = ('[[feeds]]\nmarket = "crypto"\nvenue = "ccxt:binance"\nsymbols = ["BTC/USDT"]\n'
        'timeframes = ["1m"]\n')


@pytest.mark.parametrize(("text", "message"), [
    # StrategyLoadError was no MmatsError (a traceback), raised after the accounts existed
    (ACC + SMA.replace("sma_crossover", "nosuch") + FEED,
     r"mmats.toml: \[\[strategies\]\] #1 \(nosuch on q1\): no strategy named 'nosuch'"),
    # parameters and symbols failed only inside the strategy worker (restarted forever)
    (ACC + SMA + 'bogus = 1\n' + FEED,
     r"#1 \(sma_crossover on q1\): unknown parameter\(s\) bogus"),
    (ACC + SMA.replace("fast = 5", 'fast = "abc"') + FEED,
     r"#1 \(sma_crossover on q1\): parameter fast must be int, got 'abc'"),
    (ACC + SMA.replace("BTC/USDT@binance", "NOPE/XXX") + FEED,
     r"#1 \(sma_crossover on q1\): symbol 'NOPE/XXX' is not in market.instruments and no "
     r"\[\[feeds\]\] entry provides it"),
    (ACC + SMA + FEED.replace("ccxt:binance", "ccxt:kraken"),
     r"symbol 'BTC/USDT@binance' is not in market.instruments"),
    # [notifications] failed only inside the notifier
    (ACC + SMA + FEED + '[notifications]\nevents = ["fill"]\n[[notifications.channels]]\n'
     'type = "telegram"\nchat_id = "1"\ntoken = "123456:INLINE"\n',
     r"\[notifications\]: notifications.channels\[0\].token: unknown key for a telegram"),
    (ACC + SMA + FEED + '[notifications]\n[[notifications.channels]]\ntype = "telegram"\n'
     'chat_id = "1"\ntoken_env = "MMATS_TEST_NO_SUCH_VARIABLE"\n',
     r"token_env: environment variable MMATS_TEST_NO_SUCH_VARIABLE is not set"),
    # a configuration with nothing to run created its accounts first
    (ACC, r"mmats.toml: nothing to run"),
])
def test_run_checks_everything_before_writing_anything(db_url, tmp_path, text, message):
    exc, out = _run(db_url, tmp_path, text)
    assert isinstance(exc, MmatsError), (exc, out)
    assert len(str(exc).splitlines()) == 1
    assert re.search(message, str(exc)), str(exc)
    assert _written(db_url) == []


def test_a_symbol_is_known_from_market_instruments_or_a_feed(db_url, tmp_path):
    with psycopg.connect(db_url, autocommit=True) as conn:
        cfg = rc.parse(tomllib.loads(ACC + SMA + FEED))
        assert [c.name for c in check_config(conn, cfg)] == ["sma_crossover"]
        for venue in ("binance", "kraken"):
            conn.execute(
                "INSERT INTO market.instruments (symbol, venue, market, base_currency, "
                "quote_currency, price_tick, quantity_step, min_quantity, calendar_id) "
                "VALUES ('ETH/USDT', %s, 'crypto', 'ETH', 'USDT', 0.01, 0.0001, 0, "
                "'CRYPTO_24X7')", (venue,))
        stored = rc.parse(tomllib.loads(ACC + SMA.replace("BTC/USDT@binance", "ETH/USDT@kraken")))
        check_config(conn, stored)
        bare = rc.parse(tomllib.loads(ACC + SMA.replace("BTC/USDT@binance", "ETH/USDT")))
        with pytest.raises(rc.RuntimeConfigError,
                           match=r"symbol 'ETH/USDT' is on several venues \(binance, kraken\)"):
            check_config(conn, bare)
    assert _written(db_url) == []


def test_the_database_table_of_a_config_file_given_with_config_is_the_one_used(
        db_url, tmp_path):
    """`--config FILE` read FILE's runtime tables but the database of MMATS_CONFIG (or
    ./mmats.toml): here a server that is not there."""
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text(f'[database]\nurl = "{db_url}"\n' + ACC
                         + SMA.replace("BTC/USDT@binance", "NOPE/USDT"), encoding="utf-8")
    dead = tmp_path / "dead.toml"
    dead.write_text('[database]\nurl = "postgresql://mmats@127.0.0.1:1/x?connect_timeout=2"\n',
                    encoding="utf-8")
    result = CliRunner().invoke(run_command, ["--config", str(elsewhere)],
                                env={"MMATS_CONFIG": str(dead), "MMATS_DATABASE_URL": None,
                                     "MMATS_HOME": str(tmp_path / "home")})
    # the symbol is looked up in db_url's market.instruments: that database was reached
    assert isinstance(result.exception, MmatsError), (result.exception, result.output)
    assert "symbol 'NOPE/USDT' is not in market.instruments" in str(result.exception), str(
        result.exception)
    assert "127.0.0.1:1" not in str(result.exception) and ":1/x" not in result.output


def test_a_replay_session_s_copy_counts_only_where_its_venue_is_named(db_url):
    """Every `mmats paper` (and the demo's) copies its symbols onto venue replay<N>: a
    bare symbol of a live configuration was then 'on several venues'."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        for venue in ("binance", "replay1"):
            conn.execute(
                "INSERT INTO market.instruments (symbol, venue, market, base_currency, "
                "quote_currency, price_tick, quantity_step, min_quantity, calendar_id) "
                "VALUES ('BTC/USDT', %s, 'crypto', 'BTC', 'USDT', 0.01, 0.0001, 0, "
                "'CRYPTO_24X7')", (venue,))
        for symbol in ("BTC/USDT", "BTC/USDT@binance", "BTC/USDT@replay1"):
            cfg = rc.parse(tomllib.loads(ACC + SMA.replace("BTC/USDT@binance", symbol)))
            assert [c.name for c in check_config(conn, cfg)] == ["sma_crossover"]
    assert _written(db_url) == []


@pytest.mark.parametrize("name", ["Bad Name", "UPPER", "9lives", "x" * 65, "a\nb", ""])
def test_worker_refuses_a_name_runtime_workers_would_refuse(db_url, tmp_path, name):
    """A name against workers_name_format ran a worker that never recorded a heartbeat."""
    exc, _ = _run(db_url, tmp_path, "", worker_command, "notifier", "--name", name)
    assert isinstance(exc, MmatsError)
    assert str(exc).startswith(f"--name {name!r}: a worker's name is a lowercase letter")
    with psycopg.connect(db_url, autocommit=True) as conn:  # the rule is the database's
        conn.execute("SET ROLE mmats_router")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("SELECT runtime.heartbeat(%s, 'router', 'running', 1, 'h')", (name,))


def test_worker_accepts_a_name_the_database_accepts(db_url, tmp_path):
    exc, _ = _run(db_url, tmp_path, "", worker_command, "notifier", "--name", "notifier.eu-1:a")
    assert isinstance(exc, rc.RuntimeConfigError)
    assert "no [[notifications.channels]] configured" in str(exc)


# --------------------------------------------------------------------------- mmats paper
TAGGED = '''
from typing import ClassVar

from strategies.base import IStrategy
from strategies.params import ParamSpec


class Tagged(IStrategy):
    name = "tagged"
    version = "1"
    parameters: ClassVar = {"tag": ParamSpec("x"), "size": ParamSpec(1.0, minimum=0.01)}

    def get_required_indicators(self):
        return []

    def on_bar(self, context):
        return None
'''


@pytest.fixture
def bars(db_url: str) -> str:
    from workers.ingest.importer import import_file
    from workers.ingest.samples import sample_datasets

    sample = next(s for s in sample_datasets() if s.symbol == "BTC/USDT")
    with psycopg.connect(db_url, autocommit=True) as conn:
        import_file(conn, sample.path, symbol=sample.symbol, market=sample.market,
                    timeframe=sample.timeframe, venue=sample.venue)
    return db_url


def _prepare(conn, tmp_path: Path, **kw) -> Path:
    folder = tmp_path / "strats"
    folder.mkdir(exist_ok=True)
    (folder / "tagged.py").write_text(textwrap.dedent(TAGGED), encoding="utf-8")
    args = {"strategy": "tagged", "symbols": ["BTC/USDT"], "timeframe": "1m",
            "start": parse_time("2024-01-02T00:00", "--from"),
            "end": parse_time("2024-01-02T01:00", "--to"), "speed": "max",
            "params": {}, "cash": Decimal(10000), "commission": Decimal("0.001"),
            "slippage": "none", "spread": Decimal(0), "allow_short": False,
            "home": tmp_path / "home", "strategy_dirs": (folder,)}
    return prepare_replay(conn, **{**args, **kw})


def test_paper_writes_any_string_parameter_as_valid_toml(bars, tmp_path):
    tag = 'a\nb\t"c"\\d\x00e\x1bf\x7fg é'
    with psycopg.connect(bars, autocommit=True) as conn:
        path = _prepare(conn, tmp_path, params={"tag": tag, "size": 0.5})
    cfg = rc.load(path)
    assert dict(cfg.strategies[0].params) == {"tag": tag, "size": 0.5}


def test_toml_strings_round_trip():
    for text in ["", "plain", 'q"uote', "back\\slash", "\x00\x01\x1f\x7f", "\b\t\n\f\r",
                 "é ü \u2028 \U0001f600"]:
        assert tomllib.loads(f"v = {_toml_str(text)}")["v"] == text
    with pytest.raises(MmatsError, match="not valid text"):
        _toml_str("bad\udcff")


@pytest.mark.parametrize(("option", "value", "message"), [
    ("commission", Decimal("0.5"), r"^--commission must be <= 0.1, got '0.5'$"),
    ("commission", Decimal("-0.001"), r"^--commission must be >= 0"),
    ("spread", Decimal("0.2"), r"^--spread must be <= 0.1, got '0.2'$"),
])
def test_paper_names_the_option_of_a_bad_cost(bars, tmp_path, option, value, message):
    """The error named the internal session file (replay-1.toml: [[accounts]] #1 ...)."""
    with (psycopg.connect(bars, autocommit=True) as conn,
          pytest.raises(MmatsError, match=message)):
        _prepare(conn, tmp_path, **{option: value})
    assert not list((tmp_path / "home").glob("sessions/*.toml"))
    assert _written(bars) == []
