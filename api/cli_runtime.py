"""`mmats run`, `mmats worker KIND` and `mmats paper --feed replay`."""

from __future__ import annotations

import math
import os
import re
import signal
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
import psycopg

from db.config import Settings, load_settings
from db.connect import connect, database_url
from db.errors import MmatsError
from workers.runtime import config as runtime_config
from workers.runtime import log

# the CHECK workers_name_format of runtime.workers (db/sql/schema.sql)
WORKER_NAME = re.compile(r"[a-z][a-z0-9_.:-]{0,63}")


def _config_path(value: str | None) -> Path:
    if value:
        return Path(value)
    env = os.environ.get("MMATS_CONFIG")
    return Path(env) if env else Path("mmats.toml")


def _settings(config_file: str | None) -> Settings:
    """The database settings: a --config file's [database] table (and the environment's
    MMATS_DATABASE_URL / MMATS_HOME over it), as MMATS_CONFIG would give them; without
    --config, MMATS_CONFIG's or ./mmats.toml's. The workers `mmats run` starts get the
    same --config, so they read the same."""
    if config_file:
        return load_settings({**os.environ, "MMATS_CONFIG": config_file})
    return load_settings()


@click.command("run")
@click.option("--config", "config_file", help="the runtime configuration (default mmats.toml)")
def run_command(config_file: str | None) -> None:
    """Create the configured accounts, then run and supervise every worker they need."""
    from workers.runtime.supervisor import Supervisor, apply_config, kinds_for

    path = _config_path(config_file)
    cfg = runtime_config.load(path)
    kinds = kinds_for(cfg)
    if not kinds:  # before anything is written
        raise MmatsError(f"{path}: nothing to run (no [[feeds]], [[strategies]] or brokers)")
    settings = _settings(config_file)
    url = database_url(settings)
    with connect(url, autocommit=True) as conn:
        try:
            lines = apply_config(conn, cfg, symbols=True, notifications=True)
        except runtime_config.RuntimeConfigError as exc:
            raise runtime_config.RuntimeConfigError(f"{path}: {exc}") from None
        for line in lines:
            click.echo(line)
    with connect(url, autocommit=True) as conn:  # (the mode it has, not the one configured)
        modes: dict[str, str] = dict(conn.execute("SELECT name, mode::text FROM trading.accounts "
                                  "WHERE name = ANY(%s)", ([a.name for a in cfg.accounts],)
                                  ).fetchall())
    for acc in cfg.accounts:
        click.echo(f"account {acc.name}: {acc.environment.upper()} environment, "
                   f"{modes.get(acc.name, acc.mode)} mode, broker {acc.broker}"
                   + (f" ({acc.endpoint} endpoint)" if acc.broker != "paper" else ""))
    log_dir = settings.home / "logs"
    click.echo(f"workers: {', '.join(kinds)} (JSON logs in {log_dir}/<worker>.log; stop with "
               "Ctrl-C or SIGTERM)")
    # a replay's ingest worker ends (exit 0) when it has played every bar: not restarted
    sup = Supervisor(path.resolve(), kinds, log_dir=log_dir,
                     finished=lambda kind, code: (kind == "ingest" and code == 0
                                                  and cfg.replay is not None))
    signal.signal(signal.SIGTERM, lambda *_: sup.stop_event.set())
    try:
        sup.run()
    except KeyboardInterrupt:
        pass
    finally:
        sup.stop()


def _seconds(_ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """A number of seconds above 0 (NaN compared false with every age: --check nan
    passed every stale worker)."""
    if value is not None and not 0 < value <= 1e9:
        raise click.BadParameter(f"must be a number of seconds above 0, got {value}",
                                 param=param)
    return value


@click.command("workers")
@click.option("--check", "stale_after", type=float, default=None, callback=_seconds,
              help="exit 1 if a running worker's heartbeat is older than this many seconds")
def workers_command(stale_after: float | None) -> None:
    """The workers' heartbeats (runtime.workers) and their latest errors."""
    from api.table import table

    with connect(database_url(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT name, kind, state, pid, host, started_at, beat_at, "
            "extract(epoch FROM now() - beat_at)::float FROM runtime.workers ORDER BY name"
        ).fetchall()
        errors = conn.execute("SELECT ts, worker, kind, message FROM runtime.errors "
                              "ORDER BY error_id DESC LIMIT 5").fetchall()
    if not rows:
        click.echo("no worker has reported yet (start them with `mmats run`)")
    else:
        click.echo(table(["worker", "kind", "state", "pid", "host", "started", "last beat"],
                         [[r[0], r[1], r[2], r[3], r[4], f"{r[5]:%Y-%m-%d %H:%M:%S}",
                           f"{r[7]:.0f} s ago"] for r in rows]))
    for ts, worker, kind, message in errors:
        click.echo(f"  {ts:%Y-%m-%d %H:%M:%S} {worker} {kind}: {message[:200]}")
    if stale_after is not None:
        stale = [r[0] for r in rows if r[2] in ("starting", "running", "degraded")
                 and r[7] > stale_after]
        if stale or not rows:
            raise MmatsError(f"stale heartbeat: {', '.join(stale) or 'no worker reported'}")


@click.command("worker")
@click.argument("kind", type=click.Choice(["ingest", "strategies", "router", "reconciler",
                                           "notifier"]))
@click.option("--config", "config_file", help="the runtime configuration (default mmats.toml)")
@click.option("--name", help="the worker's name in runtime.workers (default: its kind)")
def worker_command(kind: str, config_file: str | None, name: str | None) -> None:
    """Run one worker in the foreground (JSON logs on stderr)."""
    from workers.runtime.supervisor import build_worker

    if name is not None and not WORKER_NAME.fullmatch(name):
        # runtime.workers' own rule (workers_name_format): a name it refuses never beats
        raise MmatsError(f"--name {name!r}: a worker's name is a lowercase letter, then up to "
                         "63 of a-z 0-9 _ . : -")
    cfg = runtime_config.load(_config_path(config_file))
    settings = _settings(config_file)
    log.setup(name or kind, file=cfg.log_file, database_url=settings.database_url)
    worker = build_worker(kind, cfg, database_url(settings), name=name)
    worker.install_signal_handlers()
    worker.run()


@click.command("paper")
@click.option("--feed", type=click.Choice(["replay"]), required=True,
              help="where the bars come from (replay: stored bars, played as if live)")
@click.option("--strategy", required=True, help="a strategy name (mmats strategies)")
@click.option("--symbol", "symbols", multiple=True, required=True, help="repeatable")
@click.option("--timeframe", default="1m", show_default=True)
@click.option("--from", "start", required=True, help="YYYY-MM-DD or ISO-8601 (UTC)")
@click.option("--to", "end", required=True, help="YYYY-MM-DD or ISO-8601 (UTC), exclusive")
@click.option("--speed", default="max", show_default=True,
              help="N times real time, or max (as fast as the pipeline settles)")
@click.option("--params", help="strategy parameters, k=v,...")
@click.option("--cash", default="10000", show_default=True)
@click.option("--commission", default="0.001", show_default=True,
              help="paper broker fee, a fraction per side")
@click.option("--slippage", default="none", show_default=True,
              help="none | bps:N | atr:F | volume:K")
@click.option("--spread", default="0", show_default=True)
@click.option("--allow-short", is_flag=True)
@click.option("--strategy-dir", "strategy_dirs", multiple=True,
              type=click.Path(file_okay=False, exists=True),
              help="a folder of your own strategies (repeatable)")
@click.option("--quiet", is_flag=True, help="no line per signal, order and fill")
def paper_command(feed: str, strategy: str, symbols: tuple[str, ...], timeframe: str, start: str,
                  end: str, speed: str, params: str | None, cash: str, commission: str,
                  slippage: str, spread: str, allow_short: bool, strategy_dirs: tuple[str, ...],
                  quiet: bool) -> None:
    """Paper-trade a strategy on a replayed feed: the whole live pipeline (ingest -> bars
    trigger -> strategy worker -> order queue -> router -> paper broker), each worker in
    its own process. Prints the signals, orders and fills as they happen."""
    from workers.backtest.config import (
        BacktestError,
        parse_decimal,
        parse_params,
        parse_time,
        symbol_ref,
    )

    try:
        start_ts, end_ts = parse_time(start, "--from"), parse_time(end, "--to")
        values = {"params": parse_params(params), "cash": parse_decimal(cash, "--cash"),
                  "commission": parse_decimal(commission, "--commission"),
                  "spread": parse_decimal(spread, "--spread")}
    except BacktestError as exc:
        raise MmatsError(str(exc)) from None
    result = run_replay_session(
        # (a symbol given twice was a duplicate-key error of the replay's instruments)
        strategy=strategy, symbols=list(dict.fromkeys(symbol_ref(s) for s in symbols)),
        timeframe=timeframe,
        start=start_ts, end=end_ts, speed=speed, slippage=slippage, allow_short=allow_short,
        echo=None if quiet else click.echo,
        strategy_dirs=tuple(Path(d) for d in strategy_dirs), **values)  # type: ignore[arg-type]
    s = result["summary"]
    click.echo(f"session {result['session']} ({result['account']}, PAPER environment): "
               f"{s['signals']} signals, {s['orders']} orders, {s['fills']} fills, "
               f"{s['trades']} closed trades; equity {s['equity']:.2f} "
               f"(cash {s['cash']:.2f}) in {result['seconds']:.1f} s")


def _speed(text: str) -> float | None:
    if text.strip().lower() == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        raise MmatsError(f"--speed must be a number > 0 or max, got {text!r}") from None
    if not 0.001 <= value <= 1e9:  # (1e-300 made the step's wait overflow time_t)
        raise MmatsError(f"--speed must be a number from 0.001 to 1e9 or max, got {text!r}")
    return value


def prepare_replay(conn: psycopg.Connection, *, strategy: str, symbols: list[str],
                   timeframe: str, start: datetime, end: datetime, speed: str,
                   params: Mapping[str, object], cash: Decimal, commission: Decimal, slippage: str,
                   spread: Decimal, allow_short: bool, home: Path,
                   visibility_seconds: int = 5,
                   strategy_dirs: tuple[Path, ...] = ()) -> Path:
    """The session's instruments, warm-up bars, account, resume points and configuration
    file — all of them or, on any error, none (one transaction; the file is removed)."""
    from strategies.loader import StrategyLoader, StrategyLoadError
    from strategies.params import ParamError
    from workers.backtest.simulator import SimulatorError, Slippage
    from workers.runtime.replay import ReplaySession, copy_instruments, copy_warmup, next_session
    from workers.runtime.supervisor import apply_config

    if timeframe not in runtime_config.TIMEFRAMES:
        raise MmatsError(f"--timeframe {timeframe!r} is not one of "
                         f"{', '.join(runtime_config.TIMEFRAMES)}")
    if end <= start:
        raise MmatsError(f"--to {end.isoformat()} must be after --from {start.isoformat()}")
    if not (cash.is_finite() and cash > 0):
        raise MmatsError(f"--cash must be a number > 0, got {cash}")
    for option, value in (("--commission", commission), ("--spread", spread)):
        # the paper broker's range (as [accounts.paper] of a session file would check it)
        runtime_config._dec(str(value), option, Decimal(0), Decimal("0.1"))
    pace = _speed(speed)
    try:
        Slippage.parse(slippage)
        loader = StrategyLoader([Path(d).resolve() for d in strategy_dirs])
        report = loader.reload_if_changed()
        # (the loader reports a broken file once: on its first load, when it is built)
        errors = report.errors or list(loader.errors.values())
        if errors and strategy not in loader.names():
            raise StrategyLoadError("; ".join(str(e) for e in errors))
        instance = loader.create(strategy, params)  # a bad name or parameter fails here
    except (StrategyLoadError, ParamError, SimulatorError) as exc:
        raise MmatsError(str(exc)) from None
    path: Path | None = None
    try:
        with conn.transaction():
            n = next_session(conn)
            venue = f"replay{n}"
            account = f"paper-replay-{n}"
            pairs = copy_instruments(conn, symbols, venue)
            stored = conn.execute(
                "SELECT count(*) FROM market.bars WHERE instrument_id = ANY(%s) "
                "AND timeframe = %s AND ts >= %s AND ts < %s",
                ([p[0] for p in pairs], timeframe, start, end)).fetchone()
            if not stored or not stored[0]:
                raise MmatsError(f"no {timeframe} bars stored for {', '.join(symbols)} from "
                                 f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC")
            currency = conn.execute("SELECT quote_currency FROM market.instruments "
                                    "WHERE instrument_id = %s", (pairs[0][0],)).fetchone()
            assert currency is not None
            last_warmup = copy_warmup(conn, pairs, timeframe, start, instance.warmup_bars())
            session = ReplaySession(n, venue, account, timeframe, start, end, pace,
                                    tuple(p[0] for p in pairs), tuple(p[1] for p in pairs),
                                    tuple(p[2] for p in pairs))
            text = "\n".join([
                f"# replay session {n}, written by `mmats paper` (safe to delete)",
                "[runtime]", "heartbeat_seconds = 1",
                # a replay step's bars are one INSERT: no bar of that time can come later
                "bar_grace_seconds = 0",
                "strategy_dirs = [" + ", ".join(
                    _toml_str(str(Path(d).resolve())) for d in strategy_dirs) + "]", "",
                "[router]", f"visibility_seconds = {int(visibility_seconds)}", "poll_ms = 20", "",
                "[[accounts]]", f"name = {_toml_str(account)}", 'environment = "paper"',
                'mode = "operator"', f"cash = {_toml_str(str(cash))}",
                f"currency = {_toml_str(str(currency[0]))}",
                'broker = "paper"', f"allow_short = {'true' if allow_short else 'false'}",
                "[accounts.paper]", f"commission = {_toml_str(str(commission))}",
                f"slippage = {_toml_str(slippage)}", f"spread = {_toml_str(str(spread))}", "",
                "[[strategies]]", f"account = {_toml_str(account)}",
                f"name = {_toml_str(strategy)}",
                "symbols = [" + ", ".join(_toml_str(f"{p[2]}@{venue}") for p in pairs) + "]",
                f"timeframe = {_toml_str(timeframe)}",
                "[strategies.params]",
                *[f"{_toml_str(str(k))} = {_toml_value(v)}" for k, v in params.items()],
                "", session.to_toml()])
            folder = home / "sessions"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"replay-{n}.toml"
            path.write_text(text, encoding="utf-8")
            apply_config(conn, runtime_config.load(path))
            # the strategy's resume point exists before any worker runs: the replay waits
            # for it from the first bar, and the strategy worker starts after the warm-up
            cls = type(instance)
            begin = last_warmup if last_warmup is not None else start - timedelta(microseconds=1)
            conn.execute("SELECT runtime.advance_cursor(%s, NULL, %s)",
                         (f"strategy:{account}:{cls.name}:{timeframe}", begin))
            for target in session.targets:  # the paper broker has settled the warm-up
                conn.execute("SELECT runtime.advance_cursor(%s, NULL, %s)",
                             (f"paper:{target}:{timeframe}", begin))
    except BaseException:
        if path is not None:
            path.unlink(missing_ok=True)
        raise
    return path


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def _toml_str(text: str) -> str:
    """`text` as a TOML basic string: quotes, backslashes and every control character
    (U+0000..U+001F, U+007F) escaped; text that is not Unicode (a lone surrogate from
    undecodable arguments) is refused."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            raise MmatsError(f"{text!r} is not valid text (undecodable bytes)")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else
                                                  ("inf" if v > 0 else "-inf"))
    return _toml_str(str(v))


class EventTail:
    """Prints an account's new signals, orders and fills, oldest first."""

    def __init__(self, conn: psycopg.Connection, account: str, echo: Any) -> None:
        self.conn = conn
        self.echo = echo
        row = conn.execute("SELECT account_id FROM trading.accounts WHERE name = %s",
                           (account,)).fetchone()
        assert row is not None
        self.account_id = int(row[0])
        self.last = {"signal": 0, "order": 0, "fill": 0}

    def poll(self) -> int:
        # in the order they happened on the bars' clock (a replay's wall clock is not it)
        rows = self.conn.execute(
            "SELECT * FROM ("
            "SELECT 'signal' AS kind, s.signal_id, s.ts, i.symbol, s.action::text, "
            "       s.status::text, COALESCE(s.reason_code, ''), NULL::numeric, NULL::numeric, "
            "       s.ts AS at, 0 AS rank "
            "FROM trading.signals s JOIN market.instruments i USING (instrument_id) "
            "WHERE s.account_id = %(a)s AND s.signal_id > %(s)s "
            "UNION ALL SELECT 'order', o.order_id, o.created_at, i.symbol, o.side::text, "
            "       o.trigger::text, o.order_type::text, o.quantity, NULL, "
            "       COALESCE(g.ts, (SELECT min(f.ts) FROM trading.fills f "
            "                       WHERE f.order_id = o.order_id) - interval '1 microsecond', "
            "                o.created_at), 1 "
            "FROM trading.orders o JOIN market.instruments i USING (instrument_id) "
            "LEFT JOIN trading.signals g ON g.signal_id = o.signal_id "
            "WHERE o.account_id = %(a)s AND o.order_id > %(o)s "
            "UNION ALL SELECT 'fill', f.fill_id, f.ts, i.symbol, f.side::text, '', '', "
            "       f.quantity, f.price, f.ts, 2 "
            "FROM trading.fills f JOIN market.instruments i USING (instrument_id) "
            "WHERE f.account_id = %(a)s AND f.fill_id > %(f)s) x ORDER BY at, rank, 2",
            {"a": self.account_id, "s": self.last["signal"], "o": self.last["order"],
             "f": self.last["fill"]}).fetchall()
        for kind, id_, ts, symbol, side, status, extra, qty, price, _at, _rank in rows:
            self.last[kind] = max(self.last[kind], int(id_))
            if self.echo is None:
                continue
            if kind == "signal":
                if side == "hold":
                    continue
                self.echo(f"  signal #{id_} {ts:%Y-%m-%d %H:%M} {symbol} {side} -> {status}"
                          + (f" ({extra})" if extra else ""))
            elif kind == "order":
                self.echo(f"  order  #{id_} {symbol} {side} {qty} {extra} ({status})")
            else:
                self.echo(f"  fill   #{id_} {ts:%Y-%m-%d %H:%M} {symbol} {side} {qty} @ {price}")
        return len(rows)


def run_replay_session(*, strategy: str, symbols: list[str], timeframe: str, start: datetime,
                       end: datetime, speed: str, params: Mapping[str, object], cash: Decimal,
                       commission: Decimal, slippage: str = "none", spread: Decimal = Decimal(0),
                       allow_short: bool = False, echo: Any = None,
                       timeout: float = 3600.0, visibility_seconds: int = 5,
                       on_tick: Any = None, restart_base: float = 0.5,
                       strategy_dirs: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Prepare a replay session and run its workers (ingest, strategies, router) as
    supervised processes until the replay has played every bar and the pipeline settled."""
    from workers.runtime.replay import load_session, summary
    from workers.runtime.supervisor import Supervisor

    settings = load_settings()
    url = database_url()
    started = time.monotonic()
    max_restarts = 5 if on_tick is None else 1000
    with connect(url, autocommit=True) as conn:
        path = prepare_replay(conn, strategy=strategy, symbols=symbols, timeframe=timeframe,
                              start=start, end=end, speed=speed, params=params, cash=cash,
                              commission=commission, slippage=slippage, spread=spread,
                              allow_short=allow_short, home=settings.home,
                              visibility_seconds=visibility_seconds,
                              strategy_dirs=strategy_dirs)
        session = load_session(path)
        assert session is not None
        if echo is not None:
            echo(f"replay session {session.session}: {', '.join(session.symbols)} "
                 f"{timeframe} from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC, "
                 f"speed {speed}, account {session.account} (PAPER environment, operator)")
        tail = EventTail(conn, session.account, echo)
        sup = Supervisor(path, ["ingest", "strategies", "router"],
                         log_dir=settings.home / "logs" / f"replay-{session.session}",
                         finished=lambda kind, code: kind == "ingest" and code == 0,
                         restart_base=restart_base)
        previous = signal.signal(signal.SIGTERM, lambda *_: sup.stop_event.set())
        sup.start()
        try:
            while not sup.stop_event.wait(0.2):
                tail.poll()
                sup.poll()
                if on_tick is not None:
                    on_tick(sup)
                ingest = sup.children["ingest"]
                if ingest.process is None and ingest.exit_codes and ingest.exit_codes[-1] == 0:
                    break
                if time.monotonic() - started > timeout:
                    raise MmatsError(f"replay session {session.session} did not finish in "
                                     f"{timeout:.0f} s")
                for child in sup.children.values():
                    if child.restarts > max_restarts:
                        logs = settings.home / "logs" / f"replay-{session.session}"
                        raise MmatsError(
                            f"the {child.kind} worker of replay session {session.session} "
                            f"keeps dying (exit codes {child.exit_codes[-3:]}); its log: "
                            f"{logs / (child.kind + '.log')}")
        finally:
            sup.stop()
            signal.signal(signal.SIGTERM, previous)
        tail.poll()
        return {"session": session.session, "account": session.account, "config": str(path),
                "restarts": {k: c.restarts for k, c in sup.children.items()},
                "summary": summary(conn, session.account),
                "seconds": time.monotonic() - started}
