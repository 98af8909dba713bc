"""Strategy parameters: defaults plus the search space walk-forward optimisation explores."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from strategies.market import ParamValue


class ParamError(ValueError):
    """A parameter value outside its declared range or of the wrong type (one line)."""


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """A parameter's default, its search space and its valid domain.

    The search space (what walk-forward optimisation tries) is [low, high] by `step`, or
    `choices`; the domain (what a value may be at all) is [minimum, maximum] and `choices`.
    """

    default: ParamValue
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple[ParamValue, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    help: str = ""

    def __post_init__(self) -> None:
        if self.choices is not None and (self.low is not None or self.high is not None):
            raise ParamError("ParamSpec: give either low/high or choices, not both")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ParamError(f"ParamSpec: low {self.low:g} is above high {self.high:g}")
        outside = [v for v in (self.low, self.high) if v is not None and not self._inside(v)]
        if outside:
            raise ParamError(f"ParamSpec: search bound {outside[0]:g} is outside the domain")
        if self.step is not None and self.step <= 0:
            raise ParamError(f"ParamSpec: step must be positive, got {self.step}")
        self.validate("default", self.default)

    def _inside(self, value: float) -> bool:
        return (self.minimum is None or value >= self.minimum) and (
            self.maximum is None or value <= self.maximum
        )

    def validate(self, name: str, value: object) -> ParamValue:
        kind = type(self.default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind:
            raise ParamError(f"parameter {name} must be {kind.__name__}, got {value!r}")
        assert isinstance(value, int | float | bool | str)
        if self.choices is not None and value not in self.choices:
            raise ParamError(f"parameter {name} must be one of {list(self.choices)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            # NaN compares False with every bound: it would pass them all
            raise ParamError(f"parameter {name} must be a finite number, got {value!r}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if self.minimum is not None and value < self.minimum:
                raise ParamError(f"parameter {name} must be >= {self.minimum:g}, got {value}")
            if self.maximum is not None and value > self.maximum:
                raise ParamError(f"parameter {name} must be <= {self.maximum:g}, got {value}")
        return value

    def grid(self) -> list[ParamValue]:
        """The values an optimiser tries: the choices, or low..high by step (default only)."""
        if self.choices is not None:
            return list(self.choices)
        if self.low is None or self.high is None or self.step is None:
            return [self.default]
        # the steps that fit in [low, high] (the epsilon keeps one that float arithmetic
        # puts a hair above high, 0.1 + 0.2 > 0.3; rounding would add one past it)
        count = math.floor((self.high - self.low) / self.step + 1e-9) + 1
        values = [self.low + i * self.step for i in range(count)]
        if isinstance(self.default, int):
            grid: list[float] = sorted({round(v) for v in values})
        else:
            grid = [round(v, 10) for v in values]
        # (a rounded value may still fall outside the search space or the domain)
        return [v for v in grid if self.low <= v <= self.high and self._inside(v)]


def resolve_params(
    specs: Mapping[str, ParamSpec], overrides: Mapping[str, object]
) -> dict[str, ParamValue]:
    """Defaults overlaid with `overrides`, each checked against its spec."""
    unknown = sorted(set(overrides) - set(specs))
    if unknown:
        raise ParamError(f"unknown parameter(s) {', '.join(unknown)} (known: {', '.join(specs)})")
    return {
        name: spec.validate(name, overrides[name]) if name in overrides else spec.default
        for name, spec in specs.items()
    }


def param_grid(specs: Mapping[str, ParamSpec]) -> dict[str, Sequence[ParamValue]]:
    return {name: spec.grid() for name, spec in specs.items()}
