"""Indicator libraries compared: TA-Lib vs pandas-ta-classic vs plain numpy.

Times SMA_20, EMA_20, RSI_14, MACD_12_26_9, ATR_14 and BBANDS_20_2 over N floats (default
1,000,000, a random walk), best of R repeats, and checks that the three agree with each
other after the warm-up (max absolute difference). Prints a table; --json FILE writes it.

    python benchmarks/bench_indicators.py [--n 1000000] [--repeat 3] [--json out.json]

pandas-ta-classic is called with talib=False, so its own implementation is timed (with
TA-Lib installed it would otherwise delegate to it).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import talib

Arrays = dict[str, np.ndarray]
Impl = Callable[[Arrays], np.ndarray]


# ---- plain numpy (recursive smoothings need a Python loop: numpy cannot vectorise them)
def np_sma(x: np.ndarray, n: int) -> np.ndarray:
    out = np.full_like(x, np.nan)
    c = np.cumsum(np.insert(x, 0, 0.0))
    out[n - 1 :] = (c[n:] - c[:-n]) / n
    return out


def _recursive(x: np.ndarray, start: int, seed: float, alpha: float) -> np.ndarray:
    out = np.full_like(x, np.nan)
    value = seed
    out[start] = value
    for i in range(start + 1, len(x)):
        value += alpha * (x[i] - value)
        out[i] = value
    return out


def np_ema(x: np.ndarray, n: int) -> np.ndarray:
    return _recursive(x, n - 1, float(x[:n].mean()), 2.0 / (n + 1))


def np_rsi(x: np.ndarray, n: int) -> np.ndarray:
    d = np.diff(x)
    gain = _recursive(np.where(d > 0, d, 0.0), n - 1, float(np.clip(d[:n], 0, None).mean()), 1 / n)
    loss = _recursive(
        np.where(d < 0, -d, 0.0), n - 1, float(np.clip(-d[:n], 0, None).mean()), 1 / n
    )
    return np.insert(100.0 * gain / (gain + loss), 0, np.nan)


def np_macd(x: np.ndarray) -> np.ndarray:
    macd = np_ema(x, 12) - np_ema(x, 26)
    signal = np.full_like(x, np.nan)
    signal[25:] = np_ema(macd[25:], 9)
    return signal


def np_atr(h: np.ndarray, lo: np.ndarray, c: np.ndarray, n: int) -> np.ndarray:
    prev = np.roll(c, 1)
    tr = np.maximum(h - lo, np.maximum(np.abs(h - prev), np.abs(lo - prev)))[1:]
    return np.insert(_recursive(tr, n - 1, float(tr[:n].mean()), 1 / n), 0, np.nan)


def np_bbands_upper(x: np.ndarray, n: int, k: float) -> np.ndarray:
    out = np.full_like(x, np.nan)
    w = np.lib.stride_tricks.sliding_window_view(x, n)
    out[n - 1 :] = w.mean(axis=1) + k * w.std(axis=1)
    return out


IMPLS: dict[str, dict[str, Impl]] = {
    "talib": {
        "SMA_20": lambda d: talib.SMA(d["close"], 20),
        "EMA_20": lambda d: talib.EMA(d["close"], 20),
        "RSI_14": lambda d: talib.RSI(d["close"], 14),
        "MACD_12_26_9": lambda d: talib.MACD(d["close"], 12, 26, 9)[1],
        "ATR_14": lambda d: talib.ATR(d["high"], d["low"], d["close"], 14),
        "BBANDS_20_2": lambda d: talib.BBANDS(d["close"], 20, 2.0, 2.0)[0],
    },
    "numpy": {
        "SMA_20": lambda d: np_sma(d["close"], 20),
        "EMA_20": lambda d: np_ema(d["close"], 20),
        "RSI_14": lambda d: np_rsi(d["close"], 14),
        "MACD_12_26_9": lambda d: np_macd(d["close"]),
        "ATR_14": lambda d: np_atr(d["high"], d["low"], d["close"], 14),
        "BBANDS_20_2": lambda d: np_bbands_upper(d["close"], 20, 2.0),
    },
}


def _pandas_ta() -> dict[str, Impl]:
    import pandas_ta_classic as ta

    def s(d: Arrays, k: str) -> pd.Series:
        return pd.Series(d[k])

    return {
        "SMA_20": lambda d: ta.sma(s(d, "close"), 20, talib=False).to_numpy(),
        "EMA_20": lambda d: ta.ema(s(d, "close"), 20, talib=False).to_numpy(),
        "RSI_14": lambda d: ta.rsi(s(d, "close"), 14, talib=False).to_numpy(),
        "MACD_12_26_9": lambda d: (
            ta.macd(s(d, "close"), 12, 26, 9, talib=False).iloc[:, 2].to_numpy()
        ),
        "ATR_14": lambda d: ta.atr(
            s(d, "high"), s(d, "low"), s(d, "close"), 14, talib=False
        ).to_numpy(),
        "BBANDS_20_2": lambda d: (
            ta.bbands(s(d, "close"), 20, 2.0, talib=False).iloc[:, 2].to_numpy()
        ),
    }


def make_data(n: int, seed: int = 7) -> Arrays:
    rng = np.random.default_rng(seed)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    spread = np.abs(rng.normal(0, 0.005, n)) * close
    return {"high": close + spread, "low": close - spread, "close": close}


def best_time(fn: Impl, data: Arrays, repeat: int) -> tuple[float, np.ndarray]:
    best, result = float("inf"), np.empty(0)
    for _ in range(repeat):
        start = time.perf_counter()
        result = np.asarray(fn(data), dtype=np.float64)
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    impls = dict(IMPLS)
    try:
        impls["pandas_ta_classic"] = _pandas_ta()
    except ImportError:
        print("pandas-ta-classic not installed: skipped")
    data = make_data(args.n)
    warm = 500  # EMA-type recursions converge after the warm-up; compare after it
    rows: list[dict[str, Any]] = []
    print(f"{args.n:,} floats, best of {args.repeat} (ms); max |diff| vs talib after bar {warm}")
    print(f"{'indicator':<14}" + "".join(f"{lib:>20}" for lib in impls) + "   max|diff|")
    for name in IMPLS["talib"]:
        times: dict[str, float] = {}
        diffs: dict[str, float] = {}
        reference = None
        for lib, table in impls.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                seconds, values = best_time(table[name], data, args.repeat)
            times[lib] = seconds
            if reference is None:
                reference = values
            else:
                diffs[lib] = float(np.nanmax(np.abs(values[warm:] - reference[warm:])))
        rows.append({"indicator": name, "seconds": times, "max_abs_diff_vs_talib": diffs})
        cells = "".join(f"{times[lib] * 1000:>20.2f}" for lib in impls)
        print(f"{name:<14}{cells}   " + " ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
    totals = {lib: sum(r["seconds"][lib] for r in rows) for lib in impls}
    print(f"{'total':<14}" + "".join(f"{totals[lib] * 1000:>20.2f}" for lib in impls))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"n": args.n, "repeat": args.repeat, "rows": rows, "totals": totals}, fh, indent=2
            )


if __name__ == "__main__":
    main()
