"""Monte Carlo resampling of a trade list: determinism, hand-enumerated paths, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workers.backtest import montecarlo
from workers.backtest.montecarlo import MonteCarloResult, run_montecarlo

KEYS = ["p5", "p25", "p50", "p75", "p95", "mean"]
# decimals that are not exact in binary, so summation order shows in the last bits
PNLS = [12.3, -4.1, 7.7, -15.2, 0.3, 9.9, -2.2, 5.5, -8.8, 3.1, 0.7, -1.9]


def paths_of(pnls: list[float], method: str, *, paths: int = 200, seed: int = 0,
             cash: float = 100.0, ruin_level: float = 0.5,
             chunk: int = 1000) -> montecarlo._Paths:
    array = np.array(pnls, dtype=np.float64)
    return montecarlo._simulate_paths(array, cash, method, paths, seed, ruin_level, chunk)


def test_same_arguments_give_the_same_result() -> None:
    for method in ("shuffle", "bootstrap"):
        first = run_montecarlo(PNLS, 100.0, method=method, paths=300, seed=7)
        again = run_montecarlo(PNLS, 100.0, method=method, paths=300, seed=7)
        assert first == again
        assert first.to_dict() == again.to_dict()


def test_a_different_seed_gives_a_different_bootstrap() -> None:
    a = run_montecarlo(PNLS, 100.0, method="bootstrap", paths=300, seed=1)
    b = run_montecarlo(PNLS, 100.0, method="bootstrap", paths=300, seed=2)
    assert a.final_return != b.final_return
    assert a.max_drawdown != b.max_drawdown


def test_shuffle_ends_every_path_at_the_plain_sum() -> None:
    expected = (100.0 + math.fsum(PNLS)) / 100.0 - 1
    outcome = paths_of(PNLS, "shuffle")
    assert np.all(outcome.final_return == expected)
    result = run_montecarlo(PNLS, 100.0, paths=200)
    assert result.final_return == dict.fromkeys(KEYS, expected)
    # the order changes the drawdowns, though
    assert len(set(outcome.max_drawdown.tolist())) > 1


def test_shuffle_of_two_trades_by_hand() -> None:
    # +10 then -20: equity 110, 90 -> drawdown 1 - 90/110 = 2/11
    # -20 then +10: equity 80, 90 -> drawdown from starting_cash 100: 0.2
    # both orders end at 90: final return -0.1
    outcome = paths_of([10.0, -20.0], "shuffle", paths=200)
    drawdowns = outcome.max_drawdown.tolist()
    assert set(np.round(drawdowns, 12)) == {round(2 / 11, 12), 0.2}
    np.testing.assert_allclose(outcome.final_return, -0.1)
    assert not outcome.ruined.any()


def test_bootstrap_of_two_trades_by_hand() -> None:
    # the four possible draws of two trades out of (+10, -20), from 100:
    #   +10 +10 -> 120: return  0.2, drawdown 0
    #   +10 -20 -> 90:  return -0.1, drawdown 2/11
    #   -20 +10 -> 90:  return -0.1, drawdown 0.2
    #   -20 -20 -> 60:  return -0.4, drawdown 0.4
    possible = {(0.2, 0.0), (-0.1, round(2 / 11, 12)), (-0.1, 0.2), (-0.4, 0.4)}
    outcome = paths_of([10.0, -20.0], "bootstrap", paths=400)
    seen = {
        (round(r, 12), round(d, 12))
        for r, d in zip(outcome.final_return.tolist(), outcome.max_drawdown.tolist(),
                        strict=True)
    }
    assert seen == possible


def test_all_gains_have_no_drawdown_and_no_ruin() -> None:
    for method in ("shuffle", "bootstrap"):
        result = run_montecarlo([1.0, 2.5, 0.5, 4.0], 100.0, method=method, paths=100)
        assert result.max_drawdown == dict.fromkeys(KEYS, 0.0)
        assert result.probability_of_ruin == 0.0


def test_a_single_sixty_percent_loss_ruins_every_path() -> None:
    # whatever the order, the gains before the loss are at most +10: equity touches
    # 100 + 10 - 60 = 50 = 100 * 0.5 at best, and touching the ruin level is ruin
    result = run_montecarlo([5.0, 5.0, -60.0], 100.0, paths=100, ruin_level=0.5)
    assert result.probability_of_ruin == 1.0
    # the worst any order can do is the loss first: equity 40, above a ruin level of 39
    lower = run_montecarlo([5.0, 5.0, -60.0], 100.0, paths=100, ruin_level=0.39)
    assert lower.probability_of_ruin == 0.0


def test_probability_of_ruin_counts_the_ruined_paths() -> None:
    # ruined exactly when the -60 comes first (equity 40); +100 first peaks at 200, ends 140
    outcome = paths_of([-60.0, 100.0], "shuffle", paths=500)
    result = run_montecarlo([-60.0, 100.0], 100.0, paths=500)
    assert result.probability_of_ruin == np.count_nonzero(outcome.ruined) / 500
    assert 0.4 < result.probability_of_ruin < 0.6
    # the ruined paths are exactly those with the deeper drawdown (1 - 40/100)
    np.testing.assert_array_equal(outcome.ruined, np.isclose(outcome.max_drawdown, 0.6))


def test_bootstrap_percentiles_are_ordered() -> None:
    pnls = np.random.default_rng(3).normal(0.5, 10.0, 250).tolist()
    result = run_montecarlo(pnls, 1000.0, method="bootstrap", paths=500, seed=11)
    for summary in (result.final_return, result.max_drawdown):
        levels = [summary[k] for k in ("p5", "p25", "p50", "p75", "p95")]
        assert levels == sorted(levels)
        assert levels[0] < levels[-1]
        assert levels[0] <= summary["mean"] <= levels[-1]


def test_chunking_does_not_change_the_result() -> None:
    for method in ("shuffle", "bootstrap"):
        whole = paths_of(PNLS, method, paths=50, chunk=50)
        for chunk in (1, 7, 49):
            part = paths_of(PNLS, method, paths=50, chunk=chunk)
            np.testing.assert_array_equal(part.final_return, whole.final_return)
            np.testing.assert_array_equal(part.max_drawdown, whole.max_drawdown)
            np.testing.assert_array_equal(part.ruined, whole.ruined)
        assert run_montecarlo(PNLS, 100.0, method=method, paths=50, _chunk_paths=3) == (
            run_montecarlo(PNLS, 100.0, method=method, paths=50)
        )


def test_default_chunks_stay_within_fifty_megabytes() -> None:
    rows = montecarlo._chunk_rows(100_000, None)
    assert 1 <= rows < 1000
    assert rows * 100_000 * 3 * 8 <= 50 * 10**6
    assert montecarlo._chunk_rows(10**9, None) == 1  # never zero rows
    with pytest.raises(ValueError, match=r"^_chunk_paths must be a positive integer, got 0$"):
        run_montecarlo(PNLS, 100.0, _chunk_paths=0)


def test_to_dict() -> None:
    result = run_montecarlo([1.0, -2.0, 3.0], 50.0, method="bootstrap", paths=10, seed=4,
                            ruin_level=0.25)
    as_dict = result.to_dict()
    assert {k: as_dict[k] for k in ("method", "paths", "seed", "trades", "starting_cash",
                                    "ruin_level")} == {
        "method": "bootstrap", "paths": 10, "seed": 4, "trades": 3, "starting_cash": 50.0,
        "ruin_level": 0.25,
    }
    assert as_dict["final_return"] == result.final_return
    assert as_dict["final_return"] is not result.final_return  # a copy
    assert list(result.max_drawdown) == KEYS
    assert as_dict["probability_of_ruin"] == result.probability_of_ruin
    assert isinstance(result, MonteCarloResult)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trade_pnls": []}, r"^no closed trades to resample$"),
        ({"method": "jackknife"},
         r"^unknown method 'jackknife' \(expected 'shuffle' or 'bootstrap'\)$"),
        ({"paths": 0}, r"^paths must be an integer from 1 to 100000, got 0$"),
        ({"paths": 100_001}, r"^paths must be an integer from 1 to 100000, got 100001$"),
        ({"paths": 2.0}, r"^paths must be an integer from 1 to 100000, got 2.0$"),
        ({"seed": -1}, r"^seed must be a non-negative integer, got -1$"),
        ({"starting_cash": 0.0}, r"^starting_cash must be a positive number, got 0.0$"),
        ({"starting_cash": math.inf}, r"^starting_cash must be a positive number, got inf$"),
        ({"ruin_level": 0.0}, r"^ruin_level must be between 0 and 1 \(exclusive\), got 0.0$"),
        ({"ruin_level": 1.0}, r"^ruin_level must be between 0 and 1 \(exclusive\), got 1.0$"),
        ({"ruin_level": math.nan},
         r"^ruin_level must be between 0 and 1 \(exclusive\), got nan$"),
        ({"trade_pnls": [1.0, math.nan]}, r"^trade P&L 1 is not finite \(nan\)$"),
        ({"trade_pnls": [[1.0, 2.0]]}, r"^trade_pnls must be a flat sequence, got 2 dim"),
    ],
)
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    arguments: dict = {"trade_pnls": [1.0, -1.0], "starting_cash": 100.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        run_montecarlo(**arguments)
