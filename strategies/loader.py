"""Strategies by name: the package's examples plus user folders of .py files, hot-reloaded.

Each user file is imported under its own module name (`mmats_user_strategies__<stem>_<hash
of its path>`), so two folders may both hold a `trend.py`. `reload_if_changed()` re-imports
the files whose content changed; when a new version fails to load, the last good one stays
registered and the failure is reported as one line naming the file and the problem.

Only regular files are loaded; a symbolic link is followed only to a file inside its own
folder (one to a file elsewhere, or to nothing, is refused with a one-line error naming
the link). A file refused only because another file already defines its strategy name is
tried again at every reload, so it loads once that other file is gone or renamed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import pkgutil
import re
import sys
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from strategies.base import IStrategy

USER_NAMESPACE = "mmats_user_strategies"
EXAMPLES_PACKAGE = "strategies.examples"


class StrategyLoadError(Exception):
    """A strategy file or name that cannot be used; str() is one line naming the file."""


class _NameTaken(StrategyLoadError):
    """A file whose only fault is a strategy name another file already defines."""


# what the trading core accepts (trading.strategies, backtest.runs: db/sql/schema.sql)
_NAME_RULE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_VERSION_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,31}")


@dataclass(frozen=True, slots=True)
class LoadedStrategy:
    name: str
    cls: type[IStrategy]
    origin: str  # a file path, or the module name of a packaged example


@dataclass(slots=True)
class ReloadReport:
    loaded: list[str] = field(default_factory=list)  # names (re)loaded from changed files
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one line each

    @property
    def changed(self) -> bool:
        return bool(self.loaded or self.removed)


@dataclass(slots=True)
class _FileState:
    digest: str
    names: list[str]
    # a version refused only for a name another file defines: tried again at each reload
    waiting: tuple[ModuleType, list[type[IStrategy]]] | None = None


class StrategyLoader:
    def __init__(self, user_dirs: Iterable[str | Path] = (), *, examples: bool = True) -> None:
        self.user_dirs = [Path(d) for d in user_dirs]
        self._registry: dict[str, LoadedStrategy] = {}
        self._files: dict[Path, _FileState] = {}
        self.errors: dict[str, str] = {}  # origin -> the latest one-line error
        self._refused: set[str] = set()  # listed files refused before reading them
        if examples:
            self._load_examples()
        self.reload_if_changed()

    # ---- lookup
    def names(self) -> list[str]:
        return sorted(self._registry)

    def get(self, name: str) -> type[IStrategy]:
        try:
            return self._registry[name].cls
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise StrategyLoadError(f"no strategy named {name!r} (known: {known})") from None

    def create(self, name: str, params: Mapping[str, object] | None = None) -> IStrategy:
        return self.get(name)(params)

    def origin(self, name: str) -> str:
        self.get(name)
        return self._registry[name].origin

    # ---- loading
    def _load_examples(self) -> None:
        package = importlib.import_module(EXAMPLES_PACKAGE)
        for info in pkgutil.iter_modules(package.__path__):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{EXAMPLES_PACKAGE}.{info.name}")
            origin = module.__name__
            try:
                classes = _strategy_classes(module, origin)
                self._register(classes, origin)
            except StrategyLoadError as exc:
                self.errors[origin] = str(exc)

    def reload_if_changed(self) -> ReloadReport:
        """Import new or edited user files, drop deleted ones; report what changed."""
        report = ReloadReport()
        present = self._present(report)
        for path in sorted(set(self._files) - present):
            report.removed.extend(self._unregister_file(path))
            sys.modules.pop(_module_name(path), None)
            if str(path) not in self._refused:  # (now a refused link: its error stays)
                self.errors.pop(str(path), None)
        for path in sorted(present):
            state = self._files.get(path)
            try:
                source = path.read_bytes()
            except OSError as exc:  # deleted since the listing, unreadable, ...
                self._error(report, str(path),
                            f"{path}: cannot be read: {exc.strerror or type(exc).__name__}")
                if state is None:
                    self._files[path] = _FileState("", [])
                else:  # the last good version stays; the file is read afresh next time
                    state.digest, state.waiting = "", None
                continue
            digest = hashlib.sha256(source).hexdigest()
            if state is not None and state.digest == digest:
                continue
            try:
                module = _import_file(path, source)
                classes = _strategy_classes(module, str(path))
                self._check_duplicates(classes, path)
            except StrategyLoadError as exc:
                self.errors[str(path)] = str(exc)
                report.errors.append(str(exc))
                waiting = (module, classes) if isinstance(exc, _NameTaken) else None
                if state is not None:
                    state.digest = digest  # report a broken version once, keep the last good
                    state.waiting = waiting
                else:
                    self._files[path] = _FileState(digest, [], waiting)
                continue
            self._install(path, digest, module, classes, report)
        for path in sorted(present):  # a name conflict that a removal or an edit ended
            state = self._files.get(path)
            if state is None or state.waiting is None:
                continue
            module, classes = state.waiting
            try:
                self._check_duplicates(classes, path)
            except StrategyLoadError as exc:  # (another file may define the name now)
                self._error(report, str(path), str(exc))
                continue
            self._install(path, state.digest, module, classes, report)
        return report

    def _present(self, report: ReloadReport) -> set[Path]:
        """The user files to load (resolved paths); refuses, once each, what is not a
        regular file inside its folder."""
        present: set[Path] = set()
        refused: set[str] = set()
        for directory in self.user_dirs:
            for listed, resolved, problem in _py_files(directory, report):
                if problem is None:
                    present.add(resolved)
                    continue
                key = str(listed)
                refused.add(key)
                self._error(report, key, f"{key}: {problem}")
        for key in self._refused - refused:
            self.errors.pop(key, None)
        self._refused = refused
        return present

    def _error(self, report: ReloadReport, key: str, text: str) -> None:
        """Record a one-line error of a file (keyed by its path); reported when new."""
        if self.errors.get(key) != text:
            report.errors.append(text)
        self.errors[key] = text

    def _install(self, path: Path, digest: str, module: ModuleType,
                 classes: list[type[IStrategy]], report: ReloadReport) -> None:
        old = self._unregister_file(path)
        self._register(classes, str(path))
        sys.modules[module.__name__] = module
        self._files[path] = _FileState(digest, [c.name for c in classes])
        self.errors.pop(str(path), None)
        report.loaded.extend(c.name for c in classes)
        report.removed.extend(n for n in old if n not in report.loaded)

    def _check_duplicates(self, classes: list[type[IStrategy]], path: Path) -> None:
        own = set(self._files[path].names) if path in self._files else set()
        seen: set[str] = set()
        for cls in classes:
            if cls.name in seen:
                raise StrategyLoadError(f"{path}: strategy name {cls.name!r} is defined twice")
            seen.add(cls.name)
            if cls.name in self._registry and cls.name not in own:
                other = self._registry[cls.name].origin
                raise _NameTaken(
                    f"{path}: strategy name {cls.name!r} is already defined by {other}"
                )

    def _register(self, classes: list[type[IStrategy]], origin: str) -> None:
        for cls in classes:
            if cls.name in self._registry:
                other = self._registry[cls.name].origin
                raise StrategyLoadError(
                    f"{origin}: strategy name {cls.name!r} is already defined by {other}"
                )
            self._registry[cls.name] = LoadedStrategy(cls.name, cls, origin)

    def _unregister_file(self, path: Path) -> list[str]:
        state = self._files.pop(path, None)
        names = state.names if state else []
        for name in names:
            self._registry.pop(name, None)
        return names


def _py_files(directory: Path,
              report: ReloadReport) -> list[tuple[Path, Path, str | None]]:
    """(as listed, resolved, why it is refused or None) of each `*.py` of the folder that is
    a regular file or a link to one: a link to a file outside the folder, or to nothing,
    is refused; a folder named `x.py` is not a strategy file."""
    if not directory.is_dir():
        report.errors.append(f"{directory}: strategy folder not found")
        return []
    try:
        home = directory.resolve()
        listed = sorted(directory.absolute().glob("*.py"))
    except OSError as exc:
        report.errors.append(f"{directory}: strategy folder cannot be read: {exc.strerror}")
        return []
    files: list[tuple[Path, Path, str | None]] = []
    for path in listed:
        if path.name.startswith("_"):
            continue
        try:
            resolved = path.resolve()
            link = path.is_symlink()
            regular = path.is_file()
        except (OSError, RuntimeError) as exc:  # a link loop (RuntimeError before 3.13), ...
            why = getattr(exc, "strerror", None) or _one_line(exc)
            files.append((path, path, f"cannot be read: {why}"))
            continue
        if link and not resolved.exists():
            files.append((path, resolved, f"symbolic link to {resolved}, which does not exist"))
        elif not regular:
            continue  # a folder, a pipe, ...
        elif link and not resolved.is_relative_to(home):
            files.append((path, resolved, f"symbolic link to {resolved}, outside the strategy "
                          f"folder {home}: refused (copy the file into the folder)"))
        else:
            files.append((path, resolved, None))
    return files


def _module_name(path: Path) -> str:
    tag = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)
    return f"{USER_NAMESPACE}__{stem}_{tag}"


def _import_file(path: Path, source: bytes) -> ModuleType:
    """The module of `source` (the bytes just read from `path` and hashed). Compiled here
    rather than through the import system's bytecode cache: that cache is checked by the
    file's mtime and size, so an edit within the same second that keeps the size (v1 ->
    v2) would run the old code. sys.modules is left as it was: the caller installs the
    module once its strategies are registered."""
    name = _module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise StrategyLoadError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(name)
    sys.modules[name] = module  # dataclasses and typing resolve names through sys.modules
    try:
        exec(compile(source, str(path), "exec", dont_inherit=True), module.__dict__)
    except SyntaxError as exc:
        raise StrategyLoadError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # whatever the file raises at import time, sys.exit too
        line = _line_in(path, exc)
        raise StrategyLoadError(
            f"{path}{line}: import failed: {type(exc).__name__}: {_one_line(exc)}"
        ) from None
    finally:
        # the module enters sys.modules when it is registered (the last good one stays)
        _restore(name, previous)
    return module


def _restore(name: str, previous: ModuleType | None) -> None:
    if previous is None:
        sys.modules.pop(name, None)
    else:
        sys.modules[name] = previous


def _line_in(path: Path, exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    return f":{frames[-1].lineno}" if frames else ""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else "(no message)"


def _strategy_classes(module: ModuleType, origin: str) -> list[type[IStrategy]]:
    """The concrete IStrategy subclasses a module defines, checked; one-line errors."""
    own = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj) and obj.__module__ == module.__name__
    ]
    strategies = [c for c in own if issubclass(c, IStrategy)]
    if not strategies:
        lookalikes = [c.__name__ for c in own if hasattr(c, "on_bar")]
        if lookalikes:
            raise StrategyLoadError(
                f"{origin}: class {lookalikes[0]} is not an IStrategy "
                "(derive it from strategies.base.IStrategy)"
            )
        raise StrategyLoadError(f"{origin}: no IStrategy subclass found")
    concrete = []
    for cls in strategies:
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
            if cls.__name__.startswith("_") or cls.__name__.startswith("Base"):
                continue  # a shared base class, not meant to run
            raise StrategyLoadError(f"{origin}: class {cls.__name__} does not implement {missing}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name.strip():
            raise StrategyLoadError(f"{origin}: class {cls.__name__} has no `name` (a string)")
        if not _NAME_RULE.fullmatch(name):
            raise StrategyLoadError(
                f"{origin}: class {cls.__name__}: name {name!r} is not valid (1-64 characters:"
                " a letter, then letters, digits, _ . -)"
            )
        version = getattr(cls, "version", None)
        if not isinstance(version, str):
            raise StrategyLoadError(
                f"{origin}: class {cls.__name__}: version must be a string, got {version!r}"
            )
        if not _VERSION_RULE.fullmatch(version):
            raise StrategyLoadError(
                f"{origin}: class {cls.__name__}: version {version!r} is not valid (1-32"
                " characters: a letter or digit, then letters, digits, _ . + -)"
            )
        concrete.append(cls)
    if not concrete:
        raise StrategyLoadError(f"{origin}: no concrete IStrategy subclass found")
    return concrete
