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


@pytest.mark.parametrize(("spec", "grid"), [
    # (10 - 1) / 6 = 1.5 rounded up to 2 steps gave [1, 7, 13]: past high and maximum
    (ParamSpec(5, low=1, high=10, step=6, minimum=1, maximum=10), [1, 7]),
    (ParamSpec(1.0, low=0.0, high=1.0, step=0.6, maximum=1.0), [0.0, 0.6]),
    (ParamSpec(0.3, low=0.1, high=0.3, step=0.1), [0.1, 0.2, 0.3]),  # 0.1 + 0.2 > 0.3
    (ParamSpec(0.0, low=-0.5, high=0.5, step=0.25), [-0.5, -0.25, 0.0, 0.25, 0.5]),
    (ParamSpec(2, low=1, high=3, step=0.75, maximum=3), [1, 2]),  # round(2.5) = 2, 3.25 out
    (ParamSpec(3, low=1, high=3, step=0.8, maximum=3), [1, 2, 3]),  # 1, 1.8, 2.6 rounded
])
def test_the_grid_stays_inside_the_search_space_and_the_domain(spec, grid):
    assert spec.grid() == grid
