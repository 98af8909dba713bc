"""Strategy parameters: defaults plus the search space walk-forward optimisation explores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from strategies.market import ParamValue


class ParamError(ValueError):
    """A parameter value outside its declared range or of the wrong type (one line)."""


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """A parameter's default and its search space: [low, high] by `step`, or `choices`."""

    default: ParamValue
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple[ParamValue, ...] | None = None
    help: str = ""

    def __post_init__(self) -> None:
        if self.choices is not None and (self.low is not None or self.high is not None):
            raise ParamError("ParamSpec: give either low/high or choices, not both")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ParamError(f"ParamSpec: low {self.low} is above high {self.high}")
        if self.step is not None and self.step <= 0:
            raise ParamError(f"ParamSpec: step must be positive, got {self.step}")
        self.validate("default", self.default)

    def validate(self, name: str, value: object) -> ParamValue:
        kind = type(self.default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind:
            raise ParamError(f"parameter {name} must be {kind.__name__}, got {value!r}")
        assert isinstance(value, int | float | bool | str)
        if self.choices is not None and value not in self.choices:
            raise ParamError(f"parameter {name} must be one of {list(self.choices)}, got {value!r}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if self.low is not None and value < self.low:
                raise ParamError(f"parameter {name} must be >= {self.low}, got {value}")
            if self.high is not None and value > self.high:
                raise ParamError(f"parameter {name} must be <= {self.high}, got {value}")
        return value

    def grid(self) -> list[ParamValue]:
        """The values an optimiser tries: the choices, or low..high by step (default only)."""
        if self.choices is not None:
            return list(self.choices)
        if self.low is None or self.high is None or self.step is None:
            return [self.default]
        count = round((self.high - self.low) / self.step) + 1
        values = [self.low + i * self.step for i in range(count)]
        if isinstance(self.default, int):
            return sorted({round(v) for v in values})
        return [round(v, 10) for v in values]


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
