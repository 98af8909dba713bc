"""Notifications: each channel's wire format (HTTP through `responses`, SMTP through an
in-process aiosmtpd server), the config parser, and the notifier over real audit events
(signals, fills, breaker trips... written by the database's own functions).

Retries never wait: the notifier and the Discord channel take an injected `sleep` that
records the delays it was asked for.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import socket
import threading
import traceback
from collections.abc import Callable, Iterator
from email import message_from_bytes
from typing import Any

import psycopg
import pytest
import requests
import responses
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from psycopg.types.json import Jsonb

from workers.notify import (
    DEFAULT_EVENTS,
    ChannelError,
    DiscordChannel,
    EmailChannel,
    Message,
    Notifier,
    NotifyConfigError,
    Subscription,
    TelegramChannel,
    WebhookChannel,
    parse_config,
)
from workers.runtime import log

TOKEN = "123456:AAE-test-bot-token-xyz"
DISCORD = "https://discord.com/api/webhooks/111/discord-secret-path"
HOOK = "https://hooks.example.com/mmats/hook-secret-path"
MSG = Message(event="fill.applied", subject="[PAPER] alpha: filled buy 1 BTCUSD",
              text="Account alpha (paper): filled buy 1 BTCUSD at 100 on order 7.",
              account="alpha", environment="paper", event_id=42,
              ts="2024-01-02T00:01:00+00:00", payload={"order_id": 7, "price": "100"})


class Sleeps:
    """An injected sleep: records what it was asked to wait, waits nothing."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


class Recorder:
    """An in-process channel that keeps what it was sent (optionally held by a gate)."""

    kind = "recorder"

    def __init__(self, name: str = "recorder", gate: threading.Event | None = None) -> None:
        self.name = name
        self.sent: list[Message] = []
        self.gate = gate

    def send(self, message: Message) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        self.sent.append(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def body_of(call: Any) -> Any:
    raw = call.request.body
    assert isinstance(raw, bytes | str)
    return json.loads(raw)


def bodies(url: str) -> list[dict[str, Any]]:
    return [body_of(c) for c in responses.calls if c.request.url == url]


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The workers' JSON log, captured; the `mmats` logger is put back as it was after."""
    root = logging.getLogger("mmats")
    saved = (list(root.handlers), root.propagate, root.level)
    stream = io.StringIO()
    log.setup("test", level="DEBUG", stream=stream)
    yield stream
    root.handlers[:], root.propagate = saved[0], saved[1]
    root.setLevel(saved[2])


# ---------------------------------------------------------------------------- telegram
@responses.activate
def test_telegram_request_shape() -> None:
    url = f"https://api.telegram.org/bot{TOKEN}/sendMessage"
    responses.post(url, json={"ok": True, "result": {"message_id": 1}})
    TelegramChannel("tg", TOKEN, "-1001", parse_mode="HTML").send(MSG)
    [call] = responses.calls
    assert call.request.url == url
    assert call.request.headers["Content-Type"] == "application/json"
    assert body_of(call) == {"chat_id": "-1001", "text": MSG.text, "parse_mode": "HTML",
                             "disable_web_page_preview": True}


@responses.activate
def test_telegram_errors_never_show_the_token() -> None:
    url = f"https://api.telegram.org/bot{TOKEN}/sendMessage"
    responses.post(url, status=429, json={"ok": False, "error_code": 429,
                                          "description": "Too Many Requests: retry after 7",
                                          "parameters": {"retry_after": 7}})
    responses.post(url, body=requests.ConnectionError(f"Max retries exceeded with url: "
                                                      f"/bot{TOKEN}/sendMessage"))
    channel = TelegramChannel("tg", TOKEN, "1")
    with pytest.raises(ChannelError) as limited:
        channel.send(MSG)
    assert limited.value.retry_after == 7 and "HTTP 429" in str(limited.value)
    with pytest.raises(ChannelError) as refused:
        channel.send(MSG)
    for error in (limited.value, refused.value):
        assert TOKEN not in str(error) and "123456" not in str(error)
        # nor does the traceback a log line would carry (the transport's error is not chained)
        assert TOKEN not in "".join(traceback.format_exception(error))
    assert str(refused.value) == ("tg: ConnectionError posting to "
                                  "https://api.telegram.org/***")


# ---------------------------------------------------------------------------- discord
@responses.activate
def test_discord_request_shape_and_429_retry() -> None:
    responses.post(DISCORD, status=429, json={"message": "You are being rate limited.",
                                              "retry_after": 0.25, "global": False})
    responses.post(DISCORD, status=204)
    sleeps = Sleeps()
    DiscordChannel("dc", DISCORD, sleep=sleeps).send(MSG)
    assert sleeps.calls == [0.25]
    assert bodies(DISCORD) == [{"content": MSG.text}, {"content": MSG.text}]


@responses.activate
def test_discord_gives_up_after_its_rate_limit_retries() -> None:
    responses.post(DISCORD, status=429, json={"retry_after": 1.5})
    sleeps = Sleeps()
    with pytest.raises(ChannelError) as caught:
        DiscordChannel("dc", DISCORD, sleep=sleeps, rate_limit_retries=2).send(MSG)
    assert sleeps.calls == [1.5, 1.5] and len(responses.calls) == 3
    assert caught.value.retry_after == 1.5
    assert "discord-secret-path" not in str(caught.value)
    assert "https://discord.com/***" in str(caught.value)


# ---------------------------------------------------------------------------- webhook
@responses.activate
def test_webhook_body_and_hmac_signature() -> None:
    responses.post(HOOK, status=200)
    channel = WebhookChannel("hook", HOOK, secret="shared-hmac-secret")
    channel.send(MSG)
    [call] = responses.calls
    raw = call.request.body
    assert isinstance(raw, bytes)
    expected = hmac.new(b"shared-hmac-secret", raw, hashlib.sha256).hexdigest()
    assert call.request.headers["X-MMATS-Signature"] == f"sha256={expected}"
    forged = hmac.new(b"another-secret", raw, hashlib.sha256).hexdigest()
    assert call.request.headers["X-MMATS-Signature"] != f"sha256={forged}"
    assert json.loads(raw) == {"event": "fill.applied", "event_id": 42,
                               "ts": "2024-01-02T00:01:00+00:00", "account": "alpha",
                               "environment": "paper", "subject": MSG.subject,
                               "text": MSG.text, "payload": {"order_id": 7, "price": "100"}}


@responses.activate
def test_webhook_without_secret_and_its_errors() -> None:
    responses.post(HOOK, status=500, body="upstream broke")
    channel = WebhookChannel("hook", HOOK)
    with pytest.raises(ChannelError) as caught:
        channel.send(MSG)
    assert "X-MMATS-Signature" not in responses.calls[0].request.headers
    assert str(caught.value) == ("hook: HTTP 500 from https://hooks.example.com/***: "
                                 "upstream broke")


# ---------------------------------------------------------------------------- email
class Mailbox:
    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    mailbox = Mailbox()

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str,
                     auth_data: Any) -> AuthResult:
        good = isinstance(auth_data, LoginPassword) and \
            (auth_data.login, auth_data.password) == (b"mmats", b"smtp-pass-9876")
        return AuthResult(success=good, handled=False)

    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port,
                            authenticator=authenticate, auth_require_tls=False)
    controller.start()
    try:
        yield mailbox, port
    finally:
        controller.stop()


def test_email_is_received_with_subject_and_body(smtp: tuple[Mailbox, int]) -> None:
    mailbox, port = smtp
    channel = EmailChannel("mail", "127.0.0.1", port, "mmats@example.com",
                           ["ops@example.com", "cto@example.com"], username="mmats",
                           password="smtp-pass-9876")
    channel.send(MSG)
    [envelope] = mailbox.envelopes
    assert envelope.mail_from == "mmats@example.com"
    assert envelope.rcpt_tos == ["ops@example.com", "cto@example.com"]
    mail = message_from_bytes(envelope.content)
    assert mail["Subject"] == f"[MMATS] {MSG.subject}"
    assert mail["To"] == "ops@example.com, cto@example.com"
    payload = mail.get_payload(decode=True)
    assert isinstance(payload, bytes) and payload.decode().strip() == MSG.text


def test_email_bad_login_and_refused_connection(smtp: tuple[Mailbox, int]) -> None:
    mailbox, port = smtp
    bad = EmailChannel("mail", "127.0.0.1", port, "a@example.com", ["b@example.com"],
                       username="mmats", password="wrong-password-1")
    with pytest.raises(ChannelError, match="SMTPAuthenticationError") as caught:
        bad.send(MSG)
    assert "wrong-password-1" not in str(caught.value) and mailbox.envelopes == []
    closed = EmailChannel("mail", "127.0.0.1", free_port(), "a@example.com",
                          ["b@example.com"], timeout=2)
    with pytest.raises(ChannelError, match="ConnectionRefusedError"):
        closed.send(MSG)


# ---------------------------------------------------------------------------- config
ENV = {"TG_TOKEN": TOKEN, "DC_HOOK": DISCORD, "HOOK_SECRET": "hmac-secret-1",
       "SMTP_PASS": "smtp-pass-9876"}


def full_config() -> dict[str, Any]:
    return {
        "events": ["signal", "fill", "breaker"],
        "max_attempts": 3,
        "channels": [
            {"type": "telegram", "chat_id": -1001, "token_env": "TG_TOKEN",
             "events": ["fill", "error"]},
            {"type": "discord", "webhook_env": "DC_HOOK"},
            {"type": "webhook", "name": "ops-hook", "url": HOOK, "secret_env": "HOOK_SECRET",
             "events": ["signal.approved", "rejection"]},
            {"type": "email", "host": "smtp.example.com", "starttls": True,
             "from": "mmats@example.com", "to": "ops@example.com", "username": "mmats",
             "password_env": "SMTP_PASS"},
        ],
    }


def test_config_builds_every_channel() -> None:
    config = parse_config(full_config(), ENV)
    by_name = {s.channel.name: s for s in config.subscriptions}
    assert list(by_name) == ["telegram", "discord", "ops-hook", "email"]
    tg = by_name["telegram"].channel
    assert isinstance(tg, TelegramChannel) and tg.chat_id == "-1001"
    assert by_name["telegram"].events == {"fill.applied", "worker.error"}
    assert by_name["discord"].events == {"signal.advisory", "fill.applied",
                                         "risk.breaker_tripped", "risk.breaker_reset"}
    assert by_name["ops-hook"].events == {"signal.approved", "signal.rejected",
                                          "order.rejected"}
    mail = by_name["email"].channel
    assert isinstance(mail, EmailChannel) and (mail.port, mail.starttls) == (587, True)
    assert config.options["max_attempts"] == 3
    # secrets read from the environment are redacted from every log line from now on
    assert log.redact(f"token {TOKEN} and {DISCORD}") == "token *** and ***"


def test_log_redacts_fields_of_every_type_and_dict_keys(json_log: io.StringIO) -> None:
    """Not only strings: an exception, bytes, a set, a dict key, a number holding a
    registered secret are redacted too (json.dumps(default=str) would print them)."""
    secret = "S3cr3t-log-field-value-!"
    log.register_secret(secret)
    log.register_secret("987654321")
    log.event(log.get("test"), "fields", error=RuntimeError(f"auth failed for key {secret}"),
              raw=secret.encode(), things={secret}, frozen=frozenset({f"x {secret}"}),
              per_key={secret: 1}, nested={"errors": [ValueError(secret)], "n": 987654321},
              attempts=3, ok=True, nothing=None, ratio=0.5, **{f"key {secret}": "v"})
    text = json_log.getvalue()
    assert secret not in text and "987654321" not in text
    line = json.loads(text.splitlines()[-1])
    assert line["error"] == "auth failed for key ***"
    assert line["raw"] == "b'***'"
    assert line["things"] == ["***"] and line["frozen"] == ["x ***"]
    assert line["per_key"] == {"***": 1}
    assert line["nested"] == {"errors": ["***"], "n": "***"}
    assert (line["attempts"], line["ok"], line["nothing"], line["ratio"]) == (3, True, None, 0.5)
    assert line["key ***"] == "v"
    assert log.redact_value("detail", {secret: [b"ok"]}) == {"***": ["b'ok'"]}
    # in text: a URL's password up to its last @, and password=... anywhere
    assert log.redact("postgresql://u:Top@Pw1@h/db?password=Pw2 host=h password=Pw3") == (
        "postgresql://u:***@h/db?password=*** host=h password=***")


@pytest.mark.parametrize("change,fragment", [
    (lambda c: c.update(retries=3), "notifications.retries: unknown key"),
    (lambda c: c["channels"][0].update(token="x"),
     "notifications.channels[0].token: unknown key for a telegram channel"),
    (lambda c: c["channels"][0].update(token_env="NOPE"),
     "notifications.channels[0].token_env: environment variable NOPE is not set"),
    (lambda c: c["channels"][1].update(events=["fils"]),
     "notifications.channels[1].events: unknown event 'fils'"),
    (lambda c: c["channels"][1].update(type="slack"),
     "notifications.channels[1].type: must be one of telegram, discord, webhook, email"),
    (lambda c: c["channels"][2].update(url_env="X"),
     "notifications.channels[2].url: give exactly one of url and url_env"),
    (lambda c: c["channels"][3].update(to=["not-an-address"]),
     "notifications.channels[3].to: must be an address or a list of addresses"),
    (lambda c: c["channels"][3].pop("password_env"),
     "notifications.channels[3].password_env: is required with username"),
    (lambda c: c["channels"][0].pop("chat_id"), "notifications.channels[0].chat_id: is "
                                                "required"),
    (lambda c: c.update(poll_interval="fast"), "notifications.poll_interval: must be a number"),
    (lambda c: c["channels"][2].update(name="discord"),
     "notifications.channels[2].name: another channel is named 'discord'"),
])
def test_config_errors_name_the_bad_key(change: Callable[[dict[str, Any]], Any],
                                        fragment: str) -> None:
    config = full_config()
    change(config)
    with pytest.raises(NotifyConfigError) as caught:
        parse_config(config, ENV)
    assert str(caught.value).startswith(fragment)
    assert "\n" not in str(caught.value) and TOKEN not in str(caught.value)


# ---------------------------------------------------------------------------- the notifier
@pytest.fixture
def factory(db_url: str) -> Callable[[], psycopg.Connection]:
    return lambda: psycopg.connect(db_url, autocommit=True)


@pytest.fixture
def advisory(conn: psycopg.Connection) -> None:
    """Account alpha (paper, advisory) and BTCUSD with a bar at 100."""
    iid = conn.execute("""
        INSERT INTO market.instruments (symbol, venue, market, base_currency, quote_currency,
                                        price_tick, quantity_step, min_quantity, calendar_id)
        VALUES ('BTCUSD', 'binance', 'crypto', 'BTC', 'USD', 0.01, 0.01, 0, 'CRYPTO_24X7')
        RETURNING instrument_id""").fetchone()
    assert iid is not None
    conn.execute("INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, "
                 "close) VALUES (%s, '1m', '2024-01-02T00:00:00Z', 100, 100, 100, 100)",
                 (iid[0],))
    conn.execute("SELECT trading.create_account(name => 'alpha', environment => 'paper', "
                 "mode => 'advisory', cash => 10000)")


def submit(conn: psycopg.Connection, minute: int = 1, **signal: Any) -> dict[str, Any]:
    body = {"account": "alpha", "strategy": "trend", "symbol": "BTCUSD", "action": "buy",
            "ts": f"2024-01-02T00:{minute:02d}:00Z", **signal}
    row = conn.execute("SELECT trading.submit_signal(%s)", (Jsonb(body),)).fetchone()
    assert row is not None
    return dict(row[0])


def notify_failed(conn: psycopg.Connection) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT worker, message, details FROM runtime.errors "
                        "WHERE kind = 'NOTIFY_FAILED' ORDER BY error_id").fetchall()


def cursor(conn: psycopg.Connection, name: str = "notifier") -> int | None:
    row = conn.execute("SELECT seq FROM runtime.cursors WHERE name = %s", (name,)).fetchone()
    return None if row is None else int(row[0])


def last_event(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT max(event_id) FROM audit.events").fetchone()
    assert row is not None
    return int(row[0])


@responses.activate
def test_advisory_signal_reaches_the_webhook_once_across_restarts(
        conn: psycopg.Connection, factory: Callable[[], psycopg.Connection],
        advisory: None) -> None:
    responses.post(HOOK, status=200)
    submit(conn, size=0.5, confidence=0.7, stop_loss=90, reasoning="breakout above 99")

    def api_role() -> psycopg.Connection:
        c = factory()
        c.execute("SET ROLE mmats_api")  # the notifier needs no more than the api role
        return c

    with Notifier(api_role, [WebhookChannel("hook", HOOK)], replay=True) as first:
        assert first.poll_once() == 1
        assert first.flush(10)
    [body] = bodies(HOOK)
    assert body["event"] == "signal.advisory"
    assert (body["account"], body["environment"]) == ("alpha", "paper")
    assert body["text"] == ("Account alpha (paper): advisory signal BUY BTCUSD from strategy "
                            "trend (size 0.5, confidence 0.7, stop-loss 90). Reasoning: "
                            "breakout above 99. Recorded only: an advisory account places "
                            "no orders.")
    assert body["subject"] == "[PAPER] alpha: advisory BUY BTCUSD"
    assert cursor(conn) == last_event(conn)
    # a new instance resumes after the cursor: nothing is sent twice
    with Notifier(factory, [WebhookChannel("hook", HOOK)], replay=True) as second:
        assert second.poll_once() == 0
        assert second.flush(10)
        assert len(responses.calls) == 1
        submit(conn, minute=2, action="sell")
        assert second.poll_once() == 1
        assert second.flush(10)
    assert [b["text"].split(":")[1] for b in bodies(HOOK)] == [
        " advisory signal BUY BTCUSD from strategy trend (size 0.5, confidence 0.7, "
        "stop-loss 90). Reasoning", " advisory signal SELL BTCUSD from strategy trend "
        "(size 1). Recorded only"]
    assert cursor(conn) == last_event(conn)


def test_first_start_does_not_replay_history(conn: psycopg.Connection,
                                             factory: Callable[[], psycopg.Connection],
                                             advisory: None) -> None:
    submit(conn)
    recorder = Recorder()
    with Notifier(factory, [recorder]) as notifier:
        assert notifier.poll_once() == 0
        assert cursor(conn) == last_event(conn)
        submit(conn, minute=2, action="sell")
        assert notifier.poll_once() == 1 and notifier.flush(10)
    assert [m.text.split(":")[1].strip() for m in recorder.sent] == [
        "advisory signal SELL BTCUSD from strategy trend (size 1). Recorded only"]


@responses.activate
def test_a_failing_channel_does_not_stop_the_others(
        conn: psycopg.Connection, factory: Callable[[], psycopg.Connection],
        advisory: None, json_log: io.StringIO) -> None:
    responses.post(HOOK, status=200)
    bad = "https://down.example.com/hook/down-secret-path"
    responses.post(bad, status=500, body="internal error")
    for minute in (1, 2, 3):
        submit(conn, minute=minute)
    sleeps = Sleeps()
    channels = [WebhookChannel("good", HOOK), WebhookChannel("down", bad)]
    with Notifier(factory, channels, replay=True, sleep=sleeps, max_attempts=3,
                  backoff=0.5) as notifier:
        assert notifier.poll_once() == 3
        assert notifier.flush(10)
        assert notifier.stats()["good"]["delivered"] == 3
        assert notifier.stats()["down"] == {"delivered": 0, "dropped": 3, "queued": 0}
        # the NOTIFY_FAILED error is audited as worker.error: never notified (no loop)
        assert notifier.poll_once() == 0 and notifier.flush(10)
    assert [b["event_id"] for b in bodies(HOOK)] == sorted(b["event_id"] for b in bodies(HOOK))
    assert len(bodies(HOOK)) == 3 and len(bodies(bad)) == 9  # 3 messages x 3 attempts
    assert sleeps.calls == [0.5, 1.0] * 3
    [(worker, message, details)] = notify_failed(conn)  # one per outage, not per message
    assert worker == "notifier"
    assert message.startswith("notification channel down (webhook) gave up on event ")
    assert "after 3 attempt(s): down: HTTP 500 from https://down.example.com/***" in message
    assert details["channel"] == "down" and details["attempts"] == 3
    assert cursor(conn) == last_event(conn)
    logged = json_log.getvalue()
    assert "notification dropped" in logged and "notification failed, retrying" in logged
    assert "down-secret-path" not in logged


def test_connection_refused_channel(conn: psycopg.Connection,
                                    factory: Callable[[], psycopg.Connection],
                                    advisory: None) -> None:
    submit(conn)
    submit(conn, minute=2)
    recorder = Recorder()
    refused = WebhookChannel("refused", f"http://127.0.0.1:{free_port()}/hook-secret",
                             timeout=2)
    sleeps = Sleeps()
    with Notifier(factory, [refused, recorder], replay=True, sleep=sleeps,
                  max_attempts=2) as notifier:
        notifier.poll_once()
        assert notifier.flush(20)
    assert len(recorder.sent) == 2
    [(_, message, details)] = notify_failed(conn)
    assert "ConnectionError posting to http://127.0.0.1/***" in message
    assert "hook-secret" not in message and details["channel"] == "refused"
    assert sleeps.calls == [1.0, 1.0]


def test_a_slow_channel_holds_the_cursor_but_not_the_others(
        conn: psycopg.Connection, factory: Callable[[], psycopg.Connection],
        advisory: None) -> None:
    for minute in (1, 2, 3):
        submit(conn, minute=minute)
    gate = threading.Event()
    slow, fast = Recorder("slow", gate), Recorder("fast")
    start = cursor(conn)
    notifier = Notifier(factory, [slow, fast], replay=True)
    try:
        assert notifier.poll_once() == 3
        assert not notifier.flush(0.05)
        assert len(fast.sent) == 3 and slow.sent == []
        # the cursor stays before the first event the slow channel has not settled
        first = min(m.event_id or 0 for m in fast.sent)
        assert cursor(conn) == first - 1 != start
        gate.set()
        assert notifier.flush(10)
        assert len(slow.sent) == 3 and cursor(conn) == last_event(conn)
    finally:
        gate.set()
        notifier.close()


def test_a_full_queue_gives_up_without_blocking(conn: psycopg.Connection,
                                                factory: Callable[[], psycopg.Connection],
                                                advisory: None) -> None:
    for minute in (1, 2, 3, 4):
        submit(conn, minute=minute)
    gate = threading.Event()
    slow, fast = Recorder("slow", gate), Recorder("fast")
    notifier = Notifier(factory, [Subscription(slow, DEFAULT_EVENTS, queue_size=1), fast],
                        replay=True)
    try:
        assert notifier.poll_once() == 4  # returns at once: the slow channel's drops
        assert not notifier.flush(0.05)
        gate.set()
        assert notifier.flush(10)
    finally:
        gate.set()
        notifier.close()
    assert len(fast.sent) == 4
    dropped = notifier.stats()["slow"]["dropped"]
    assert 2 <= dropped <= 3 and len(slow.sent) == 4 - dropped
    [(_, message, details)] = notify_failed(conn)
    assert "queue full (1 messages waiting)" in message and details["channel"] == "slow"


def test_every_interesting_event_names_account_and_environment(
        conn: psycopg.Connection, factory: Callable[[], psycopg.Connection],
        advisory: None) -> None:
    conn.execute("SELECT trading.create_account(name => 'beta', environment => 'paper', "
                 "mode => 'operator', cash => 10000)")
    conn.execute("UPDATE trading.accounts SET max_consecutive_rejections = 2 "
                 "WHERE name = 'beta'")
    approved = submit(conn, account="beta", size=0.1)
    assert approved["status"] == "approved"
    conn.execute("SELECT trading.apply_fill(%s)", (Jsonb({
        "order_id": approved["order_id"], "broker_fill_id": "f-1", "quantity": "1",
        "price": "100", "ts": "2024-01-02T00:01:00Z"}),))
    for minute in (2, 3):
        order = submit(conn, minute=minute, account="beta", action="close")
        if order["order_id"] is not None:
            conn.execute("SELECT trading.reject_order(%s, 'INSUFFICIENT_FUNDS', 'no money')",
                         (str(order["order_id"]),))
    conn.execute("SELECT risk.report_mismatch('beta', 'position_mismatch', "
                 "'broker has 2, ledger has 1')")
    conn.execute("SELECT runtime.report_error('router', 'BROKER_AUTH', 'key revoked', 'beta')")
    conn.execute("SELECT runtime.report_error('ingest', 'FEED_STALE', 'no bars for 5m')")
    recorder = Recorder()
    every = ["signal", "approved", "order", "fill", "breaker", "rejection", "downgrade",
             "mismatch", "error"]
    with Notifier(factory, [Subscription(recorder, frozenset())], replay=True,
                  events=every) as notifier:
        notifier.poll_once()
        assert notifier.flush(10)
    assert recorder.sent == []  # an empty subscription gets nothing
    with Notifier(factory, [recorder], replay=True, events=every, cursor_name="all") as n2:
        n2.poll_once()
        assert n2.flush(10)
    texts = {m.event: m.text for m in recorder.sent}
    assert set(texts) >= {"signal.approved", "order.created", "fill.applied", "order.rejected",
                          "account.downgraded", "risk.breaker_tripped",
                          "reconcile.mismatch", "worker.error"}
    for message in recorder.sent:
        if message.account is not None:
            assert message.text.startswith(f"Account {message.account} (paper)") or \
                f"on account {message.account} (paper)" in message.text
    assert texts["fill.applied"].startswith("Account beta (paper): filled buy 1 BTCUSD at 100")
    assert "rejected by the broker: INSUFFICIENT_FUNDS: no money" in texts["order.rejected"]
    assert "switched to advisory mode (consecutive rejections)" in texts["account.downgraded"]
    assert "circuit breaker tripped to SOFT (was OK)" in texts["risk.breaker_tripped"]
    assert "reconciliation mismatch POSITION_MISMATCH: broker has 2, ledger has 1" in \
        texts["reconcile.mismatch"]
    errors = [m for m in recorder.sent if m.event == "worker.error"]
    assert [m.text for m in errors] == [
        "Worker router reported BROKER_AUTH on account beta (paper): key revoked.",
        "Worker ingest reported FEED_STALE: no bars for 5m."]


def test_backtest_events_are_not_news(conn: psycopg.Connection,
                                      factory: Callable[[], psycopg.Connection],
                                      advisory: None) -> None:
    conn.execute("SELECT trading.create_account(name => 'bt', environment => 'backtest', "
                 "mode => 'advisory', cash => 10000)")
    submit(conn, account="bt")
    submit(conn, minute=2, account="alpha")
    recorder, everything = Recorder(), Recorder("everything")
    with Notifier(factory, [recorder], replay=True) as notifier:
        notifier.poll_once()
        assert notifier.flush(10)
    with Notifier(factory, [everything], replay=True, cursor_name="all",
                  environments=("paper", "live", "backtest")) as notifier:
        notifier.poll_once()
        assert notifier.flush(10)
    assert [m.account for m in recorder.sent] == ["alpha"]
    assert [m.account for m in everything.sent] == ["bt", "alpha"]
    assert everything.sent[0].text.startswith("Account bt (backtest): advisory signal")


def test_run_polls_until_stopped_and_survives_a_database_outage(
        conn: psycopg.Connection, factory: Callable[[], psycopg.Connection],
        advisory: None) -> None:
    outages = [psycopg.OperationalError("server closed the connection")]

    def flaky() -> psycopg.Connection:
        if outages:
            raise outages.pop()
        return factory()

    class Signalled(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.got = threading.Event()

        def send(self, message: Message) -> None:
            super().send(message)
            self.got.set()

    recorder = Signalled()
    submit(conn)
    stop = threading.Event()
    notifier = Notifier(flaky, [recorder], replay=True, poll_interval=0.02)
    worker = threading.Thread(target=notifier.run, args=(stop,))
    worker.start()
    try:
        assert recorder.got.wait(10)
    finally:
        stop.set()
        worker.join(10)
        notifier.close()
    assert not worker.is_alive() and outages == []
    assert [m.event for m in recorder.sent] == ["signal.advisory"]
