"""Notifications: each channel's wire format (HTTP through `responses`, SMTP through an
in-process aiosmtpd server), the config parser, and the notifier over real audit events
(signals, fills, breaker trips... written by the database's own functions).

Retries never wait: the notifier and the Discord channel take an injected `sleep` that
records the delays it was asked for.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import io
import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import requests
import responses
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from assigned import ensure_assigned
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
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
from workers.runtime.notify_worker import NotifierWorker

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
    no_pings = {"parse": []}
    assert bodies(DISCORD) == [{"content": MSG.text, "allowed_mentions": no_pings}] * 2


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
        self.logins: Logins | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        return "250 OK"


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1: (the server's context, a client context
    that trusts it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    return server, client


class Logins:
    """What the SMTP server saw of each login: (over TLS?, login, password)."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, bytes, bytes]] = []

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str,
                 auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        over_tls = session.ssl is not None or \
            server.transport.get_extra_info("ssl_object") is not None
        self.seen.append((over_tls, auth_data.login, auth_data.password))
        good = (auth_data.login, auth_data.password) == (b"mmats", b"smtp-pass-9876")
        return AuthResult(success=good, handled=False)


@pytest.fixture
def smtp(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> Iterator[tuple[Mailbox, int]]:
    """An SMTP server on 127.0.0.1 that offers STARTTLS and takes logins over TLS only."""
    mailbox = Mailbox()
    port = free_port()
    mailbox.logins = Logins()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port,
                            authenticator=mailbox.logins, tls_context=tls[0],
                            require_starttls=True, auth_require_tls=True)
    controller.start()
    try:
        yield mailbox, port
    finally:
        controller.stop()


@pytest.fixture
def smtps(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> Iterator[tuple[Mailbox, int]]:
    """An SMTP server on 127.0.0.1 speaking TLS from the first byte (SMTPS)."""
    mailbox = Mailbox()
    port = free_port()
    mailbox.logins = Logins()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port,
                            authenticator=mailbox.logins, ssl_context=tls[0],
                            auth_require_tls=False)
    controller.start()
    try:
        yield mailbox, port
    finally:
        controller.stop()


def test_email_is_received_with_subject_and_body(
        smtp: tuple[Mailbox, int], tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    mailbox, port = smtp
    channel = EmailChannel("mail", "127.0.0.1", port, "mmats@example.com",
                           ["ops@example.com", "cto@example.com"], username="mmats",
                           password="smtp-pass-9876", starttls=True, ssl_context=tls[1])
    channel.send(MSG)
    [envelope] = mailbox.envelopes
    assert envelope.mail_from == "mmats@example.com"
    assert envelope.rcpt_tos == ["ops@example.com", "cto@example.com"]
    mail = message_from_bytes(envelope.content)
    assert mail["Subject"] == f"[MMATS] {MSG.subject}"
    assert mail["To"] == "ops@example.com, cto@example.com"
    payload = mail.get_payload(decode=True)
    assert isinstance(payload, bytes) and payload.decode().strip() == MSG.text


def test_email_bad_login_and_refused_connection(
        smtp: tuple[Mailbox, int], tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    mailbox, port = smtp
    bad = EmailChannel("mail", "127.0.0.1", port, "a@example.com", ["b@example.com"],
                       username="mmats", password="wrong-password-1", starttls=True,
                       ssl_context=tls[1])
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
    ensure_assigned(conn, body)
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


def test_a_full_queue_holds_its_channel_back_and_drops_nothing(
        conn: psycopg.Connection, factory: Callable[[], psycopg.Connection],
        advisory: None) -> None:
    """Backpressure: a channel whose queue is full stops reading there (its cursor too)
    and reads on as it drains; the others are not held up and nothing is dropped."""
    for minute in (1, 2, 3, 4):
        submit(conn, minute=minute)
    gate = threading.Event()
    slow, fast = Recorder("slow", gate), Recorder("fast")
    notifier = Notifier(factory, [Subscription(slow, DEFAULT_EVENTS, queue_size=1), fast],
                        replay=True)
    try:
        assert notifier.poll_once() == 4  # returns at once: the slow channel waits its turn
        assert not notifier.flush(0.2)
        assert len(fast.sent) == 4 and notifier.stats()["slow"]["dropped"] == 0
        first = min(m.event_id or 0 for m in fast.sent)
        assert cursor(conn, "notifier:slow") == first - 1  # nothing of it passed
        assert cursor(conn, "notifier:fast") == last_event(conn)
        gate.set()
        assert notifier.flush(10)
    finally:
        gate.set()
        notifier.close()
    assert [m.event_id for m in slow.sent] == [m.event_id for m in fast.sent]
    assert len(slow.sent) == 4 and notifier.stats()["slow"]["dropped"] == 0
    assert notify_failed(conn) == []
    assert cursor(conn) == cursor(conn, "notifier:slow") == last_event(conn)


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


def test_cancels_and_what_hard_cancelled_are_told(
        conn: psycopg.Connection, factory: Callable[[], psycopg.Connection],
        advisory: None) -> None:
    """Before, `events = ["cancel"]` (or order.cancelled) was refused as unknown, and a HARD
    trip's message left out the entry orders it cancelled."""
    conn.execute("SELECT trading.create_account(name => 'beta', environment => 'paper', "
                 "mode => 'operator', cash => 10000)")
    venue = submit(conn, account="beta", size=0.1)
    conn.execute("SELECT trading.acknowledge_order(%s, 'venue-1')", (str(venue["order_id"]),))
    conn.execute("SELECT trading.request_cancel(%s, 'changed my mind')",
                 (str(venue["order_id"]),))
    conn.execute("SELECT trading.cancel_order(%s, 'cancelled at the venue as requested')",
                 (str(venue["order_id"]),))
    entry = submit(conn, minute=2, account="beta", size=0.1)
    conn.execute("SELECT risk.trip_breaker('beta', 'HARD', 'desk says stop')")
    recorder = Recorder()
    with Notifier(factory, [recorder], replay=True, events=["cancel", "breaker"]) as notifier:
        notifier.poll_once()
        assert notifier.flush(10)
    texts = [(m.event, m.text) for m in recorder.sent]
    v, e = venue["order_id"], entry["order_id"]
    assert texts == [
        ("order.cancel_requested", f"Account beta (paper): cancel of order {v} (BTCUSD, "
         "submitted) requested: changed my mind; the order stays open until its venue "
         "confirms."),
        ("order.cancelled", f"Account beta (paper): order {v} (BTCUSD) cancelled (was "
         "submitted): cancelled at the venue as requested."),
        ("order.cancelled", f"Account beta (paper): order {e} (BTCUSD) cancelled (was "
         "created): breaker HARD: desk says stop."),
        ("risk.breaker_tripped", "Account beta (paper): circuit breaker tripped to HARD (was "
         "OK): desk says stop; 1 entry order(s) cancelled."),
    ]


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


# ---------------------------------------------------------------------------- secrets
def echo_path(request: Any) -> tuple[int, dict[str, str], str]:
    """A receiver that names the path it refused (Express: "Cannot POST /path")."""
    path = urlsplit(request.url).path
    return 404, {}, f"<!DOCTYPE html><html><body><pre>Cannot POST {path}</pre></body></html>"


@responses.activate
def test_a_receiver_echoing_the_secret_path_leaks_nothing(
        conn: psycopg.Connection, factory: Callable[[], psycopg.Connection],
        advisory: None, json_log: io.StringIO) -> None:
    secret = "T0KEN-abc123-very-secret"
    env = {"HOOK_URL": f"https://hooks.example.net/hooks/{secret}",
           "DC_URL": f"https://discord.example.net/api/webhooks/1234/{secret}-dc?wait=1"}
    responses.add_callback(responses.POST, env["HOOK_URL"], callback=echo_path)
    responses.add_callback(responses.POST, env["DC_URL"], callback=echo_path)
    submit(conn)
    table = {"max_attempts": 1, "replay": True,
             "channels": [{"type": "webhook", "url_env": "HOOK_URL"},
                          {"type": "discord", "webhook_env": "DC_URL"}]}
    with Notifier.from_config(factory, table, env=env) as notifier:
        assert notifier.poll_once() == 1 and notifier.flush(10)
    rows = notify_failed(conn)
    assert len(rows) == 2 and all("Cannot POST ***" in message for _, message, _ in rows)
    stored = json.dumps([[m, d] for _, m, d in rows])
    logged = json_log.getvalue()
    assert "notification dropped" in logged
    for text in (stored, logged):
        assert secret not in text and "hooks/T0KEN" not in text


@responses.activate
def test_the_receivers_answer_is_redacted_before_it_is_cut() -> None:
    hook = "https://hooks.example.com/in/0123456789abcdef-SECRETPART-fedcba9876543210"
    body = "x" * 130 + " proxy error: upstream " + hook + " unreachable"  # hook at 153..
    responses.post(hook, status=502, body=body)
    with pytest.raises(ChannelError) as caught:
        WebhookChannel("hook", hook).send(MSG)
    text = str(caught.value)
    assert "0123456789abcdef" not in text and "SECRETPART" not in text
    assert text.endswith("proxy error: upstream *** unreachable")


# ---------------------------------------------------------------------------- email TLS
def test_an_smtp_login_without_tls_is_refused() -> None:
    config = full_config()
    config["channels"][3]["starttls"] = False
    with pytest.raises(NotifyConfigError) as caught:
        parse_config(config, ENV)
    assert str(caught.value) == ("notifications.channels[3].username: a login needs "
                                 "starttls = true or ssl = true (the password would be "
                                 "sent in clear)")
    config["channels"][3].update(starttls=True, ssl=True)
    with pytest.raises(NotifyConfigError, match=r"channels\[3\]\.ssl: give starttls"):
        parse_config(config, ENV)
    config["channels"][3].update(starttls=False, ssl=True)
    mail = parse_config(config, ENV).subscriptions[3].channel
    assert isinstance(mail, EmailChannel) and (mail.port, mail.use_ssl) == (465, True)
    with pytest.raises(ValueError, match="sent in clear"):
        EmailChannel("mail", "127.0.0.1", 25, "a@example.com", ["b@example.com"],
                     username="mmats", password="smtp-pass-9876")
    # without a login, plain SMTP (a relay on the host) is still fine
    del config["channels"][3]["username"], config["channels"][3]["password_env"]
    config["channels"][3]["ssl"] = False
    assert parse_config(config, ENV).subscriptions[3].channel.port == 25  # type: ignore[attr-defined]


def test_the_smtp_password_only_travels_over_tls(
        smtp: tuple[Mailbox, int], smtps: tuple[Mailbox, int],
        tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    for (mailbox, port), how in ((smtp, {"starttls": True}), (smtps, {"use_ssl": True})):
        EmailChannel("mail", "127.0.0.1", port, "mmats@example.com", ["ops@example.com"],
                     username="mmats", password="smtp-pass-9876", ssl_context=tls[1],
                     **how).send(MSG)
        assert len(mailbox.envelopes) == 1, how
        assert mailbox.logins is not None
        assert mailbox.logins.seen == [(True, b"mmats", b"smtp-pass-9876")], how


# ---------------------------------------------------------------------------- deadlines
def drip_server(greeting: bytes, drip: bytes) -> Iterator[int]:
    """A server that answers `greeting`, then one `drip` every 0.1 s, forever (each read
    well within any timeout)."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()

    def serve(client: socket.socket) -> None:
        with client:
            try:
                if not greeting.startswith(b"220"):
                    client.recv(65536)
                client.sendall(greeting)
                while not stop.wait(0.1):
                    client.sendall(drip)
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(client,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        server.close()


@pytest.mark.parametrize("kind", ["webhook", "email"])
def test_a_dripping_peer_cannot_hold_a_channel(kind: str) -> None:
    if kind == "webhook":
        served = drip_server(b"HTTP/1.1 200 OK\r\n", b"X-Pad: a\r\n")
        port = next(served)
        channel: Any = WebhookChannel("hook", f"http://127.0.0.1:{port}/hook-secret",
                                      timeout=0.5, deadline=1.0)
    else:
        served = drip_server(b"220-hello\r\n", b"220-still here\r\n")
        port = next(served)
        channel = EmailChannel("mail", "127.0.0.1", port, "a@example.com",
                               ["b@example.com"], timeout=0.5, deadline=1.0)
    started = time.monotonic()
    try:
        with pytest.raises(ChannelError, match="within the 1 s deadline"):
            channel.send(MSG)
    finally:
        served.close()
    assert time.monotonic() - started < 3


def test_the_deadline_is_configured_per_channel() -> None:
    config = full_config()
    config["channels"][0]["deadline"] = 12
    config["channels"][1]["timeout"] = 40
    channels = [s.channel for s in parse_config(config, ENV).subscriptions]
    assert [c.deadline for c in channels] == [12.0, 40.0, 30.0, 30.0]  # type: ignore[attr-defined]
    config["channels"][0]["deadline"] = 1
    with pytest.raises(NotifyConfigError, match=r"channels\[0\]\.deadline: must be a number "
                                                r">= 5"):
        parse_config(config, ENV)


# ---------------------------------------------------------------------------- telegram, discord
RESERVED_V2 = set("_*[]()~`>#+-=|{}.!")


def telegram_parser(request: Any) -> tuple[int, dict[str, str], str]:
    """Telegram's parse rules, reduced to what these texts hit; answers the text as shown."""
    body = json.loads(request.body)
    text, mode = body["text"], body.get("parse_mode")
    bad = None
    shown = text
    if mode == "MarkdownV2":
        for i, ch in enumerate(text):
            if ch in RESERVED_V2 and (i == 0 or text[i - 1] != "\\"):
                bad = f"Character '{ch}' is reserved"
                break
        shown = re.sub(r"\\(.)", r"\1", text)
    elif mode == "Markdown":
        if re.search(r"(?<!\\)[_*`\[]", text):
            bad = "Can't find end of the entity"
        shown = re.sub(r"\\([_*`\[])", r"\1", text)
    elif mode == "HTML":
        if re.search(r"<(?!/?(b|i|u|s|a|code|pre)\b)", text) or re.search(r"&(?!\w+;)", text):
            bad = "Unsupported start tag"
        shown = html.unescape(text)
    if bad:
        return 400, {}, json.dumps({"ok": False, "error_code": 400,
                                    "description": f"Bad Request: can't parse entities: {bad}"})
    return 200, {}, json.dumps({"ok": True, "result": {"text": shown}})


@responses.activate
@pytest.mark.parametrize("mode", [None, "MarkdownV2", "Markdown", "HTML"])
def test_telegram_parse_modes_show_the_text_as_written(mode: str | None) -> None:
    url = f"https://api.telegram.org/bot{TOKEN}/sendMessage"
    responses.add_callback(responses.POST, url, callback=telegram_parser)
    text = ("Account alpha (paper): advisory signal BUY BTC/USDT from strategy sma_crossover "
            "(size 0.5). Reasoning: close <50-day SMA & RSI_14 *low* [x] `y` \\ done!")
    TelegramChannel("tg", TOKEN, "1", parse_mode=mode).send(
        Message(event="signal.advisory", subject="s", text=text))
    [call] = responses.calls
    assert call.response is not None
    assert json.loads(call.response.text)["result"]["text"] == text


def test_a_telegram_refusal_is_not_retried(conn: psycopg.Connection,
                                           factory: Callable[[], psycopg.Connection],
                                           advisory: None) -> None:
    url = f"https://api.telegram.org/bot{TOKEN}/sendMessage"
    submit(conn)
    sleeps = Sleeps()
    with responses.RequestsMock() as mock:
        mock.post(url, status=400, json={"ok": False, "error_code": 400,
                                         "description": "Bad Request: chat not found"})
        with Notifier(factory, [TelegramChannel("tg", TOKEN, "1")], replay=True,
                      sleep=sleeps) as notifier:
            notifier.poll_once()
            assert notifier.flush(10)
        assert len(mock.calls) == 1 and sleeps.calls == []
    [(_, message, details)] = notify_failed(conn)
    assert details["attempts"] == 1 and "HTTP 400" in message and "chat not found" in message


@responses.activate
def test_statuses_that_are_refusals_are_permanent() -> None:
    for status, permanent in ((400, True), (403, True), (404, True), (408, False),
                              (429, False), (500, False), (503, False)):
        responses.post(HOOK, status=status, body="no")
        with pytest.raises(ChannelError) as caught:
            WebhookChannel("hook", HOOK).send(MSG)
        assert (caught.value.status, caught.value.permanent) == (status, permanent)
        responses.reset()


def test_telegram_retry_after_is_honoured_in_full(conn: psycopg.Connection,
                                                  factory: Callable[[], psycopg.Connection],
                                                  advisory: None) -> None:
    """A 300 s flood ban: the channel waits 300 s once (more than backoff_max, and not an
    attempt), then sends everything; nothing is asked early, nothing dropped."""
    url = f"https://api.telegram.org/bot{TOKEN}/sendMessage"
    clock = [0.0]
    hits: list[float] = []
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock[0] += seconds

    def banned(request: Any) -> tuple[int, dict[str, str], str]:
        hits.append(clock[0])
        if clock[0] < 300:
            left = int(300 - clock[0])
            return 429, {}, json.dumps({"ok": False, "error_code": 429,
                                        "description": f"Too Many Requests: retry after {left}",
                                        "parameters": {"retry_after": left}})
        return 200, {}, json.dumps({"ok": True, "result": {}})

    for minute in (1, 2, 3, 4):
        submit(conn, minute=minute)
    with responses.RequestsMock() as mock:
        mock.add_callback(responses.POST, url, callback=banned)
        with Notifier(factory, [TelegramChannel("tg", TOKEN, "1")], replay=True, sleep=sleep,
                      max_attempts=2, backoff_max=60) as notifier:
            assert notifier.poll_once() == 4 and notifier.flush(10)
    assert waits == [300] and hits == [0, 300, 300, 300, 300]
    assert notifier.stats()["tg"] == {"delivered": 4, "dropped": 0, "queued": 0}
    assert notify_failed(conn) == []


@responses.activate
def test_discord_never_pings_anyone() -> None:
    responses.post(DISCORD, status=204)
    text = "Reasoning: @everyone buy now <@&123> <@456> @here."
    DiscordChannel("dc", DISCORD).send(Message(event="signal.advisory", subject="s", text=text))
    assert bodies(DISCORD) == [{"content": text, "allowed_mentions": {"parse": []}}]


# ---------------------------------------------------------------------------- cursors
def test_a_graceful_stop_repeats_nothing(db_url: str, conn: psycopg.Connection,
                                         factory: Callable[[], psycopg.Connection],
                                         advisory: None) -> None:
    """SIGTERM between two polls: what was delivered since the last poll is not sent
    again by the next worker (close moves the cursors)."""
    for minute in (1, 2, 3):
        submit(conn, minute=minute)

    gate = threading.Event()
    first = Recorder("tg", gate)
    worker = NotifierWorker(db_url, Notifier(factory, [first], replay=True, poll_interval=30),
                            name="notifier")
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        # the poll moves the cursor before anything is delivered; then the gate opens
        while cursor(conn) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cursor(conn) == min(e for e, in conn.execute(
            "SELECT event_id FROM audit.events WHERE event_type = 'signal.advisory'")) - 1
        gate.set()
        while len(first.sent) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        gate.set()
        worker.stop()  # SIGTERM, 30 s before the next poll
        thread.join(10)
    assert not thread.is_alive() and len(first.sent) == 3
    assert cursor(conn) == cursor(conn, "notifier:tg") == last_event(conn)
    second = Recorder("tg")
    with Notifier(factory, [second], replay=True) as notifier:
        assert notifier.poll_once() == 0 and notifier.flush(10)
    assert second.sent == []


class Down:
    """A channel that is down: every send fails (HTTP 503, retried)."""

    kind = "down"

    def __init__(self, name: str = "down") -> None:
        self.name = name
        self.calls = 0

    def send(self, message: Message) -> None:
        self.calls += 1
        raise ChannelError(f"{self.name}: HTTP 503 from https://down.example.com/***")


def test_a_dead_channel_holds_only_its_own_cursor(
        conn: psycopg.Connection, factory: Callable[[], psycopg.Connection],
        advisory: None) -> None:
    """Each channel resumes from its own cursor: after a restart the healthy channel gets
    nothing again, the dead one gets everything it never delivered (at least once)."""
    Notifier(factory, [Recorder("good"), Down()]).poll_once()  # cursors at the head
    for minute in (1, 2, 3):
        submit(conn, minute=minute)
    good, down = Recorder("good"), Down()
    first = Notifier(factory, [good, down])  # the real sleep: waits until close
    try:
        assert first.poll_once() == 3
        deadline = time.monotonic() + 10
        while len(good.sent) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        first.poll_once()  # the next poll moves the good channel's cursor
        assert cursor(conn, "notifier:good") == last_event(conn)
    finally:
        first.close(timeout=2)
    ids = [m.event_id for m in good.sent]
    assert cursor(conn, "notifier:down") == min(ids) - 1
    assert cursor(conn) == min(ids) - 1  # the shared cursor: the lowest channel's
    # restarted: the channel is back
    good2, back = Recorder("good"), Recorder("down")
    with Notifier(factory, [good2, back]) as second:
        assert second.poll_once() == 3 and second.flush(10)
    assert good2.sent == [] and [m.event_id for m in back.sent] == ids
    assert cursor(conn) == cursor(conn, "notifier:down") == last_event(conn)


def test_crash_safety_per_channel(conn: psycopg.Connection,
                                  factory: Callable[[], psycopg.Connection],
                                  advisory: None) -> None:
    """A crash (no close): each channel gets again what it had not settled at the last
    poll, and never misses an event; an upgrade from the one shared cursor resumes every
    channel there; a channel added later starts at the newest event."""
    submit(conn, minute=1)
    conn.execute("SELECT runtime.advance_cursor('notifier', %s, now())", (last_event(conn),))
    submit(conn, minute=2)
    submit(conn, minute=3)
    gate = threading.Event()
    a, b = Recorder("a"), Recorder("b", gate)
    crashed = Notifier(factory, [a, b])
    assert crashed.poll_once() == 2  # both resumed from the shared cursor
    deadline = time.monotonic() + 10
    while len(a.sent) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    crashed.poll_once()
    # ... and the process dies here: b's messages were never delivered
    a2, b2 = Recorder("a"), Recorder("b")
    with Notifier(factory, [a2, b2]) as restarted:
        assert restarted.poll_once() == 2 and restarted.flush(10)
    assert a2.sent == [] and [m.event_id for m in b2.sent] == [m.event_id for m in a.sent]
    gate.set()
    crashed._closing.set()
    submit(conn, minute=4)
    a3, b3, c3 = Recorder("a"), Recorder("b"), Recorder("c")
    with Notifier(factory, [a3, b3, c3]) as later:
        later.poll_once()
        assert later.flush(10)
        submit(conn, minute=5)
        later.poll_once()
        assert later.flush(10)
    assert [len(r.sent) for r in (a3, b3, c3)] == [2, 2, 1]


def test_a_burst_larger_than_the_queue_loses_nothing(
        conn: psycopg.Connection, factory: Callable[[], psycopg.Connection],
        advisory: None) -> None:
    """A rate-limited channel (one message at a time) and a burst of 10 with a queue of
    2: every message is delivered once, in order, the cursor never passes one not sent,
    and no NOTIFY_FAILED is written."""
    Notifier(factory, [Recorder("tg")], cursor_name="burst").poll_once()
    for minute in range(1, 11):
        submit(conn, minute=minute)

    class Slow(Recorder):
        def send(self, message: Message) -> None:
            time.sleep(0.02)
            super().send(message)

    slow = Slow("tg")
    with Notifier(factory, [Subscription(slow, DEFAULT_EVENTS, queue_size=2)],
                  cursor_name="burst", batch_size=3) as notifier:
        notifier.poll_once()
        for _ in range(200):
            stored = cursor(conn, "burst:tg") or 0
            assert stored <= max([m.event_id or 0 for m in slow.sent], default=stored)
            if len(slow.sent) == 10:
                break
            notifier.poll_once()
            time.sleep(0.02)
        assert notifier.flush(10)
    ids = [m.event_id for m in slow.sent]
    assert len(ids) == 10 and ids == sorted(set(ids))  # type: ignore[type-var]
    assert notifier.stats()["tg"]["dropped"] == 0 and notify_failed(conn) == []
    assert cursor(conn, "burst") == cursor(conn, "burst:tg") == last_event(conn)
