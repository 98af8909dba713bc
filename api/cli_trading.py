"""mmats account … and mmats risk …: thin calls into the database's control functions."""

from __future__ import annotations

import json
import math
import re
import sys
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import click
import psycopg
from psycopg.types.json import Jsonb

from api.table import printable, table
from db.connect import connect, database_url
from db.errors import MmatsError, describe
from db.numbers import parse_number
from db.structured import check_depth

ENVIRONMENTS = ["backtest", "paper", "live"]




SHOWN_LENGTH = 40  # what a message shows of a value the user gave


def shortened(value: str, limit: int = SHOWN_LENGTH) -> str:
    """`value` quoted for a message, cut to `limit` characters."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _decimal(value: str, what: str) -> Decimal:
    """A number given on the command line (`db.numbers.parse_number`'s bounds)."""
    return parse_number(value, what, MmatsError)


def _past_time(value: str, what: str) -> str:
    """A time given on the command line for something that has happened: ISO 8601 with
    its offset, from 1970 on and not after tomorrow (a cash movement dated 9999 or 0001
    was booked); returned as given, for the database to read."""
    try:
        ts = datetime.fromisoformat(value.strip())
    except ValueError:
        raise MmatsError(f"{what} {shortened(value)} is not a time: use ISO 8601 with its"
                         " offset, e.g. 2024-03-01T10:00:00Z") from None
    if ts.tzinfo is None:
        raise MmatsError(f"{what} {shortened(value)} has no UTC offset: add one, e.g."
                         f" {ts.isoformat()}Z")
    if ts < datetime(1970, 1, 1, tzinfo=UTC):
        raise MmatsError(f"{what} {value.strip()} is before 1970")
    if ts > datetime.now(UTC) + timedelta(days=1):
        raise MmatsError(f"{what} {value.strip()} is in the future: book what has happened")
    return value.strip()


def _sql_literal(value: str) -> str:
    """`value` as the database's messages quote it (quote_literal)."""
    quoted = "'" + value.replace("'", "''").replace("\\", "\\\\") + "'"
    return "E" + quoted if "\\" in value else quoted


def _call(sql: str, params: tuple[object, ...], echoed: tuple[str | None, ...] = ()) -> object:
    """`sql`'s one value. A refusal that quotes one of the `echoed` arguments (an ORDER,
    a SYMBOL, a --venue as the user gave it) shows a long one `shortened`, so that the
    error stays one readable line."""
    url = database_url()
    with connect(url) as conn:
        # the database's warnings (a limit on a symbol nothing is called yet) are shown
        conn.add_notice_handler(lambda d: click.echo(
            f"warning: {printable(d.message_primary or '')}", err=True)
            if d.severity_nonlocalized == "WARNING" else None)
        try:
            row = conn.execute(sql, params).fetchone()
        except psycopg.Error as exc:
            message = shown = describe(exc, url)
            for value in sorted({v for v in echoed if v is not None and len(v) > SHOWN_LENGTH},
                                key=len, reverse=True):
                shown = shown.replace(_sql_literal(value), shortened(value))
                shown = shown.replace(value, shortened(value))
            if shown == message:
                raise
            raise MmatsError(shown) from exc
    return row[0] if row else None


# --------------------------------------------------------------------------- account
@click.group("account")
def account_group() -> None:
    """Trading accounts: create, list, switch between advisory and operator mode."""


@account_group.command("create")
@click.argument("name")
@click.option("--environment", required=True, type=click.Choice(ENVIRONMENTS))
@click.option("--mode", default="advisory", show_default=True,
              type=click.Choice(["advisory", "operator"]))
@click.option("--cash", default="0", show_default=True, help="starting cash")
@click.option("--currency", default="USD", show_default=True)
@click.option("--position-mode", default="oneway", show_default=True,
              type=click.Choice(["oneway", "hedge"]))
@click.option("--aggregation", default="independent", show_default=True,
              type=click.Choice(["independent", "priority", "consensus", "weighted"]))
@click.option("--allow-short", is_flag=True, help="allow short positions")
@click.option("--taker-fee", default="0", show_default=True, help="fraction per side")
def account_create(name: str, environment: str, mode: str, cash: str, currency: str,
                   position_mode: str, aggregation: str, allow_short: bool,
                   taker_fee: str) -> None:
    """Create an account (a live account starts in advisory mode)."""
    if environment == "live" and mode == "operator":
        shown = printable(name[:64])
        raise MmatsError("a live account starts in advisory mode: create it without --mode"
                         f" operator, then switch it with `mmats account operator {shown}`"
                         " (it needs credentials marked live)")
    if re.fullmatch(r"(bt|paper-replay)-[0-9]+", name):
        # (backtest run N makes bt-N, replay session N paper-replay-N: run N failed on a
        # duplicate name nobody had typed)
        raise MmatsError(f"account name {name!r} has the form of the accounts MMATS makes for "
                         "backtest runs (bt-N) and replay sessions (paper-replay-N): choose "
                         "another")
    starting = _decimal(cash, "--cash")
    account_id = _call(
        "SELECT trading.create_account(%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (name, environment, mode, starting, currency, position_mode,
         aggregation, allow_short, _decimal(taker_fee, "--taker-fee")))
    click.echo(f"account {printable(name)} created (id {account_id}): {environment}, {mode}, "
               f"{starting:f} {printable(currency.upper())}, {position_mode}, {aggregation}")


_ACCOUNTS = """
SELECT a.name, a.environment::text, a.mode::text, a.base_currency, e.cash, e.equity,
       (SELECT count(*) FROM trading.positions p
        WHERE p.account_id = a.account_id AND p.quantity <> 0),
       risk.breaker_mode(a.account_id)::text
FROM trading.accounts a, LATERAL trading.account_equity(a.account_id) e
WHERE (%(env)s::text IS NULL OR a.environment::text = %(env)s)
  AND (%(runs)s OR NOT EXISTS (SELECT 1 FROM backtest.runs r WHERE r.account_id = a.account_id))
ORDER BY a.name
"""
_RUN_ACCOUNTS = """
SELECT count(*) FROM trading.accounts a JOIN backtest.runs r USING (account_id)
WHERE %(env)s::text IS NULL OR a.environment::text = %(env)s
"""


@account_group.command("list")
@click.option("--environment", default=None, type=click.Choice(ENVIRONMENTS),
              help="only accounts of this environment")
@click.option("--all", "show_runs", is_flag=True,
              help="the accounts of backtest and walk-forward runs too (one per run)")
def account_list(environment: str | None, show_runs: bool) -> None:
    """Accounts with their cash, equity, open positions and breaker. The account each
    backtest run makes for itself is left out unless --all (`mmats runs` lists the runs)."""
    args = {"env": environment, "runs": show_runs}
    with connect(database_url()) as conn:
        rows = conn.execute(_ACCOUNTS, args).fetchall()
        counted = None if show_runs else conn.execute(_RUN_ACCOUNTS, args).fetchone()
    hidden = counted[0] if counted else 0
    note = (f"({hidden:,} account{'s' if hidden != 1 else ''} of backtest runs not shown:"
            " --all lists them, `mmats runs` the runs)") if hidden else ""
    if not rows:
        click.echo(f"no {environment + ' ' if environment else ''}accounts (create one with"
                   " `mmats account create`)" + (f"\n{note}" if note else ""))
        return
    out = [(n, env, m, ccy, f"{cash:,.2f}", f"{eq:,.2f}", pos, brk)
           for n, env, m, ccy, cash, eq, pos, brk in rows]
    click.echo(table(("account", "environment", "mode", "ccy", "cash", "equity", "positions",
                      "breaker"), out, right=(4, 5, 6)))
    if note:
        click.echo(note)


@account_group.command("operator")
@click.argument("name")
@click.option("--confirm", "token", default=None, metavar="TOKEN",
              help="the token the request printed")
def account_operator(name: str, token: str | None) -> None:
    """Switch to operator mode, in two steps: request a token, then confirm with it."""
    if token is None:
        issued = _call("SELECT trading.request_operator_mode(%s)", (name,))
        click.echo(f"operator mode requested for {name}; within 5 minutes confirm with:\n"
                   f"  mmats account operator {name} --confirm {issued}")
        return
    try:
        _call("SELECT trading.confirm_operator_mode(%s, %s)", (name, token))
    except psycopg.errors.InsufficientPrivilege as exc:
        if "no valid request for this token" not in str(exc):
            raise
        shown = printable(name)
        raise MmatsError(f"operator mode for {shown}: no valid request for this token (request"
                         f" one with `mmats account operator {shown}`; it expires after 5"
                         " minutes)") from exc
    click.echo(f"account {name} is in operator mode: approved signals become orders")


@account_group.command("advisory")
@click.argument("name")
@click.option("--reason", default=None)
def account_advisory(name: str, reason: str | None) -> None:
    """Switch to advisory mode at once (signals recorded, no orders)."""
    _call("SELECT trading.set_advisory(%s, %s)", (name, reason))
    click.echo(f"account {name} is in advisory mode")


CASH_KINDS = ["fee", "financing", "dividend", "interest", "deposit", "withdrawal", "adjustment"]


@account_group.command("book", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("kind", type=click.Choice(CASH_KINDS))
@click.argument("amount")
@click.option("--currency", default=None, help="default: the account's currency")
@click.option("--ref", default=None,
              help="the broker's id of the movement (booking it twice changes nothing); "
                   "default: a new manual-... id")
@click.option("--ts", default=None,
              help="when it happened (ISO 8601 with its offset, e.g. 2024-03-01T10:00:00Z); "
                   "default now")
@click.option("--symbol", default=None, help="the instrument it is about, if any")
@click.option("--description", default=None)
def account_book(name: str, kind: str, amount: str, currency: str | None, ref: str | None,
                 ts: str | None, symbol: str | None, description: str | None) -> None:
    """Book cash that moved outside any fill: a deposit, a withdrawal (AMOUNT < 0), a
    fee or financing charge (< 0), a dividend or interest. A deposit or withdrawal is not
    profit or loss: the drawdown and daily-loss rules do not see it."""
    value = _decimal(amount, "AMOUNT")
    if ts is not None:
        ts = _past_time(ts, "--ts")
    movement = {"account": name, "kind": kind, "amount": str(value), "currency": currency,
                "broker_ref": ref or f"manual-{uuid.uuid4().hex[:12]}", "ts": ts,
                "symbol": symbol, "description": description}
    out = _call("SELECT trading.book_cash(%s)", (Jsonb(movement),))
    assert isinstance(out, dict)
    if out["status"] == "duplicate":
        click.echo(f"{movement['broker_ref']} is already booked (movement "
                   f"{out['movement_id']}): nothing changed; cash {Decimal(str(out['cash'])):,.2f}")
        return
    click.echo(f"booked {kind} {value} {out['currency']} on {name} as {movement['broker_ref']}"
               f" (movement {out['movement_id']}); cash {Decimal(str(out['cash'])):,.2f}")


_MOVEMENTS = """
SELECT m.ts, m.kind::text, m.amount, m.currency, m.amount_account, m.symbol, m.broker_ref,
       m.description
FROM trading.cash_movements m JOIN trading.accounts a USING (account_id)
WHERE a.name = %s
ORDER BY m.ts DESC, m.movement_id DESC
LIMIT %s
"""


@account_group.command("movements")
@click.argument("name")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100000))
def account_movements(name: str, limit: int) -> None:
    """Cash booked outside fills (fees, financing, dividends, deposits ...), newest first."""
    with connect(database_url()) as conn:
        if conn.execute("SELECT 1 FROM trading.accounts WHERE name = %s",
                        (name,)).fetchone() is None:
            raise MmatsError(f"unknown account {name!r} (see `mmats account list`)")
        rows = conn.execute(_MOVEMENTS, (name, limit)).fetchall()
    if not rows:
        click.echo(f"no cash movements on {name}")
        return
    out = [(t.strftime("%Y-%m-%d %H:%M:%S"), k, f"{amt:,.2f}", ccy, f"{acct:,.2f}", sym or "",
            ref, d or "") for t, k, amt, ccy, acct, sym, ref, d in rows]
    click.echo(table(("ts (UTC)", "kind", "amount", "ccy", "in account ccy", "symbol",
                      "ref", "description"), out, right=(2, 4)))


# --------------------------------------------------------------------------- risk
@click.group("risk")
def risk_group() -> None:
    """Risk limits and the circuit breaker."""


def _params(pairs: tuple[str, ...]) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MmatsError(f"--param takes key=value, got {pair!r}")
        try:
            parsed = json.loads(value)
            check_depth(parsed)
        except json.JSONDecodeError:
            parsed = value  # (text)
        except (RecursionError, ValueError) as exc:  # nested too deeply, a 5,000-digit integer
            message = "nested too deeply" if isinstance(exc, RecursionError) else \
                str(exc).splitlines()[0]
            raise MmatsError(f"--param {printable(key)}: {message}") from None
        if not _finite(parsed):  # NaN, Infinity, 1e400: no JSON the database reads
            raise MmatsError(f"--param {printable(key)}: {shortened(value)} is not a finite "
                             "number")
        out[key] = parsed
    return out


def _finite(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


@risk_group.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("limit_type")
@click.argument("value")
@click.option("--scope", default="global", show_default=True,
              type=click.Choice(["global", "market", "strategy", "symbol"]))
@click.option("--key", "scope_key", default=None,
              help="the market, strategy or symbol the limit is about")
@click.option("--account", default=None, help="only this account (default: all)")
@click.option("--environment", default=None, type=click.Choice(ENVIRONMENTS),
              help="only accounts of this environment")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help='extra parameters, e.g. --param mode=SOFT --param days=[1,2,3,4,5]')
def risk_set(limit_type: str, value: str, scope: str, scope_key: str | None,
             account: str | None, environment: str | None, params: tuple[str, ...]) -> None:
    """Set a limit (kept with its history). See `mmats risk types`."""
    number = _decimal(value, "VALUE")  # (a negative VALUE is a value, not an option)
    if scope_key is not None and not 1 <= len(scope_key) <= 64:  # (limits_scope_key_length,
        # checked first: the database warns of an unknown key before its insert is refused)
        raise MmatsError(f"--key {shortened(scope_key)}: a limit's scope key (a market, "
                         "strategy or symbol) is 1-64 characters")
    limit_id = _call("SELECT risk.set_limit(%s, %s, %s, %s, %s, %s, %s::jsonb)",
                     (limit_type, number, scope, scope_key, account,
                      environment, json.dumps(_params(params))))
    where = printable(f"{scope}" + (f":{scope_key}" if scope_key else ""))
    click.echo(f"limit {printable(limit_type.upper())} = {number:f} ({where}"
               f"{', account ' + printable(account) if account else ''}"
               f"{', ' + environment + ' accounts' if environment else ''}) set, id {limit_id}")


_LIMITS = """
SELECT l.limit_id, l.limit_type, l.value, l.scope::text, l.scope_key,
       COALESCE(a.name, '*'), COALESCE(l.environment::text, '*'), l.params::text,
       l.updated_by, l.updated_at
FROM risk.limits l LEFT JOIN trading.accounts a USING (account_id)
WHERE l.enabled AND (%(account)s::text IS NULL OR l.limit_id IN (
    SELECT e.limit_id FROM trading.accounts x, LATERAL risk.effective_limits(x.account_id) e
    WHERE x.name = %(account)s))
ORDER BY array_position(ARRAY['global', 'market', 'strategy', 'symbol'], l.scope::text),
         l.limit_type, l.limit_id
"""


@risk_group.command("show")
@click.option("--account", default=None, help="only the limits in force for this account")
def risk_show(account: str | None) -> None:
    """The limits (and the breaker states)."""
    with connect(database_url()) as conn:
        if account is not None:
            conn.execute("SELECT trading._account(%s)", (account,))
        rows = conn.execute(_LIMITS, {"account": account}).fetchall()
        breakers = conn.execute(
            "SELECT a.name, b.mode::text, b.reason, b.tripped_at FROM risk.breaker_state b "
            "JOIN trading.accounts a USING (account_id) WHERE b.mode <> 'OK' "
            "AND (%s::text IS NULL OR a.name = %s) ORDER BY a.name", (account, account)
        ).fetchall()
    if rows:
        out = [(i, t, v, s + (f":{k}" if k else ""), acc, env, p if p != "{}" else "", by,
                f"{at:%Y-%m-%d %H:%M}") for i, t, v, s, k, acc, env, p, by, at in rows]
        click.echo(table(("id", "limit", "value", "scope", "account", "env", "params",
                          "set by", "set at (UTC)"), out, right=(0, 2)))
    else:
        click.echo("no limits set" + (f" for {account}" if account else ""))
    for name, mode, reason, at in breakers:
        click.echo(f"breaker {mode} on {name} since {at:%Y-%m-%d %H:%M} UTC: "
                   f"{printable(reason)}")


@risk_group.command("remove")
@click.argument("limit_id", type=click.IntRange(1))
def risk_remove(limit_id: int) -> None:
    """Remove a limit by its id (`mmats risk show`); its history stays."""
    if not _call("SELECT risk.remove_limit(%s)", (limit_id,)):
        raise MmatsError(f"no limit {limit_id} (`mmats risk show` lists them)")
    click.echo(f"limit {limit_id} removed")


@risk_group.command("types")
def risk_types() -> None:
    """The limit types the risk gate knows."""
    with connect(database_url()) as conn:
        rows = conn.execute(
            "SELECT limit_type, unit, description FROM risk.limit_types ORDER BY 1").fetchall()
    click.echo(table(("limit", "unit", "meaning"), rows))


@risk_group.command("trip")
@click.argument("account")
@click.option("--mode", required=True, type=click.Choice(["SOFT", "HARD", "FREEZE"]))
@click.option("--reason", required=True)
def risk_trip(account: str, mode: str, reason: str) -> None:
    """Trip the breaker: SOFT stops entries, HARD also closes everything, FREEZE stops all."""
    result = _call("SELECT risk.trip_breaker(%s, %s, %s)", (account, mode, reason))
    assert isinstance(result, dict)
    click.echo(f"breaker {result['mode']} on {account}; {result['open_orders']} open orders")


@risk_group.command("reset")
@click.argument("account")
@click.option("--confirm", "confirmation", default=None, metavar="'RESET <account>'",
              help="the confirmation text (asked for when not given)")
def risk_reset(account: str, confirmation: str | None) -> None:
    """Clear the breaker; needs the explicit confirmation 'RESET <account>'."""
    if confirmation is None:
        if not sys.stdin.isatty():
            raise MmatsError(f"resetting the breaker needs --confirm 'RESET {account}'")
        confirmation = click.prompt(f"type RESET {account} to clear the breaker")
    result = _call("SELECT risk.reset_breaker(%s, %s)", (account, confirmation))
    assert isinstance(result, dict)
    click.echo(f"breaker on {account} reset (was {result['previous']})")


# --------------------------------------------------------------------------- orders
OPEN_STATUSES = ("created", "in_flight", "submitted", "partially_filled")


def _number(value: Decimal | None) -> str:
    """A quantity or price without trailing zeros ('' when there is none)."""
    if value is None:
        return ""
    return f"{value.normalize():f}" if value else "0"


def _ids(values: object) -> list[int]:
    assert isinstance(values, list)
    return [int(v) for v in values]


def _check_account(conn: psycopg.Connection, name: str) -> None:
    if conn.execute("SELECT 1 FROM trading.accounts WHERE name = %s", (name,)).fetchone() is None:
        raise MmatsError(f"unknown account {shortened(name)} (see `mmats account list`)")


_ORDERS = """
SELECT o.order_id, a.name, i.symbol, o.side::text, o.order_type::text, o.quantity,
       o.filled_quantity, o.limit_price, o.stop_price, o.status::text,
       o.cancel_requested_at IS NOT NULL, o.trigger::text, o.client_order_id, o.created_at
FROM trading.orders o
JOIN trading.accounts a USING (account_id)
JOIN market.instruments i USING (instrument_id)
WHERE (%(account)s::text IS NULL OR a.name = %(account)s)
  AND (NOT %(open)s OR o.status::text = ANY (%(statuses)s))
ORDER BY o.created_at DESC, o.order_id DESC
LIMIT %(limit)s
"""


@click.group("orders", invoke_without_command=True)
@click.option("--account", default=None, help="only this account's orders")
@click.option("--open", "only_open", is_flag=True,
              help="only open orders (created, in flight, submitted, partially filled)")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100000))
@click.pass_context
def orders_group(ctx: click.Context, account: str | None, only_open: bool, limit: int) -> None:
    """The latest orders, newest first; `mmats orders cancel ORDER` cancels one."""
    if ctx.invoked_subcommand is not None:
        return
    with connect(database_url()) as conn:
        if account is not None:
            _check_account(conn, account)
        rows = conn.execute(_ORDERS, {"account": account, "open": only_open,
                                      "statuses": list(OPEN_STATUSES), "limit": limit}
                            ).fetchall()
    if not rows:
        click.echo(f"no {'open ' if only_open else ''}orders"
                   + (f" on {printable(account)}" if account else ""))
        return
    out = [(oid, acc, sym, side, otype, _number(qty), _number(filled), _number(lp), _number(sp),
            "cancel requested" if requested and status in OPEN_STATUSES else status,
            trig, coid, f"{at:%Y-%m-%d %H:%M:%S}")
           for oid, acc, sym, side, otype, qty, filled, lp, sp, status, requested, trig, coid, at
           in rows]
    click.echo(table(("id", "account", "symbol", "side", "type", "quantity", "filled", "limit",
                      "stop", "status", "trigger", "client order id", "created (UTC)"),
                     out, right=(0, 5, 6, 7, 8)))


@orders_group.command("cancel")
@click.argument("order")
@click.option("--reason", default=None, help="why (kept with the order; 1 to 500 characters)")
def orders_cancel(order: str, reason: str | None) -> None:
    """Cancel ORDER (its id or client order id): at once when it never left the database,
    else the router asks its venue, and the order stays open until the venue confirms."""
    result = _call("SELECT trading.request_cancel(%s, %s)", (order, reason), echoed=(order,))
    assert isinstance(result, dict)
    oid = result["order_id"]
    if result["status"] == "cancelled":
        click.echo(f"order {oid} cancelled (was {printable(result.get('previous', '?'))})")
    elif result["status"] == "unchanged":
        click.echo(f"order {oid} was already cancelled")
    else:
        click.echo(f"order {oid}: cancel requested; the router asks its venue to cancel it, "
                   f"and it stays {printable(result.get('order_status', 'open'))} until the "
                   "venue confirms")


# --------------------------------------------------------------------------- positions
_POSITIONS = """
SELECT a.name, i.symbol, p.leg::text, s.name,
       CASE WHEN p.leg = 'short' THEN -p.quantity ELSE p.quantity END,
       p.average_price, p.last_price,
       CASE WHEN p.leg = 'short' THEN -p.quantity ELSE p.quantity END
           * (COALESCE(p.last_price, p.average_price) - p.average_price),
       i.quote_currency, p.stop_loss, p.take_profit
FROM trading.positions p
JOIN trading.accounts a USING (account_id)
JOIN market.instruments i USING (instrument_id)
LEFT JOIN trading.strategies s USING (strategy_id)
WHERE p.quantity <> 0 AND (%(account)s::text IS NULL OR a.name = %(account)s)
ORDER BY a.name, i.symbol, p.leg, p.position_id
"""


@click.command("positions")
@click.option("--account", default=None, help="only this account's positions")
def positions_command(account: str | None) -> None:
    """Open positions, marked at their last price (P&L in the instrument's quote currency)."""
    with connect(database_url()) as conn:
        if account is not None:
            _check_account(conn, account)
        rows = conn.execute(_POSITIONS, {"account": account}).fetchall()
    if not rows:
        click.echo("no open positions" + (f" on {printable(account)}" if account else ""))
        return
    out = [(acc, sym, leg, strat or "", _number(qty), _number(avg), _number(last),
            f"{pnl:,.2f}", ccy, _number(sl), _number(tp))
           for acc, sym, leg, strat, qty, avg, last, pnl, ccy, sl, tp in rows]
    click.echo(table(("account", "symbol", "leg", "strategy", "quantity", "avg price",
                      "last price", "unrealised P&L", "ccy", "stop loss", "take profit"),
                     out, right=(4, 5, 6, 7, 9, 10)))


# --------------------------------------------------------------------------- close
_CANCEL_STATES = """
SELECT order_id, status::text, cancel_requested_at IS NOT NULL FROM trading.orders
WHERE order_id = ANY (%s) ORDER BY order_id
"""


def _closed(where: str, result: object) -> None:
    """What a close did: the closing orders, and the entry orders cancelled (or whose cancel
    the router will ask the venue for)."""
    assert isinstance(result, dict)
    closing = _ids(result.get("order_ids") or [])
    cancelled = _ids(result.get("cancelled_order_ids") or [])
    waiting = _ids(result.get("waiting_order_ids") or [])
    if closing:
        click.echo(f"{where}: closing order{'s' if len(closing) > 1 else ''} "
                   + ", ".join(map(str, closing)))
    if waiting:
        click.echo(f"{where}: closing order{'s' if len(waiting) > 1 else ''} "
                   + ", ".join(map(str, waiting)) + " being cancelled at the venue: "
                   "the position is closed again once the venue confirms")
    if not closing and not waiting:
        click.echo(f"{where}: no open position, no closing order")
    if not cancelled:
        click.echo(f"{where}: no open entry orders to cancel")
        return
    with connect(database_url()) as conn:
        states = conn.execute(_CANCEL_STATES, (cancelled,)).fetchall()
    done = [str(i) for i, status, _ in states if status == "cancelled"]
    asked = [str(i) for i, status, requested in states if status != "cancelled" and requested]
    if done:
        click.echo(f"{where}: cancelled entry order{'s' if len(done) > 1 else ''} "
                   + ", ".join(done))
    if asked:
        click.echo(f"{where}: cancel requested for entry order{'s' if len(asked) > 1 else ''} "
                   + ", ".join(asked) + " (open until the venue confirms)")


@click.command("close")
@click.argument("account")
@click.argument("symbol", required=False)
@click.option("--venue", default=None, help="the instrument's venue, when the symbol is ambiguous")
@click.option("--all", "close_all", is_flag=True,
              help="close every position of ACCOUNT (and cancel its open entry orders)")
@click.option("--yes", is_flag=True, help="do not ask for confirmation (with --all)")
def close_command(account: str, symbol: str | None, venue: str | None, close_all: bool,
                  yes: bool) -> None:
    """Close ACCOUNT's position in SYMBOL, or all of them with --all; the account's open
    entry orders (of that instrument) are cancelled too."""
    if (symbol is None) == (not close_all):
        raise click.UsageError("give either SYMBOL or --all (exactly one)")
    if close_all and venue is not None:
        raise click.UsageError("--venue goes with SYMBOL, not with --all")
    if symbol is not None:
        result = _call("SELECT trading.close_position(%s, %s, %s)", (account, symbol, venue),
                       echoed=(account, symbol, venue))
        assert isinstance(result, dict)
        _closed(f"{printable(account)} {printable(result.get('symbol', symbol))}", result)
        return
    if not yes:
        if not sys.stdin.isatty():
            raise MmatsError(f"closing every position of {shortened(account)} needs --yes")
        click.confirm(f"close every position of {printable(account)} and cancel its open "
                      "entry orders?", abort=True)
    _closed(printable(account), _call("SELECT trading.close_all(%s)", (account,),
                                      echoed=(account,)))
