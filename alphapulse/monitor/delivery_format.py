"""The words of an alert notification: one title and one plain-text body, the same for every channel.

Plain text on purpose: apprise escapes it for each service (HTML for Telegram, mrkdwn for Slack), so a
message such as ``value < threshold`` can never break a channel's markup. Summaries (rate limit, quiet-hours
digest) list one line per alert, most severe first, capped so no service truncates the important part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from alphapulse.monitor.delivery_config import SEVERITIES

#: Lines listed in a summary before "... and N more", and the most characters of its body: Telegram refuses
#: a message over 4096 characters (after its HTML escaping), and nobody reads past a screen anyway.
MAX_SUMMARY_LINES = 30
MAX_SUMMARY_CHARS = 3000
_MAX_MESSAGE = 300

Entry = tuple[str, Mapping[str, Any]]  # (event, alert)


def severity_of(alert: Mapping[str, Any]) -> str:
    """The alert's severity (P1..P4); anything else is a caller's bug."""
    sev = alert.get("severity")
    if sev not in SEVERITIES:
        raise ValueError(f"alert severity must be one of {', '.join(SEVERITIES)}, got {sev!r}")
    return str(sev)


def _when(value: Any) -> str:
    """An alert time for people: epoch seconds (or ms) become UTC ISO; strings pass as they are."""
    if value is None or value == "":
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value / 1000.0 if value > 1e11 else float(value)
        try:
            return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        except (OverflowError, OSError, ValueError):
            return str(value)
    return str(value)


def _short(text: Any, limit: int = _MAX_MESSAGE) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def format_alert(event: str, alert: Mapping[str, Any]) -> tuple[str, str]:
    """(title, body) of one alert event, e.g. ``[P2] OPENED drawdown_pct`` and a few ``key: value`` lines."""
    sev = severity_of(alert)
    rule = alert.get("rule", "?")
    title = f"[{sev}] {event.upper()} {rule} (AlphaPulse)"
    lines = [_short(alert.get("message", ""))]
    if alert.get("value") is not None or alert.get("threshold") is not None:
        lines.append(f"value: {alert.get('value')}  threshold: {alert.get('threshold')}")
    lines.append(f"severity: {sev}  rule: {rule}  state: {alert.get('state', '')}  count: {alert.get('count', '')}")
    for key in ("opened_at", "acknowledged_at", "resolved_at", "updated_at"):
        when = _when(alert.get(key))
        if when:
            lines.append(f"{key.removesuffix('_at')}: {when}")
    lines.append(f"alert id: {alert.get('id', '?')}")
    return title, "\n".join(line for line in lines if line)


def summary_line(event: str, alert: Mapping[str, Any]) -> str:
    """One alert event as one line of a summary."""
    value = ""
    if alert.get("value") is not None:
        value = f" (value {alert.get('value')}, threshold {alert.get('threshold')})"
    return f"[{alert.get('severity')}] {event} {alert.get('rule', '?')}: {_short(alert.get('message', ''), 160)}{value}"


def format_summary(entries: Sequence[Entry], reason: str) -> tuple[str, str]:
    """(title, body) of several alert events sent as one message because of ``reason``."""
    ordered = sorted(entries, key=lambda e: SEVERITIES.index(severity_of(e[1])))
    top = severity_of(ordered[0][1])
    title = f"[{top}] {len(entries)} alert events ({reason}) (AlphaPulse)"
    lines: list[str] = []
    size = 0
    for ev, al in ordered[:MAX_SUMMARY_LINES]:
        line = summary_line(ev, al)
        if size + len(line) + 1 > MAX_SUMMARY_CHARS - 40:  # room for the "... and N more" line
            break
        lines.append(line)
        size += len(line) + 1
    if len(lines) < len(ordered):
        lines.append(f"... and {len(ordered) - len(lines)} more")
    return title, "\n".join(lines)


def notify_type(entries: Sequence[Entry]) -> str:
    """apprise's notify type (colour and icon): failure for P1–P2, warning P3, info P4, success when resolved."""
    if all(ev == "resolved" for ev, _ in entries):
        return "success"
    worst = min(SEVERITIES.index(severity_of(al)) for _, al in entries)
    return ("failure", "failure", "warning", "info")[worst]
