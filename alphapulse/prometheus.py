"""The daemon's ``/metrics?format=prometheus``: a prometheus_client collector that reads state at scrape time.

Nothing is recorded for Prometheus per candle: the collector turns what the daemon already keeps (the JSON
``/metrics`` view, its :class:`~alphapulse.metrics.LatencyHistogram` objects and a few counters) into metric
families when Prometheus asks, and holds no state of its own, so a scrape costs the same after ten candles or
ten million.  Counters are ``_total`` (``rate()`` works on them); latency is in seconds as cumulative
``_bucket{le=...}`` series on the fixed ladder :data:`~alphapulse.metrics.PROM_LE_US` (``histogram_quantile()``
works on them), not the p50/p99-since-start of the JSON view.  Every value that belongs to one traded pair
carries a ``symbol`` label.  Each control app registers one collector on its own :class:`CollectorRegistry`,
never on prometheus_client's global one (tests start several apps in one process).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from alphapulse.domain import TradingState
from alphapulse.market.validate import REJECT_REASONS
from alphapulse.metrics import PROM_LE_US, LatencyHistogram
from alphapulse.reconcile import MISMATCH_KINDS

#: The text format generate_latest writes (0.0.4, names escaped to the legacy character set).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: The ``le`` label of each bucket, in seconds as Prometheus expects, then ``+Inf``.
_LE_LABELS: tuple[str, ...] = (*(floatToGoString(us / 1e6) for us in PROM_LE_US), "+Inf")


@dataclass(frozen=True)
class LatencySeries:
    """One histogram series: the family name (``alphapulse_..._seconds``), its help, labels and the live
    histogram, which the collector reads at scrape time."""

    name: str
    help: str
    labels: Mapping[str, str]
    histogram: LatencyHistogram


@dataclass(frozen=True)
class ExchangeRequests:
    """The REST client's request counters (live, or paper on the WEEX feed)."""

    requests: int
    errors: int
    retries: int
    rate_limited: int


@dataclass(frozen=True)
class ScrapeView:
    """What Prometheus needs beyond the JSON ``/metrics`` (which stays as it is for its own readers)."""

    latency: Sequence[LatencySeries]
    #: per symbol: age of the last candle's close in bars on the feed's clock (what the stale-data limit
    #: measures); no entry before the first candle or once a replay has finished
    data_age_bars: Mapping[str, float]
    #: per symbol: open time (s since the epoch) of the last processed candle
    last_candle_s: Mapping[str, float]
    bar_seconds: float
    exchange: ExchangeRequests | None


class PrometheusSource(Protocol):
    """What the collector reads; the daemon implements it (as part of the control server's ControlTarget)."""

    ready: bool

    def health(self) -> tuple[int, dict[str, Any]]: ...

    def metrics(self) -> dict[str, Any]: ...

    def scrape_view(self) -> ScrapeView: ...


class DaemonCollector:
    """A prometheus_client custom collector over a :class:`PrometheusSource`; stateless between scrapes."""

    def __init__(self, source: PrometheusSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        src = self._source
        m = src.metrics()
        view = src.scrape_view()
        status, _ = src.health()
        yield from _system(m, status, src.ready)
        yield from _portfolio(m)
        yield from _trading(m)
        yield from _model(m)
        yield from _risk(m)
        yield from _market(m, view)
        yield from _exchange(m, view)
        yield from _histograms(view.latency)


def new_registry(source: PrometheusSource) -> CollectorRegistry:
    """A private registry holding one :class:`DaemonCollector` (nothing is collected until a scrape)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(source))
    return registry


class _Collected:
    """Families already collected, handed to generate_latest one at a time."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Sequence[Metric]:
        return self._families


async def render(registry: CollectorRegistry) -> bytes:
    """The exposition in the text format :data:`CONTENT_TYPE` names, without holding the event loop for long.

    The state is read in one go (one consistent moment, on the loop thread where it lives); the text is then
    formatted a family at a time with the loop free in between: formatting is most of a scrape's cost (about a
    millisecond for ~200 samples) and a candle should not wait for all of it.  A thread would not help: it is
    pure-Python work that holds the GIL.
    """
    families = list(registry.collect())
    parts: list[bytes] = []
    for family in families:
        parts.append(generate_latest(_Collected([family])))
        await asyncio.sleep(0)
    return b"".join(parts)


# ---- families ---------------------------------------------------------------------------------------------


def _gauge(name: str, help_: str, value: float, labels: Mapping[str, str] | None = None) -> GaugeMetricFamily:
    labels = labels or {}
    g = GaugeMetricFamily(name, help_, labels=list(labels))
    g.add_metric(list(labels.values()), float(value))
    return g


def _counter(name: str, help_: str, value: float, labels: Mapping[str, str] | None = None) -> CounterMetricFamily:
    labels = labels or {}
    c = CounterMetricFamily(name, help_, labels=list(labels))
    c.add_metric(list(labels.values()), float(value))
    return c


def _system(m: dict[str, Any], health_status: int, ready: bool) -> Iterator[Metric]:
    sy = m["system"]
    info = InfoMetricFamily("alphapulse_build", "Daemon version and trading mode",
                            value={"version": str(sy["version"]), "mode": str(m["trading"]["mode"])})
    yield info
    yield _gauge("alphapulse_healthy", "1 while /health answers 200 (every pipeline task alive and progressing)",
                 1.0 if health_status == 200 else 0.0)
    yield _gauge("alphapulse_ready", "1 once start-up finished (systemd READY=1 sent)", 1.0 if ready else 0.0)
    yield _gauge("alphapulse_uptime_seconds", "Seconds since the process started", sy["uptime_s"])
    yield _gauge("alphapulse_resident_memory_bytes", "Resident set size of the daemon", sy["rss_mb"] * 1048576)
    yield _gauge("alphapulse_queue_depth", "Validated candles waiting for the engine", sy["queue_depth"])
    yield _counter("alphapulse_db_commits_total", "Durable SQLite commits (one per candle step)", sy["db_commits"])


def _portfolio(m: dict[str, Any]) -> Iterator[Metric]:
    p = m["portfolio"]
    yield _gauge("alphapulse_equity", "Account equity in quote currency (cash + unrealized PnL)", p["equity"])
    yield _gauge("alphapulse_cash", "Wallet balance: initial + realized PnL - fees + funding", p["cash"])
    yield _gauge("alphapulse_peak_equity", "Highest equity seen; drawdown is measured from it", p["peak_equity"])
    yield _gauge("alphapulse_daily_pnl", "PnL since the start of the UTC day, quote currency", p["daily_pnl"])
    day_start = p["equity"] - p["daily_pnl"]
    loss = max(0.0, -p["daily_pnl"] / day_start) if day_start > 0 else 0.0
    yield _gauge("alphapulse_daily_loss_ratio", "Loss since the start of the UTC day as a fraction of the "
                 "start-of-day equity (0 when up on the day)", loss)
    yield _gauge("alphapulse_drawdown_ratio", "Drawdown from peak equity (fraction)", p["drawdown"])
    yield _gauge("alphapulse_realized_pnl", "Cumulative gross realized PnL", p["realized_pnl"])
    yield _gauge("alphapulse_unrealized_pnl", "Unrealized PnL at the last mark", p["unrealized_pnl"])
    yield _counter("alphapulse_fees_paid_total", "Trading fees paid, quote currency", p["fees_paid"])
    traded = m["trading"]["symbol"]
    qty = GaugeMetricFamily("alphapulse_position_qty", "Signed position quantity (base currency)", labels=["symbol"])
    notional = GaugeMetricFamily("alphapulse_position_notional", "Position notional at the last mark, quote "
                                 "currency", labels=["symbol"])
    held = {pos["symbol"]: pos for pos in p["positions"]}
    for sym in sorted({traded, *held}):  # a flat pair shows 0 rather than vanishing
        pos = held.get(sym)
        qty.add_metric([sym], float(pos["qty"]) if pos else 0.0)
        notional.add_metric([sym], float(pos["notional"]) if pos else 0.0)
    yield qty
    yield notional
    yield _counter("alphapulse_fills_total", "Fills booked", p["fills"], {"symbol": traded})


def _trading(m: dict[str, Any]) -> Iterator[Metric]:
    t = m["trading"]
    state = GaugeMetricFamily("alphapulse_trading_state", "1 for the current trading state, 0 for the others",
                              labels=["state"])
    for s in TradingState:
        state.add_metric([s.value], 1.0 if t["state"] == s.value else 0.0)
    yield state
    sym = {"symbol": t["symbol"]}
    yield _counter("alphapulse_orders_total", "Orders the engine sent (paper: filled next bar; live: to WEEX)",
                   t["orders"], sym)
    yield _gauge("alphapulse_open_orders", "Orders sent and not yet finished", t["open_orders"], sym)


def _model(m: dict[str, Any]) -> Iterator[Metric]:
    mo = m["model"]
    sym = {"symbol": m["trading"]["symbol"]}
    yield InfoMetricFamily("alphapulse_model", "The ONNX policy in use",
                           value={"version": str(mo["version"]), "kind": str(mo["kind"])})
    yield _counter("alphapulse_decisions_total", "Policy decisions", mo["decisions"], sym)
    yield _gauge("alphapulse_model_avg_confidence", "Mean confidence of the decisions since start (0 before the "
                 "first)", mo["avg_confidence"], sym)
    yield _gauge("alphapulse_model_confidence_threshold", "Below this confidence the decision is to hold",
                 mo["confidence_threshold"])


def _risk(m: dict[str, Any]) -> Iterator[Metric]:
    r = m["risk"]
    usage = GaugeMetricFamily("alphapulse_risk_limit_usage_ratio", "Measured value / limit (1 = at the limit)",
                              labels=["limit"])
    for k, v in sorted(r["usage"].items()):
        usage.add_metric([k], float(v))
    yield usage
    limits = GaugeMetricFamily("alphapulse_risk_limit", "Configured risk limits (units in the limit's name)",
                               labels=["limit"])
    for k, v in sorted(r["limits"].items()):
        limits.add_metric([k], float(v))
    yield limits
    yield _counter("alphapulse_risk_alerts_total", "RISK_LIMIT_EXCEEDED events (rows of risk_alerts.json)",
                   r["alerts"])


def _market(m: dict[str, Any], view: ScrapeView) -> Iterator[Metric]:
    mk = m["market"]
    sym = mk["symbol"]
    labels = {"symbol": sym}
    yield _counter("alphapulse_candles_received_total", "Candles the feed delivered (before validation)",
                   mk["candles_in"], labels)
    yield _counter("alphapulse_candles_processed_total", "Candles through the pipeline", mk["candles_processed"],
                   labels)
    rejected = CounterMetricFamily("alphapulse_rejected_candles", "Candles rejected by validation, by reason",
                                   labels=["symbol", "reason"])
    by_reason = mk["rejected_by_reason"]
    for reason in sorted({*REJECT_REASONS, *by_reason}):  # known reasons as zeros, so rate() starts at once
        rejected.add_metric([sym, reason], float(by_reason.get(reason, 0)))
    yield rejected
    yield _counter("alphapulse_data_gaps_total", "Gaps (missing bars) seen in the candle stream", mk["gaps"], labels)
    yield _gauge("alphapulse_bar_seconds", "Length of one bar of the traded timeframe", view.bar_seconds, labels)
    last = GaugeMetricFamily("alphapulse_last_candle_timestamp_seconds", "Open time of the last processed candle",
                             labels=["symbol"])
    for s, ts in sorted(view.last_candle_s.items()):
        last.add_metric([s], float(ts))
    yield last
    age = GaugeMetricFamily("alphapulse_data_age_bars", "Age of the last candle's close in bars on the feed's "
                            "clock (absent before the first candle and after a replay ends)", labels=["symbol"])
    for s, bars in sorted(view.data_age_bars.items()):
        age.add_metric([s], float(bars))
    yield age
    yield _gauge("alphapulse_feed_finished", "1 once a replay has delivered its last candle",
                 1.0 if mk["feed"].get("finished") else 0.0, labels)


def _exchange(m: dict[str, Any], view: ScrapeView) -> Iterator[Metric]:
    ex = view.exchange
    if ex is not None:
        yield _counter("alphapulse_exchange_requests_total", "REST requests sent to the exchange", ex.requests)
        yield _counter("alphapulse_exchange_request_errors_total", "REST requests not answered with success "
                       "(timeout, connection error, HTTP error, error body)", ex.errors)
        yield _counter("alphapulse_exchange_retries_total", "REST requests re-sent after an error", ex.retries)
        yield _counter("alphapulse_exchange_rate_limited_total", "HTTP 429 answers", ex.rate_limited)
    live = m.get("exchange")
    if live is None:
        return
    rec = live["reconciliation"]
    yield _counter("alphapulse_reconciliation_runs_total", "Reconciliations against the exchange", rec["runs"])
    yield _counter("alphapulse_reconciliation_errors_total", "Reconciliations that failed (retried)", rec["errors"])
    mism = CounterMetricFamily("alphapulse_reconciliation_mismatches", "RECONCILIATION_MISMATCH events by kind",
                               labels=["kind"])
    for kind in sorted({*MISMATCH_KINDS, *rec["mismatches"]}):
        mism.add_metric([kind], float(rec["mismatches"].get(kind, 0)))
    yield mism


def _histograms(series: Iterable[LatencySeries]) -> Iterator[Metric]:
    families: dict[str, HistogramMetricFamily] = {}
    for s in series:
        fam = families.get(s.name)
        if fam is None:
            fam = families[s.name] = HistogramMetricFamily(s.name, s.help, labels=list(s.labels))
        cumulative, total_us = s.histogram.cumulative()
        fam.add_metric(list(s.labels.values()), list(zip(_LE_LABELS, map(float, cumulative), strict=True)),
                       sum_value=total_us / 1e6)
    yield from families.values()
