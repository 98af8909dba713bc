"""`mmats account …` and `mmats risk …`, run as a user runs them (subprocesses)."""

from __future__ import annotations

import re
import subprocess

import psycopg
import pytest


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_account_create_and_list(run, db_url: str) -> None:  # type: ignore[no-untyped-def]
    made = run("account", "create", "alpha", "--environment", "paper", "--mode", "operator",
               "--cash", "10000.50", "--currency", "eur", "--taker-fee", "0.001")
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("account alpha created (id ")
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT environment::text, mode::text, base_currency, starting_cash::text, "
            "cash::text, taker_fee::text FROM trading.accounts WHERE name = 'alpha'").fetchone()
    assert row == ("paper", "operator", "EUR", "10000.50", "10000.50", "0.001")
    listed = run("account", "list")
    assert re.search(r"alpha\s+paper\s+operator\s+EUR\s+10,000.50\s+10,000.50\s+0\s+OK",
                     listed.stdout), listed.stdout


@pytest.mark.parametrize("args,fragment", [
    (("account", "create", "x'; DROP TABLE trading.accounts; --", "--environment", "paper"),
     "an account name is 1-64 characters"),
    (("account", "create", "beta", "--environment", "live", "--mode", "operator"),
     "error: a live account starts in advisory mode: create it without --mode operator, then"
     " switch it with `mmats account operator beta` (it needs credentials marked live)"),
    (("account", "create", "gamma", "--environment", "paper", "--cash", "NaN"),
     "--cash must be a finite number"),
    (("account", "create", "delta", "--environment", "paper", "--cash", "-1"),
     "cash must be a number >= 0"),
    (("risk", "set", "BOGUS", "1"), "unknown limit type 'BOGUS'; known: DAILY_LOSS"),
    (("risk", "set", "MAX_DRAWDOWN", "1.5"), "MAX_DRAWDOWN must be a fraction between 0 and 1"),
    (("risk", "set", "MAX_EXPOSURE", "0.4", "--scope", "market", "--key", "gold"),
     "a market limit needs scope_key crypto, forex or stock"),
    (("risk", "trip", "nobody", "--mode", "SOFT", "--reason", "x"), "unknown account 'nobody'"),
    # numbers the database could not hold (10^18 or more) are refused by the CLI, naming
    # the flag, with the value shortened
    (("account", "create", "c3", "--environment", "paper", "--cash", "1e400"),
     "error: --cash '1e400' is out of range: it must be less than 10^18 in size"),
    (("account", "create", "c3", "--environment", "paper", "--cash", "1" + "0" * 18),
     "--cash '1000000000000000000' is out of range"),
    (("account", "create", "c3", "--environment", "paper", "--taker-fee", "-1e20"),
     "--taker-fee '-1e20' is out of range"),
    (("risk", "set", "MAX_OPEN_POSITIONS", "1e400"), "VALUE '1e400' is out of range"),
    (("risk", "set", "MAX_OPEN_POSITIONS", "9" * 400),
     f"VALUE '{'9' * 40}...' is too long (400 characters; a number has at most 64)"),
    # a negative VALUE is a value (click used to read it as an unknown option '-1')
    (("risk", "set", "MAX_POSITION_SIZE", "-1"),
     "MAX_POSITION_SIZE must be a fraction between 0 and 1, got -1"),
    (("risk", "set", "MAX_POSITION_SIZE", "-1", "--scope", "global"),
     "MAX_POSITION_SIZE must be a fraction between 0 and 1, got -1"),
    # "invalid input syntax for type json" before: NaN is no JSON
    (("risk", "set", "MAX_VOLATILITY", "0.1", "--param", "period=NaN"),
     "error: --param period: 'NaN' is not a finite number"),
    (("risk", "set", "MAX_VOLATILITY", "0.1", "--param", "period=[1, 1e400]"),
     "error: --param period: '[1, 1e400]' is not a finite number"),
    # a flag is on while it exists: 7 was accepted
    (("risk", "set", "REQUIRE_STOP_LOSS", "7"),
     "REQUIRE_STOP_LOSS is a flag: its value is 1 (remove the limit to turn it off), got 7"),
    (("risk", "remove", "999999"), "error: no limit 999999 (`mmats risk show` lists them)"),
    # the constraint's own sentence, not its name
    (("account", "create", "c5", "--environment", "paper", "--currency", "US'D"),
     "an account's currency is 2-12 upper-case letters or digits"),
    (("risk", "set", "MAX_POSITION_SIZE", "0.1", "--scope", "strategy", "--key", "k" * 65),
     "error: --key 'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk...': a limit's scope key (a market, "
     "strategy or symbol) is 1-64 characters"),
    # more digits than any money or quantity has
    (("account", "create", "c4", "--environment", "paper", "--cash", "1e-16000"),
     "error: --cash '1e-16000' has more than 18 decimal places"),
])
def test_bad_input_is_one_line(run, db_url: str, args, fragment: str) -> None:  # type: ignore[no-untyped-def]
    line = one_error_line(run(*args))
    assert fragment in line
    assert len(line) < 250
    with psycopg.connect(db_url) as conn:  # nothing was written
        assert conn.execute("SELECT count(*) FROM trading.accounts").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM risk.limits").fetchone() == (0,)


def test_limits_set_show_and_history(run, db_url: str) -> None:  # type: ignore[no-untyped-def]
    assert run("account", "create", "alpha", "--environment", "paper").returncode == 0
    assert run("risk", "set", "max_position_size", "0.1").returncode == 0
    assert run("risk", "set", "MAX_EXPOSURE", "0.4", "--scope", "market", "--key", "crypto",
               "--environment", "paper").returncode == 0
    changed = run("risk", "set", "MAX_POSITION_SIZE", "0.05")
    assert changed.returncode == 0 and "MAX_POSITION_SIZE = 0.05 (global)" in changed.stdout
    hours = run("risk", "set", "TRADING_HOURS", "1", "--param", "days=[1,2,3,4,5]",
                "--param", "start=09:30", "--param", "tz=America/New_York", "--account", "alpha")
    assert hours.returncode == 0, hours.stderr
    shown = run("risk", "show", "--account", "alpha").stdout
    assert re.search(r"MAX_POSITION_SIZE\s+0.05\s+global", shown)
    assert re.search(r"MAX_EXPOSURE\s+0.4\s+market:crypto\s+\*\s+paper", shown)
    assert '"days": [1, 2, 3, 4, 5]' in shown
    with psycopg.connect(db_url) as conn:
        history = conn.execute(
            "SELECT operation, old_row ->> 'value', new_row ->> 'value' FROM risk.limit_history "
            "h JOIN risk.limits l USING (limit_id) WHERE l.limit_type = 'MAX_POSITION_SIZE' "
            "ORDER BY history_id").fetchall()
    assert history == [("INSERT", None, "0.1"), ("UPDATE", "0.1", "0.05")]
    (hours_id,) = re.findall(r"^\s*(\d+)\s+TRADING_HOURS", shown, re.MULTILINE)
    removed = run("risk", "remove", hours_id)
    assert removed.returncode == 0 and removed.stdout == f"limit {hours_id} removed\n"
    assert "TRADING_HOURS" not in run("risk", "show", "--account", "alpha").stdout
    with psycopg.connect(db_url) as conn:  # the history keeps it
        assert conn.execute("SELECT operation FROM risk.limit_history WHERE limit_id = %s"
                            " ORDER BY history_id", (int(hours_id),)).fetchall() == [
            ("INSERT",), ("DELETE",)]


def test_breaker_trip_and_reset_need_confirmation(run, db_url: str) -> None:  # type: ignore[no-untyped-def]
    assert run("account", "create", "alpha", "--environment", "paper").returncode == 0
    tripped = run("risk", "trip", "alpha", "--mode", "HARD", "--reason", "manual test")
    assert tripped.returncode == 0 and "breaker HARD on alpha" in tripped.stdout
    assert "breaker HARD on alpha" in run("risk", "show").stdout
    assert "needs --confirm 'RESET alpha'" in one_error_line(run("risk", "reset", "alpha"))
    assert "needs the confirmation 'RESET alpha'" in one_error_line(
        run("risk", "reset", "alpha", "--confirm", "RESET"))
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT risk.breaker_mode(1)::text").fetchone() == ("HARD",)
    reset = run("risk", "reset", "alpha", "--confirm", "RESET alpha")
    assert reset.returncode == 0 and "was HARD" in reset.stdout
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT risk.breaker_mode(1)::text").fetchone() == ("OK",)



def test_stored_text_is_shown_with_its_control_characters_escaped(run) -> None:  # type: ignore[no-untyped-def]
    """A breaker reason (a broker's message, or typed) with a newline and a terminal escape
    sequence is kept as given but shown on one line, escaped: it cannot forge output lines
    or recolour the terminal."""
    assert run("account", "create", "alpha", "--environment", "paper").returncode == 0
    hostile = "broker said:\nbreaker OK on alpha\x1b[2J"
    assert run("risk", "trip", "alpha", "--mode", "SOFT", "--reason", hostile).returncode == 0
    shown = run("risk", "show").stdout
    assert "\x1b" not in shown
    assert not [x for x in shown.splitlines() if x.startswith("breaker OK")]
    line = next(x for x in shown.splitlines() if x.startswith("breaker SOFT on alpha"))
    assert line.endswith("broker said:\\nbreaker OK on alpha\\x1b[2J")
    desc = "fee\r\nbooked withdrawal"
    assert run("account", "book", "alpha", "fee", "-1", "--description", desc).returncode == 0
    listed = run("account", "movements", "alpha").stdout
    assert "\r" not in listed and "fee\\r\\nbooked withdrawal" in listed

def test_error_messages_show_control_characters_escaped(run) -> None:  # type: ignore[no-untyped-def]
    """A name with a terminal escape sequence (OSC 0: set the window title) comes back in
    the error line escaped, so it cannot retitle or clear the terminal."""
    line = one_error_line(run("account", "advisory", "x\x1b]0;pwned\x07"))
    assert "\x1b" not in line and "\x07" not in line
    assert "unknown account 'x\\x1b]0;pwned\\x07'" in line
    usage = run("account", "create", "x", "--environment", "p\x1b[2J")
    assert usage.returncode == 2 and "\x1b" not in usage.stderr
    assert "'p\\x1b[2J' is not one of" in usage.stderr


def test_account_list_leaves_out_the_accounts_of_runs(  # type: ignore[no-untyped-def]
        run, db_url: str) -> None:
    """Each backtest (and walk-forward window) makes an account, bt-<run>: after a few
    hundred runs `account list` was those. They are left out and counted unless --all;
    --environment filters; an account made by hand as a backtest one is listed."""
    assert run("account", "create", "alpha", "--environment", "paper").returncode == 0
    assert run("account", "create", "mine", "--environment", "backtest").returncode == 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO market.instruments (symbol, venue, market, base_currency,"
                     " quote_currency, price_tick, quantity_step, min_quantity, calendar_id)"
                     " VALUES ('AAA', 'test', 'stock', 'AAA', 'USD', 0.01, 1, 1, 'XNYS')")
        runs = [conn.execute("SELECT backtest.create_run('sma_crossover', '1.0.0', '{}',"
                             " '{AAA}', '1d', '2024-01-01', '2024-02-01', 10000, 'USD')"
                             ).fetchone()[0] for _ in range(2)]
    names = lambda out: [line.split()[0] for line in out.splitlines()[2:]  # noqa: E731
                         if not line.startswith("(")]
    listed = run("account", "list")
    assert listed.returncode == 0, listed.stderr
    assert names(listed.stdout) == ["alpha", "mine"]
    assert listed.stdout.splitlines()[-1] == (
        "(2 accounts of backtest runs not shown: --all lists them, `mmats runs` the runs)")
    every = run("account", "list", "--all").stdout
    assert names(every) == ["alpha", *(f"bt-{r}" for r in runs), "mine"]
    assert not every.splitlines()[-1].startswith("(")
    assert names(run("account", "list", "--environment", "paper").stdout) == ["alpha"]
    assert run("account", "list", "--environment", "live").stdout.splitlines()[0] == (
        "no live accounts (create one with `mmats account create`)")


def test_operator_mode_in_two_steps(run, db_url: str) -> None:  # type: ignore[no-untyped-def]
    assert run("account", "create", "alpha", "--environment", "paper").returncode == 0
    # the CLI's own command, not the SQL function (trading.request_operator_mode())
    assert one_error_line(run("account", "operator", "alpha", "--confirm", "guess")) == (
        "error: operator mode for alpha: no valid request for this token (request one with"
        " `mmats account operator alpha`; it expires after 5 minutes)")
    requested = run("account", "operator", "alpha")
    token = re.search(r"--confirm ([0-9a-f]{64})", requested.stdout)
    assert token, requested.stdout
    assert "no valid request" in one_error_line(
        run("account", "operator", "alpha", "--confirm", "0" * 64))
    confirmed = run("account", "operator", "alpha", "--confirm", token.group(1))
    assert confirmed.returncode == 0 and "operator mode" in confirmed.stdout
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT mode::text FROM trading.accounts").fetchone() == ("operator",)
    # a token works once
    assert "no valid request" in one_error_line(
        run("account", "operator", "alpha", "--confirm", token.group(1)))
    assert run("account", "advisory", "alpha").returncode == 0
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT mode::text FROM trading.accounts").fetchone() == ("advisory",)


def test_book_cash_and_list_the_movements(run, db_url: str) -> None:  # type: ignore[no-untyped-def]
    assert run("account", "create", "alpha", "--environment", "paper", "--cash", "1000"
               ).returncode == 0
    dep = run("account", "book", "alpha", "deposit", "250.25", "--ref", "wire-7",
              "--description", "wire from bank", "--ts", "2026-03-02T10:00:00Z")
    assert dep.returncode == 0, dep.stderr
    assert re.fullmatch(r"booked deposit 250.25 USD on alpha as wire-7 \(movement \d+\); "
                        r"cash 1,250.25\n", dep.stdout), dep.stdout
    again = run("account", "book", "alpha", "deposit", "250.25", "--ref", "wire-7")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("wire-7 is already booked (movement ")
    assert again.stdout.endswith("nothing changed; cash 1,250.25\n")
    fee = run("account", "book", "alpha", "fee", "-1.5", "--ts", "2026-03-03T10:00:00Z")
    assert fee.returncode == 0, fee.stderr
    assert re.search(r" as manual-[0-9a-f]{12} \(movement \d+\); cash 1,248.75$", fee.stdout)
    listed = run("account", "movements", "alpha")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["ts", "(UTC)", "kind", "amount", "ccy", "in", "account", "ccy",
                                "symbol", "ref", "description"]
    assert lines[2].split()[:6] == ["2026-03-03", "10:00:00", "fee", "-1.50", "USD", "-1.50"]
    assert lines[3].split() == ["2026-03-02", "10:00:00", "deposit", "250.25", "USD", "250.25",
                                "wire-7", "wire", "from", "bank"]
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT cash::text FROM trading.accounts WHERE name = 'alpha'"
                            ).fetchone() == ("1248.75",)
    assert "wire-7" in one_error_line(run("account", "book", "alpha", "deposit", "5",
                                          "--ref", "wire-7"))
    assert one_error_line(run("account", "book", "alpha", "withdrawal", "5")).startswith(
        "error: book_cash.amount of a withdrawal must be negative, got 5")
    assert one_error_line(run("account", "book", "alpha", "fee", "NaN")) == (
        "error: AMOUNT must be a finite number, got 'NaN'")
    assert one_error_line(run("account", "movements", "nobody")) == (
        "error: unknown account 'nobody' (see `mmats account list`)")


@pytest.mark.parametrize(("ts", "error"), [
    ("9999-01-01T00:00:00Z", "error: --ts 9999-01-01T00:00:00Z is in the future: book what has"
                             " happened"),
    ("0001-01-01T00:00:00Z", "error: --ts 0001-01-01T00:00:00Z is before 1970"),
    ("2024-13-01", "error: --ts '2024-13-01' is not a time: use ISO 8601 with its offset, e.g."
                   " 2024-03-01T10:00:00Z"),
    ("2024-03-01T10:00:00", "error: --ts '2024-03-01T10:00:00' has no UTC offset: add one, e.g."
                            " 2024-03-01T10:00:00Z"),
])
def test_book_cash_refuses_a_time_that_has_not_happened(  # type: ignore[no-untyped-def]
        run, db_url: str, ts: str, error: str) -> None:
    """--ts is when the money moved: the years 0001 and 9999 were booked. Refused by
    the option's name, nothing booked."""
    assert run("account", "create", "alpha", "--environment", "paper", "--cash", "1000"
               ).returncode == 0
    assert one_error_line(run("account", "book", "alpha", "deposit", "5", "--ts", ts)) == error
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM trading.cash_movements").fetchone() == (0,)


def test_risk_set_shows_the_database_s_warning(run) -> None:  # type: ignore[no-untyped-def]
    """A limit on a symbol nothing is called yet is kept (the feed may create it later),
    and the database says so (0004_11): the command shows it on stderr."""
    r = run("risk", "set", "MAX_EXPOSURE", "0.2", "--scope", "symbol", "--key", "BTCUSDT")
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == ("warning: no instrument is called 'BTCUSDT' yet: this "
                                "MAX_EXPOSURE limit applies to none until one is")
    assert "set, id" in r.stdout
