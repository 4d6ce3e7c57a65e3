"""The ``delivery:`` section of ``config/monitoring.yaml``: who is told about alerts, how, and when.

Validated like every other configuration file of the project (see :mod:`alphapulse.config`): an unknown key,
a wrong type or a bad value raises :class:`~alphapulse.config.ConfigError` naming the file, the dotted key
(``delivery.telegram.chat_id``) and the problem, which the monitor turns into exit status 78 and one line.
A problem message never repeats the value of a secret field: the line lands in the journal.

Each channel is translated here, once, into an apprise URL plus the few plugin attributes that point it at a
different host; :mod:`alphapulse.monitor.delivery` only sends. Building the URL at load time lets apprise's
own parser validate it before the monitor starts, so a token apprise would reject is a config error, not a
failure at the first alert.

Secrets may come from the environment (the 0600 env file systemd passes), which wins over the YAML file, as
everywhere in the project: ``ALPHAPULSE_WEBHOOK_URL``, ``ALPHAPULSE_SLACK_WEBHOOK_URL``,
``ALPHAPULSE_TELEGRAM_TOKEN``, ``ALPHAPULSE_SMTP_PASSWORD``.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, time
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from alphapulse.config import ConfigError, _coerce

SEVERITIES: tuple[str, ...] = ("P1", "P2", "P3", "P4")
EVENTS: tuple[str, ...] = ("opened", "escalated", "resolved", "acknowledged")
#: Severities that quiet hours hold back; P1 and P2 always go out.
QUIET_SEVERITIES: frozenset[str] = frozenset({"P3", "P4"})

ENV_WEBHOOK_URL = "ALPHAPULSE_WEBHOOK_URL"
ENV_SLACK_URL = "ALPHAPULSE_SLACK_WEBHOOK_URL"
ENV_TELEGRAM_TOKEN = "ALPHAPULSE_TELEGRAM_TOKEN"
ENV_SMTP_PASSWORD = "ALPHAPULSE_SMTP_PASSWORD"
#: Every environment variable this module reads (all of them secrets); alphapulse.config lists the same names
#: so the daemon, which shares the env file, accepts them (a test checks the two agree).
DELIVERY_ENV: tuple[str, ...] = (ENV_WEBHOOK_URL, ENV_SLACK_URL, ENV_TELEGRAM_TOKEN, ENV_SMTP_PASSWORD)

DEFAULT_TELEGRAM_API = "https://api.telegram.org"

_TG_TOKEN_RE = re.compile(r"^[0-9]+:[A-Za-z0-9_-]+$")
_TG_CHAT_RE = re.compile(r"^(-?[0-9]{1,32}|@?[A-Za-z_][A-Za-z0-9_]{3,})$")
_SLACK_TOKEN_RE = re.compile(r"^[A-Za-z0-9]+$")
_EMAIL_RE = re.compile(r"^[^@\s,;<>]+@[^@\s,;<>]+\.[^@\s,;<>]+$|^[^@\s,;<>]+@localhost$")
_HHMM_RE = re.compile(r"^([01]?[0-9]|2[0-3]):([0-5][0-9])$")

# Scalar settings: key -> (type, default, (lo, hi)).
_GLOBAL: dict[str, tuple[type, Any, tuple[float, float]]] = {
    "timeout_s": (float, 10.0, (0.1, 300.0)),
    "max_attempts": (int, 4, (1, 20)),
    "backoff_s": (float, 2.0, (0.0, 3600.0)),
    "backoff_max_s": (float, 60.0, (0.0, 86_400.0)),
    "rate_limit_per_minute": (int, 6, (0, 10_000)),
    "queue_size": (int, 1000, (1, 1_000_000)),
    "drain_timeout_s": (float, 10.0, (0.0, 600.0)),
}
_SECTIONS = ("quiet_hours", "webhook", "slack", "telegram", "email")
_COMMON_CHANNEL_KEYS = ("enabled", "min_severity", "events")
_CHANNEL_KEYS: dict[str, tuple[str, ...]] = {
    "webhook": ("url",),
    "slack": ("url",),
    "telegram": ("bot_token", "chat_id", "api_url"),
    "email": ("host", "port", "security", "username", "password", "from", "to"),
}
_QUIET_KEYS = ("start", "end", "timezone", "action")


@dataclass(frozen=True)
class QuietHours:
    """A daily window, in ``timezone``, during which P3–P4 alerts are held (or dropped) instead of sent.

    ``start`` > ``end`` wraps midnight (22:00–07:00). ``action`` is ``hold`` (sent as one digest when the
    window ends) or ``drop`` (only counted).
    """

    start: time
    end: time
    timezone: str
    action: str

    def active(self, now: datetime) -> bool:
        """Whether ``now`` (an aware datetime) falls inside the window, read in the window's time zone."""
        local = now.astimezone(ZoneInfo(self.timezone)).time().replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def describe(self) -> str:
        return f"{self.start:%H:%M}–{self.end:%H:%M} {self.timezone}"


@dataclass(frozen=True)
class ChannelConfig:
    """One enabled channel: which alerts it takes and the apprise URL that sends them.

    ``overrides`` are plugin attributes set on the apprise plugin instance after it is built, to send to
    another host than the service's public one (a self-hosted Telegram Bot API server, a Slack-compatible
    receiver, a local fake in tests). ``url`` and ``secrets`` carry credentials and never appear in a repr.
    """

    kind: str
    min_severity: str
    events: frozenset[str]
    url: str = field(repr=False)
    overrides: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    secrets: tuple[str, ...] = field(default=(), repr=False)
    target: str = ""  # where it goes, without credentials, for logs and stats

    def accepts(self, event: str, severity: str) -> bool:
        """Whether an ``event`` of an alert of ``severity`` goes to this channel."""
        return event in self.events and SEVERITIES.index(severity) <= SEVERITIES.index(self.min_severity)


@dataclass(frozen=True)
class DeliveryConfig:
    """Validated delivery settings; build one with :meth:`from_mapping`."""

    timeout_s: float = 10.0
    max_attempts: int = 4
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0
    rate_limit_per_minute: int = 6
    queue_size: int = 1000
    drain_timeout_s: float = 10.0
    quiet_hours: QuietHours | None = None
    channels: tuple[ChannelConfig, ...] = ()

    def secrets(self) -> list[str]:
        """Every credential in this configuration, for :func:`alphapulse.log.register_secrets`."""
        return [s for ch in self.channels for s in ch.secrets if s]

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any] | None, source: str, environ: Mapping[str, str] | None = None
    ) -> DeliveryConfig:
        """Validate the ``delivery:`` mapping of ``source`` (``None``: nothing configured, nothing sent).

        ``environ`` defaults to ``os.environ``; its secrets override the file's.
        """
        env = os.environ if environ is None else environ
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(source, "delivery", f"must be a mapping, got {type(data).__name__}")
        _no_unknown(data, tuple(_GLOBAL) + _SECTIONS, source, "delivery")
        values: dict[str, Any] = {}
        for key, (typ, default, (lo, hi)) in _GLOBAL.items():
            values[key] = _scalar(data, key, typ, default, source, "delivery", lo, hi)
        if values["backoff_max_s"] < values["backoff_s"]:
            raise ConfigError(source, "delivery.backoff_max_s",
                              f"must be >= backoff_s ({values['backoff_s']}), got {values['backoff_max_s']}")
        quiet = _quiet_hours(_section(data, "quiet_hours", source), source)
        channels: list[ChannelConfig] = []
        for kind, builder in (("webhook", _webhook), ("slack", _slack), ("telegram", _telegram), ("email", _email)):
            section = _section(data, kind, source)
            prefix = f"delivery.{kind}"
            _no_unknown(section, _COMMON_CHANNEL_KEYS + _CHANNEL_KEYS[kind], source, prefix)
            if not _coerce(section.get("enabled", False), bool, source, f"{prefix}.enabled"):
                continue
            min_sev = _str(section, "min_severity", "P4", source, prefix)
            if min_sev not in SEVERITIES:
                raise ConfigError(source, f"{prefix}.min_severity", f"must be one of {', '.join(SEVERITIES)}, "
                                  f"got {min_sev!r}")
            events = _str_list(section, "events", list(EVENTS), source, prefix)
            for ev in events:
                if ev not in EVENTS:
                    raise ConfigError(source, f"{prefix}.events", f"must list some of {', '.join(EVENTS)}, got {ev!r}")
            if not events:
                raise ConfigError(source, f"{prefix}.events", "must list at least one event")
            url, overrides, secrets, target = builder(section, source, prefix, env)
            channels.append(ChannelConfig(kind=kind, min_severity=min_sev, events=frozenset(events), url=url,
                                          overrides=overrides, secrets=secrets, target=target))
        cfg = cls(quiet_hours=quiet, channels=tuple(channels), **values)
        for ch in cfg.channels:
            _check_with_apprise(ch, source)
        return cfg


# ------------------------------------------------------------------------------------------------------------
# Small validators
# ------------------------------------------------------------------------------------------------------------


def _no_unknown(data: Mapping[str, Any], known: tuple[str, ...], source: str, prefix: str) -> None:
    for key in data:
        if key not in known:
            raise ConfigError(source, f"{prefix}.{key}", f"unknown key (known keys here: {', '.join(sorted(known))})")


def _section(data: Mapping[str, Any], key: str, source: str) -> Mapping[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(source, f"delivery.{key}", f"must be a mapping, got {type(value).__name__}")
    return value


def _scalar(data: Mapping[str, Any], key: str, typ: type, default: Any, source: str, prefix: str,
            lo: float, hi: float) -> Any:
    dotted = f"{prefix}.{key}"
    value = data.get(key)
    if value is None:
        return default
    v = _coerce(value, typ, source, dotted)
    if not (lo <= v <= hi) or v != v:  # v != v: NaN
        raise ConfigError(source, dotted, f"must be between {lo:g} and {hi:g}, got {v}")
    return v


def _str(data: Mapping[str, Any], key: str, default: str, source: str, prefix: str, secret: bool = False) -> str:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        shown = type(value).__name__ if secret else repr(value)
        raise ConfigError(source, f"{prefix}.{key}", f"must be a string, got {shown}")
    return str(value).strip()


def _str_list(data: Mapping[str, Any], key: str, default: list[str], source: str, prefix: str) -> list[str]:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, str):
        value = [v for v in re.split(r"[,\s]+", value) if v]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(source, f"{prefix}.{key}", f"must be a list of strings, got {value!r}")
    return [v.strip() for v in value]


def _secret(data: Mapping[str, Any], key: str, env: Mapping[str, str], env_name: str, source: str,
            prefix: str) -> tuple[str, str, str]:
    """(value, where it came from, key to blame): the environment wins over the file."""
    from_env = env.get(env_name, "")
    if from_env.strip():
        return from_env.strip(), "environment", env_name
    return _str(data, key, "", source, prefix, secret=True), source, f"{prefix}.{key}"


def _http_url(value: str, where: str, key: str, *, secret: bool) -> urllib.parse.SplitResult:
    """Parse an http(s) URL with a host; the error shows the value only when it is not a secret."""
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        parts = urllib.parse.urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        shown = "(value hidden: it may hold a token)" if secret else repr(value)
        raise ConfigError(where, key, f"must be an http:// or https:// URL with a host, got {shown}")
    return parts


# ------------------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------------------


def _quiet_hours(section: Mapping[str, Any], source: str) -> QuietHours | None:
    prefix = "delivery.quiet_hours"
    _no_unknown(section, _QUIET_KEYS, source, prefix)
    bounds: list[time | None] = []
    for key in ("start", "end"):
        value = section.get(key)
        if value is None or value == "":
            bounds.append(None)
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            # YAML 1.1 reads an unquoted 22:00 as the base-60 integer 1320.
            raise ConfigError(source, f"{prefix}.{key}",
                              f"must be a quoted \"HH:MM\" string (YAML read the unquoted time as the number {value})")
        m = _HHMM_RE.match(str(value).strip()) if isinstance(value, str) else None
        if m is None:
            raise ConfigError(source, f"{prefix}.{key}", f"must be a time \"HH:MM\" (00:00..23:59), got {value!r}")
        bounds.append(time(int(m.group(1)), int(m.group(2))))
    start, end = bounds
    tz = _str(section, "timezone", "UTC", source, prefix)
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(source, f"{prefix}.timezone", f"unknown time zone {tz!r} (use an IANA name such as "
                          "UTC or Europe/Berlin)") from None
    action = _str(section, "action", "hold", source, prefix)
    if action not in ("hold", "drop"):
        raise ConfigError(source, f"{prefix}.action", f"must be one of hold, drop, got {action!r}")
    if start is None and end is None:
        return None
    if start is None or end is None:
        missing = "start" if start is None else "end"
        raise ConfigError(source, f"{prefix}.{missing}", "must be set when the other bound is (or leave both empty)")
    if start == end:
        raise ConfigError(source, f"{prefix}.end", f"must differ from start ({start:%H:%M}); leave both empty for none")
    return QuietHours(start=start, end=end, timezone=tz, action=action)


Built = tuple[str, tuple[tuple[str, str], ...], tuple[str, ...], str]


def _webhook(section: Mapping[str, Any], source: str, prefix: str, env: Mapping[str, str]) -> Built:
    """Generic JSON webhook: apprise's ``json://`` (POST of {version, title, message, type, attachments})."""
    url, where, key = _secret(section, "url", env, ENV_WEBHOOK_URL, source, prefix)
    if not url:
        raise ConfigError(source, f"{prefix}.url", f"required when enabled (or set {ENV_WEBHOOK_URL})")
    parts = _http_url(url, where, key, secret=True)
    scheme = "jsons" if parts.scheme == "https" else "json"
    # apprise passes query parameters of the target through only when written as "-name=value".
    query = "&".join(f"-{urllib.parse.quote(k, safe='')}={urllib.parse.quote(v, safe='')}"
                     for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    apprise_url = f"{scheme}://{parts.netloc}{parts.path or '/'}" + (f"?{query}" if query else "")
    secrets = [url]
    if parts.password:
        secrets.append(urllib.parse.unquote(parts.password))
    if parts.query:
        secrets.append(parts.query)
    return apprise_url, (), tuple(secrets), f"{parts.scheme}://{parts.hostname}"


def _slack(section: Mapping[str, Any], source: str, prefix: str, env: Mapping[str, str]) -> Built:
    """Slack incoming webhook through apprise's Slack plugin.

    The URL is the one Slack shows (``https://hooks.slack.com/services/T…/B…/X…``); its last three path
    segments are the tokens and everything before them is the webhook base. apprise's plugin posts to
    ``{webhook_url}/{token_a}/{token_b}/{token_c}`` with ``webhook_url`` a class attribute, so pointing a
    Slack-compatible receiver (Mattermost, Rocket.Chat, a local fake) elsewhere is one instance attribute.
    """
    url, where, key = _secret(section, "url", env, ENV_SLACK_URL, source, prefix)
    if not url:
        raise ConfigError(source, f"{prefix}.url", f"required when enabled (or set {ENV_SLACK_URL})")
    parts = _http_url(url, where, key, secret=True)
    segments = [s for s in parts.path.split("/") if s]
    if len(segments) < 4 or not all(_SLACK_TOKEN_RE.match(s) for s in segments[-3:]):
        raise ConfigError(where, key, "must be a Slack incoming-webhook URL: a base path, then /<T…>/<B…>/<token> "
                          "(letters and digits), e.g. https://hooks.slack.com/services/T000/B000/XXXX")
    a, b, c = segments[-3:]
    base = f"{parts.scheme}://{parts.netloc}" + "".join(f"/{s}" for s in segments[:-3])
    apprise_url = f"slack://{a}/{b}/{c}/?image=no&footer=no"
    return apprise_url, (("webhook_url", base),), (url, c, f"{a}/{b}/{c}"), f"{parts.scheme}://{parts.hostname}"


def _telegram(section: Mapping[str, Any], source: str, prefix: str, env: Mapping[str, str]) -> Built:
    """Telegram Bot API ``sendMessage`` through apprise's ``tgram://``.

    apprise's plugin builds every request as ``{notify_url}{bot_token}/{method}`` with ``notify_url`` a class
    attribute (``https://api.telegram.org/bot``); ``api_url`` sets it on our instance, for a self-hosted Bot
    API server (https://core.telegram.org/bots/api#using-a-local-bot-api-server) or a local fake.
    """
    token, where, key = _secret(section, "bot_token", env, ENV_TELEGRAM_TOKEN, source, prefix)
    if not token:
        raise ConfigError(source, f"{prefix}.bot_token", f"required when enabled (or set {ENV_TELEGRAM_TOKEN})")
    if not _TG_TOKEN_RE.match(token):
        raise ConfigError(where, key, "must look like 123456789:AAbb-cc_dd (digits, a colon, then letters, digits, "
                          "_ or -); value hidden")
    chat_id = _str(section, "chat_id", "", source, prefix)
    if not _TG_CHAT_RE.match(chat_id):
        raise ConfigError(source, f"{prefix}.chat_id", f"must be a numeric chat id (e.g. -1001234567890) or a "
                          f"@channel name, got {chat_id!r}")
    api = _str(section, "api_url", DEFAULT_TELEGRAM_API, source, prefix) or DEFAULT_TELEGRAM_API
    parts = _http_url(api, source, f"{prefix}.api_url", secret=False)
    base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
    # detect=no: never call getUpdates to guess a chat; image=no: no icon fetched from GitHub.
    apprise_url = f"tgram://{token}/{chat_id.lstrip('@')}/?detect=no&image=no&preview=no"
    return apprise_url, (("notify_url", f"{base}/bot"),), (token,), f"{parts.scheme}://{parts.hostname}"


def _email(section: Mapping[str, Any], source: str, prefix: str, env: Mapping[str, str]) -> Built:
    """E-mail through apprise's ``mailto://`` (plain SMTP) or ``mailtos://`` (STARTTLS or SSL)."""
    host = _str(section, "host", "", source, prefix)
    if not host:
        raise ConfigError(source, f"{prefix}.host", "required when enabled (the SMTP server, e.g. smtp.example.org)")
    if not re.match(r"^[A-Za-z0-9.-]+$|^\[[0-9a-fA-F:]+\]$", host):
        raise ConfigError(source, f"{prefix}.host", f"must be a host name or address, got {host!r}")
    port = _scalar(section, "port", int, 587, source, prefix, 1, 65535)
    security = _str(section, "security", "starttls", source, prefix)
    if security not in ("starttls", "ssl", "none"):
        raise ConfigError(source, f"{prefix}.security", f"must be one of starttls, ssl, none, got {security!r}")
    username = _str(section, "username", "", source, prefix)
    password, _where, _key = _secret(section, "password", env, ENV_SMTP_PASSWORD, source, prefix)
    if password and not username:
        raise ConfigError(source, f"{prefix}.username", "required when a password is set")
    sender = _str(section, "from", "", source, prefix)
    if not _EMAIL_RE.match(sender):
        raise ConfigError(source, f"{prefix}.from", f"must be an e-mail address, got {sender!r}")
    to = _str_list(section, "to", [], source, prefix)
    if not to:
        raise ConfigError(source, f"{prefix}.to", "must list at least one e-mail address")
    for addr in to:
        if not _EMAIL_RE.match(addr):
            raise ConfigError(source, f"{prefix}.to", f"must list e-mail addresses, got {addr!r}")
    q = urllib.parse.quote
    auth = f"{q(username, safe='')}:{q(password, safe='')}@" if username else ""
    scheme = "mailto" if security == "none" else "mailtos"
    mode = "insecure" if security == "none" else security
    apprise_url = (f"{scheme}://{auth}{host}:{port}/?mode={mode}&smtp={q(host, safe='')}"
                   f"&from={q(sender, safe='')}&to={q(','.join(to), safe='')}")
    return apprise_url, (), ((password,) if password else ()), f"smtp://{host}:{port}"


def _check_with_apprise(ch: ChannelConfig, source: str) -> None:
    """Let apprise parse the URL now, so what it would refuse is a config error, not a failure at the first alert."""
    from alphapulse.monitor.delivery import make_plugin  # late: delivery imports this module

    try:
        plugin = make_plugin(ch, timeout_s=1.0)
    except Exception as e:  # apprise raises its own exception types; the message may quote the URL
        raise ConfigError(source, f"delivery.{ch.kind}", f"rejected by apprise ({type(e).__name__})") from None
    if plugin is None or len(plugin) == 0:
        raise ConfigError(source, f"delivery.{ch.kind}", "rejected by apprise (check the URL, token and targets)")
