"""Where notifications go: Telegram, Discord, a generic webhook, email.

A channel delivers one `Message` or raises `ChannelError`; it never retries for long (the
notifier's sender thread does, with backoff), never waits more than its timeout on one
network read, and never spends more than its deadline on one send, all round trips
included (the sockets are shut down when it passes: a peer that answers a byte at a time
cannot hold a channel). Secrets (bot tokens, webhook URLs and the paths and queries that
hold their secret, SMTP passwords) are registered for log redaction when a channel is
built, and no error raised here contains them: URLs are reduced to their scheme and host,
a receiver's answer is redacted before it is cut short, and the transport's own exception
(whose text names the full URL) is not chained. An SMTP password is only ever sent over
TLS (STARTTLS or implicit TLS).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import html
import json
import re
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any, Protocol, cast, runtime_checkable
from urllib.parse import parse_qsl, unquote, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from workers.runtime import log

DEFAULT_TIMEOUT = 5.0
DEFAULT_DEADLINE = 30.0
LONG_SEGMENT = 12  # a path segment this long may be (part of) a webhook's secret
TELEGRAM_API = "https://api.telegram.org"
SIGNATURE_HEADER = "X-MMATS-Signature"


@dataclass(frozen=True)
class Message:
    """One notification: a subject line, a one-paragraph text, and what it is about."""

    event: str                      # the audit event type, e.g. "fill.applied"
    subject: str                    # one short line (email subject, log line)
    text: str                       # one paragraph, naming the account and its environment
    account: str | None = None
    environment: str | None = None
    event_id: int | None = None
    ts: str | None = None           # the audit event's time, ISO 8601 UTC
    payload: Mapping[str, Any] = field(default_factory=dict)


class ChannelError(Exception):
    """A channel could not deliver; the message holds no secret. `retry_after` (seconds)
    is the receiver's own request to wait, when it made one; `status` the HTTP status;
    `permanent` says that trying the same message again cannot help (a 4xx other than
    408, 425 and 429: the receiver refused the request itself)."""

    def __init__(self, message: str, *, retry_after: float | None = None,
                 status: int | None = None, permanent: bool = False) -> None:
        super().__init__(log.redact(message))
        self.retry_after = retry_after
        self.status = status
        self.permanent = permanent

    @property
    def rate_limited(self) -> bool:
        """The receiver said "too many requests" and how long to wait."""
        return self.status == 429 and self.retry_after is not None


@runtime_checkable
class Channel(Protocol):
    """Delivers a message or raises (ChannelError for what the receiver said)."""

    name: str

    def send(self, message: Message) -> None: ...


def safe_url(url: str) -> str:
    """Scheme and host only: webhook paths and bot URLs carry the secret."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}/***"


def register_secret_url(url: str) -> None:
    """Redact a secret URL from every log line, and what a receiver may echo of it
    without the rest ("Cannot POST /hooks/<secret>"): its path, its query, its long path
    segments and query values, as written and decoded."""
    log.register_secret(url)
    parts = urlsplit(url)
    pieces = [parts.path, parts.query, f"{parts.path}?{parts.query}" if parts.query else ""]
    pieces += [seg for seg in parts.path.split("/") if len(seg) >= LONG_SEGMENT]
    pieces += [v for _k, v in parse_qsl(parts.query) if len(v) >= 8]
    for piece in pieces:
        for value in {piece, unquote(piece)}:
            if value.strip("/"):
                log.register_secret(value)


# --------------------------------------------------------------------------- deadlines
_current = threading.local()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed, or detached into a TLS socket
        sock.shutdown(socket.SHUT_RDWR)


class Deadline:
    """The most one send may take, all its round trips included. Socket timeouts bound
    each read only: a peer answering a byte every few seconds never trips them. When the
    deadline passes, the sockets the send opened (`watch`) are shut down, so the blocked
    read returns and the send fails."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._previous: Deadline | None = None

    def watch(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._socks.append(sock)
            expired = self.expired
        if expired:
            _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            socks = list(self._socks)
        for sock in socks:
            _shut(sock)

    def __enter__(self) -> Deadline:
        self._previous = getattr(_current, "deadline", None)
        _current.deadline = self
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        _current.deadline = self._previous


def _watch(sock: socket.socket | None) -> None:
    deadline: Deadline | None = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.watch(sock)


class _Watched(HTTPConnection):
    """A urllib3 connection whose sockets the current send's deadline can shut down."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch(sock)
        return sock

    def connect(self) -> None:
        super().connect()
        _watch(self.sock)  # for HTTPS, the TLS socket

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch(self.sock)  # a kept-alive connection, reused without connect()
        super().request(*args, **kwargs)


class _WatchedHTTPS(_Watched, HTTPSConnection):
    pass


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Watched


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPS


class _DeadlineAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _HTTPSPool}

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = {"http": _Pool, "https": _HTTPSPool}
        return manager


def http_session() -> requests.Session:
    """A requests session whose sends a `Deadline` can cut short."""
    session = requests.Session()
    adapter = _DeadlineAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _json_default(value: object) -> object:
    # Decimals (exact amounts) and datetimes travel as text
    return str(value)


def _body_excerpt(response: requests.Response) -> str:
    # redacted before it is cut: a secret cut in two is no longer recognised
    text = response.text.strip().replace("\n", " ")
    return log.redact(text)[:200]


def _retry_after(response: requests.Response, body: Any) -> float | None:
    """Seconds to wait, from the JSON body (Discord, Telegram) or the Retry-After header."""
    candidates: list[object] = []
    if isinstance(body, dict):
        candidates.append(body.get("retry_after"))
        params = body.get("parameters")
        if isinstance(params, dict):
            candidates.append(params.get("retry_after"))
    candidates.append(response.headers.get("Retry-After"))
    for value in candidates:
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if seconds >= 0:
            return seconds
    return None


def _json(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


class _HttpChannel:
    """A POST with a timeout (per read) and a deadline (the whole request), whose failures
    become ChannelErrors without the URL."""

    kind = "http"

    def __init__(self, name: str, url: str, *, timeout: float = DEFAULT_TIMEOUT,
                 session: requests.Session | None = None,
                 deadline: float = DEFAULT_DEADLINE) -> None:
        self.name = name
        self._url = url
        self._where = safe_url(url)
        self.timeout = timeout
        self.deadline = deadline
        self._session = session or http_session()

    def _post(self, *, data: bytes, headers: Mapping[str, str]) -> requests.Response:
        deadline = Deadline(self.deadline)
        late = ChannelError(f"{self.name}: no complete answer from {self._where} within "
                            f"the {self.deadline:g} s deadline")
        try:
            with deadline:
                response = self._session.post(self._url, data=data, headers=dict(headers),
                                              timeout=self.timeout)
        except requests.RequestException as exc:
            # the exception's text names the full URL: say what happened, not where
            if deadline.expired:
                raise late from None
            raise ChannelError(f"{self.name}: {type(exc).__name__} posting to "
                               f"{self._where}") from None
        if deadline.expired:  # an answer cut short by the deadline is no answer
            raise late
        return response

    def _fail(self, response: requests.Response, body: Any = None) -> ChannelError:
        status = response.status_code
        return ChannelError(f"{self.name}: HTTP {status} from {self._where}: "
                            f"{_body_excerpt(response)}",
                            retry_after=_retry_after(response, body), status=status,
                            permanent=400 <= status < 500 and status not in (408, 425, 429))


_MARKDOWN_V2 = re.compile(r"([_*\[\]()~`>#+\-=|{}.!\\])")
_MARKDOWN = re.compile(r"([_*`\[])")
PARSE_MODES = ("HTML", "MarkdownV2", "Markdown")


def telegram_escape(text: str, parse_mode: str | None) -> str:
    """`text` shown as written under Telegram's `parse_mode`: every character the mode
    reserves is escaped (a message is plain text, never markup)."""
    if parse_mode == "MarkdownV2":
        return _MARKDOWN_V2.sub(r"\\\1", text)
    if parse_mode == "Markdown":
        return _MARKDOWN.sub(r"\\\1", text)
    if parse_mode == "HTML":
        return html.escape(text, quote=False)
    return text


class TelegramChannel(_HttpChannel):
    """A Telegram bot's sendMessage to one chat. With a `parse_mode` the text is escaped
    for it, so it is shown as written."""

    kind = "telegram"

    def __init__(self, name: str, token: str, chat_id: str, *, parse_mode: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, session: requests.Session | None = None,
                 api: str = TELEGRAM_API, deadline: float = DEFAULT_DEADLINE) -> None:
        if parse_mode not in (None, *PARSE_MODES):
            raise ValueError(f"parse_mode: must be one of {', '.join(PARSE_MODES)}, got "
                             f"{parse_mode!r}")
        log.register_secret(token)
        super().__init__(name, f"{api}/bot{token}/sendMessage", timeout=timeout,
                         session=session, deadline=deadline)
        self.chat_id = chat_id
        self.parse_mode = parse_mode

    def send(self, message: Message) -> None:
        # Telegram's 4096 characters are counted after the entities are parsed
        text = telegram_escape(message.text[:4096], self.parse_mode)
        body: dict[str, Any] = {"chat_id": self.chat_id, "text": text,
                                "disable_web_page_preview": True}
        if self.parse_mode:
            body["parse_mode"] = self.parse_mode
        response = self._post(data=json.dumps(body).encode(),
                              headers={"Content-Type": "application/json"})
        answer = _json(response)
        if response.status_code != 200 or not (isinstance(answer, dict) and answer.get("ok")):
            raise self._fail(response, answer)


class DiscordChannel(_HttpChannel):
    """A Discord webhook. A 429 is honoured here: wait the body's retry_after and try
    again (at most `rate_limit_retries` times), then give the wait to the caller. No
    message pings anyone: `@everyone`, `@here`, role and user mentions in a text (a
    strategy's reasoning, a broker's reason) are shown, not notified."""

    kind = "discord"

    def __init__(self, name: str, webhook_url: str, *, timeout: float = DEFAULT_TIMEOUT,
                 session: requests.Session | None = None, rate_limit_retries: int = 2,
                 max_wait: float = 30.0, sleep: Callable[[float], object] = time.sleep,
                 deadline: float = DEFAULT_DEADLINE) -> None:
        register_secret_url(webhook_url)
        super().__init__(name, webhook_url, timeout=timeout, session=session,
                         deadline=deadline)
        self.rate_limit_retries = rate_limit_retries
        self.max_wait = max_wait
        self._sleep = sleep

    def send(self, message: Message) -> None:
        data = json.dumps({"content": message.text[:2000],
                           "allowed_mentions": {"parse": []}}).encode()
        for attempt in range(self.rate_limit_retries + 1):
            response = self._post(data=data, headers={"Content-Type": "application/json"})
            if 200 <= response.status_code < 300:
                return
            body = _json(response)
            error = self._fail(response, body)
            wait = error.retry_after
            if response.status_code != 429 or wait is None or wait > self.max_wait \
                    or attempt == self.rate_limit_retries:
                raise error
            self._sleep(wait)


class WebhookChannel(_HttpChannel):
    """POST a JSON document; with a shared secret, `X-MMATS-Signature: sha256=<hex>` is
    the HMAC-SHA256 of the exact body bytes, so the receiver can verify the sender."""

    kind = "webhook"

    def __init__(self, name: str, url: str, *, secret: str | None = None,
                 signature_header: str = SIGNATURE_HEADER, timeout: float = DEFAULT_TIMEOUT,
                 session: requests.Session | None = None, url_is_secret: bool = True,
                 deadline: float = DEFAULT_DEADLINE) -> None:
        if url_is_secret:
            register_secret_url(url)
        if secret:
            log.register_secret(secret)
        super().__init__(name, url, timeout=timeout, session=session, deadline=deadline)
        self._secret = secret.encode() if secret else None
        self.signature_header = signature_header

    def body(self, message: Message) -> bytes:
        """The exact bytes posted (and signed)."""
        return json.dumps({
            "event": message.event, "event_id": message.event_id, "ts": message.ts,
            "account": message.account, "environment": message.environment,
            "subject": message.subject, "text": message.text,
            "payload": dict(message.payload),
        }, default=_json_default, sort_keys=True, separators=(",", ":")).encode()

    def send(self, message: Message) -> None:
        data = self.body(message)
        headers = {"Content-Type": "application/json"}
        if self._secret is not None:
            digest = hmac.new(self._secret, data, hashlib.sha256).hexdigest()
            headers[self.signature_header] = f"sha256={digest}"
        response = self._post(data=data, headers=headers)
        if not 200 <= response.status_code < 300:
            raise self._fail(response, _json(response))


class _WatchedTLS:
    """An SSL context whose TLS sockets the deadline can shut down during the handshake
    too (smtplib only calls `wrap_socket`)."""

    def __init__(self, context: ssl.SSLContext, deadline: Deadline) -> None:
        self._context = context
        self._deadline = deadline

    def wrap_socket(self, sock: socket.socket, server_hostname: str | None = None,
                    **_kwargs: Any) -> ssl.SSLSocket:
        tls = self._context.wrap_socket(sock, server_hostname=server_hostname,
                                        do_handshake_on_connect=False)
        self._deadline.watch(tls)
        tls.do_handshake()
        return tls


class _SMTP(smtplib.SMTP):
    """smtplib's client, connected later (`connect`), over implicit TLS when given a
    context, with its sockets watched by the send's deadline."""

    def __init__(self, deadline: Deadline, timeout: float,
                 implicit_tls: ssl.SSLContext | None = None) -> None:
        self._deadline = deadline
        self._implicit_tls = implicit_tls
        super().__init__(timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        self._host = host  # the name TLS verifies (STARTTLS too)
        sock: socket.socket = super()._get_socket(host, port, timeout)  # type: ignore[misc]
        self._deadline.watch(sock)
        if self._implicit_tls is not None:
            return _WatchedTLS(self._implicit_tls, self._deadline).wrap_socket(
                sock, server_hostname=host)
        return sock


class EmailChannel:
    """Email through an SMTP server, with STARTTLS or implicit TLS (`use_ssl`, SMTPS,
    port 465) and login. A password is never sent in clear: a username needs one of them."""

    kind = "email"

    def __init__(self, name: str, host: str, port: int, sender: str, recipients: Sequence[str],
                 *, username: str | None = None, password: str | None = None,
                 starttls: bool = False, use_ssl: bool = False,
                 subject_prefix: str = "[MMATS]", timeout: float = DEFAULT_TIMEOUT,
                 ssl_context: ssl.SSLContext | None = None,
                 deadline: float = DEFAULT_DEADLINE) -> None:
        if starttls and use_ssl:
            raise ValueError(f"{name}: starttls and ssl exclude each other (ssl: TLS from "
                             "the first byte, port 465; starttls: upgraded, port 587)")
        if username and not (starttls or use_ssl):
            raise ValueError(f"{name}: a login needs starttls or ssl (the password would be "
                             "sent in clear)")
        if password:
            log.register_secret(password)
        self.name = name
        self.host = host
        self.port = port
        self.sender = sender
        self.recipients = list(recipients)
        self.username = username
        self._password = password
        self.starttls = starttls
        self.use_ssl = use_ssl
        self.subject_prefix = subject_prefix
        self.timeout = timeout
        self.deadline = deadline
        self._ssl_context = ssl_context

    def email(self, message: Message) -> EmailMessage:
        """The email as sent."""
        mail = EmailMessage()
        mail["From"] = self.sender
        mail["To"] = ", ".join(self.recipients)
        mail["Subject"] = f"{self.subject_prefix} {message.subject}".strip()
        mail["Date"] = formatdate(usegmt=True)
        mail["Message-ID"] = make_msgid(domain="mmats")
        mail.set_content(message.text)
        return mail

    def send(self, message: Message) -> None:
        where = f"{self.host}:{self.port}"
        deadline = Deadline(self.deadline)
        context = self._ssl_context or ssl.create_default_context()
        try:
            with deadline:
                smtp = _SMTP(deadline, self.timeout, context if self.use_ssl else None)
                try:
                    smtp.connect(self.host, self.port)
                    if self.starttls:
                        smtp.starttls(context=cast(ssl.SSLContext,
                                                   _WatchedTLS(context, deadline)))
                    if self.username:
                        smtp.login(self.username, self._password or "")
                    smtp.send_message(self.email(message), from_addr=self.sender,
                                      to_addrs=self.recipients)
                    with contextlib.suppress(smtplib.SMTPException, OSError):
                        smtp.quit()
                finally:
                    smtp.close()
        except (smtplib.SMTPException, OSError) as exc:
            if deadline.expired:
                raise ChannelError(f"{self.name}: SMTP {where}: no complete answer within "
                                   f"the {self.deadline:g} s deadline") from None
            if isinstance(exc, smtplib.SMTPException):
                raise ChannelError(f"{self.name}: SMTP {where}: {type(exc).__name__}: "
                                   f"{log.redact(str(exc))[:300]}") from None
            raise ChannelError(f"{self.name}: SMTP {where}: {type(exc).__name__}: "
                               f"{exc.strerror or exc}") from None
