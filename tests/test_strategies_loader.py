"""Loading strategies by name and from user folders, hot reload, load errors, isolation."""

from __future__ import annotations

import logging
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
