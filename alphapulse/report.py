"""``alphapulse report --daily|--weekly``: the operations manual's performance analysis of one period.

It reads only the operator files that the daemon (or a backtest) appends to the log directory -
``trades.csv``, ``ai_decisions.json`` and ``risk_alerts.json`` - never the SQLite store, so it works
on a copy of the logs, on a machine without the daemon, and while the daemon is writing.  Those
files grow by one decision per bar forever, so they are streamed line by line through the readers of
:mod:`alphapulse.operator_files` (which define the files' names, columns and keys for every reader and
the writer, decode each line as JSON whatever the order of its keys, and skip and count a torn line),
and only the period's values are kept in memory (a week of 5m bars is 2,016 numbers).

Period membership (all UTC, half-open ``[start, end)``):

* a fill and a risk alert belong to the period of their ``timestamp``;
* a decision belongs to the period of its ``candle_time`` (the bar it is about).  Its ``timestamp``
  is the bar close (the daemon decides when the bar closes), so the decision on the 23:55 bar is
  stamped 00:00 of the next day, yet it is the day's last decision and its equity is the day's
  closing equity;
* the equity curve is the opening equity - the last mark before the period (the previous day's
  close), when the logs have one - followed by the equity of each of the period's decisions.  So a
  day's return, drawdown and Sharpe cover every bar of the day, including the first.

The metric definitions are those of :mod:`alphapulse.performance` (the backtester uses the same), so
a report and a backtest of the same bars agree.  Output: an aligned plain-text table on stdout and a
self-contained HTML file (inline CSS and SVG charts, no script, no network) whose path is printed.

Exit status: 0 written, 1 no data for the period (or no readable logs), 2 usage error.
"""

from __future__ import annotations

import argparse
import html
import math
import os
import re
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any

from alphapulse.config import DEFAULT_CONFIDENCE_THRESHOLD, DEFAULT_TIMEFRAME
from alphapulse.domain import TIMEFRAME_MS, timeframe_ms
from alphapulse.operator_files import (
    ALERTS_FILE,
    DECISIONS_FILE,
    TRADES_FILE,
    AlertRow,
    DecisionRow,
    TradeRow,
    read_alerts,
    read_decisions,
    read_trades,
)
from alphapulse.performance import (
    RATIO_CAP,
    drawdown_series,
    max_drawdown,
    periods_per_year,
    returns_from_equity,
    sharpe_ratio,
    sortino_ratio,
    total_return,
    trade_stats,
)
from alphapulse.timeutil import EPOCH, iso_ms, parse_utc_ms

PROG = "alphapulse report"
DEFAULT_THRESHOLD = DEFAULT_CONFIDENCE_THRESHOLD
#: The bar length when neither the decisions nor a loaded configuration say it: the configuration's own
#: default timeframe (alphapulse.config), not a separate guess.
DEFAULT_BAR_MS = TIMEFRAME_MS[DEFAULT_TIMEFRAME]
DAY_MS = 86_400_000

# Reasons a decision is not executed that are not the risk manager saying no: the policy was not
# confident enough, or the position was already where the policy wanted it.
NOT_RISK_REASONS = frozenset({"below_confidence_threshold", "at_target", "within_rebalance_band",
                              "duplicate_order", "ok", "clamped"})

_DATE_ARG = re.compile(r"\d{4}-\d{2}-\d{2}")


class ReportError(Exception):
    """A condition the operator must fix (no data, unreadable logs): one line, exit status 1."""


# --------------------------------------------------------------------------- time and periods


def parse_ts_ms(text: str) -> int:
    """ISO 8601 (``...Z`` or with an offset) to integer ms UTC, exactly: :func:`alphapulse.timeutil.parse_utc_ms`."""
    return parse_utc_ms(text)


def _utc(ts_ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ts_ms)


def _ms(d: date) -> int:
    return (datetime(d.year, d.month, d.day, tzinfo=UTC) - EPOCH) // timedelta(milliseconds=1)


@dataclass(frozen=True)
class Period:
    """One report period: ``[start_ms, end_ms)`` in UTC."""

    kind: str  # "daily" | "weekly"
    start_ms: int
    end_ms: int
    label: str  # "2025-01-06" or "2025-W02"
    slug: str  # file name part: "daily_20250106" or "weekly_2025-W02"

    def contains(self, ts_ms: int) -> bool:
        return self.start_ms <= ts_ms < self.end_ms

    def describe(self) -> str:
        last = _utc(self.end_ms - 1)
        if self.kind == "daily":
            return f"{_utc(self.start_ms):%a %Y-%m-%d} 00:00-24:00 UTC"
        return f"{_utc(self.start_ms):%a %Y-%m-%d} .. {last:%a %Y-%m-%d} UTC"


def period_for(kind: str, day: date) -> Period:
    """The UTC day ``day``, or the ISO week (Monday..Sunday) that contains it."""
    if kind == "daily":
        start = _ms(day)
        return Period("daily", start, start + DAY_MS, day.isoformat(), f"daily_{day:%Y%m%d}")
    if kind == "weekly":
        monday = day - timedelta(days=day.weekday())
        iso = monday.isocalendar()
        label = f"{iso.year}-W{iso.week:02d}"
        start = _ms(monday)
        return Period("weekly", start, start + 7 * DAY_MS, label, f"weekly_{label}")
    raise ValueError(f"unknown period kind {kind!r}")


# --------------------------------------------------------------------------- reading the operator files


@dataclass
class PeriodData:
    """Everything of one period that the metrics need; built in one streaming pass per file."""

    period: Period
    trades: list[TradeRow] = field(default_factory=list)
    alerts: list[AlertRow] = field(default_factory=list)
    equity_ts: list[int] = field(default_factory=list)  # mark time (bar close) of each equity value
    equity: list[float] = field(default_factory=list)
    opening_from_before: bool = False  # equity[0] is the last mark before the period
    positions: list[float] = field(default_factory=list)  # one per decision in the period
    candle_times: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)  # of decisions NOT executed
    executed: int = 0
    symbols: set[str] = field(default_factory=set)
    skipped: Counter[str] = field(default_factory=Counter)  # malformed lines per file

    @property
    def decisions(self) -> int:
        return len(self.confidences)

    def has_data(self) -> bool:
        return bool(self.trades or self.alerts or self.confidences)


def iter_trades(path: Path, skipped: Counter[str] | None = None) -> Iterator[TradeRow]:
    """Every well-formed fill of ``trades.csv``; a torn or foreign line is counted and skipped."""
    return read_trades(path.parent, skipped, path=path)


def iter_alerts(path: Path, skipped: Counter[str] | None = None) -> Iterator[AlertRow]:
    return read_alerts(path.parent, skipped, path=path)


def last_data_ms(logs: Path) -> int | None:
    """Time of the newest record in the logs (decisions by candle time), ``None`` when there is none.

    A fill or funding line stamped exactly at a UTC midnight counts as the millisecond before: it is the close of
    the day's last bar (a paper fill lands at the next bar's open, funding at the bar's close), so a run whose last
    candle is 23:00 reports that day, not a next day holding one funding line.  That matters for a model deciding
    once a day: its decision is on the 23:00 candle and its fill at 00:00.

    Streams every line because a file can hold several runs (a backtest appended after a live
    run) and so need not end with its newest record.
    """
    times = [t.ts_ms - (t.ts_ms % DAY_MS == 0) for t in read_trades(logs)] + [a.ts_ms for a in read_alerts(logs)]
    newest = max(times, default=None)
    for d in read_decisions(logs):
        newest = d.candle_ms if newest is None or d.candle_ms > newest else newest
    return newest


def collect(logs: Path, period: Period) -> PeriodData:
    """Stream the three files once and keep what belongs to ``period``."""
    data = PeriodData(period)
    for t in iter_trades(logs / TRADES_FILE, data.skipped):
        if period.contains(t.ts_ms):
            data.trades.append(t)
            data.symbols.add(t.symbol)
    data.trades.sort(key=lambda t: (t.ts_ms, t.fill_id.zfill(20)))
    for a in iter_alerts(logs / ALERTS_FILE, data.skipped):
        if period.contains(a.ts_ms):
            data.alerts.append(a)
    data.alerts.sort(key=lambda a: a.ts_ms)

    opening: DecisionRow | None = None  # the last decision before the period (by candle time)
    marks: dict[int, float] = {}  # mark time -> equity; one account, so several symbols share a mark
    for d in read_decisions(logs, data.skipped):
        if d.candle_ms < period.start_ms:
            if opening is None or d.candle_ms >= opening.candle_ms:
                opening = d
            continue
        if d.candle_ms >= period.end_ms:
            continue
        data.confidences.append(d.confidence)
        data.candle_times.append(d.candle_ms)
        data.symbols.add(d.symbol)
        data.positions.append(d.position or 0.0)
        if d.allowed:
            data.executed += 1
        else:
            data.reasons[d.reason] += 1
        if d.equity is not None:
            marks[d.ts_ms] = d.equity
    data.symbols.discard("")

    if opening is not None and marks and opening.equity is not None and opening.ts_ms < min(marks):
        data.equity_ts.append(opening.ts_ms)
        data.equity.append(opening.equity)
        data.opening_from_before = True
    for ts in sorted(marks):
        data.equity_ts.append(ts)
        data.equity.append(marks[ts])
    return data


# --------------------------------------------------------------------------- metrics


def infer_bar_ms(candle_times: Sequence[int], default: int = DEFAULT_BAR_MS) -> int:
    """The most common spacing of consecutive candle times (robust to gaps and restarts)."""
    diffs = Counter(b - a for a, b in pairwise(sorted(set(candle_times))))
    if not diffs:
        return default
    return max(diffs.items(), key=lambda kv: (kv[1], -kv[0]))[0]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``q`` in [0, 100]."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Report:
    data: PeriodData
    logs: Path
    threshold: float
    threshold_source: str
    bar_ms: int
    net_pnl: Decimal
    gross_pnl: Decimal
    fees: Decimal
    closing_fills: int
    win_rate: float
    profit_factor: float
    largest_loss: TradeRow | None
    largest_win: TradeRow | None
    opening_equity: float | None
    closing_equity: float | None
    period_return: float
    sharpe: float
    sortino: float
    max_dd: float
    drawdowns: list[float]
    exposure: float
    conf_mean: float
    conf_median: float
    conf_p10: float
    conf_p90: float
    conf_share: float
    risk_blocked: Counter[str]
    other_not_executed: Counter[str]
    alerts_by_limit: Counter[str]


def build_report(data: PeriodData, logs: Path, threshold: float, threshold_source: str,
                 default_bar_ms: int = DEFAULT_BAR_MS) -> Report:
    trades = data.trades
    bar_ms = infer_bar_ms(data.candle_times, default_bar_ms)
    ppy = periods_per_year(bar_ms)
    stats = trade_stats([float(t.pnl) for t in trades], [t.closing for t in trades])
    losses = [t for t in trades if t.pnl < 0]
    wins = [t for t in trades if t.pnl > 0]
    returns = returns_from_equity(data.equity)
    confs = data.confidences
    risk = Counter({r: n for r, n in data.reasons.items() if r not in NOT_RISK_REASONS})
    other = Counter({r: n for r, n in data.reasons.items() if r in NOT_RISK_REASONS})
    return Report(
        data=data,
        logs=logs,
        threshold=threshold,
        threshold_source=threshold_source,
        bar_ms=bar_ms,
        net_pnl=sum((t.pnl for t in trades), Decimal(0)),
        gross_pnl=sum((t.realized_pnl for t in trades), Decimal(0)),
        fees=sum((t.fee for t in trades), Decimal(0)),
        closing_fills=sum(1 for t in trades if t.closing),
        win_rate=stats["win_rate"],
        profit_factor=stats["profit_factor"],
        largest_loss=min(losses, key=lambda t: t.pnl) if losses else None,
        largest_win=max(wins, key=lambda t: t.pnl) if wins else None,
        opening_equity=data.equity[0] if data.equity else None,
        closing_equity=data.equity[-1] if data.equity else None,
        period_return=total_return(data.equity),
        sharpe=sharpe_ratio(returns, ppy),
        sortino=sortino_ratio(returns, ppy),
        max_dd=max_drawdown(data.equity),
        drawdowns=[float(x) for x in drawdown_series(data.equity)],
        exposure=(sum(1 for p in data.positions if p != 0) / len(data.positions)) if data.positions else 0.0,
        conf_mean=statistics.fmean(confs) if confs else math.nan,
        conf_median=statistics.median(confs) if confs else math.nan,
        conf_p10=percentile(confs, 10),
        conf_p90=percentile(confs, 90),
        conf_share=(sum(1 for c in confs if c >= threshold) / len(confs)) if confs else math.nan,
        risk_blocked=risk,
        other_not_executed=other,
        alerts_by_limit=Counter(a.limit for a in data.alerts),
    )


# --------------------------------------------------------------------------- formatting


def _pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x * 100:.{digits}f}%"


def _ratio_text(x: float) -> str:
    if x >= RATIO_CAP:
        return "inf"
    if x <= -RATIO_CAP:
        return "-inf"
    return f"{x:.2f}"


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _money(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.2f}"


def _dec_text(d: Decimal) -> str:
    return format(d, "f")


def _bar_text(bar_ms: int) -> str:
    for unit, ms in (("d", DAY_MS), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if bar_ms % ms == 0:
            return f"{bar_ms // ms}{unit}"
    return f"{bar_ms}ms"


def _fill_rows(label: str, t: TradeRow | None) -> Rows:
    if t is None:
        return [(label, "none")]
    return [(label, _dec_text(t.pnl)), ("  at", f"{_utc(t.ts_ms):%Y-%m-%d %H:%M:%S} {t.side} {_dec_text(t.qty)}")]


REASON_LABELS = {
    "below_confidence_threshold": "Held: below confidence threshold",
    "at_target": "Held: already at target",
    "within_rebalance_band": "Held: within rebalance band",
    "duplicate_order": "Dropped: duplicate order",
}


Rows = list[tuple[str, str]]


def summary_sections(r: Report) -> list[tuple[str, Rows]]:
    """The report's numbers, formatted once so the text table and the HTML cannot disagree."""
    d = r.data
    perf: Rows = [
        ("Trades (fills)", str(len(d.trades))),
        ("Closing fills", str(r.closing_fills)),
        ("Realized PnL, net of fees", _dec_text(r.net_pnl)),
        ("Realized PnL, gross", _dec_text(r.gross_pnl)),
        ("Fees", _dec_text(r.fees)),
        ("Win rate (closing fills)", _pct(r.win_rate, 1) if r.closing_fills else "n/a"),
        ("Profit factor", _ratio_text(r.profit_factor) if d.trades else "n/a"),
        *_fill_rows("Largest loss (fill)", r.largest_loss),
        *_fill_rows("Largest win (fill)", r.largest_win),
    ]
    eq: Rows = [
        ("Opening equity", _money(r.opening_equity)),
        ("Closing equity", _money(r.closing_equity)),
        ("Return", _pct(r.period_return) if d.equity else "n/a"),
        ("Max drawdown", _pct(r.max_dd) if d.equity else "n/a"),
        ("Sharpe (annualised)", _ratio_text(r.sharpe) if len(d.equity) > 2 else "n/a"),
        ("Sortino (annualised)", _ratio_text(r.sortino) if len(d.equity) > 2 else "n/a"),
        ("Time in market", _pct(r.exposure, 1) if d.positions else "n/a"),
        ("Bars (equity marks)", f"{len(d.equity)} x {_bar_text(r.bar_ms)}"),
    ]
    model: Rows = [
        ("Decisions", str(d.decisions)),
        ("Executed (order sent)", str(d.executed)),
        ("Confidence mean", _num(r.conf_mean)),
        ("Confidence median", _num(r.conf_median)),
        ("Confidence p10", _num(r.conf_p10)),
        ("Confidence p90", _num(r.conf_p90)),
        (f"Share >= {r.threshold:g} ({r.threshold_source})", _pct(r.conf_share, 1)),
        ("Blocked by risk", str(sum(r.risk_blocked.values()))),
    ]
    for reason, n in sorted(r.other_not_executed.items(), key=lambda kv: (-kv[1], kv[0])):
        model.append((REASON_LABELS.get(reason, f"Not executed: {reason}"), str(n)))
    risk: Rows = [("Risk alerts", str(len(d.alerts)))]
    for limit, n in sorted(r.alerts_by_limit.items(), key=lambda kv: (-kv[1], kv[0])):
        risk.append((f"  {limit}", str(n)))
    for reason, n in sorted(r.risk_blocked.items(), key=lambda kv: (-kv[1], kv[0])):
        risk.append((f"Blocked by risk: {reason}", str(n)))
    return [("Trading", perf), ("Equity", eq), ("Model", model), ("Risk", risk)]


def alert_table(r: Report) -> tuple[list[str], list[list[str]]]:
    headers = ["time (UTC)", "id", "limit", "value", "threshold", "action", "detail"]
    rows = [[iso_ms(a.ts_ms), str(a.alert_id), a.limit, _num(a.value, 6), _num(a.threshold, 6), a.action, a.detail_text]
            for a in r.data.alerts]
    return headers, rows


def trade_table(r: Report) -> tuple[list[str], list[list[str]]]:
    headers = ["time (UTC)", "symbol", "side", "qty", "price", "fee", "pnl", "reason"]
    rows = [[iso_ms(t.ts_ms), t.symbol, t.side, _dec_text(t.qty), _dec_text(t.price), _dec_text(t.fee),
             _dec_text(t.pnl), t.reason] for t in r.data.trades]
    return headers, rows


def _title(r: Report) -> str:
    return f"AlphaPulse {r.data.period.kind} report {r.data.period.label}"


def _subtitle(r: Report) -> str:
    d = r.data
    symbols = ", ".join(sorted(d.symbols)) or "-"
    return f"{d.period.describe()} | symbols: {symbols} | logs: {r.logs}"


def _text_table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    out = [indent + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    out.append(indent + "  ".join("-" * w for w in widths))
    out.extend(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)
    return out


def render_text(r: Report) -> str:
    sections = summary_sections(r)
    width = max(len(label) for _, rows in sections for label, _ in rows)
    lines = [_title(r), _subtitle(r), ""]
    for title, rows in sections:
        lines.append(title)
        lines.extend(f"  {label.ljust(width)}  {value}" for label, value in rows)
        lines.append("")
    if r.data.alerts:
        lines.append("Risk alerts")
        headers, table = alert_table(r)
        lines.extend(_text_table(headers, table))
        lines.append("")
    if r.data.skipped:
        lines.append("Skipped malformed lines: " + ", ".join(f"{k} {n}" for k, n in sorted(r.data.skipped.items())))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- SVG charts

W, H = 1080, 300
ML, MR, MT, MB = 78, 34, 30, 34  # margins: room for y labels left, x labels below, title above
GREEN, RED, BLUE, GRID, AXIS, TEXT = "#1a9850", "#d73027", "#2166ac", "#e3e6ea", "#8a9099", "#333"


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k) covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        pad = abs(lo) * 0.01 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks: list[float] = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(v, 12))
    return ticks


def _tick_fmt(ticks: Sequence[float], suffix: str = "") -> Callable[[float], str]:
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    digits = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    if step > 0 and abs(step * 10**digits - round(step * 10**digits)) > 1e-6:
        digits += 1  # 2.5 x 10^k needs one more digit

    def fmt(v: float) -> str:
        if abs(v) < step * 1e-6:
            v = 0.0  # no "-0.00"
        return f"{v:,.{digits}f}{suffix}"

    return fmt


_TIME_STEPS_MS = [60_000 * m for m in (5, 10, 15, 30)] + [3_600_000 * h for h in (1, 2, 3, 4, 6, 12)] + \
    [DAY_MS * d for d in (1, 2, 7, 14, 28)]


def time_ticks(t0: int, t1: int, max_ticks: int = 9) -> list[tuple[int, str]]:
    """UTC-aligned ticks with labels: clock times within a day, dates at midnight and for long spans."""
    span = max(t1 - t0, 1)
    step = next((s for s in _TIME_STEPS_MS if span / s <= max_ticks), _TIME_STEPS_MS[-1])
    first = -(-t0 // step) * step
    out = []
    for t in range(first, t1 + 1, step):
        dt = _utc(t)
        if step >= DAY_MS:
            label = f"{dt:%a %d %b}"
        elif t % DAY_MS == 0:
            label = f"{dt:%d %b}"
        else:
            label = f"{dt:%H:%M}"
        out.append((t, label))
    return out


def _esc(s: str) -> str:
    return html.escape(s, quote=True)


class _Plot:
    """Linear scales of one chart's data area plus the SVG elements drawn so far."""

    def __init__(self, title: str, x0: float, x1: float, y0: float, y1: float) -> None:
        self.title = title
        self.x0, self.x1 = x0, (x1 if x1 > x0 else x0 + 1)
        self.y0, self.y1 = y0, (y1 if y1 > y0 else y0 + 1)
        self.parts: list[str] = []

    def x(self, v: float) -> float:
        return ML + (v - self.x0) / (self.x1 - self.x0) * (W - ML - MR)

    def y(self, v: float) -> float:
        return MT + (self.y1 - v) / (self.y1 - self.y0) * (H - MT - MB)

    def y_axis(self, ticks: Sequence[float], fmt: Callable[[float], str]) -> None:
        for v in ticks:
            y = self.y(v)
            self.parts.append(f'<line x1="{ML}" y1="{y:.1f}" x2="{W - MR}" y2="{y:.1f}" stroke="{GRID}"/>')
            self.parts.append(f'<text x="{ML - 8}" y="{y + 4:.1f}" text-anchor="end" class="tick">'
                              f"{_esc(fmt(v))}</text>")

    def x_axis(self, ticks: Sequence[tuple[float, str]]) -> None:
        base = H - MB
        self.parts.append(f'<line x1="{ML}" y1="{base}" x2="{W - MR}" y2="{base}" stroke="{AXIS}"/>')
        for v, label in ticks:
            x = self.x(v)
            # a label centred on the last tick would run past the edge of the chart
            anchor = "end" if x > W - MR - 30 else "middle"
            self.parts.append(f'<line x1="{x:.1f}" y1="{MT}" x2="{x:.1f}" y2="{base}" stroke="{GRID}"/>')
            self.parts.append(f'<line x1="{x:.1f}" y1="{base}" x2="{x:.1f}" y2="{base + 5}" stroke="{AXIS}"/>')
            self.parts.append(f'<text x="{x + (6 if anchor == "end" else 0):.1f}" y="{base + 19}" '
                              f'text-anchor="{anchor}" class="tick">{_esc(label)}</text>')

    def svg(self, label: str) -> str:
        head = (f'<svg viewBox="0 0 {W} {H}" width="100%" role="img" aria-label="{_esc(label)}" '
                f'font-family="system-ui, -apple-system, Segoe UI, Roboto, Helvetica, Arial, sans-serif">')
        title = f'<text x="{ML}" y="18" class="ctitle">{_esc(self.title)}</text>'
        return "\n".join([head, title, *self.parts, "</svg>"])


def _empty_chart(title: str, message: str) -> str:
    p = _Plot(title, 0, 1, 0, 1)
    p.parts.append(f'<rect x="{ML}" y="{MT}" width="{W - ML - MR}" height="{H - MT - MB}" fill="#fafbfc" '
                   f'stroke="{GRID}"/>')
    p.parts.append(f'<text x="{(ML + W - MR) / 2}" y="{(MT + H - MB) / 2}" text-anchor="middle" class="empty">'
                   f"{_esc(message)}</text>")
    return p.svg(title)


def _time_range(r: Report) -> tuple[int, int]:
    """The chart x range: the whole period, widened to the data (the opening mark lies before it)."""
    p = r.data.period
    t0 = min([p.start_ms, *r.data.equity_ts[:1]])
    t1 = max([p.end_ms, *r.data.equity_ts[-1:]])
    return t0, t1


def equity_chart(r: Report) -> str:
    d = r.data
    title = "Equity (USDT, mark-to-market at each bar close)"
    if not d.equity:
        return _empty_chart(title, "no equity marks in this period")
    t0, t1 = _time_range(r)
    ticks = nice_ticks(min(d.equity), max(d.equity))
    p = _Plot(title, t0, t1, ticks[0], ticks[-1])
    p.y_axis(ticks, _tick_fmt(ticks))
    p.x_axis(time_ticks(t0, t1))
    if r.opening_equity is not None:
        y = p.y(r.opening_equity)
        p.parts.append(f'<line x1="{ML}" y1="{y:.1f}" x2="{W - MR}" y2="{y:.1f}" stroke="{AXIS}" '
                       f'stroke-dasharray="4 4"><title>opening equity {_money(r.opening_equity)}</title></line>')
    pts = " ".join(f"{p.x(t):.1f},{p.y(v):.1f}" for t, v in zip(d.equity_ts, d.equity, strict=True))
    base = H - MB
    first_x, last_x = p.x(d.equity_ts[0]), p.x(d.equity_ts[-1])
    p.parts.append(f'<polygon points="{first_x:.1f},{base} {pts} {last_x:.1f},{base}" fill="{BLUE}" '
                   f'fill-opacity="0.08" stroke="none"/>')
    p.parts.append(f'<polyline points="{pts}" fill="none" stroke="{BLUE}" stroke-width="1.6" '
                   f'stroke-linejoin="round"/>')
    lx, ly = p.x(d.equity_ts[-1]), p.y(d.equity[-1])
    p.parts.append(f'<circle cx="{lx:.1f}" cy="{ly:.1f}" r="3" fill="{BLUE}"><title>closing equity '
                   f"{_money(d.equity[-1])} at {iso_ms(d.equity_ts[-1])}</title></circle>")
    return p.svg("equity curve")


def drawdown_chart(r: Report) -> str:
    d = r.data
    title = f"Drawdown from the period's running peak (max {_pct(r.max_dd)})"
    if not d.equity:
        return _empty_chart(title, "no equity marks in this period")
    t0, t1 = _time_range(r)
    dd = [-100.0 * x for x in r.drawdowns]
    # a flat period still gets a readable 0..-1 % axis; a tiny drawdown at least 0..-0.1 %
    ticks = nice_ticks(min(min(dd), -0.1 if r.max_dd > 0 else -1.0), 0.0, 4)
    p = _Plot(title, t0, t1, ticks[0], ticks[-1])
    p.y_axis(ticks, _tick_fmt(ticks, "%"))
    p.x_axis(time_ticks(t0, t1))
    zero = p.y(0.0)
    pts = " ".join(f"{p.x(t):.1f},{p.y(v):.1f}" for t, v in zip(d.equity_ts, dd, strict=True))
    first_x, last_x = p.x(d.equity_ts[0]), p.x(d.equity_ts[-1])
    p.parts.append(f'<polygon points="{first_x:.1f},{zero:.1f} {pts} {last_x:.1f},{zero:.1f}" fill="{RED}" '
                   f'fill-opacity="0.35" stroke="{RED}" stroke-width="1" stroke-linejoin="round"/>')
    p.parts.append(f'<line x1="{ML}" y1="{zero:.1f}" x2="{W - MR}" y2="{zero:.1f}" stroke="{AXIS}"/>')
    if r.max_dd > 0:
        i = max(range(len(dd)), key=lambda k: -dd[k])
        p.parts.append(f'<circle cx="{p.x(d.equity_ts[i]):.1f}" cy="{p.y(dd[i]):.1f}" r="3" fill="{RED}">'
                       f"<title>max drawdown {_pct(r.max_dd)} at {iso_ms(d.equity_ts[i])}</title></circle>")
    return p.svg("drawdown")


def pnl_chart(r: Report) -> str:
    trades = r.data.trades
    title = "Net PnL per fill (USDT, after fees)"
    if not trades:
        return _empty_chart(title, "no fills in this period")
    values = [float(t.pnl) for t in trades]
    ticks = nice_ticks(min(0.0, *values), max(0.0, *values))
    n = len(trades)
    p = _Plot(title, -0.5, n - 0.5, ticks[0], ticks[-1])
    p.y_axis(ticks, _tick_fmt(ticks))
    # x labels at up to 8 evenly spaced fills, named by their time
    k = max(1, math.ceil(n / 8))
    daily = r.data.period.kind == "daily"
    labels = [(float(i), f"{_utc(trades[i].ts_ms):%H:%M}" if daily else f"{_utc(trades[i].ts_ms):%a %H:%M}")
              for i in range(0, n, k)]
    p.x_axis(labels)
    zero = p.y(0.0)
    slot = (W - ML - MR) / n
    bw = max(1.0, min(28.0, slot * 0.7))
    for i, (t, v) in enumerate(zip(trades, values, strict=True)):
        x = p.x(i) - bw / 2
        y = p.y(v)
        top, h = (y, zero - y) if v >= 0 else (zero, y - zero)
        colour = GREEN if v > 0 else RED
        tip = (f"#{i + 1} {iso_ms(t.ts_ms)} {t.side} {_dec_text(t.qty)} @ {_dec_text(t.price)} "
               f"pnl {_dec_text(t.pnl)} fee {_dec_text(t.fee)} ({t.reason})")
        p.parts.append(f'<rect x="{x:.1f}" y="{top:.1f}" width="{bw:.1f}" height="{max(h, 0.8):.1f}" '
                       f'fill="{colour}"><title>{_esc(tip)}</title></rect>')
    p.parts.append(f'<line x1="{ML}" y1="{zero:.1f}" x2="{W - MR}" y2="{zero:.1f}" stroke="{AXIS}"/>')
    return p.svg("per-fill pnl")


# --------------------------------------------------------------------------- HTML

_CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #222;
       background: #f4f6f8; margin: 0; padding: 24px; }
main { max-width: 1120px; margin: 0 auto; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 0 0 10px; }
.sub { color: #667; font-size: 13px; margin-bottom: 18px; word-break: break-all; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(160px, 1fr)); gap: 10px; margin-bottom: 16px; }
.card { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: 10px 14px; }
.card .k { color: #667; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 20px; font-weight: 600; margin-top: 4px; font-variant-numeric: tabular-nums; }
.pos { color: #1a9850; } .neg { color: #d73027; }
.panel { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: 14px 16px; margin-bottom: 16px; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 0 16px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eef0f2; vertical-align: top; }
th { color: #556; font-weight: 600; background: #f8f9fa; }
td.v { text-align: right; white-space: nowrap; }
.kv td:first-child { color: #444; white-space: nowrap; }
.kv td.ind { padding-left: 24px; color: #778; }
svg { display: block; }
svg .tick { font-size: 12px; fill: #555; }
svg .ctitle { font-size: 14px; font-weight: 600; fill: #333; }
svg .empty { font-size: 14px; fill: #888; }
details summary { cursor: pointer; font-weight: 600; }
.muted { color: #888; font-size: 13px; }
footer { color: #888; font-size: 12px; margin-top: 8px; }
"""


def _sign_class(x: float | Decimal | None) -> str:
    if x is None or x == 0:
        return ""
    return "pos" if x > 0 else "neg"


def _kv_table(rows: Rows) -> str:
    """Label/value rows; a label indented with spaces in the text table is a sub-row here too."""
    out = []
    for k, v in rows:
        cls = ' class="ind"' if k.startswith(" ") else ""
        out.append(f'<tr><td{cls}>{_esc(k.strip())}</td><td class="v">{_esc(v)}</td></tr>')
    return f'<table class="kv"><tbody>{"".join(out)}</tbody></table>'


def _html_table(headers: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="v">{_esc(c)}</td>' if i in numeric else f"<td>{_esc(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(r: Report, generated: datetime | None = None) -> str:
    d = r.data
    generated = generated or datetime.now(UTC)
    cards = [
        ("Net PnL", _dec_text(r.net_pnl.quantize(Decimal("0.01"))), _sign_class(r.net_pnl)),
        ("Return", _pct(r.period_return) if d.equity else "n/a", _sign_class(r.period_return)),
        ("Max drawdown", _pct(r.max_dd) if d.equity else "n/a", "neg" if r.max_dd > 0 else ""),
        ("Sharpe", _ratio_text(r.sharpe) if len(d.equity) > 2 else "n/a", _sign_class(r.sharpe)),
        ("Fills", str(len(d.trades)), ""),
        ("Risk alerts", str(len(d.alerts)), "neg" if d.alerts else ""),
    ]
    card_html = "".join(f'<div class="card"><div class="k">{_esc(k)}</div><div class="v {c}">{_esc(v)}</div></div>'
                        for k, v, c in cards)
    sections = summary_sections(r)
    panels = "".join(f'<div class="panel"><h2>{_esc(t)}</h2>{_kv_table(rows)}</div>' for t, rows in sections)
    if d.alerts:
        h, rows = alert_table(r)
        alerts = _html_table(h, rows, {1, 3, 4})
    else:
        alerts = '<p class="muted">No risk alerts in this period.</p>'
    if d.trades:
        h, rows = trade_table(r)
        trades = (f"<details><summary>All {len(rows)} fills</summary>"
                  f"{_html_table(h, rows, {3, 4, 5, 6})}</details>")
    else:
        trades = '<p class="muted">No fills in this period.</p>'
    skipped = ""
    if d.skipped:
        skipped = ('<p class="muted">Skipped malformed lines: '
                   + _esc(", ".join(f"{k} {n}" for k, n in sorted(d.skipped.items()))) + "</p>")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(_title(r))}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<h1>{_esc(_title(r))}</h1>
<div class="sub">{_esc(_subtitle(r))}</div>
<div class="cards">{card_html}</div>
<div class="panel">{equity_chart(r)}</div>
<div class="panel">{drawdown_chart(r)}</div>
<div class="panel">{pnl_chart(r)}</div>
<div class="grid2">{panels}</div>
<div class="panel"><h2>Risk alerts</h2>{alerts}</div>
<div class="panel"><h2>Fills</h2>{trades}{skipped}</div>
<footer>Generated {generated:%Y-%m-%d %H:%M:%S} UTC by alphapulse report from trades.csv, ai_decisions.json and
risk_alerts.json. Times are UTC. PnL in the account currency (USDT).</footer>
</main>
</body>
</html>
"""


# --------------------------------------------------------------------------- command line


def _date_arg(text: str) -> date:
    if not _DATE_ARG.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid date {text!r}: expected YYYY-MM-DD")
    try:
        return date.fromisoformat(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"invalid date {text!r}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Daily or weekly performance report from the daemon's "
                                "operator files (trades.csv, ai_decisions.json, risk_alerts.json).")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--daily", dest="kind", action="store_const", const="daily", help="one UTC day")
    kind.add_argument("--weekly", dest="kind", action="store_const", const="weekly",
                      help="one ISO week, Monday..Sunday UTC")
    p.add_argument("--date", type=_date_arg, help="YYYY-MM-DD: the day, or a day of the week "
                   "(default: the last day/week that has data)")
    p.add_argument("--logs", type=Path, help="log directory (default: $ALPHAPULSE_LOG_DIR, else the configured "
                   "paths.log_dir, else var/log)")
    p.add_argument("--out", type=Path, help="HTML file to write (default: <logs>/reports/report_<period>.html)")
    return p


def _settings() -> Any:
    """The configuration if it loads; the report works without one (e.g. on a copy of the logs)."""
    try:
        from alphapulse.config import load_settings

        return load_settings()
    except Exception:
        return None


def _default_logs(settings: Any) -> Path:
    env = os.environ.get("ALPHAPULSE_LOG_DIR")
    if env:
        return Path(env)
    if settings is not None:
        return Path(settings.log_dir)
    return Path("var/log")


def _default_bar_ms(settings: Any) -> int:
    """The configured bar length (used when the period's decisions are too few to show their spacing); the
    configuration's default timeframe when none loads."""
    try:
        return timeframe_ms(settings.timeframe) if settings is not None else DEFAULT_BAR_MS
    except (ValueError, AttributeError):
        return DEFAULT_BAR_MS


def run(kind: str, day: date | None, logs: Path, out: Path | None, settings: Any = None) -> tuple[Report, Path]:
    """Build the report and write the HTML; ``ReportError`` when there is nothing to report."""
    if not logs.is_dir():
        raise ReportError(f"log directory not found: {logs}")
    if not any((logs / f).exists() for f in (TRADES_FILE, DECISIONS_FILE, ALERTS_FILE)):
        raise ReportError(f"no operator files ({TRADES_FILE}, {DECISIONS_FILE}, {ALERTS_FILE}) in {logs}")
    if day is None:
        newest = last_data_ms(logs)
        if newest is None:
            raise ReportError(f"no data in {logs}: the operator files are empty")
        day = _utc(newest).date()
    period = period_for(kind, day)
    data = collect(logs, period)
    if not data.has_data():
        what = f"{period.label} ({period.describe()})"
        raise ReportError(f"no data in {logs} for the {kind} period {what}")
    threshold, source = DEFAULT_THRESHOLD, "default"
    if settings is not None:
        threshold, source = float(settings.confidence_threshold), "config"
    report = build_report(data, logs, threshold, source, _default_bar_ms(settings))
    path = out if out is not None else logs / "reports" / f"report_{period.slug}.html"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(render_html(report), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        raise ReportError(f"cannot write {path}: {e.strerror or e}") from None
    return report, path


def report_main(argv: list[str] | None = None) -> int:
    """Entry point for ``alphapulse report``; returns the exit status instead of raising."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed usage and the error (2) or the help (0)
        return int(e.code) if isinstance(e.code, int) else 2
    settings = _settings()
    logs = args.logs if args.logs is not None else _default_logs(settings)
    try:
        report, path = run(args.kind, args.date, logs, args.out, settings)
    except ReportError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: cannot read {logs}: {e.strerror or e}", file=sys.stderr)
        return 1
    sys.stdout.write(render_text(report))
    print(f"\nHTML report: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(report_main())
