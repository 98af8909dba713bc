"""Notifications: audit events worth a human's attention, sent to Telegram, Discord, a
webhook or email by a worker that reads after commit and never holds up trading."""

from workers.notify.channels import (
    Channel,
    ChannelError,
    DiscordChannel,
    EmailChannel,
    Message,
    TelegramChannel,
    WebhookChannel,
)
from workers.notify.notifier import (
    CATEGORIES,
    DEFAULT_EVENTS,
    AuditEvent,
    Notifier,
    NotifierConfig,
    NotifyConfigError,
    Subscription,
    format_event,
    parse_config,
    resolve_events,
)

__all__ = [
    "CATEGORIES",
    "DEFAULT_EVENTS",
    "AuditEvent",
    "Channel",
    "ChannelError",
    "DiscordChannel",
    "EmailChannel",
    "Message",
    "Notifier",
    "NotifierConfig",
    "NotifyConfigError",
    "Subscription",
    "TelegramChannel",
    "WebhookChannel",
    "format_event",
    "parse_config",
    "resolve_events",
]
