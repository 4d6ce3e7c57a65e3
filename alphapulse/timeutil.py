"""UTC times as integer milliseconds: the one parser and the one formatter every module uses.

Why one module: the backtester's ``--from``/``--to``, the evaluation's splits, the training data's cut
dates, ``alphapulse fetch`` and the report's reading of the operator files used to parse ISO times each in
their own way, and not identically: some went through ``datetime.timestamp() * 1000`` (a float, so
``...00.001Z`` could come back as ``...00.000``), some rejected the ``Z`` suffix on older Pythons, some took
a naive time as local.  Here a naive time is UTC (every candle time is UTC) and the arithmetic is exact
integer milliseconds.  Callers wrap :class:`ValueError` in their own error type so the operator still sees
which flag or file was wrong.
"""

from __future__ import annotations

import datetime as _dt

__all__ = ["EPOCH", "iso_ms", "parse_utc_ms"]

EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
_EPOCH_DATE = _dt.date(1970, 1, 1)
_ONE_MS = _dt.timedelta(milliseconds=1)
_DAY_MS = 86_400_000
_DAY_PREFIX: dict[int, str] = {}
_DAY_START: dict[str, int] = {}


def parse_utc_ms(value: str | _dt.date | _dt.datetime) -> int:
    """An ISO 8601 date or time (``2025-07-01``, ``2025-07-01T12:00``, ``...Z``, ``...+02:00``) -> epoch ms.

    A naive time is UTC; an explicit offset is converted.  A ``date`` (YAML turns an unquoted
    ``2025-07-01`` into one) is its UTC midnight.  Raises :class:`ValueError` naming the bad text.
    """
    if type(value) is str and len(value) == 24 and value[10] == "T" and value[23] == "Z":
        fast = _parse_iso_ms(value)  # the form every operator-file line carries (iso_ms)
        if fast is not None:
            return fast
    if isinstance(value, _dt.datetime):
        moment = value
    elif isinstance(value, _dt.date):
        moment = _dt.datetime(value.year, value.month, value.day)
    else:
        text = str(value).strip()
        try:
            moment = _dt.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"not an ISO date or date-time: {text!r} (e.g. 2025-01-31 or "
                             "2025-01-31T12:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.UTC)
    return (moment - EPOCH) // _ONE_MS


def _parse_iso_ms(text: str) -> int | None:
    """``YYYY-MM-DDTHH:MM:SS.mmmZ`` by slicing, the day's start cached (a year of 5m decision lines is
    210,000 times); None when the text is not exactly that form, for the general parser to judge."""
    digits = text[11:13] + text[14:16] + text[17:19] + text[20:23]
    if not (digits.isascii() and digits.isdigit() and text[13] == text[16] == ":" and text[19] == "."):
        return None
    h, m, sec, ms = int(text[11:13]), int(text[14:16]), int(text[17:19]), int(text[20:23])
    if h > 23 or m > 59 or sec > 59:
        return None
    day = _DAY_START.get(text[:10])
    if day is None:
        try:
            date = _dt.date.fromisoformat(text[:10])
        except ValueError:
            return None
        if len(_DAY_START) > 4096:
            _DAY_START.clear()
        day = _DAY_START[text[:10]] = (date - _EPOCH_DATE).days * _DAY_MS
    return day + ((h * 60 + m) * 60 + sec) * 1000 + ms


def iso_ms(ts_ms: int) -> str:
    """Epoch ms -> ISO 8601 UTC with milliseconds and a ``Z`` (``2025-01-01T00:05:00.000Z``).

    It runs on the per-candle path (every operator-file line), so the date part is cached per day."""
    day, ms_of_day = divmod(ts_ms, _DAY_MS)
    prefix = _DAY_PREFIX.get(day)
    if prefix is None:
        if len(_DAY_PREFIX) > 64:
            _DAY_PREFIX.clear()
        prefix = _DAY_PREFIX[day] = (EPOCH + _dt.timedelta(days=day)).strftime("%Y-%m-%dT")
    s, ms = divmod(ms_of_day, 1000)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{prefix}{h:02d}:{m:02d}:{sec:02d}.{ms:03d}Z"
