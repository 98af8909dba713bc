"""A strategy parameter's value is checked against its spec: NaN and infinities too."""

from __future__ import annotations

import pytest

from strategies.params import ParamError, ParamSpec, resolve_params

SPECS = {"size": ParamSpec(1.0, minimum=0.01, maximum=1.0), "free": ParamSpec(0.5)}


@pytest.mark.parametrize("name", ["size", "free"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_refused_naming_the_parameter(name, value):
    """NaN compares False with every bound, so `size=nan` passed minimum and maximum."""
    with pytest.raises(ParamError, match=rf"^parameter {name} must be a finite number, "
                       rf"got {value!r}$"):
        resolve_params(SPECS, {name: value})


def test_finite_values_still_pass_and_bounds_still_hold():
    assert resolve_params(SPECS, {"size": 0.5, "free": 1e300}) == {"size": 0.5, "free": 1e300}
    assert resolve_params(SPECS, {"size": 1}) == {"size": 1.0, "free": 0.5}
    with pytest.raises(ParamError, match="parameter size must be <= 1"):
        resolve_params(SPECS, {"size": 2.0})
    with pytest.raises(ParamError, match="must be a finite number"):
        ParamSpec(float("nan"))


def test_the_cli_s_params_nan_is_refused():
    from strategies.loader import StrategyLoader
    from workers.backtest.config import parse_params

    with pytest.raises(ParamError, match="parameter size must be a finite number, got nan"):
        StrategyLoader().create("sma_crossover", parse_params("size=nan"))
