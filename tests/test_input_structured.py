"""JSON and TOML a user writes (a --param, a secret on stdin, a limits file, the runtime
configuration, a news file's extra column): each mistake is one line naming it, never a
traceback. Each case raised a Python exception before (its comment says which)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from db.numbers import parse_number
from db.structured import json_values, loads_json, loads_toml
from workers.backtest.config import BacktestError, load_limits
from workers.runtime import config as rc

REPO = Path(__file__).resolve().parent.parent
DEEP_JSON = "[" * 3000 + "]" * 3000          # RecursionError
DEEP_TOML = "x = " + "[" * 3000 + "]" * 3000  # RecursionError
HUGE_INT = "9" * 5000                        # ValueError: Exceeds the limit (4300 digits)


@pytest.mark.parametrize(("text", "says"), [
    (DEEP_JSON, "nested too deeply (at most 64 levels)"),
    ("[" * 70 + "]" * 70, "nested too deeply"),
    (HUGE_INT, "Exceeds the limit (4300 digits)"),
    ('{"a": NaN}', "NaN is not a number JSON allows"),
    ('{"a": Infinity}', "Infinity is not a number JSON allows"),
    ('{"a": 1', "not valid JSON (Expecting ',' delimiter, line 1, column 8)"),
])
def test_bad_json_is_one_value_error(text, says):
    with pytest.raises(ValueError) as err:
        loads_json(text)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_toml_dates_times_and_nul_are_named():
    doc = loads_toml('[a]\nstart = 09:30:00\nday = 1979-05-27\n')
    with pytest.raises(ValueError, match=r'a.start is a TOML time, which is not stored: '
                                         r'write it as text \("09:30:00"\)'):
        json_values(doc, "a")
    with pytest.raises(ValueError, match=r"x\.p contains a NUL character"):
        json_values({"p": "a\x00b"}, "x")
    with pytest.raises(ValueError, match="nested too deeply"):
        loads_toml(DEEP_TOML)
    json_values(loads_toml('a = "09:30"\nb = [1, 2.5, true]\n'), "fine")


@pytest.mark.parametrize("text", ["1_000", "١٠", "1 000", "0x10"])
def test_numbers_are_written_in_ascii_digits(text):
    # 0004_13 and before: Decimal read "1_000" as 1000 and Arabic-Indic digits as 10
    with pytest.raises(ValueError, match="amount must be a number"):
        parse_number(text, "amount")


# ---------------------------------------------------------------- files
@pytest.mark.parametrize(("name", "text", "says"), [
    ("deep.json", DEEP_JSON, "nested too deeply"),                 # RecursionError
    ("deep.toml", DEEP_TOML, "nested too deeply"),                 # RecursionError
    ("big.json", f'[{{"type": "MAX_POSITION_SIZE", "value": {HUGE_INT}}}]', "4300 digits"),
    ("hours.toml", '[[limit]]\ntype = "TRADING_HOURS"\nvalue = 1\n'  # TypeError (json.dumps)
                   'params = {start = 09:30:00, end = "16:00"}\n',
     "limits.limit[1].params.start is a TOML time"),
    ("typo.toml", '[[limits]]\ntype = "MAX_POSITION_SIZE"\nvalue = 0.5\n',  # silently none
     "unknown table(s) limits: the limits are [[limit]] tables"),
    ("twice.toml", '[[limit]]\ntype = "MAX_POSITION_SIZE"\nvalue = 0.5\n'  # 0.2 kept
                   '[[limit]]\ntype = "MAX_POSITION_SIZE"\nvalue = 0.2\n',
     "limit 2: the same limit as limit 1 (MAX_POSITION_SIZE, global): give it once"),
    ("key.toml", '[[limit]]\ntype = "MAX_EXPOSURE"\nvalue = 0.5\nscope = "symbol"\n'
                 'key = ["a"]\n', "limit 1: key must be text"),         # the symbol ['A']
])
def test_a_bad_limits_file_is_one_line(tmp_path, name, text, says):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(BacktestError) as err:
        load_limits(path)
    message = str(err.value)
    assert message.startswith(f"--limits {path}: ") and says in message, message
    assert "\n" not in message


@pytest.mark.parametrize(("text", "says"), [
    (DEEP_TOML, "nested too deeply"),                                     # RecursionError
    ('[[strategies]]\nname = "x"\n[strategies.sizing_params]\nx = 1979-05-27\n',  # TypeError
     "config.strategies[1].sizing_params.x is a TOML date"),
    ('[runtime]\nlog_file = "a\\u0000b"\n',                                 # ValueError (NUL)
     "[runtime]: log_file contains a NUL character"),
    ('[runtime]\nstrategy_dirs = ["a\\u0000b"]\n',
     "[runtime] strategy_dirs must be a list of folder paths (without NUL characters)"),
    ("[runtime\n", "invalid TOML: "),
    # stored: 1E+30 USDT (`account create --cash 1e30` is refused)
    ('[[accounts]]\nname = "a"\ncash = 1e30\n', "cash '1e+30' is out of range"),
    ('[[accounts]]\nname = "a"\ncash = "1e-30"\n', "cash '1e-30' has more than 18 decimal"),
    # the database's check message, naming neither the file nor the entry
    ('[[accounts]]\nname = "bad name!"\n', "[[accounts]] #1: name 'bad name!' must be 1-64"),
    ('[[accounts]]\nname = "a"\ncurrency = "us dollar"\n', "currency 'us dollar' must be"),
    # passed: the ingest worker died on it in a loop
    ('[[feeds]]\nmarket = "crypto"\nvenue = "ccxt:nope"\nsymbols = ["BTC/USDT"]\n'
     'timeframes = ["1m"]\n',
     "venue: 'nope' is not an exchange ccxt knows"),
    ('[[accounts]]\nname = "a"\nbroker = "ccxt"\nexchange = "nope"\nendpoint = "testnet"\n'
     'credential = "k"\n', "exchange: 'nope' is not an exchange ccxt knows"),
])
def test_a_bad_runtime_config_is_one_line(tmp_path, text, says):
    path = tmp_path / "mmats.toml"
    path.write_text(text)
    with pytest.raises(rc.RuntimeConfigError) as err:
        rc.load(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and says in message, message
    assert "\n" not in message


# ---------------------------------------------------------------- the command line
def mmats(db_url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from api.cli import main; main()", *args],
                          env={**os.environ, "MMATS_DATABASE_URL": db_url,
                               "MMATS_MASTER_KEY": "ab" * 32},
                          input=stdin, capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.parametrize(("args", "stdin", "says"), [
    (("risk", "set", "MAX_POSITION_SIZE", "0.5", "--param", f"x={DEEP_JSON}"), None,
     "error: --param x: nested too deeply"),
    (("risk", "set", "MAX_POSITION_SIZE", "0.5", "--param", f"x={HUGE_INT}"), None,
     "error: --param x: Exceeds the limit (4300 digits)"),
    (("creds", "set", "acc1", "main", "--venue", "binance", "--endpoint", "paper",
      "--stdin-json"), '{"a": ' + DEEP_JSON + "}", "error: --stdin-json: stdin: nested too"),
])
def test_the_cli_refuses_deep_or_huge_json_in_one_line(db_url, args, stdin, says):
    if args[0] == "creds":
        made = mmats(db_url, "account", "create", "acc1", "--environment", "paper")
        assert made.returncode == 0, made.stderr
    r = mmats(db_url, *args, stdin=stdin)
    assert r.returncode == 1 and r.stderr.startswith(says), r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize(("args", "says"), [
    # run 1 of the next backtest failed on the duplicate name bt-1, which nobody had typed
    (("account", "create", "bt-1", "--environment", "backtest"),
     "error: account name 'bt-1' has the form of the accounts MMATS makes"),
    (("account", "create", "paper-replay-7", "--environment", "paper"),
     "error: account name 'paper-replay-7' has the form"),
    # OverflowError: date value out of range
    (("backtest", "--strategy", "sma_crossover", "--symbol", "BTC/USDT", "--timeframe", "1m",
      "--from", "0001-01-01T00:00:00+01:00", "--to", "2024-01-02"),
     "error: --from '0001-01-01T00:00:00+01:00' is out of range in UTC"),
    # NaN compared false with every age: every stale worker passed
    (("workers", "--check", "nan"), "error: Invalid value for '--check': must be a number of"),
    # lists all ranges but the last, then "... 22 more"
    (("data", "gaps", "--limit", "-1"), "error: Invalid value for '--limit'"),
    # the runs_label_length check's message, with no option named
    (("backtest", "--strategy", "sma_crossover", "--symbol", "BTC/USDT", "--timeframe", "1m",
      "--from", "2024-01-01", "--to", "2024-01-02", "--label", "x" * 300),
     "error: Invalid value for '--label': must be 1 to 200 characters, got 300"),
    # 1e-300 overflowed the step's wait in the replay worker, after the session was made
    (("paper", "--feed", "replay", "--strategy", "sma_crossover", "--symbol", "BTC/USDT",
      "--from", "2024-01-02", "--to", "2024-01-02T00:10", "--speed", "1e-300"),
     "error: --speed must be a number from 0.001 to 1e9 or max"),
])
def test_the_cli_refuses_in_one_line(db_url, args, says):
    r = mmats(db_url, *args)
    assert r.returncode in (1, 2) and r.stderr.startswith(says), r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert mmats(db_url, "account", "list", "--all").stdout.count("\n") <= 1  # none made


def test_a_replay_session_is_numbered_after_the_accounts_named_like_one(conn):
    from workers.runtime.replay import next_session
    assert next_session(conn) == 1
    conn.execute("SELECT trading.create_account('paper-replay-41', 'paper', 'advisory', 1)")
    assert next_session(conn) == 42
