"""Backtest reports: one self-contained HTML file and a PDF, from the report dict.

The report dict is the JSON-ready result of a backtest run (the same dict `--json`
writes); see render_html for the keys used. The HTML has inline CSS and inline SVG charts
drawn with matplotlib, no JavaScript and no external reference, so it opens offline and
can be mailed as one file. Every text from the data is HTML-escaped; charts carry only
generic labels, so no data text ever reaches matplotlib's SVG writer.

Large series are decimated (per bucket, the min and the max survive, so a drawdown spike
stays visible) and long trade lists are capped, so a million-point equity curve renders
in a few seconds into a file well under a megabyte or two.
"""

from __future__ import annotations

import html
import io
import itertools
import json
import math
import re
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import matplotlib
import matplotlib.dates as mdates
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, PercentFormatter
from numpy.typing import ArrayLike, NDArray

from workers.backtest.files import atomic_write

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

MAX_POINTS = 2_000  # per chart line
MAX_MARKERS = 2_000  # trade markers per price chart
TRADE_ROWS_HEAD = 500
TRADE_ROWS_TAIL = 500
REQUIRED_KEYS = ("run", "metrics", "equity")
MISSING = "—"
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
PERCENTILES = ("p5", "p25", "p50", "p75", "p95", "mean")
A4_LANDSCAPE = (11.69, 8.27)
HTML_CHART_SIZE = (10.0, 3.2)

# colours: equity, benchmark, drawdown, gain, loss, exit marker
C_EQUITY = "#1f5fbf"
C_BENCH = "#8a8f98"
C_DD = "#c62828"
C_GAIN = (22, 140, 60)
C_LOSS = (200, 40, 40)
C_EXIT = "#333333"

# Why these settings: text stays text in the SVG (smaller than glyph paths; the browser
# uses a local font, nothing is fetched); usetex off because a user's matplotlibrc must
# not make us run LaTeX on data.
_RC: dict[RcKeyType, Any] = {
    "svg.fonttype": "none",
    "text.usetex": False,
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.frameon": False,
}


# --------------------------------------------------------------------------- validation


def _validate(report: Mapping[str, Any]) -> None:
    if not isinstance(report, Mapping):
        raise ValueError("report must be a mapping (the dict written by --json)")
    for key in REQUIRED_KEYS:
        if key not in report or report[key] is None:
            raise ValueError(f"report is missing required key {key!r}")
        if not isinstance(report[key], Mapping):
            kind = type(report[key]).__name__
            raise ValueError(f"report key {key!r} must be an object, not {kind}")


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _rows(value: Any) -> list[Any]:
    """A list from a value that may be missing, None, a single item or a list."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


# --------------------------------------------------------------------------- numbers


def _num(value: Any) -> float | None:
    """A float from a float, int, Decimal or numeric string; None when not a number."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float, Decimal, np.number)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _floats(values: Any) -> NDArray[np.float64]:
    """A float array from a list of floats or numeric strings (None and junk become NaN)."""
    if values is None:
        return np.empty(0)
    try:
        return np.asarray(values, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        # mixed junk: the slow path, one value at a time
        return np.array([math.nan if (f := _num(v)) is None else f for v in values])


# --------------------------------------------------------------------------- decimation


def decimate(values: ArrayLike, max_points: int = MAX_POINTS) -> NDArray[np.intp]:
    """Indices of at most max_points samples of values that keep every bucket's extremes.

    The series is cut into (max_points - 2) // 2 buckets of consecutive points; each gives
    the index of its min and of its max, plus the first and last index. So the global min
    and max (a drawdown spike) always survive, unlike with every-nth-point sampling. NaNs
    are ignored. The indices are sorted and unique, to plot against the matching x values.
    """
    if max_points < 4:
        raise ValueError(f"max_points must be at least 4, not {max_points}")
    y = np.asarray(values, dtype=np.float64).ravel()
    n = y.size
    if n <= max_points:
        return np.arange(n, dtype=np.intp)
    buckets = (max_points - 2) // 2
    edges = np.linspace(0, n, buckets + 1).astype(np.intp)
    low = np.where(np.isnan(y), np.inf, y)
    high = np.where(np.isnan(y), -np.inf, y)
    picks = [0, n - 1]
    for start, stop in itertools.pairwise(edges):
        picks.append(start + int(np.argmin(low[start:stop])))
        picks.append(start + int(np.argmax(high[start:stop])))
    return np.unique(np.asarray(picks, dtype=np.intp))


def _even_sample(n: int, k: int) -> NDArray[np.intp]:
    """k indices spread evenly over range(n) (all of them when n <= k)."""
    if n <= k:
        return np.arange(n, dtype=np.intp)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.intp))


# --------------------------------------------------------------------------- formatting


_KINDS = {
    "final_equity": "money",
    "expectancy": "money",
    "best_trade": "money",
    "worst_trade": "money",
    "total_pnl": "money",
    "starting_cash": "money",
    "cash": "money",
    "sharpe": "ratio",
    "sortino": "ratio",
    "calmar": "ratio",
    "profit_factor": "ratio",
    "train_score": "ratio",
    "test_sharpe": "ratio",
    "cagr": "pct",
    "exposure_time": "pct",  # a fraction of the run, though it ends in '_time'
    "trades": "int",
    "paths": "int",
    "bars": "int",
}
_PCT_WORDS = ("return", "drawdown", "rate", "exposure", "volatility", "probability", "ruin")
_MONEY_WORDS = ("pnl", "equity", "commission", "profit", "loss")
_TIME_KEYS = ("start", "end", "created_at")
_LABELS = {
    "cagr": "CAGR",
    "pnl": "P&L",
    "total_pnl": "Total P&L",
    "unrealized_pnl": "Unrealized P&L",
}


def _kind(key: str) -> str:
    """How a value under this key is shown: pct, money, ratio, int, duration, time or plain."""
    if key in _KINDS:
        return _KINDS[key]
    if "duration" in key or key.endswith("_seconds"):
        return "duration"
    if key in _TIME_KEYS or key.endswith(("_start", "_end", "_time", "_at")):
        return "time"
    if any(word in key for word in _PCT_WORDS):
        return "pct"
    if any(word in key for word in _MONEY_WORDS):
        return "money"
    return "plain"


def label(key: str) -> str:
    """A human label for a snake_case key: 'max_drawdown' -> 'Max drawdown'."""
    return _LABELS.get(key, key.replace("_", " ").capitalize())


def fmt_duration(seconds: float) -> str:
    """Seconds as the two largest units: 273600 -> '3d 4h', 90 -> '1m 30s'."""
    sign = "-" if seconds < 0 else ""
    s = abs(seconds)
    if s < 60 and not float(s).is_integer():
        # short timings (a run's elapsed time) keep their fraction: '1.23s', not '1s'
        return f"{sign}{s:.3g}s"
    parts: list[str] = []
    rest = round(s)
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count or parts:
            parts.append(f"{count}{unit}")
    # two units are precise enough for a report; drop zero tails like '3d 0h'
    shown = [p for p in parts[:2] if not p.startswith("0")] or parts[:1]
    return sign + " ".join(shown)


def fmt_time(value: Any) -> str:
    """An ISO timestamp as 'YYYY-MM-DD HH:MM' in UTC (seconds only when not zero)."""
    if not isinstance(value, str):
        return MISSING if value is None else str(value)
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return value
    if ts.tzinfo is not None:
        ts = ts.astimezone(UTC)
    return ts.strftime("%Y-%m-%d %H:%M:%S" if ts.second else "%Y-%m-%d %H:%M")


def _fmt_plain_number(x: float) -> str:
    if x.is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:,.2f}" if abs(x) >= 1000 else f"{x:.4g}"


def format_value(key: str, value: Any) -> str:
    """A value as report text (not yet HTML-escaped); None and NaN as '—', inf as '∞'."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    kind = _kind(key)
    if kind == "time":
        return fmt_time(value)
    x = _num(value)
    if x is None:
        return _plain(value)
    if math.isnan(x):
        return MISSING
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    if kind == "pct":
        return f"{x * 100:,.2f}%"
    if kind == "money":
        return f"{x:,.2f}"
    if kind == "ratio":
        return f"{x:,.2f}"
    if kind == "int":
        return f"{round(x):,}"
    if kind == "duration":
        return fmt_duration(x)
    return _fmt_plain_number(x)


def _plain(value: Any) -> str:
    """Text for a non-number: strings as they are, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return fmt_params(value)
    try:
        return json.dumps(value, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def fmt_params(params: Any) -> str:
    """Strategy parameters as 'fast=10, slow=20' (not yet escaped)."""
    if not isinstance(params, Mapping):
        return MISSING if params is None else _plain(params)
    if not params:
        return "(none)"
    return ", ".join(f"{k}={_plain(v)}" for k, v in params.items())


def _exact(value: Any) -> str:
    """A price or quantity as given: Decimal strings stay exact, floats get 10 digits."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)


def _sign_class(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "none"
    return "pos" if x > 0 else "neg" if x < 0 else "zero"


def _e(value: Any) -> str:
    """HTML-escape any value (quotes too, since values also land in attributes)."""
    return html.escape(str(value), quote=True)


# --------------------------------------------------------------------------- series


@dataclass(frozen=True)
class _Line:
    x: NDArray[Any]
    y: NDArray[np.float64]


def _parse_times(values: Sequence[Any]) -> NDArray[Any] | None:
    """ISO strings as naive-UTC datetime64 (NaT for junk); None when nothing parses."""
    if not values:
        return None
    try:
        parsed = pd.to_datetime(
            pd.Series(list(values), dtype=object), utc=True, format="ISO8601", errors="coerce"
        )
    except (TypeError, ValueError, OverflowError):
        return None
    if parsed.isna().all():
        return None
    return parsed.dt.tz_convert(None).to_numpy()


def _line(ts: Any, values: Any, *, invert: bool = False) -> _Line | None:
    """A decimated series; x is time when ts matches values, else the bar number."""
    y = _floats(values)
    if y.size == 0 or np.isnan(y).all():
        return None
    if invert:
        # drawdowns are shown below zero whichever sign the engine uses
        y = -np.abs(y)
    idx = decimate(y)
    ts_list = ts if isinstance(ts, (list, tuple)) else []
    x: NDArray[Any] | None = None
    if len(ts_list) == y.size:
        # only the kept points are parsed: cheap even for a million-point series
        x = _parse_times([ts_list[i] for i in idx])
    if x is None:
        x = idx.astype(np.float64)
    return _Line(x, y[idx])


def _drawdown_values(equity: Mapping[str, Any], cash: object = None) -> Any:
    """The drawdown series, computed from equity when the report has none: from the
    running peak, which starts at the starting cash (as metrics.py measures it)."""
    dd = equity.get("drawdown")
    if dd is not None:
        return dd
    eq = _floats(equity.get("equity"))
    if eq.size == 0:
        return None
    start = _floats([cash])[0] if cash is not None else math.nan  # fmax skips a NaN
    peak = np.fmax.accumulate(np.fmax(eq, start))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(peak > 0, 1.0 - eq / peak, 0.0)


@dataclass(frozen=True)
class _Markers:
    x: NDArray[Any]
    y: NDArray[np.float64]
    marker: str
    colour: str
    filled: bool
    name: str


def _is_short(trade: Mapping[str, Any]) -> bool:
    return str(trade.get("side", "")).lower() in ("short", "sell")


def _symbol_trades(trades: list[Any], symbol: str) -> list[Mapping[str, Any]]:
    return [t for t in trades if isinstance(t, Mapping) and t.get("symbol") == symbol]


def _trade_markers(trades: list[Mapping[str, Any]]) -> list[_Markers]:
    """Entry/exit markers: ▲ buys, ▼ sells; long entries green, short entries red."""
    shown = [trades[i] for i in _even_sample(len(trades), MAX_MARKERS // 2)]
    groups = (
        ("entry", False, "^", "#168c3c", True, "long entry"),
        ("entry", True, "v", "#c82828", True, "short entry"),
        ("exit", False, "v", C_EXIT, False, "long exit"),
        ("exit", True, "^", C_EXIT, False, "short exit"),
    )
    out: list[_Markers] = []
    for when, short, marker, colour, filled, name in groups:
        chosen = [t for t in shown if _is_short(t) == short]
        times = _parse_times([t.get(f"{when}_time") for t in chosen])
        if times is None:
            continue
        prices = _floats([t.get(f"{when}_price") for t in chosen])
        ok = ~np.isnat(times) & ~np.isnan(prices)
        if ok.any():
            out.append(_Markers(times[ok], prices[ok], marker, colour, filled, name))
    return out


# --------------------------------------------------------------------------- charts


@contextmanager
def _mpl_settings(salt: str) -> Iterator[None]:
    """Our rcParams for one chart, without touching the importing process's settings.

    A fixed hash salt makes the SVG ids deterministic; a different salt per chart keeps
    ids unique when several SVGs share one HTML page.
    """
    rc = dict(_RC)
    rc["svg.hashsalt"] = f"mmats-{salt}"
    with matplotlib.rc_context(rc):
        yield


def _time_axis(ax: Axes, x: NDArray[Any]) -> None:
    if np.issubdtype(x.dtype, np.datetime64):
        locator = mdates.AutoDateLocator(minticks=4, maxticks=10)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    else:
        ax.set_xlabel("bar")


def _money_axis(ax: Axes) -> None:
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))


def _plot_equity(ax: Axes, equity: _Line, benchmark: _Line | None, name: str) -> None:
    ax.plot(equity.x, equity.y, color=C_EQUITY, linewidth=1.1, label=name)
    if benchmark is not None:
        ax.plot(benchmark.x, benchmark.y, color=C_BENCH, linewidth=1.0, label="buy & hold")
        ax.legend(loc="upper left")
    _time_axis(ax, equity.x)
    _money_axis(ax)


def _plot_drawdown(ax: Axes, dd: _Line) -> None:
    ax.fill_between(dd.x, dd.y, 0.0, color=C_DD, alpha=0.3, linewidth=0)
    ax.plot(dd.x, dd.y, color=C_DD, linewidth=0.8)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    _time_axis(ax, dd.x)


def _plot_prices(ax: Axes, close: _Line, markers: list[_Markers]) -> None:
    ax.plot(close.x, close.y, color="#444444", linewidth=0.9, label="close")
    for m in markers:
        ax.scatter(
            m.x, m.y, marker=m.marker, s=28, label=m.name, zorder=3, linewidths=0.9,
            c=m.colour if m.filled else "none", edgecolors=m.colour,
        )
    # above the plot: a legend inside would hide prices and markers
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=5, fontsize=8)
    _time_axis(ax, close.x)


def _figure(size: tuple[float, float]) -> Figure:
    # Figure directly, not pyplot: no GUI backend, no global figure registry to leak into
    return Figure(figsize=size, layout="constrained")


_SVG_PROLOGUE = re.compile(r"\A.*?(?=<svg\b)", re.S)
_SVG_XMLNS = re.compile(r'\s+xmlns(?::\w+)?="[^"]*"')
_SVG_SIZE = re.compile(r'\s+(?:width|height)="[^"]*"')


def _svg(fig: Figure, name: str) -> str:
    """The figure as inline SVG: no XML prologue, no metadata, no namespace URLs.

    HTML5 parses inline SVG (xlink:href included) without namespace declarations, and
    leaving them out keeps the page free of any http:// string. Width/height go so CSS
    can scale the chart to the page; the viewBox keeps its proportions.
    """
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None,
                                             "Type": None})
    svg = _SVG_PROLOGUE.sub("", buf.getvalue(), count=1)
    root, sep, rest = svg.partition(">")
    root = _SVG_SIZE.sub("", _SVG_XMLNS.sub("", root))
    return f'{root} role="img" aria-label="{_e(name)}"{sep}{rest}'


def _chart_svg(salt: str, draw: Callable[[Axes], None], name: str) -> str:
    with _mpl_settings(salt):
        fig = _figure(HTML_CHART_SIZE)
        draw(fig.add_subplot())
        return _svg(fig, name)


# --------------------------------------------------------------------------- HTML parts


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
 color:#1d2330;background:#f6f7f9;margin:0;line-height:1.4}
main{max-width:1120px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:1.6em;margin:0 0 4px}
h2{font-size:1.2em;margin:32px 0 10px;padding-bottom:4px;border-bottom:2px solid #e3e6eb}
h3{font-size:1em;margin:18px 0 6px}
nav{font-size:.85em;margin:8px 0 16px}
nav a{color:#1f5fbf;text-decoration:none;margin-right:12px;white-space:nowrap}
table{border-collapse:collapse;font-size:.85em;margin:6px 0}
th,td{border:1px solid #e3e6eb;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.kv th{width:12em}
.metrics{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:0 24px}
.metrics table{width:100%}
.mono{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:.9em;
 word-break:break-all}
.pos{color:#13702f}.neg{color:#b42323}
.heat td{text-align:center;min-width:3.6em;color:#1d2330}
.heat td.total{font-weight:700;border-left:2px solid #9aa3b0}
.heat td.light{color:#fff}
.scroll{overflow-x:auto}
.trades{font-size:.78em}
.trades tr.gap td{text-align:center;font-style:italic;background:#f6f7f9}
.note{color:#5b6475;font-size:.85em}
.passed{color:#13702f;font-weight:600}
.warn{color:#9a5b00}
ul.warnings li{color:#9a5b00}
svg{width:100%;height:auto;display:block}
.legend span{margin-right:14px}
"""


def _tr(cells: Sequence[str], num: Sequence[bool]) -> str:
    """One table row; the cells must already be escaped."""
    return "<tr>" + "".join(
        f'<td class="num">{c}</td>' if n else f"<td>{c}</td>"
        for c, n in zip(cells, num, strict=True)
    ) + "</tr>"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], num: Sequence[bool],
           css: str = "", body: str | None = None) -> str:
    """An HTML table; headers and cells must already be escaped (body: prebuilt rows)."""
    cls = f' class="{css}"' if css else ""
    head = "".join(
        f'<th class="num">{h}</th>' if n else f"<th>{h}</th>"
        for h, n in zip(headers, num, strict=True)
    )
    if body is None:
        body = "".join(_tr(row, num) for row in rows)
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv_table(pairs: Sequence[tuple[str, str]]) -> str:
    """A two-column key/value table; values must already be escaped."""
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


def _period(run: Mapping[str, Any]) -> str:
    return f"{fmt_time(run.get('start'))} → {fmt_time(run.get('end'))} UTC"


def _symbols(run: Mapping[str, Any]) -> str:
    return ", ".join(str(s) for s in _rows(run.get("symbols"))) or MISSING


def _header_html(run: Mapping[str, Any]) -> str:
    strategy = run.get("strategy") or "backtest"
    title = f"{strategy} {run.get('version') or ''}".strip()
    pairs = [
        ("Run", _e(f"#{run.get('run_id', MISSING)} {run.get('name') or ''}".strip())),
        ("Strategy", _e(title)),
        ("Parameters", _e(fmt_params(run.get("params")))),
        ("Symbols", _e(_symbols(run))),
        ("Timeframe", _e(run.get("timeframe") or MISSING)),
        ("Period", _e(_period(run))),
        ("Bars", _e(format_value("bars", run.get("bars")))),
        ("Cash", _e(f"{format_value('cash', run.get('cash'))} {run.get('currency') or ''}")),
        ("Costs", _e(_costs(run))),
        ("Short selling", _e("allowed" if run.get("allow_short") else "not allowed")),
        ("Fingerprint", f'<span class="mono">{_e(run.get("fingerprint") or MISSING)}</span>'),
        ("Created", _e(f"{fmt_time(run.get('created_at'))} "
                       f"(ran {format_value('elapsed_seconds', run.get('elapsed_seconds'))})")),
    ]
    return (f"<header><h1>Backtest report: {_e(title)}</h1>"
            f'<p class="note">{_e(_symbols(run))} · {_e(run.get("timeframe") or "")} · '
            f"{_e(_period(run))}</p>{_kv_table(pairs)}</header>")


def _costs(run: Mapping[str, Any]) -> str:
    return (f"commission {_plain(run.get('commission', MISSING))}, "
            f"slippage {_plain(run.get('slippage', MISSING))}, "
            f"spread {_plain(run.get('spread', MISSING))}")


def _metric_pairs(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(label(k), format_value(k, v)) for k, v in metrics.items()]


def _metrics_html(metrics: Mapping[str, Any]) -> str:
    pairs = _metric_pairs(metrics)
    if not pairs:
        return '<p class="note">no metrics</p>'
    # two columns of tables read better than one very long one
    half = (len(pairs) + 1) // 2
    tables = []
    for chunk in (pairs[:half], pairs[half:]):
        rows = [[_e(k), _e(v)] for k, v in chunk]
        tables.append(_table(["Metric", "Value"], rows, [False, True]))
    return f'<div class="metrics">{"".join(tables)}</div>'


def _breakdown_columns(groups: Mapping[str, Any]) -> list[str]:
    columns: list[str] = []
    for stats in groups.values():
        for key in _mapping(stats):
            if key not in columns:
                columns.append(key)
    return columns


def _breakdown_html(groups: Mapping[str, Any], first: str) -> str:
    """A per-strategy or per-market table: one row per group, one column per statistic."""
    columns = _breakdown_columns(groups)
    rows = [
        [_e(name)] + [_e(format_value(c, _mapping(stats).get(c))) for c in columns]
        for name, stats in groups.items()
    ]
    headers = [_e(first)] + [_e(label(c)) for c in columns]
    return _table(headers, rows, [False] + [True] * len(columns))


def _equity_section(report: Mapping[str, Any]) -> str:
    equity = _mapping(report.get("equity"))
    line = _line(equity.get("ts"), equity.get("equity"))
    if line is None:
        return _section("equity", "Equity", '<p class="note">no equity points</p>')
    bench = _line(equity.get("ts"), equity.get("benchmark"))
    svg = _chart_svg("equity", lambda ax: _plot_equity(ax, line, bench, "strategy"),
                     "equity and buy-and-hold chart")
    title = "Equity vs buy-and-hold" if bench is not None else "Equity"
    return _section("equity", title, svg + _points_note(equity.get("equity")))


def _points_note(values: Any) -> str:
    n = len(values) if isinstance(values, (list, tuple)) else 0
    if n <= MAX_POINTS:
        return ""
    return (f'<p class="note">{n:,} points, drawn as at most {MAX_POINTS:,} '
            "(each stretch's low and high kept)</p>")


def _drawdown_section(report: Mapping[str, Any]) -> str:
    equity = _mapping(report.get("equity"))
    cash = _mapping(report.get("run")).get("cash")
    dd = _line(equity.get("ts"), _drawdown_values(equity, cash), invert=True)
    if dd is None:
        return ""
    svg = _chart_svg("drawdown", lambda ax: _plot_drawdown(ax, dd), "drawdown chart")
    return _section("drawdown", "Drawdown", svg)


# --------------------------------------------------------------------------- monthly


def _monthly_grid(rows: list[Any]) -> dict[int, dict[int, float]]:
    """{year: {month: return}} from the monthly_returns list (bad rows skipped)."""
    grid: dict[int, dict[int, float]] = {}
    for row in rows:
        r = _mapping(row)
        value = _num(r.get("return"))
        try:
            year, month = int(r["year"]), int(r["month"])
        except (KeyError, TypeError, ValueError):
            continue
        if value is not None and 1 <= month <= 12:
            grid.setdefault(year, {})[month] = value
    return grid


def _year_total(months: Mapping[int, float]) -> float:
    # compounded, not summed: twelve +10% months make +213.8%, not +120%
    return float(np.prod([1.0 + r for r in months.values()]) - 1.0)


def _heat_rgba(value: float, scale: float) -> tuple[float, float, float, float]:
    """Green for gains, red for losses, more opaque the larger |value| is against scale."""
    base = C_GAIN if value >= 0 else C_LOSS
    strength = min(1.0, abs(value) / scale) if scale > 0 else 0.0
    alpha = 0.08 + 0.72 * strength if value != 0 else 0.0
    return (base[0] / 255, base[1] / 255, base[2] / 255, alpha)


def _heat_cell(value: float | None, scale: float, attrs: str, extra: str = "") -> str:
    if value is None:
        return f'<td class="none{extra}" {attrs}></td>'
    r, g, b, a = _heat_rgba(value, scale)
    light = " light" if a > 0.55 else ""
    style = f"background:rgba({r * 255:.0f},{g * 255:.0f},{b * 255:.0f},{a:.2f})"
    text = f"{value * 100:.2f}%"
    return (f'<td class="{_sign_class(value)}{extra}{light}" {attrs} style="{style}" '
            f'title="{text}">{text}</td>')


def _monthly_html(grid: Mapping[int, Mapping[int, float]]) -> str:
    month_scale = max((abs(v) for m in grid.values() for v in m.values()), default=0.0)
    totals = {year: _year_total(months) for year, months in grid.items()}
    year_scale = max((abs(v) for v in totals.values()), default=0.0)
    rows = []
    for year in sorted(grid):
        cells = "".join(
            _heat_cell(grid[year].get(m), month_scale, f'data-month="{year}-{m:02d}"')
            for m in range(1, 13)
        )
        total = _heat_cell(totals[year], year_scale, f'data-year="{year}"', " total")
        rows.append(f"<tr><th>{year}</th>{cells}{total}</tr>")
    head = "".join(f"<th>{m}</th>" for m in MONTHS)
    return (f'<div class="scroll"><table class="heat"><thead><tr><th>Year</th>{head}'
            f'<th>Total</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _monthly_section(report: Mapping[str, Any]) -> str:
    grid = _monthly_grid(_rows(report.get("monthly_returns")))
    if not grid:
        return ""
    return _section("monthly", "Monthly returns", _monthly_html(grid))


# --------------------------------------------------------------------------- prices


_MARKER_LEGEND = (
    '<p class="legend note"><span style="color:#168c3c">▲ long entry</span>'
    '<span style="color:#c82828">▼ short entry</span>'
    "<span>▽ long exit</span><span>△ short exit</span></p>"
)


def _price_chart(symbol: str, data: Mapping[str, Any], trades: list[Any], index: int) -> str:
    close = _line(data.get("ts"), data.get("close"))
    if close is None:
        return ""
    mine = _symbol_trades(trades, symbol)
    # trade times only mean something on a time axis
    markers = _trade_markers(mine) if np.issubdtype(close.x.dtype, np.datetime64) else []
    svg = _chart_svg(f"price-{index}", lambda ax: _plot_prices(ax, close, markers),
                     "price chart with trade markers")
    note = ""
    if len(mine) > MAX_MARKERS // 2:
        note = (f'<p class="note">markers for {MAX_MARKERS // 2:,} of {len(mine):,} trades, '
                "spread evenly over the run</p>")
    return f"<h3>{_e(symbol)}</h3>{svg}{note}"


def _prices_section(report: Mapping[str, Any]) -> str:
    prices = _mapping(report.get("prices"))
    trades = _rows(report.get("trades"))
    charts = [
        _price_chart(str(symbol), _mapping(data), trades, i)
        for i, (symbol, data) in enumerate(prices.items())
    ]
    charts = [c for c in charts if c]
    if not charts:
        return ""
    return _section("prices", "Prices and trades", _MARKER_LEGEND + "".join(charts))


# --------------------------------------------------------------------------- trades


_TRADE_COLUMNS = ("symbol", "side", "quantity", "entry_time", "entry_price", "exit_time",
                  "exit_price", "pnl", "commission", "strategy")
_TRADE_NUMERIC = (False, False, True, False, True, False, True, True, True, False)


def _trade_cells(trade: Mapping[str, Any]) -> list[str]:
    cells = []
    for key in _TRADE_COLUMNS:
        value = trade.get(key)
        if key in ("pnl", "commission"):
            text = _e(format_value("pnl", value))
            if key == "pnl":
                text = f'<span class="{_sign_class(_num(value))}">{text}</span>'
        elif key.endswith("_time"):
            text = _e(fmt_time(value))
        elif key in ("quantity", "entry_price", "exit_price"):
            text = _e(_exact(value))
        else:
            text = _e(MISSING if value is None else value)
        cells.append(text)
    return cells


def _trade_table(trades: list[Any]) -> str:
    """The trade list; a long one shows its head and tail around a 'not shown' row."""
    n = len(trades)
    if n > TRADE_ROWS_HEAD + TRADE_ROWS_TAIL:
        hidden = n - TRADE_ROWS_HEAD - TRADE_ROWS_TAIL
        gap = (f'<tr class="gap"><td colspan="{len(_TRADE_COLUMNS)}">… {hidden:,} trades '
               "not shown …</td></tr>")
        head, tail = trades[:TRADE_ROWS_HEAD], trades[-TRADE_ROWS_TAIL:]
    else:
        gap, head, tail = "", trades, []
    body = "".join(_tr(_trade_cells(_mapping(t)), _TRADE_NUMERIC) for t in head) + gap
    body += "".join(_tr(_trade_cells(_mapping(t)), _TRADE_NUMERIC) for t in tail)
    headers = [_e(label(c)) for c in _TRADE_COLUMNS]
    table = _table(headers, [], _TRADE_NUMERIC, "trades", body=body)
    return f'<div class="scroll">{table}</div>'


def _trades_section(report: Mapping[str, Any]) -> str:
    trades = _rows(report.get("trades"))
    if not trades:
        return _section("trades", "Trades", '<p class="note">no closed trades</p>')
    n = len(trades)
    if n > TRADE_ROWS_HEAD + TRADE_ROWS_TAIL:
        note = (f'<p class="note">{n:,} trades in all; the first {TRADE_ROWS_HEAD:,} and the '
                f"last {TRADE_ROWS_TAIL:,} are listed here. The full list is in the JSON / "
                "the database.</p>")
    else:
        note = f'<p class="note">{n:,} closed trades</p>'
    return _section("trades", "Trades", note + _trade_table(trades))


_POSITION_COLUMNS = ("symbol", "side", "quantity", "average_price", "last_price",
                     "unrealized_pnl")


def _positions_section(report: Mapping[str, Any]) -> str:
    positions = [_mapping(p) for p in _rows(report.get("open_positions"))]
    if not positions:
        return ""
    rows = []
    for p in positions:
        rows.append([
            _e(p.get("symbol", MISSING)), _e(p.get("side", MISSING)),
            _e(_exact(p.get("quantity"))), _e(_exact(p.get("average_price"))),
            _e(_exact(p.get("last_price"))),
            f'<span class="{_sign_class(_num(p.get("unrealized_pnl")))}">'
            f'{_e(format_value("unrealized_pnl", p.get("unrealized_pnl")))}</span>',
        ])
    headers = [_e(label(c)) for c in _POSITION_COLUMNS]
    table = _table(headers, rows, [False, False, True, True, True, True])
    return _section("positions", "Open positions at the end", table)


def _assumptions_section(report: Mapping[str, Any]) -> str:
    items = [str(a) for a in _rows(report.get("assumptions"))]
    if not items:
        return ""
    body = "<ul>" + "".join(f"<li>{_e(a)}</li>" for a in items) + "</ul>"
    return _section("assumptions", "Assumptions", body)


def _sanity_banner(report: Mapping[str, Any]) -> str:
    """One line under the header: warnings must be seen before the numbers are trusted."""
    if report.get("sanity") is None:
        return ""
    n = len(_rows(report["sanity"]))
    if not n:
        return '<p class="passed">✓ Sanity check passed</p>'
    return f'<p class="warn">⚠ Sanity check: {n} warning(s), see <a href="#sanity">below</a></p>'


def _sanity_section(report: Mapping[str, Any]) -> str:
    if "sanity" not in report or report["sanity"] is None:
        return ""
    warnings = [str(w) for w in _rows(report["sanity"])]
    if not warnings:
        body = '<p class="passed">✓ Sanity check passed: no warnings.</p>'
    else:
        body = (f'<p class="warn">⚠ {len(warnings)} warning(s):</p><ul class="warnings">'
                + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>")
    return _section("sanity", "Sanity check", body)


# --------------------------------------------------------------------------- walk-forward


_WINDOW_COLUMNS = ("train_start", "train_end", "test_start", "test_end", "params",
                   "train_score", "test_return", "test_sharpe")


def _window_cells(window: Mapping[str, Any]) -> list[str]:
    return [
        _e(fmt_params(window.get(c)) if c == "params" else format_value(c, window.get(c)))
        for c in _WINDOW_COLUMNS
    ]


def _stability_rows(stability: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name, stats in stability.items():
        s = _mapping(stats)
        values = _rows(s.get("values"))
        shown = ", ".join(_plain(v) for v in values[:30])
        if len(values) > 30:
            shown += f", … ({len(values)} in all)"
        rows.append([_e(name), _e(shown), _e(_plain(s.get("mode", MISSING))),
                     _e(format_value("changes", s.get("changes")))])
    return rows


def _walk_forward_section(report: Mapping[str, Any]) -> str:
    wf = _mapping(report.get("walk_forward"))
    if not wf:
        return ""
    parts = [f'<p class="note">objective: {_e(wf.get("objective", MISSING))}</p>']
    windows = [_mapping(w) for w in _rows(wf.get("windows"))]
    if windows:
        headers = [_e(label(c)) for c in _WINDOW_COLUMNS]
        rows = [_window_cells(w) for w in windows]
        parts.append("<h3>Windows</h3><div class=\"scroll\">"
                     + _table(headers, rows, [False] * 5 + [True] * 3) + "</div>")
    stitched = _mapping(wf.get("stitched"))
    line = _line(stitched.get("ts"), stitched.get("equity"))
    if line is not None:
        svg = _chart_svg("walk-forward", lambda ax: _plot_equity(ax, line, None, "out-of-sample"),
                         "stitched out-of-sample equity chart")
        parts.append(f"<h3>Stitched out-of-sample equity</h3>{svg}")
    stability = _mapping(wf.get("stability"))
    if stability:
        table = _table(["Parameter", "Chosen per window", "Most often", "Changes"],
                       _stability_rows(stability), [False, False, True, True])
        parts.append(f"<h3>Parameter stability</h3>{table}")
    return _section("walk-forward", "Walk-forward analysis", "".join(parts))


# --------------------------------------------------------------------------- Monte Carlo


def _mc_runs(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [m for m in (_mapping(x) for x in _rows(report.get("montecarlo"))) if m]


def _mc_summary(mc: Mapping[str, Any]) -> str:
    text = (f"{format_value('paths', mc.get('paths'))} paths, seed {_plain(mc.get('seed'))}, "
            f"{format_value('trades', mc.get('trades'))} trades, starting cash "
            f"{format_value('starting_cash', mc.get('starting_cash'))}; a path is ruined "
            f"when its equity touches {format_value('ruin_level', mc.get('ruin_level'))} "
            "of the starting cash")
    if mc.get("method") == "shuffle":  # the same trades in another order: the same sum
        text += ("; shuffling reorders the same trades, so every path ends at the same "
                 "return: what varies is the drawdown on the way")
    return text


def _mc_table_rows(mc: Mapping[str, Any]) -> list[list[str]]:
    return [
        [label(key)] + [format_value(key, _mapping(mc.get(key)).get(p)) for p in PERCENTILES]
        for key in ("final_return", "max_drawdown")
    ]


def _mc_html(mc: Mapping[str, Any]) -> str:
    rows = [[_e(c) for c in row] for row in _mc_table_rows(mc)]
    table = _table(["", *PERCENTILES], rows, [False] + [True] * len(PERCENTILES))
    ruin = format_value("probability_of_ruin", mc.get("probability_of_ruin"))
    return (f"<h3>Method: {_e(mc.get('method', MISSING))}</h3>"
            f'<p class="note">{_e(_mc_summary(mc))}</p>{table}'
            f"<p>Probability of ruin: <strong>{_e(ruin)}</strong></p>")


def _montecarlo_section(report: Mapping[str, Any]) -> str:
    runs = _mc_runs(report)
    if not runs:
        return ""
    return _section("montecarlo", "Monte Carlo", "".join(_mc_html(mc) for mc in runs))


# --------------------------------------------------------------------------- HTML


def _nav(sections: Sequence[str]) -> str:
    links = []
    for s in sections:
        m = re.match(r'<section id="([^"]+)"><h2>(.*?)</h2>', s)
        if m:  # the id and title are ours, and the title is already escaped
            links.append(f'<a href="#{m.group(1)}">{m.group(2)}</a>')
    # spaces between the links let the bar wrap instead of widening the page
    return f"<nav>{' '.join(links)}</nav>"


def render_html(report: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG, no scripts).

    Needs report["run"], ["metrics"] and ["equity"] (ValueError naming a missing one);
    by_strategy, by_market, monthly_returns, prices, trades, open_positions, assumptions,
    sanity, walk_forward and montecarlo are optional, and their sections are left out
    when missing or empty (the trade list then says "no closed trades").
    """
    _validate(report)
    run = _mapping(report["run"])
    sections = [
        _section("metrics", "Metrics", _metrics_html(_mapping(report["metrics"]))),
        _optional_breakdown(report, "by_strategy", "By strategy", "Strategy"),
        _optional_breakdown(report, "by_market", "By market", "Market"),
        _equity_section(report),
        _drawdown_section(report),
        _monthly_section(report),
        _prices_section(report),
        _trades_section(report),
        _positions_section(report),
        _walk_forward_section(report),
        _montecarlo_section(report),
        _assumptions_section(report),
        _sanity_section(report),
    ]
    sections = [s for s in sections if s]
    title = _e(f"Backtest report: {run.get('strategy') or 'backtest'} run {run.get('run_id', '')}")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title><style>{_CSS}</style></head><body><main>"
        f"{_header_html(run)}{_sanity_banner(report)}{_nav(sections)}{''.join(sections)}"
        '<p class="note">Generated by MMATS. Past results, simulated on historical data, '
        "do not predict future ones.</p></main></body></html>\n"
    )


def _optional_breakdown(report: Mapping[str, Any], key: str, title: str, first: str) -> str:
    groups = _mapping(report.get(key))
    if not groups:
        return ""
    return _section(key.replace("_", "-"), title, _breakdown_html(groups, first))


# --------------------------------------------------------------------------- writing


def _target(path: str | Path) -> Path:
    """The output path, checked before any rendering so a typo fails fast."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"cannot write the report to {target}: it is a folder")
    if not target.parent.is_dir():
        raise ValueError(f"cannot write the report to {target}: folder {target.parent} "
                         "does not exist")
    return target


def write_html(report: Mapping[str, Any], path: str | Path) -> Path:
    """Render the report and write it to path atomically; returns the path."""
    target = _target(path)
    page = render_html(report).encode("utf-8")

    def write(fh: IO[bytes]) -> None:
        fh.write(page)

    return atomic_write(target, write)


# --------------------------------------------------------------------------- PDF


def _mpl_text(value: Any, limit: int = 70) -> str:
    """Data text for matplotlib: one line, bounded length (math parsing is off per Text)."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", str(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _pdf_table(ax: Axes, rows: Sequence[Sequence[str]], headers: Sequence[str] | None = None,
               col_widths: Sequence[float] | None = None, font: float = 8,
               colours: Sequence[Sequence[Any]] | None = None) -> None:
    """A matplotlib table filling ax from the top; data text is never parsed as math."""
    ax.set_axis_off()
    if not rows:
        return
    table = ax.table(
        cellText=[[_mpl_text(c) for c in row] for row in rows],
        colLabels=[_mpl_text(h) for h in headers] if headers else None,
        colWidths=list(col_widths) if col_widths else None,
        cellColours=[list(r) for r in colours] if colours else None,
        loc="upper center", cellLoc="left",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(font)
    table.scale(1.0, 1.25)
    for (row, _col), cell in table.get_celld().items():
        # a '$' pair in a strategy name must not switch on mathtext (or crash it)
        cell.get_text().set_parse_math(False)
        cell.set_edgecolor("#d5d9e0")
        if headers and row == 0:
            cell.set_facecolor("#eef0f4")
            cell.get_text().set_fontweight("bold")


def _page(title: str) -> Figure:
    fig = Figure(figsize=A4_LANDSCAPE, layout="constrained")
    fig.suptitle(_mpl_text(title, 110), fontsize=13, fontweight="bold", parse_math=False)
    return fig


def _header_rows(run: Mapping[str, Any]) -> list[list[str]]:
    return [
        ["Run", f"#{run.get('run_id', MISSING)} {run.get('name') or ''}"],
        ["Strategy", f"{run.get('strategy') or MISSING} {run.get('version') or ''}"],
        ["Parameters", fmt_params(run.get("params"))],
        ["Symbols", _symbols(run)],
        ["Timeframe", str(run.get("timeframe") or MISSING)],
        ["Period", _period(run)],
        ["Bars", format_value("bars", run.get("bars"))],
        ["Cash", f"{format_value('cash', run.get('cash'))} {run.get('currency') or ''}"],
        ["Costs", _costs(run)],
        ["Short selling", "allowed" if run.get("allow_short") else "not allowed"],
        ["Created", fmt_time(run.get("created_at"))],
    ]


def _pdf_summary(report: Mapping[str, Any]) -> Figure:
    run = _mapping(report["run"])
    fig = _page(f"Backtest report: {run.get('strategy') or 'backtest'} "
                f"{run.get('version') or ''}")
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.15, 1]})
    rows = _header_rows(run)
    if report.get("sanity") is not None:
        n = len(_rows(report["sanity"]))
        rows.append(["Sanity check", f"{n} warning(s), see page 2" if n else "passed"])
    _pdf_table(left, rows, ["Run", ""], [0.25, 0.75])
    metrics = _metric_pairs(_mapping(report["metrics"]))[:36]
    _pdf_table(right, [list(p) for p in metrics], ["Metric", "Value"], [0.55, 0.45])
    fig.text(0.01, 0.01, f"fingerprint {_mpl_text(run.get('fingerprint') or MISSING, 80)}",
             fontsize=7, family="monospace", parse_math=False)
    return fig


def _breakdown_rows(groups: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    columns = _breakdown_columns(groups)[:9]
    rows = [[str(name)] + [format_value(c, _mapping(s).get(c)) for c in columns]
            for name, s in list(groups.items())[:12]]
    return [label(c) for c in columns], rows


def _pdf_notes(report: Mapping[str, Any]) -> Figure:
    """Per-strategy and per-market tables, the sanity check and the assumptions."""
    fig = _page("Breakdown, sanity check and assumptions")
    axes = fig.subplots(3, 1, gridspec_kw={"height_ratios": [1, 1, 1.3]})
    for ax, key, first in ((axes[0], "by_strategy", "Strategy"), (axes[1], "by_market", "Market")):
        groups = _mapping(report.get(key))
        headers, rows = _breakdown_rows(groups)
        ax.set_title(label(key), loc="left", fontsize=10)
        if rows:
            _pdf_table(ax, rows, [first, *headers])
        else:
            ax.set_axis_off()
    axes[2].set_axis_off()
    axes[2].text(0, 1, _notes_text(report), va="top", fontsize=8, parse_math=False,
                 transform=axes[2].transAxes)
    return fig


def _notes_text(report: Mapping[str, Any]) -> str:
    lines = []
    if report.get("sanity") is not None:
        warnings = [str(w) for w in _rows(report["sanity"])]
        lines.append("Sanity check: passed" if not warnings
                     else f"Sanity check: {len(warnings)} warning(s)")
        lines += [f"  ! {_mpl_text(w, 140)}" for w in warnings[:10]]
    assumptions = [str(a) for a in _rows(report.get("assumptions"))]
    if assumptions:
        lines.append("Assumptions:")
        for a in assumptions[:15]:
            lines += textwrap.wrap(_mpl_text(a, 300), 140, initial_indent="  • ",
                                   subsequent_indent="    ")
    return "\n".join(lines)


def _has_notes(report: Mapping[str, Any]) -> bool:
    return bool(_mapping(report.get("by_strategy")) or _mapping(report.get("by_market"))
                or report.get("sanity") is not None or _rows(report.get("assumptions")))


def _pdf_equity(report: Mapping[str, Any]) -> Figure:
    equity = _mapping(report["equity"])
    line = _line(equity.get("ts"), equity.get("equity"))
    bench = _line(equity.get("ts"), equity.get("benchmark"))
    cash = _mapping(report.get("run")).get("cash")
    dd = _line(equity.get("ts"), _drawdown_values(equity, cash), invert=True)
    fig = _page("Equity vs buy-and-hold, and drawdown")
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [2, 1]})
    if line is not None:
        _plot_equity(top, line, bench, "strategy")
    else:
        top.text(0.5, 0.5, "no equity points", ha="center", transform=top.transAxes)
    if dd is not None:
        _plot_drawdown(bottom, dd)
    top.set_title("Equity", loc="left", fontsize=10)
    bottom.set_title("Drawdown", loc="left", fontsize=10)
    return fig


def _pdf_monthly(report: Mapping[str, Any]) -> Figure:
    grid = _monthly_grid(_rows(report.get("monthly_returns")))
    fig = _page("Monthly returns")
    ax = fig.add_subplot()
    month_scale = max((abs(v) for m in grid.values() for v in m.values()), default=0.0)
    totals = {year: _year_total(months) for year, months in grid.items()}
    year_scale = max((abs(v) for v in totals.values()), default=0.0)
    rows: list[list[str]] = []
    colours: list[list[Any]] = []
    for year in sorted(grid)[-30:]:
        months, total = grid[year], totals[year]
        rows.append([str(year)] + [f"{months[m] * 100:.1f}%" if m in months else ""
                                   for m in range(1, 13)] + [f"{total * 100:.1f}%"])
        colours.append(["white"] + [_heat_rgba(months[m], month_scale) if m in months
                                    else "white" for m in range(1, 13)]
                       + [_heat_rgba(total, year_scale)])
    _pdf_table(ax, rows, ["Year", *MONTHS, "Total"], font=8, colours=colours)
    return fig


def _pdf_price(symbol: str, data: Mapping[str, Any], trades: list[Any]) -> Figure:
    close = _line(data.get("ts"), data.get("close"))
    fig = _page(f"Price and trades: {symbol}")
    ax = fig.add_subplot()
    if close is not None:
        on_time = np.issubdtype(close.x.dtype, np.datetime64)
        markers = _trade_markers(_symbol_trades(trades, symbol)) if on_time else []
        _plot_prices(ax, close, markers)
    return fig


def _pdf_walk_forward(report: Mapping[str, Any]) -> Figure:
    wf = _mapping(report.get("walk_forward"))
    fig = _page(f"Walk-forward analysis (objective: {wf.get('objective', MISSING)})")
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [1, 1.2]})
    stitched = _mapping(wf.get("stitched"))
    line = _line(stitched.get("ts"), stitched.get("equity"))
    if line is not None:
        _plot_equity(top, line, None, "out-of-sample")
        top.set_title("Stitched out-of-sample equity", loc="left", fontsize=10)
    else:
        top.set_axis_off()
    windows = [_mapping(w) for w in _rows(wf.get("windows"))]
    rows = [_window_plain(w) for w in windows[:18]]
    if len(windows) > 18:
        rows.append([f"+{len(windows) - 18} more"] + [""] * (len(_WINDOW_COLUMNS) - 1))
    _pdf_table(bottom, rows, [label(c) for c in _WINDOW_COLUMNS], font=7)
    return fig


def _window_plain(window: Mapping[str, Any]) -> list[str]:
    return [fmt_params(window.get(c)) if c == "params" else format_value(c, window.get(c))
            for c in _WINDOW_COLUMNS]


def _pdf_montecarlo(report: Mapping[str, Any]) -> Figure:
    fig = _page("Monte Carlo")
    ax = fig.add_subplot()
    rows = []
    for mc in _mc_runs(report):
        ruin = format_value("probability_of_ruin", mc.get("probability_of_ruin"))
        for row in _mc_table_rows(mc):
            rows.append([str(mc.get("method", MISSING)), *row, ruin])
    _pdf_table(ax, rows, ["Method", "", *PERCENTILES, "P(ruin)"])
    lines = [f"{mc.get('method', MISSING)}: {_mc_summary(mc)}" for mc in _mc_runs(report)]
    fig.text(0.01, 0.02, _mpl_text("\n".join(lines), 1000), fontsize=8, parse_math=False)
    return fig


def _price_page(symbol: str, data: Mapping[str, Any],
                trades: list[Any]) -> Callable[[], Figure]:
    # a function, not a lambda in the loop, so each page binds its own symbol
    return lambda: _pdf_price(symbol, data, trades)


def pdf_pages(report: Mapping[str, Any]) -> list[Callable[[], Figure]]:
    """The PDF's pages, in order, as figure builders (one figure alive at a time)."""
    _validate(report)
    pages: list[Callable[[], Figure]] = [lambda: _pdf_summary(report)]
    if _has_notes(report):
        pages.append(lambda: _pdf_notes(report))
    pages.append(lambda: _pdf_equity(report))
    if _monthly_grid(_rows(report.get("monthly_returns"))):
        pages.append(lambda: _pdf_monthly(report))
    trades = _rows(report.get("trades"))
    for symbol, data in _mapping(report.get("prices")).items():
        if not np.isnan(_floats(_mapping(data).get("close"))).all():
            pages.append(_price_page(str(symbol), _mapping(data), trades))
    if _mapping(report.get("walk_forward")):
        pages.append(lambda: _pdf_walk_forward(report))
    if _mc_runs(report):
        pages.append(lambda: _pdf_montecarlo(report))
    return pages


def write_pdf(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write the report as a PDF (summary, charts, walk-forward, Monte Carlo) atomically.

    CreationDate is left out, so the same report gives the same bytes.
    """
    target = _target(path)
    pages = pdf_pages(report)

    def write(fh: IO[bytes]) -> None:
        meta = {"Creator": "MMATS", "CreationDate": None, "Title": "Backtest report"}
        with _mpl_settings("pdf"), PdfPages(fh, metadata=meta) as pdf:
            for build in pages:
                pdf.savefig(build())

    return atomic_write(target, write)
