"""Where notifications go: Telegram, Discord, a generic webhook, email.

A channel delivers one `Message` or raises `ChannelError`; it never retries for long (the
notifier's sender thread does, with backoff) and never waits more than its timeout on one
call. Secrets (bot tokens, webhook URLs, SMTP passwords) are registered for log redaction
when a channel is built, and no error raised here contains them: URLs are reduced to
their scheme and host, and the transport's own exception (whose text names the full URL)
is not chained.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import smtplib
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import requests

from workers.runtime import log

DEFAULT_TIMEOUT = 5.0
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
    is the receiver's own request to wait, when it made one."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(log.redact(message))
        self.retry_after = retry_after


@runtime_checkable
class Channel(Protocol):
    """Delivers a message or raises (ChannelError for what the receiver said)."""

    name: str

    def send(self, message: Message) -> None: ...


def safe_url(url: str) -> str:
    """Scheme and host only: webhook paths and bot URLs carry the secret."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}/***"


def _json_default(value: object) -> object:
    # Decimals (exact amounts) and datetimes travel as text
    return str(value)


def _body_excerpt(response: requests.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    return log.redact(text[:200])


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
    """A POST with a timeout, whose failures become ChannelErrors without the URL."""

    kind = "http"

    def __init__(self, name: str, url: str, *, timeout: float = DEFAULT_TIMEOUT,
                 session: requests.Session | None = None) -> None:
        self.name = name
        self._url = url
        self._where = safe_url(url)
        self.timeout = timeout
        self._session = session or requests.Session()

    def _post(self, *, data: bytes, headers: Mapping[str, str]) -> requests.Response:
        try:
            return self._session.post(self._url, data=data, headers=dict(headers),
                                      timeout=self.timeout)
        except requests.RequestException as exc:
            # the exception's text names the full URL: say what happened, not where
            raise ChannelError(f"{self.name}: {type(exc).__name__} posting to "
                               f"{self._where}") from None

    def _fail(self, response: requests.Response, body: Any = None) -> ChannelError:
        return ChannelError(f"{self.name}: HTTP {response.status_code} from {self._where}: "
                            f"{_body_excerpt(response)}",
                            retry_after=_retry_after(response, body))


class TelegramChannel(_HttpChannel):
    """A Telegram bot's sendMessage to one chat."""

    kind = "telegram"

    def __init__(self, name: str, token: str, chat_id: str, *, parse_mode: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, session: requests.Session | None = None,
                 api: str = TELEGRAM_API) -> None:
        log.register_secret(token)
        super().__init__(name, f"{api}/bot{token}/sendMessage", timeout=timeout,
                         session=session)
        self.chat_id = chat_id
        self.parse_mode = parse_mode

    def send(self, message: Message) -> None:
        body: dict[str, Any] = {"chat_id": self.chat_id, "text": message.text[:4096],
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
    again (at most `rate_limit_retries` times), then give the wait to the caller."""

    kind = "discord"

    def __init__(self, name: str, webhook_url: str, *, timeout: float = DEFAULT_TIMEOUT,
                 session: requests.Session | None = None, rate_limit_retries: int = 2,
                 max_wait: float = 30.0, sleep: Callable[[float], object] = time.sleep) -> None:
        log.register_secret(webhook_url)
        super().__init__(name, webhook_url, timeout=timeout, session=session)
        self.rate_limit_retries = rate_limit_retries
        self.max_wait = max_wait
        self._sleep = sleep

    def send(self, message: Message) -> None:
        data = json.dumps({"content": message.text[:2000]}).encode()
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
                 session: requests.Session | None = None, url_is_secret: bool = True) -> None:
        if url_is_secret:
            log.register_secret(url)
        if secret:
            log.register_secret(secret)
        super().__init__(name, url, timeout=timeout, session=session)
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


class EmailChannel:
    """Email through an SMTP server, with optional STARTTLS and login."""

    kind = "email"

    def __init__(self, name: str, host: str, port: int, sender: str, recipients: Sequence[str],
                 *, username: str | None = None, password: str | None = None,
                 starttls: bool = False, subject_prefix: str = "[MMATS]",
                 timeout: float = DEFAULT_TIMEOUT,
                 ssl_context: ssl.SSLContext | None = None) -> None:
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
        self.subject_prefix = subject_prefix
        self.timeout = timeout
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
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
                if self.starttls:
                    smtp.starttls(context=self._ssl_context or ssl.create_default_context())
                if self.username:
                    smtp.login(self.username, self._password or "")
                smtp.send_message(self.email(message), from_addr=self.sender,
                                  to_addrs=self.recipients)
        except smtplib.SMTPException as exc:
            raise ChannelError(f"{self.name}: SMTP {where}: {type(exc).__name__}: "
                               f"{log.redact(str(exc))[:300]}") from None
        except OSError as exc:
            raise ChannelError(f"{self.name}: SMTP {where}: {type(exc).__name__}: "
                               f"{exc.strerror or exc}") from None
