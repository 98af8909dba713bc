"""Read a bar file (CSV, CSV.gz or Parquet) and validate it, vectorised, without floats.

Price and volume cells stay strings from the file to the database: they are checked with
a regular expression, compared as floats only where a float comparison is certain (float
conversion is monotonic, so a strict float inequality is a true one), and as Decimals for
the few rows where it is not. The database receives the original digits.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from db.errors import MmatsError
from workers.feeds.base import MAX_VALUE, TIMEFRAME_SECONDS, misalignment
from workers.ingest.instruments import shown

PRICE_COLUMNS = ("open", "high", "low", "close")
VALUE_COLUMNS = (*PRICE_COLUMNS, "volume")
REQUIRED = ("time", *PRICE_COLUMNS)
_ALIASES = {
    "time": ("timestamp", "datetime", "date time", "open time", "time", "date", "ts",
             "timestamp utc", "time utc", "date utc"),
    "open": ("open", "o", "open price"),
    "high": ("high", "h", "high price"),
    "low": ("low", "l", "low price"),
    "close": ("close", "c", "close price"),
    "volume": ("volume", "v", "vol"),
}
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# bar times from this one on are refused (a typo such as 20224-01-01, or a unit mix-up)
LATEST_BAR_TIME = datetime(2200, 1, 1, tzinfo=UTC)
_LATEST_US = (LATEST_BAR_TIME - _UNIX_EPOCH) // timedelta(microseconds=1)
# (an exponent of at most 2 digits: 1e-1000 was stored as a numeric of 1,000 places)
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d{1,2})?"
# a number's text is at most this long: 40 significant digits with sign, point, exponent
# and a few leading zeros (PostgreSQL's numeric would refuse 16,384 decimal places, and
# Decimal arithmetic on millions of digits overflows)
MAX_NUMBER_LENGTH = 64
# a bar must have closed by now, give or take this much (the live ingest's rule)
CLOSE_TOLERANCE = timedelta(minutes=1)
_NOT_FINITE = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity",
               "-infinity"}
_AWARE = (r"[T ]\d{1,2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?\s*"
          r"(?:Z|[+-]\d{2}(?::?\d{2})?|(?i:UTC|GMT)(?:[+-]\d{2}(?::?\d{2})?)?)")
# a trailing UTC or GMT (with an optional offset) is read as that offset from UTC
_UTC_OFFSET_SUFFIX = r"\s*(?i:UTC|GMT)([+-]\d{2}(?::?\d{2})?)$"
_UTC_SUFFIX = r"\s*(?i:UTC|GMT)$"
_EPOCH = r"\d{9,19}(?:\.\d+)?"


class FileError(MmatsError):
    """A file that cannot be read as bars at all."""


@dataclass(frozen=True)
class BadRow:
    row_number: int
    reason: str
    raw: dict[str, str]


@dataclass
class ParsedBars:
    """Good rows (parallel arrays, one per bar) and the bad ones."""

    label: str  # "line" (CSV, header = line 1) or "row" (Parquet, first data row = row 1)
    rows_read: int
    numbers: np.ndarray  # int64 line/row numbers
    ts_us: np.ndarray  # int64 microseconds since the epoch, UTC
    values: dict[str, pa.Array]  # column -> decimal strings as in the file
    bad: list[BadRow]
    duplicates: int  # exact repeats of a row already in the file

    def convention(self) -> str:
        return ("header = line 1" if self.label == "line" else "first data row = row 1")


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name).strip().lower())


def _zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise MmatsError(f"unknown time zone {shown(tz)}: use an IANA name such as UTC or "
                         "America/New_York") from exc


def _read_csv(path: Path) -> tuple[pd.DataFrame, np.ndarray | None]:
    """All columns as strings, and the line numbers of the rows if blank lines were skipped."""
    import pyarrow.csv as pcsv

    try:
        data = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            data = gzip.decompress(data)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise FileError(f"cannot read {shown(str(path), 300)}: {exc}") from exc
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        raise FileError(f"cannot import {shown(str(path), 300)}: the file is empty")
    if b"\x00" in data[:65536]:
        raise FileError(f"cannot read {shown(str(path), 300)}: not a text CSV file (binary data)")
    first = data.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        names = next(csv.reader([first.decode("utf-8")]))
    except (UnicodeDecodeError, csv.Error, StopIteration) as exc:
        raise FileError(f"cannot read {shown(str(path), 300)} as CSV: the header is not "
                        "text") from exc
    try:
        table = pcsv.read_csv(
            pa.BufferReader(data),
            read_options=pcsv.ReadOptions(column_names=[f"c{i}" for i in range(len(names))],
                                          skip_rows=1, block_size=1 << 24),
            convert_options=pcsv.ConvertOptions(
                column_types={f"c{i}": pa.string() for i in range(len(names))},
                strings_can_be_null=False, quoted_strings_can_be_null=False))
    except (pa.ArrowException, ValueError) as exc:
        where = _csv_problem(data, len(names))
        if where is None:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            where = printable(detail[:120])
        raise FileError(f"cannot read {shown(str(path), 300)} as CSV: {where}") from exc
    _check_header(names, path)
    if len(set(names)) != len(names):  # (repeats of a column the import does not read)
        names = [name if name not in names[:i] else f"{name}#{i}"
                 for i, name in enumerate(names)]
    frame = table.rename_columns(names).to_pandas()
    numbers = None
    if re.search(rb"\n[ \t\r]*\n", data) or re.match(rb"[^\n]*\n[ \t\r]*\n", data):
        lines = data.split(b"\n")
        numbers = np.array([i + 1 for i, ln in enumerate(lines) if ln.strip()][1:],
                           dtype=np.int64)[: len(frame)]
    return frame, numbers


def printable(text: str) -> str:
    """`text` with every control character (newline, escape, NUL) shown as its escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _csv_problem(data: bytes, columns: int) -> str | None:
    """Where and why a CSV that Arrow refused is not a table of `columns` columns: the
    first line that is not UTF-8 text or has another number of fields (None if no such
    line is found). Line numbers count from the header, line 1."""
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return (f"line {n}: not UTF-8 text (byte {raw[exc.start:exc.start + 1]!r} at "
                    f"character {exc.start + 1})")
    reader = csv.reader(io.StringIO(data.decode("utf-8"), newline=""))
    start = 1
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(data) + 1))
    try:
        for row in reader:
            if row and len(row) != columns:
                line = ",".join(row)
                text = line if len(line) <= 80 else line[:80] + "..."
                hint = (" (a quoted field runs across lines: a quote that is never closed?)"
                        if reader.line_num > start else "")
                return (f"line {start}: {len(row)} field{'s' if len(row) != 1 else ''}, but "
                        f"the header has {columns}{hint}: {printable(text)}")
            start = reader.line_num + 1
    except csv.Error as exc:
        return f"line {start}: {printable(str(exc))}"
    finally:
        csv.field_size_limit(limit)
    return None


_ALIAS_KEYS = {alias for aliases in _ALIASES.values() for alias in aliases}


def _check_header(names: list[str], path: Path) -> None:
    """Refuse a header that names a column the import reads twice (which one is meant?)."""
    seen: dict[str, str] = {}
    for name in names:
        key = _key(name)
        if key in seen and key in _ALIAS_KEYS:
            same = "appears twice" if seen[key] == name else f"is the same as {shown(seen[key])}"
            raise FileError(f"cannot import {shown(str(path), 300)}: column {shown(name)} "
                            f"{same} in the header")
        seen[key] = name


# Parquet column types read as text: numbers, decimals, text, booleans
def _textual(t: pa.DataType) -> bool:
    return (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
            or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t)
            or pa.types.is_null(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)
            or pa.types.is_dictionary(t))


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise FileError(f"cannot read {shown(str(path), 300)} as Parquet: {detail}") from exc
    _check_header([str(c) for c in table.column_names], path)
    cols: dict[str, object] = {}
    unusable: dict[str, str] = {}
    for name, col in zip(table.column_names, table.columns, strict=True):
        t = col.type
        if not (pa.types.is_timestamp(t) or pa.types.is_date(t)):
            problem = None if _textual(t) else f"has type {t}"
            if problem is None:
                try:
                    col = col.cast(pa.string())
                except (pa.ArrowException, ValueError):
                    problem = (f"has type {t} that is not UTF-8 text"
                               if pa.types.is_binary(t) or pa.types.is_large_binary(t)
                               else f"has type {t}")
            if problem is not None:
                unusable[name] = problem
                # (kept as text for a quarantined row's raw values)
                cols[name] = pd.Series([printable(repr(v))[:200] for v in col.to_pylist()],
                                       dtype=object)
                continue
        if pa.types.is_timestamp(t):
            s = col.to_pandas()
            if t.tz is None:
                cols[name] = s  # naive: read in --tz later
            else:
                cols[name] = s.dt.tz_convert("UTC")
        elif pa.types.is_date(t):
            cols[name] = pd.to_datetime(col.to_pandas())
        else:
            # floats: Arrow prints the shortest repr that round-trips; decimals as they are
            cols[name] = col.to_pandas().fillna("")
    frame = pd.DataFrame(cols)
    frame.attrs["unusable"] = unusable
    return frame


def read_frame(path: Path) -> tuple[pd.DataFrame, str, np.ndarray]:
    if not path.exists():
        raise FileError(f"file not found: {shown(str(path), 300)}")
    if not path.is_file():
        raise FileError(f"not a file: {shown(str(path), 300)}")
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        frame = _read_parquet(path)
        return frame, "row", np.arange(len(frame), dtype=np.int64) + 1
    if name.endswith((".csv", ".csv.gz", ".txt")):
        frame, numbers = _read_csv(path)
        if numbers is None:
            numbers = np.arange(len(frame), dtype=np.int64) + 2
        return frame, "line", numbers
    raise FileError(f"cannot import {shown(str(path), 300)}: use a .csv, .csv.gz or .parquet file")


def map_columns(frame: pd.DataFrame, path: Path) -> dict[str, str]:
    keys: dict[str, str] = {}
    for col in frame.columns:
        keys.setdefault(_key(col), col)
    found: dict[str, str] = {}
    for std, aliases in _ALIASES.items():
        for alias in aliases:
            if alias in keys:
                found[std] = keys[alias]
                break
    unusable = frame.attrs.get("unusable", {})
    for std, col in found.items():
        if col in unusable:
            raise FileError(f"cannot import {shown(str(path), 300)}: column {shown(str(col))} "
                            f"({std}) {unusable[col]}: expected numbers, text or times")
    missing = [c for c in REQUIRED if c not in found]
    if missing:
        have = ", ".join(repr(str(c))[:40] for c in list(frame.columns)[:12]) or "none"
        raise FileError(f"cannot import {shown(str(path), 300)}: missing column(s) "
                        f"{', '.join(missing)} (found: {have})")
    return found


def _localize(naive: pd.Series, zone: ZoneInfo) -> pd.Series:
    if zone.key == "UTC":
        return naive.dt.tz_localize("UTC")
    try:
        return naive.dt.tz_localize(zone, ambiguous="infer", nonexistent="NaT")
    except Exception:  # cannot infer (unsorted or unpaired repeats): refuse those rows
        return naive.dt.tz_localize(zone, ambiguous="NaT", nonexistent="NaT")


def parse_times(col: pd.Series, zone: ZoneInfo) -> tuple[pd.Series, pd.Series]:
    """(UTC times with NaT where unusable, reason per NaT row). A time after the year 2200
    is unusable, whichever way it is written."""
    n = len(col)
    reasons = pd.Series([None] * n, dtype=object)
    nat = np.iinfo(np.int64).min
    texts: np.ndarray | None = None
    if isinstance(col.dtype, pd.DatetimeTZDtype):
        us = _as_us(col)
    elif pd.api.types.is_datetime64_dtype(col.dtype):
        naive = col
        out = _localize(naive, zone)
        dst = (out.isna() & naive.notna()).to_numpy()
        reasons[dst] = f"local time does not exist or is ambiguous in {zone.key} (DST change)"
        reasons[naive.isna().to_numpy()] = "time is empty"
        us = _as_us(out)
    else:
        texts = s = _strings(col)
        us, unit = _parse_texts(s, zone, reasons)
        if unit is not None:
            late = us > _LATEST_US
            for i in np.flatnonzero(late).tolist():
                reasons.iat[i] = (f"time {shown(s[i])} is out of range (after the year 2200 "
                                  f"in {unit}, the column's unit)")
            us[late] = nat
    late = (us > _LATEST_US) & reasons.isna().to_numpy()
    for i in np.flatnonzero(late).tolist():
        when = shown(str(texts[i])) if texts is not None else _stamp(int(us[i]))
        reasons.iat[i] = f"time {when} is out of range (after the year 2200)"
    us[late] = nat
    out = pd.Series(pd.to_datetime(us, unit="us", utc=True))
    unparsed = out.isna().to_numpy() & reasons.isna().to_numpy()
    for i in np.flatnonzero(unparsed).tolist():
        if texts is None:
            reasons.iat[i] = "time is empty"
        else:
            reasons.iat[i] = ("time is empty" if texts[i] == ""
                              else f"time {shown(texts[i])} is not a date/time")
    return out, reasons


def _stamp(us: int) -> str:
    return str(np.datetime_as_string(np.datetime64(us, "us"), unit="s")).replace("T", " ") + \
        " UTC"


def _parse_texts(s: np.ndarray, zone: ZoneInfo,
                 reasons: pd.Series) -> tuple[np.ndarray, str | None]:
    """Times written as text, as UTC microseconds (NaT as int64 min), and the unit if the
    column holds epoch numbers."""
    n = len(s)
    empty = s == ""
    us = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)  # NaT
    epoch = _match(s, _EPOCH)
    if epoch.sum() > (~empty).sum() // 2:
        us[epoch], unit = _epoch_us(s[epoch])
        return us, unit
    aware = _match(s, ".*" + _AWARE) & ~empty
    naive_mask = ~aware & ~empty
    if aware.any():
        us[aware] = _aware_us(pd.Series(s[aware]))
    if naive_mask.any():
        idx = np.flatnonzero(naive_mask)
        part = pd.Series(s[naive_mask])
        naive = pd.to_datetime(part, format="ISO8601", errors="coerce")
        if naive.isna().sum() > len(part) // 2:
            try:
                naive = pd.to_datetime(part, errors="coerce", format="mixed")
            except (ValueError, TypeError, OverflowError):  # some with a zone, some not
                naive = pd.Series([_one_time(x) for x in part], dtype=object)
        if isinstance(naive.dtype, pd.DatetimeTZDtype):  # a zone pandas reads: all aware
            us[idx] = _as_us(naive)
            return us, None
        if naive.dtype == object:  # per value: aware ones as they are, naive ones local
            has_zone = np.array([isinstance(t, pd.Timestamp) and t.tzinfo is not None
                                 for t in naive], dtype=bool)
            if has_zone.any():
                zoned: list[Any] = [naive.iat[i] for i in np.flatnonzero(has_zone).tolist()]
                us[idx[has_zone]] = _as_us(pd.Series(zoned).astype("datetime64[us, UTC]"))
            naive = pd.to_datetime(pd.Series([None if z else t for z, t in
                                              zip(has_zone, naive, strict=True)],
                                             dtype=object), errors="coerce")
            idx, naive = idx[~has_zone], naive[~has_zone].reset_index(drop=True)
        local = _localize(naive.astype("datetime64[us]"), zone)
        dst = (local.isna() & naive.notna()).to_numpy()
        for i in idx[dst]:
            reasons.iat[i] = (f"local time {printable(s[i])} does not exist or is ambiguous in "
                              f"{zone.key} (DST change)")
        us[idx] = _as_us(local)
    return us, None


def _aware_us(part: pd.Series) -> np.ndarray:
    """Times with a zone (Z, an offset, UTC or GMT) as UTC microseconds."""
    arr = pc.replace_substring_regex(pa.array(part, pa.string()), _UTC_OFFSET_SUFFIX, r"\1")
    arr = pc.replace_substring_regex(arr, _UTC_SUFFIX, "+00:00")
    iso = pd.Series(arr.to_numpy(zero_copy_only=False), dtype=object)
    parsed = pd.to_datetime(iso, format="ISO8601", errors="coerce", utc=True)
    if parsed.isna().any():  # e.g. Thu, 01 Feb 2024 00:01:00 GMT
        bad = parsed.isna().to_numpy()
        try:
            again = pd.to_datetime(iso[bad], format="mixed", errors="coerce", utc=True)
        except (ValueError, TypeError, OverflowError):
            again = pd.Series([_one_time(x, utc=True) for x in iso[bad]],
                              index=iso.index[bad], dtype="datetime64[us, UTC]")
        parsed = parsed.astype("datetime64[us, UTC]")
        parsed[bad] = again.astype("datetime64[us, UTC]")
    return _as_us(parsed)


def _one_time(text: str, utc: bool = False) -> object:
    try:
        return pd.to_datetime(text, utc=utc)
    except (ValueError, TypeError, OverflowError):
        return pd.NaT


def _epoch_us(texts: np.ndarray) -> tuple[np.ndarray, str]:
    """Epoch numbers as UTC microseconds (exactly for whole numbers), and the unit: the
    column's: by the median's size, seconds (10 digits today), milliseconds (13),
    microseconds (16: Binance's files since 2025) or nanoseconds (19)."""
    whole = _match(texts, r"\d+")
    nums = pd.to_numeric(pd.Series(texts), errors="coerce").to_numpy(dtype=np.float64)
    median = float(np.nanmedian(nums))
    per_us, unit = ((1e-6, "seconds") if median < 1e11 else (1e-3, "milliseconds")
                    if median < 1e14 else (1.0, "microseconds") if median < 1e17
                    else (1e3, "nanoseconds"))
    out = np.full(len(texts), np.iinfo(np.int64).min, dtype=np.int64)
    with np.errstate(over="ignore", invalid="ignore"):
        frac = ~whole & np.isfinite(nums) & (nums / per_us < _LATEST_US)
        out[frac] = np.round(nums[frac] / per_us).astype(np.int64)
    n = texts[whole].astype(np.uint64)  # (19 digits fit; int64 arithmetic could overflow)
    if per_us < 1:
        times = round(1 / per_us)
        late = n > np.uint64(_LATEST_US // times)
        us = np.where(late, np.uint64(_LATEST_US + 1), n * np.uint64(times))
    else:
        us = np.minimum(n // np.uint64(round(per_us)), np.uint64(_LATEST_US + 1))
    out[whole] = us.astype(np.int64)
    return out, unit


def _as_us(times: pd.Series) -> np.ndarray:
    """UTC microseconds (NaT as int64 min)."""
    utc = times.dt.tz_convert("UTC").dt.tz_localize(None)
    return utc.to_numpy(dtype="datetime64[us]").astype(np.int64)


def _dec(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        return Decimal("NaN")


def _at(arr: pa.Array, i: int) -> str:
    return str(arr[i].as_py())


def _check_values(vals: dict[str, pa.Array], reasons: np.ndarray) -> None:
    """Set a reason for every row whose numbers break a bar rule (first reason wins)."""
    floats: dict[str, np.ndarray] = {}
    for name, arr in vals.items():
        short = _np(pc.less_equal(pc.utf8_length(arr), MAX_NUMBER_LENGTH))
        ok = short & _np(pc.match_substring_regex(arr, f"^(?:{_NUMBER})$"))
        for i in np.flatnonzero(~ok).tolist():
            if reasons[i] is None:
                text = _at(arr, i)
                if not short[i]:
                    reasons[i] = (f"{name} {shown(text, 40)} is too long ({len(text):,} "
                                  f"characters; a number has at most {MAX_NUMBER_LENGTH})")
                elif text == "":
                    reasons[i] = f"{name} is empty"
                elif text.lower() in _NOT_FINITE:
                    reasons[i] = f"{name} is {text} (not a finite number)"
                elif re.fullmatch(r"[+-]?(?:\d+\.?\d*|\.\d+)[eE]-\d+", text):
                    reasons[i] = f"{name} {shown(text)} has an exponent below -99"
                elif re.fullmatch(r"[+-]?(?:\d+\.?\d*|\.\d+)[eE]\+?\d+", text) \
                        and _dec(text) != 0:
                    reasons[i] = f"{name} {shown(text)} is out of range (10^18 or more)"
                else:
                    reasons[i] = f"{name} {shown(text)} is not a number"
        usable = pc.if_else(pa.array(ok), arr, pa.scalar(None, pa.string()))
        floats[name] = _np(pc.cast(usable, pa.float64())).astype(np.float64)
    valid = pd.isna(reasons)
    # sign checks: float <= 0 is only certain for a non-zero float
    for name in VALUE_COLUMNS:
        f = floats[name]
        if name == "volume":
            limit_bad = (f < 0) | ((f == 0) & _np(pc.starts_with(vals[name], "-")))
        else:
            limit_bad = f <= 0
        big = np.abs(f) >= float(MAX_VALUE) * 0.99  # (the float of the text is near)
        for i in np.flatnonzero(valid & (limit_bad | big | ~np.isfinite(f))).tolist():
            text = _at(vals[name], i)
            d = _dec(text)
            if name == "volume" and d < 0:
                reasons[i] = f"volume {text} is negative"
            elif name != "volume" and d <= 0:
                reasons[i] = f"{name} {text} is not positive"
            elif abs(d) >= MAX_VALUE:
                reasons[i] = f"{name} {shown(text)} is out of range (10^18 or more)"
        valid &= pd.isna(reasons)
    pairs = (("high", "low", "high {a} is below low {b}"),
             ("high", "open", "high {a} is below open {b}"),
             ("high", "close", "high {a} is below close {b}"),
             ("open", "low", "low {b} is above open {a}"),
             ("close", "low", "low {b} is above close {a}"))
    for a, b, text in pairs:
        fa, fb = floats[a], floats[b]
        sa, sb = vals[a], vals[b]
        certain = valid & (fa < fb)
        unsure = valid & ~certain & ((fa == fb) | ~np.isfinite(fa) | ~np.isfinite(fb))
        if unsure.any():
            unsure &= _np(pc.not_equal(sa, sb))
        for i in np.flatnonzero(unsure).tolist():
            if _dec(_at(sa, i)) < _dec(_at(sb, i)):
                certain[i] = True
        for i in np.flatnonzero(certain).tolist():
            if reasons[i] is None:
                reasons[i] = text.format(a=_at(sa, i), b=_at(sb, i))
        valid &= ~certain


def _np(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(arr.to_numpy(zero_copy_only=False))


def _values(col: pd.Series) -> pa.Array:
    """A value column as an Arrow string array, stripped."""
    arr = pa.array(col if col.dtype == "str" else col.astype("str"))
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return pc.utf8_trim_whitespace(arr)


def _strings(col: pd.Series) -> np.ndarray:
    """A column as an object array of stripped strings."""
    arr = pa.array(col if col.dtype == "str" else col.astype("str"))
    return pc.utf8_trim_whitespace(arr).to_numpy(zero_copy_only=False)


def _match(arr: np.ndarray, pattern: str) -> np.ndarray:
    """Full-match a regular expression (RE2, vectorised) over an object array of strings."""
    return pc.match_substring_regex(pa.array(arr, pa.string()), f"^(?:{pattern})$").to_numpy(
        zero_copy_only=False)


def parse_file(path: str | Path, tz: str = "UTC", timeframe: str | None = None,
               now: datetime | None = None) -> ParsedBars:
    """The file's bars; with `timeframe`, a row whose time is not the open time of such a
    bar, or whose bar had not closed by `now` (default: the clock) give or take
    CLOSE_TOLERANCE, is bad (the live ingest's rules)."""
    zone = _zone(tz)
    p = Path(path)
    frame, label, numbers_all = read_frame(p)
    mapping = map_columns(frame, p)
    n = len(frame)
    if n == 0:
        raise FileError(f"cannot import {shown(str(p), 300)}: the file has no data rows")
    times, treasons = parse_times(frame[mapping["time"]].reset_index(drop=True), zone)
    reasons = treasons.to_numpy(dtype=object).copy()
    vals: dict[str, pa.Array] = {}
    for name in VALUE_COLUMNS:
        if name in mapping:
            vals[name] = _values(frame[mapping[name]])
        else:
            vals[name] = pa.array(["0"] * n, pa.string())
    _check_values(vals, reasons)
    ts_us = _us_with_nat(times)
    if timeframe is not None:
        _check_alignment(ts_us, timeframe, reasons)
        _check_closed(ts_us, timeframe, reasons, now or datetime.now(UTC))
    good = pd.isna(reasons)
    duplicates = _check_duplicates(ts_us, vals, good, reasons, numbers_all, times, label)
    good = pd.isna(reasons)
    good_idx = np.flatnonzero(good & ~duplicates)
    bad_idx = np.flatnonzero(~good)
    bad = [BadRow(int(numbers_all[i]), str(reasons[i]), _raw(frame, i))
           for i in bad_idx.tolist()]
    keep = pa.array(good_idx)
    return ParsedBars(label=label, rows_read=n, numbers=numbers_all[good_idx],
                      ts_us=ts_us[good_idx], values={k: v.take(keep) for k, v in vals.items()},
                      bad=bad, duplicates=int(duplicates.sum()))


def _check_alignment(ts_us: np.ndarray, timeframe: str, reasons: np.ndarray) -> None:
    """A reason for every still good row whose time no `timeframe` bar opens at."""
    todo = pd.isna(reasons) & (ts_us != np.iinfo(np.int64).min)
    if timeframe not in ("1d", "1w"):  # the rule's arithmetic, on the whole column
        todo &= ts_us % (TIMEFRAME_SECONDS[timeframe] * 1_000_000) != 0
    problems: dict[int, str | None] = {}
    for i in np.flatnonzero(todo).tolist():
        us = int(ts_us[i])
        if us not in problems:
            problems[us] = misalignment(_UNIX_EPOCH + timedelta(microseconds=us), timeframe)
        if problems[us] is not None:
            stamp = np.datetime_as_string(np.datetime64(us, "us"), unit="auto")
            reasons[i] = f"time {str(stamp).replace('T', ' ')} UTC is {problems[us]}"


def _check_closed(ts_us: np.ndarray, timeframe: str, reasons: np.ndarray,
                  now: datetime) -> None:
    """A reason for every still good row whose bar had not closed by `now` (a bar in the
    future would stop the live ingest, which resumes after the latest stored bar)."""
    step = TIMEFRAME_SECONDS[timeframe] * 1_000_000
    limit = (now + CLOSE_TOLERANCE - _UNIX_EPOCH) // timedelta(microseconds=1)
    todo = pd.isna(reasons) & (ts_us != np.iinfo(np.int64).min) & (ts_us > limit - step)
    shown_now = f"{now.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"
    for i in np.flatnonzero(todo).tolist():
        us = int(ts_us[i])
        if us > limit - CLOSE_TOLERANCE // timedelta(microseconds=1):
            reasons[i] = f"time {_stamp(us)} is in the future (now {shown_now})"
        else:
            reasons[i] = (f"the {timeframe} bar at {_stamp(us)} has not closed yet (it closes "
                          f"at {_stamp(us + step)}; now {shown_now})")


def _us_with_nat(times: pd.Series) -> np.ndarray:
    arr = times.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy(dtype="datetime64[us]")
    return arr.astype(np.int64)


def _raw(frame: pd.DataFrame, i: int) -> dict[str, str]:
    # PostgreSQL text and jsonb cannot hold NUL
    def clean(x: object) -> str:
        return ("" if pd.isna(x) else str(x)).replace("\x00", "\ufffd")  # type: ignore[call-overload]

    return {clean(k): clean(v) for k, v in frame.iloc[i].items()}


def _check_duplicates(ts_us: np.ndarray, vals: dict[str, pa.Array], good: np.ndarray,
                      reasons: np.ndarray, numbers: np.ndarray, times: pd.Series,
                      label: str) -> np.ndarray:
    """Mark repeats: an exact repeat is dropped (returned mask); a different one is bad."""
    repeat = np.zeros(len(ts_us), dtype=bool)
    idx = np.flatnonzero(good)
    if len(idx) < 2:
        return repeat
    dup = pd.Series(ts_us[idx]).duplicated(keep=False).to_numpy()
    if not dup.any():
        return repeat
    first: dict[int, tuple[int, tuple[Decimal, ...]]] = {}
    for i in idx[dup]:
        key = (int(ts_us[i]))
        value = tuple(_dec(_at(vals[c], i)) for c in VALUE_COLUMNS)
        if key not in first:
            first[key] = (i, value)
            continue
        j, seen = first[key]
        if value == seen:
            repeat[i] = True
        else:
            stamp = np.datetime64(int(ts_us[i]), "us")
            when = str(np.datetime_as_string(stamp, unit="s")).replace("T", " ")
            reasons[i] = (f"time {when} UTC appears again with different values "
                          f"(first at {label} {int(numbers[j])})")
    return repeat
