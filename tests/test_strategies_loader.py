"""Loading strategies by name and from user folders, hot reload, load errors, isolation."""

from __future__ import annotations

import logging
import re
import sys
import textwrap
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from strategies.base import IStrategy, SignalOutput
from strategies.examples.sma_crossover import SmaCrossover
from strategies.isolation import StrategyGuard
from strategies.loader import StrategyLoader, StrategyLoadError
from strategies.market import AccountState, Environment, StrategyContext
from strategies.signal import TradeSignal

NOW = datetime(2024, 5, 1, tzinfo=UTC)

USER_STRATEGY = """
from strategies.base import IStrategy
from strategies.params import ParamSpec


class Echo(IStrategy):
    name = "{name}"
    version = "{version}"
    parameters = {{"level": ParamSpec(1, minimum=0)}}

    def get_required_indicators(self):
        return []

    def on_bar(self, context):
        return self.signal(context, "X", "hold", reasoning="{says}")
"""


def write(folder: Path, filename: str, body: str) -> Path:
    path = folder / filename
    path.write_text(textwrap.dedent(body))
    return path


def user_file(
    folder: Path,
    filename: str = "echo.py",
    name: str = "echo",
    version: str = "1",
    says: str = "v1",
) -> Path:
    return write(folder, filename, USER_STRATEGY.format(name=name, version=version, says=says))


def context() -> StrategyContext:
    return StrategyContext(Environment.PAPER, NOW, {}, AccountState(Decimal(1), Decimal(1)))


def says(loader: StrategyLoader, name: str) -> str:
    out = loader.create(name).on_bar(context())
    assert not isinstance(out, list) and out is not None
    return out.reasoning


def test_examples_by_name() -> None:
    loader = StrategyLoader()
    assert loader.names() == [
        "donchian_breakout",
        "momentum_rotation",
        "rsi_mean_reversion",
        "sma_crossover",
    ]
    assert loader.get("sma_crossover") is SmaCrossover
    strategy = loader.create("sma_crossover", {"fast": 5})
    assert strategy.params["fast"] == 5
    assert loader.origin("sma_crossover") == "strategies.examples.sma_crossover"
    with pytest.raises(StrategyLoadError, match=r"no strategy named 'nope' \(known: donchian"):
        loader.get("nope")


def test_user_folder_and_hot_reload(tmp_path: Path) -> None:
    path = user_file(tmp_path)
    loader = StrategyLoader([tmp_path])
    assert "echo" in loader.names() and says(loader, "echo") == "v1"
    assert loader.origin("echo") == str(path.resolve())
    assert not loader.reload_if_changed().changed  # nothing edited: nothing reloaded

    user_file(tmp_path, says="v2")  # same size, possibly the same mtime: content decides
    report = loader.reload_if_changed()
    assert report.loaded == ["echo"] and report.errors == []
    assert says(loader, "echo") == "v2"

    user_file(tmp_path, name="echo2", says="v3")  # renamed inside the file
    report = loader.reload_if_changed()
    assert report.loaded == ["echo2"] and report.removed == ["echo"]
    assert "echo" not in loader.names() and says(loader, "echo2") == "v3"

    path.unlink()
    assert loader.reload_if_changed().removed == ["echo2"]
    assert "echo2" not in loader.names()


def test_same_file_name_in_two_folders_does_not_collide(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    user_file(one, "trend.py", name="trend_a", says="a")
    user_file(two, "trend.py", name="trend_b", says="b")
    loader = StrategyLoader([one, two], examples=False)
    assert loader.names() == ["trend_a", "trend_b"]
    assert says(loader, "trend_a") == "a" and says(loader, "trend_b") == "b"


def test_a_broken_edit_keeps_the_last_good_version(tmp_path: Path) -> None:
    path = user_file(tmp_path)
    loader = StrategyLoader([tmp_path], examples=False)
    path.write_text(path.read_text() + "\ndef broken(:\n")
    report = loader.reload_if_changed()
    last_line = len(path.read_text().splitlines())  # the broken `def`
    assert report.errors == [f"{path.resolve()}:{last_line}: syntax error: invalid syntax"]
    assert says(loader, "echo") == "v1"
    assert str(path.resolve()) in loader.errors
    assert loader.reload_if_changed().errors == []  # reported once per version
    user_file(tmp_path, says="fixed")
    assert loader.reload_if_changed().loaded == ["echo"] and says(loader, "echo") == "fixed"
    assert loader.errors == {}


BAD_FILES = {
    "syntax.py": ("class A(:\n    pass\n", ":1: syntax error: "),
    "empty.py": ("X = 1\n", ": no IStrategy subclass found"),
    "lookalike.py": (
        "class Fake:\n    name = 'fake'\n    def on_bar(self, context):\n        return None\n",
        ": class Fake is not an IStrategy (derive it from strategies.base.IStrategy)",
    ),
    "abstract.py": (
        "from strategies.base import IStrategy\n\nclass Half(IStrategy):\n    name = 'half'\n"
        "    def get_required_indicators(self):\n        return []\n",
        ": class Half does not implement on_bar",
    ),
    "noname.py": (
        "from strategies.base import IStrategy\n\nclass NoName(IStrategy):\n"
        "    def get_required_indicators(self):\n        return []\n"
        "    def on_bar(self, context):\n        return None\n",
        ": class NoName has no `name` (a string)",
    ),
    "crash.py": ("import math\n\nVALUE = 1 / 0\n", ":3: import failed: ZeroDivisionError: "),
    "missing.py": (
        "import not_a_module_anywhere\n",
        ":1: import failed: ModuleNotFoundError: No module named 'not_a_module_anywhere'",
    ),
    "dupe.py": (
        USER_STRATEGY.format(name="sma_crossover", version="1", says="x"),
        ": strategy name 'sma_crossover' is already defined by strategies.examples.sma_crossover",
    ),
}


@pytest.mark.parametrize("filename", sorted(BAD_FILES))
def test_bad_files_give_one_line_messages(tmp_path: Path, filename: str) -> None:
    body, expected = BAD_FILES[filename]
    path = write(tmp_path, filename, body)
    loader = StrategyLoader([tmp_path])
    message = loader.errors[str(path.resolve())]
    assert message.startswith(str(path.resolve())), message
    assert expected in message, message
    assert "\n" not in message
    assert len(loader.names()) == 4  # the examples still load


def test_duplicate_names_across_user_files(tmp_path: Path) -> None:
    user_file(tmp_path, "a.py", name="same")
    second = user_file(tmp_path, "b.py", name="same")
    loader = StrategyLoader([tmp_path], examples=False)
    assert loader.names() == ["same"]
    assert loader.errors[str(second.resolve())].endswith(
        f"strategy name 'same' is already defined by {(tmp_path / 'a.py').resolve()}"
    )


def test_missing_folder_is_reported(tmp_path: Path) -> None:
    loader = StrategyLoader(examples=False)
    loader.user_dirs.append(tmp_path / "nope")
    assert loader.reload_if_changed().errors == [f"{tmp_path / 'nope'}: strategy folder not found"]


class Flaky(IStrategy):
    name = "flaky"
    version = "2.0"

    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    def get_required_indicators(self) -> list[str]:
        return []

    def on_bar(self, context: StrategyContext) -> SignalOutput:
        if self.fail:
            raise ZeroDivisionError("division by zero\nsecond line")
        return self.signal(context, "X", "hold")


class Wrong(Flaky):
    name = "wrong"

    def on_bar(self, context: StrategyContext) -> SignalOutput:
        return {"action": "buy"}  # type: ignore[return-value]


def test_crash_isolation_and_disabling_after_n_errors(caplog: pytest.LogCaptureFixture) -> None:
    guard = StrategyGuard(max_consecutive_errors=3)
    flaky, healthy = Flaky(), SmaCrossover()
    ctx = context()
    with caplog.at_level(logging.ERROR, logger="strategies"):
        first = guard.run_isolated(flaky, ctx)
    assert first.error is not None and not first.ok
    assert (first.error.strategy, first.error.version, first.error.error_type) == (
        "flaky",
        "2.0",
        "ZeroDivisionError",
    )
    assert first.error.message == "division by zero" and first.error.consecutive == 1
    assert str(first.error) == "flaky 2.0: ZeroDivisionError: division by zero (1 in a row)"
    assert "flaky 2.0: ZeroDivisionError" in caplog.text

    assert guard.run_isolated(healthy, ctx).ok  # the others keep running
    second = guard.run_isolated(flaky, ctx)
    assert second.error is not None and not second.error.disabled
    third = guard.run_isolated(flaky, ctx)
    assert third.error is not None and third.error.disabled and guard.is_disabled(flaky)
    assert str(third.error).endswith("(3 in a row) -> strategy disabled")

    flaky.fail = False
    skipped = guard.run_isolated(flaky, ctx)
    assert skipped.skipped and skipped.signals == [] and skipped.error is None
    assert guard.last_error(flaky) == third.error
    assert guard.run_isolated(healthy, ctx).ok

    guard.enable(flaky)
    result = guard.run_isolated(flaky, ctx)
    assert result.ok and [s.action for s in result.signals] == ["hold"]


def test_a_success_resets_the_count_and_bad_return_values_are_errors() -> None:
    guard = StrategyGuard(max_consecutive_errors=2)
    flaky = Flaky()
    guard.run_isolated(flaky, context())
    flaky.fail = False
    guard.run_isolated(flaky, context())
    flaky.fail = True
    assert not guard.run_isolated(flaky, context()).error.disabled  # type: ignore[union-attr]

    wrong = Wrong()
    result = guard.run_isolated(wrong, context())
    assert result.error is not None and result.error.error_type == "TypeError"
    assert "on_bar returned dict, expected TradeSignal" in result.error.message
    assert guard.run_isolated(wrong, context(), call=wrong.on_timer).ok
    with pytest.raises(ValueError, match="max_consecutive_errors must be >= 1"):
        StrategyGuard(0)


def test_strategies_import_nothing_of_the_project() -> None:
    import subprocess
    import sys

    code = (
        "import sys, strategies, strategies.loader, strategies.series, strategies.isolation\n"
        "loader = strategies.loader.StrategyLoader()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'db', 'workers', 'api', 'ml', 'psycopg', 'sqlalchemy'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_user_file_may_import_from_the_package_root(tmp_path: Path) -> None:
    write(
        tmp_path,
        "root.py",
        """
        from strategies import IStrategy, StrategyContext


        class Root(IStrategy):
            name = "root"

            def get_required_indicators(self) -> list[str]:
                return ["EMA_5"]

            def on_bar(self, context: StrategyContext):
                return self.signal(context, "X", "hold", price=1.5, reasoning="root")
    """,
    )
    loader = StrategyLoader([tmp_path], examples=False)
    assert loader.names() == ["root"] and says(loader, "root") == "root"


# ----------------------------------------------------------------------------- review fixes


def test_sys_exit_at_import_is_a_load_error_not_the_callers_exit(tmp_path: Path) -> None:
    user_file(tmp_path, "good.py", name="good")
    bye = write(tmp_path, "bye.py", "import sys\n\nsys.exit('no config')\n")
    loader = StrategyLoader([tmp_path], examples=False)
    assert loader.names() == ["good"]
    assert loader.errors == {
        str(bye.resolve()): f"{bye.resolve()}:3: import failed: SystemExit: no config"}


def test_keyboard_interrupt_at_import_still_stops_the_caller(tmp_path: Path) -> None:
    write(tmp_path, "stop.py", "raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        StrategyLoader([tmp_path], examples=False)


class Exits(Flaky):
    name = "exits"

    def on_bar(self, context: StrategyContext) -> SignalOutput:
        raise SystemExit("strategy called sys.exit")


class Interrupted(Flaky):
    name = "interrupted"

    def on_bar(self, context: StrategyContext) -> SignalOutput:
        raise KeyboardInterrupt


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_sys_exit_in_on_bar_is_recorded_like_any_error(timeout: float | None) -> None:
    guard = StrategyGuard(max_consecutive_errors=2)
    strategy = Exits()
    result = guard.run_isolated(strategy, context(), timeout=timeout)
    assert result.error is not None and not result.ok
    assert str(result.error) == "exits 2.0: SystemExit: strategy called sys.exit (1 in a row)"
    again = guard.run_isolated(strategy, context(), timeout=timeout)
    assert again.error is not None and again.error.disabled
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C is not the strategy's error
        guard.run_isolated(Interrupted(), context(), timeout=timeout)


class Impostor(Flaky):
    name = "impostor"

    def on_bar(self, context: StrategyContext) -> SignalOutput:
        mine = self.signal(context, "X", "buy")
        if self.fail:  # another strategy's name
            return [mine, TradeSignal(strategy="sma_crossover", version=self.version,
                                      symbol="X", action="buy", ts=context.now)]
        return TradeSignal(strategy=self.name, version="9", symbol="X", action="buy",
                           ts=context.now)


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_a_signal_signed_by_another_strategy_is_refused(timeout: float | None) -> None:
    guard = StrategyGuard()
    impostor = Impostor()
    result = guard.run_isolated(impostor, context(), timeout=timeout)
    assert result.signals == [] and result.error is not None
    assert str(result.error) == (
        "impostor 2.0: SignalError: on_bar returned a signal of sma_crossover 2.0, not of "
        "impostor 2.0: refused (make it with self.signal) (1 in a row)")
    impostor.fail = False  # its own name, another version
    result = guard.run_isolated(impostor, context(), timeout=timeout)
    assert result.error is not None and "a signal of impostor 9, not of impostor 2.0" in str(
        result.error)
    assert guard.run_isolated(Flaky(), context()).error is not None  # (the others: unchanged)


def test_what_is_not_a_regular_file_in_the_folder_is_skipped_or_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user_file(tmp_path, "ok.py", name="ok")
    (tmp_path / "notes.py").mkdir()  # a folder named like a file: not a strategy file
    dangling = tmp_path / "link.py"
    dangling.symlink_to(tmp_path / "gone.py")
    loader = StrategyLoader([tmp_path], examples=False)
    assert loader.names() == ["ok"]
    assert loader.errors == {str(dangling): f"{dangling}: symbolic link to "
                             f"{tmp_path.resolve() / 'gone.py'}, which does not exist"}
    assert loader.reload_if_changed().errors == []  # reported once
    dangling.unlink()
    assert loader.reload_if_changed().errors == [] and loader.errors == {}

    # a file deleted between the listing and its reading: the others still (re)load
    racing = user_file(tmp_path, "racing.py", name="racing")
    user_file(tmp_path, "ok.py", name="ok", says="v2")
    read_bytes = Path.read_bytes

    def vanish(self: Path) -> bytes:
        if self.name == "racing.py":
            self.unlink()
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", vanish)
    report = loader.reload_if_changed()
    monkeypatch.undo()
    assert report.errors == [f"{racing.resolve()}: cannot be read: No such file or directory"]
    assert report.loaded == ["ok"] and says(loader, "ok") == "v2"
    assert loader.reload_if_changed().errors == [] and loader.errors == {}  # gone now
    assert loader.names() == ["ok"]


def test_a_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    outside, folder = tmp_path / "elsewhere", tmp_path / "strategies"
    outside.mkdir()
    folder.mkdir()
    target = user_file(outside, "secret.py", name="outside")
    link = folder / "mine.py"
    link.symlink_to(target)
    user_file(folder, "real.py", name="real")
    (folder / "alias.py").symlink_to(folder / "real.py")  # inside the folder: followed
    loader = StrategyLoader([folder], examples=False)
    assert loader.names() == ["real"]
    assert loader.origin("real") == str((folder / "real.py").resolve())
    assert loader.errors == {str(link): f"{link}: symbolic link to {target.resolve()}, outside "
                             f"the strategy folder {folder.resolve()}: refused (copy the file "
                             "into the folder)"}
    link.unlink()
    user_file(folder, "mine.py", name="outside")  # a copy is loaded
    assert loader.reload_if_changed().loaded == ["outside"] and loader.errors == {}


def test_a_name_conflict_clears_once_the_other_file_goes_or_renames(tmp_path: Path) -> None:
    first = user_file(tmp_path, "b.py", name="x", says="b")
    loader = StrategyLoader([tmp_path], examples=False)
    copy = user_file(tmp_path, "a.py", name="x", says="a")
    report = loader.reload_if_changed()
    assert report.errors == [f"{copy.resolve()}: strategy name 'x' is already defined by "
                             f"{first.resolve()}"]
    assert loader.reload_if_changed().errors == []  # reported once
    first.unlink()
    report = loader.reload_if_changed()
    assert (report.loaded, report.removed, report.errors) == (["x"], ["x"], [])
    assert says(loader, "x") == "a" and loader.origin("x") == str(copy.resolve())
    assert loader.errors == {}
    # the other way round: the owner renames its strategy
    third = user_file(tmp_path, "c.py", name="x", says="c")
    assert loader.reload_if_changed().errors
    user_file(tmp_path, "a.py", name="y", says="a")
    report = loader.reload_if_changed()
    assert sorted(report.loaded) == ["x", "y"] and report.errors == []
    assert loader.origin("x") == str(third.resolve()) and says(loader, "x") == "c"


def test_sys_modules_holds_the_registered_version_only(tmp_path: Path) -> None:
    path = user_file(tmp_path, "s.py", name="good")
    loader = StrategyLoader([tmp_path], examples=False)
    cls = loader.get("good")
    module = cls.__module__
    assert sys.modules[module].Echo is cls
    path.write_text("class Nothing:\n    pass\n")  # imports, defines no strategy
    assert loader.reload_if_changed().errors and loader.get("good") is cls
    assert sys.modules[module].Echo is cls  # the module the class lives in
    copy = user_file(tmp_path, "t.py", name="good")  # refused: the name is taken
    assert loader.reload_if_changed().errors
    assert not any(k.startswith("mmats_user_strategies__t_") for k in sys.modules)
    copy.unlink()
    path.unlink()
    assert loader.reload_if_changed().removed == ["good"]
    assert module not in sys.modules


@pytest.mark.parametrize(("name", "version", "says"), [
    ("my strategy", "1.0.0", "name 'my strategy' is not valid (1-64 characters: a letter, "
     "then letters, digits, _ . -)"),
    ("x" * 65, "1.0.0", f"name '{'x' * 65}' is not valid"),
    ("1st", "1.0.0", "name '1st' is not valid"),
    ("ok_name", "2 beta", "version '2 beta' is not valid (1-32 characters: a letter or digit, "
     "then letters, digits, _ . + -)"),
    ("ok_name", "v" * 33, "is not valid"),
    ("ok_name", "+1", "version '+1' is not valid"),
    ("ok_name", 2, "version must be a string, got 2"),
])
def test_metadata_the_trading_core_refuses_is_refused_at_load(
        tmp_path: Path, name: str, version: object, says: str) -> None:
    path = write(tmp_path, "m.py", USER_STRATEGY.format(name="NAME", version="V", says="x")
                 .replace('"NAME"', repr(name)).replace('"V"', repr(version)))
    loader = StrategyLoader([tmp_path], examples=False)
    assert loader.names() == [] and list(loader.errors) == [str(path.resolve())]
    message = loader.errors[str(path.resolve())]
    assert message.startswith(f"{path.resolve()}: class Echo: ") and says in message
    assert "\n" not in message


def test_the_metadata_rules_are_the_trading_core_s(tmp_path: Path) -> None:
    from strategies import loader as module

    schema = (Path(__file__).resolve().parent.parent / "db" / "sql" / "schema.sql").read_text()
    for constraint, rule in [("strategies_name_format", module._NAME_RULE),
                             ("strategies_version_format", module._VERSION_RULE),
                             ("runs_strategy_format", module._NAME_RULE),
                             ("runs_strategy_version_format", module._VERSION_RULE)]:
        found = re.search(rf"CONSTRAINT {constraint}\s+CHECK \(\w+ ~ '\^(.*?)\$'\)", schema)
        assert found is not None, constraint
        assert found.group(1) == rule.pattern, constraint
    user_file(tmp_path, name="A" + "b.-_9" * 12 + "xyz", version="Z" + "9.+-_" * 6 + "0")
    assert StrategyLoader([tmp_path], examples=False).names() == ["A" + "b.-_9" * 12 + "xyz"]
