"""Strategies by name: the package's examples plus user folders of .py files, hot-reloaded.

Each user file is imported under its own module name (`mmats_user_strategies__<stem>_<hash
of its path>`), so two folders may both hold a `trend.py`. `reload_if_changed()` re-imports
the files whose content changed; when a new version fails to load, the last good one stays
registered and the failure is reported as one line naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import pkgutil
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


class StrategyLoader:
    def __init__(self, user_dirs: Iterable[str | Path] = (), *, examples: bool = True) -> None:
        self.user_dirs = [Path(d) for d in user_dirs]
        self._registry: dict[str, LoadedStrategy] = {}
        self._files: dict[Path, _FileState] = {}
        self.errors: dict[str, str] = {}  # origin -> the latest one-line error
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
        present = {p.resolve() for d in self.user_dirs for p in _py_files(d, report)}
        for path in sorted(set(self._files) - present):
            report.removed.extend(self._unregister_file(path))
            self.errors.pop(str(path), None)
        for path in sorted(present):
            source = path.read_bytes()
            digest = hashlib.sha256(source).hexdigest()
            state = self._files.get(path)
            if state is not None and state.digest == digest:
                continue
            try:
                classes = _strategy_classes(_import_file(path, source), str(path))
                self._check_duplicates(classes, path)
            except StrategyLoadError as exc:
                self.errors[str(path)] = str(exc)
                report.errors.append(str(exc))
                if state is not None:
                    state.digest = digest  # report a broken version once, keep the last good
                else:
                    self._files[path] = _FileState(digest, [])
                continue
            old = self._unregister_file(path)
            self._register(classes, str(path))
            self._files[path] = _FileState(digest, [c.name for c in classes])
            self.errors.pop(str(path), None)
            report.loaded.extend(c.name for c in classes)
            report.removed.extend(n for n in old if n not in report.loaded)
        return report

    def _check_duplicates(self, classes: list[type[IStrategy]], path: Path) -> None:
        own = set(self._files[path].names) if path in self._files else set()
        seen: set[str] = set()
        for cls in classes:
            if cls.name in seen:
                raise StrategyLoadError(f"{path}: strategy name {cls.name!r} is defined twice")
            seen.add(cls.name)
            if cls.name in self._registry and cls.name not in own:
                other = self._registry[cls.name].origin
                raise StrategyLoadError(
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


def _py_files(directory: Path, report: ReloadReport) -> list[Path]:
    if not directory.is_dir():
        report.errors.append(f"{directory}: strategy folder not found")
        return []
    return [p for p in sorted(directory.glob("*.py")) if not p.name.startswith("_")]


def _module_name(path: Path) -> str:
    tag = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)
    return f"{USER_NAMESPACE}__{stem}_{tag}"


def _import_file(path: Path, source: bytes) -> ModuleType:
    """The module of `source` (the bytes just read from `path` and hashed). Compiled here
    rather than through the import system's bytecode cache: that cache is checked by the
    file's mtime and size, so an edit within the same second that keeps the size (v1 ->
    v2) would run the old code."""
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
        _restore(name, previous)
        raise StrategyLoadError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from None
    except Exception as exc:  # whatever the file raises at import time
        _restore(name, previous)
        line = _line_in(path, exc)
        raise StrategyLoadError(
            f"{path}{line}: import failed: {type(exc).__name__}: {_one_line(exc)}"
        ) from None
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
        concrete.append(cls)
    if not concrete:
        raise StrategyLoadError(f"{origin}: no concrete IStrategy subclass found")
    return concrete
