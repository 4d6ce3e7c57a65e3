"""One builder wires the pipeline for every driver, and the layers point one way.

Parity between the daemon, the backtest and the training environment holds because they share one
:class:`~alphapulse.engine.Engine` built in one place; these tests make that structural: a second place that
constructs an engine or a paper broker, a control server that imports the daemon, or a store that imports the
engine fails here.
"""

from __future__ import annotations

import ast
import gzip
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from alphapulse.backtest import run_backtest, select
from alphapulse.baselines import ConstantTarget
from alphapulse.builder import build_broker, build_engine, build_feed
from alphapulse.config import ConfigError, load_settings
from alphapulse.costs import price_with_slippage, taker_fee
from alphapulse.domain import Candle, Order, Side, TradingState
from alphapulse.execution.paper import PaperBroker
from alphapulse.market.feed import FeedError
from alphapulse.market.replay import ReplayFeed, check_file_timeframe, parse_candle_file
from alphapulse.store import PersistedState

PACKAGE = Path(__file__).resolve().parent.parent / "alphapulse"


#: Where each wired class is defined: only calls of *that* class count (the fake exchange has an engine too).
HOME = {"Engine": "alphapulse.engine", "EngineConfig": "alphapulse.engine", "PaperBroker": "alphapulse.execution.paper"}


def _calls(name: str) -> list[str]:
    """Every call of the package's ``name`` class, as ``file:line`` (in its home module or where imported)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "alphapulse." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        tree = ast.parse(path.read_text(), str(path))
        imported = any(isinstance(n, ast.ImportFrom) and n.module == HOME[name] and
                       any(a.name == name for a in n.names) for n in ast.walk(tree))
        if not imported and module != HOME[name]:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if called == name:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


def _imports(module: Path) -> set[str]:
    tree = ast.parse(module.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("cls", ["Engine", "PaperBroker", "EngineConfig"])
def test_only_the_builder_wires_the_pipeline(cls: str) -> None:
    sites = _calls(cls)
    assert sites and all(s.startswith("builder.py:") for s in sites), sites


@pytest.mark.parametrize(("module", "forbidden"), [
    ("control.py", "alphapulse.daemon"),
    ("store.py", "alphapulse.engine"),
    ("config.py", "alphapulse.risk"),
    ("engine.py", "alphapulse.daemon"),
    ("engine.py", "alphapulse.backtest"),
])
def test_dependencies_point_one_way(module: str, forbidden: str) -> None:
    assert forbidden not in _imports(PACKAGE / module)


def test_restored_engine_takes_back_state_and_open_orders(tmp_path: Path) -> None:
    settings = load_settings(None, env={})
    first = build_engine(settings, ConstantTarget(1.0))
    first.portfolio.mark(Decimal("50000"), 3_600_000)
    order = Order("ap-1-p", settings.symbol, Side.BUY, Decimal("0.05"), False, 1, "policy")
    snap = first.snapshot()
    persisted = PersistedState(snap["portfolio"], TradingState.HALTED.value, "max_drawdown", 7_200_000, [order])
    again = build_engine(settings, ConstantTarget(1.0), persisted=persisted)
    assert again.state is TradingState.HALTED and again.state_reason == "max_drawdown"
    assert again.last_candle_ts == 7_200_000
    assert again.broker.open_orders() == [order]
    assert again.portfolio.equity == first.portfolio.equity
    # the restored broker still refuses the same client order id: a restart cannot duplicate an order
    assert again.broker.submit(order) is False


def test_backtest_close_out_pays_the_brokers_costs(tmp_path: Path) -> None:
    """The last trade of a backtest goes through the engine and the paper broker like any other."""
    settings = load_settings(None, env={})
    parsed = parse_candle_file(PACKAGE / "data" / "BTC_USDT_USDT-1h.csv.gz")
    cols = select(parsed.columns, None, None, 3_600_000)
    cols = {k: v[:400] for k, v in cols.items()}
    res = run_backtest(ConstantTarget(1.0), cols, settings, symbol="BTCUSDT", timeframe="1h", out_dir=tmp_path)
    rows = [dict(zip(lines[0].split(","), r.split(","))) for lines in [
        (tmp_path / "trades.csv").read_text().splitlines()] for r in lines[1:]]
    last = rows[-1]
    assert last["reason"] == "end_of_backtest" and last["side"] == "sell"
    # sold the whole position at the last close minus slippage, and paid the taker fee on it
    sold_at = price_with_slippage(Side.SELL, Decimal(repr(float(cols["close"][-1]))), settings.slippage_bps)
    assert Decimal(last["price"]) == sold_at
    assert Decimal(last["fee"]) == taker_fee(Decimal(last["qty"]), sold_at, settings.taker_fee)
    assert Decimal(last["qty"]) == sum(Decimal(r["qty"]) for r in rows[:-1] if r["side"] == "buy") - sum(
        Decimal(r["qty"]) for r in rows[:-1] if r["side"] == "sell")
    assert res.position[-1] == 0.0
    assert res.final_equity - res.initial_equity == sum(Decimal(r["pnl"]) for r in rows)


def test_paper_mode_builds_the_paper_broker_on_any_feed() -> None:
    for feed in ("replay", "weex"):
        broker = build_broker(load_settings(None, env={"ALPHAPULSE_FEED": feed}))
        assert isinstance(broker, PaperBroker)


def test_feed_is_chosen_by_configuration(tmp_path: Path) -> None:
    feed = build_feed(load_settings(None, env={}), None)
    assert isinstance(feed, ReplayFeed) and feed.timeframe == "1h"


async def test_replay_of_another_timeframe_is_refused_at_open(tmp_path: Path) -> None:
    """A 5m file under the 1h configuration: one clear error naming both, not 11 rejects in 12."""
    settings = load_settings(None, env={"ALPHAPULSE_REPLAY_FILE": str(PACKAGE / "data" / "BTC_USDT_USDT-5m.csv.gz")})
    feed = build_feed(settings, None)
    with pytest.raises(FeedError, match=r"5m apart, but the configured timeframe is 1h"):
        await feed.open()


def test_file_timeframe_is_checked_from_the_head_of_the_file(tmp_path: Path) -> None:
    """The daemon's early check reads only the first rows (plain or gzip), skipping the header and bad lines."""
    rows = [f"{300_000 * i},1,2,0.5,1.5,3" for i in range(1000)]
    plain = tmp_path / "five.csv"
    plain.write_text("timestamp,open,high,low,close,volume\n" + "not,a,row\n" + "\n".join(rows) + "\n")
    check_file_timeframe(plain, 300_000)
    with pytest.raises(FeedError, match=r"five.csv: its candles are 5m apart, but the configured timeframe is 1h"):
        check_file_timeframe(plain, 3_600_000)
    with pytest.raises(FeedError, match="1h apart, but the configured timeframe is 5m"):
        check_file_timeframe(PACKAGE / "data" / "BTC_USDT_USDT-1h.csv.gz", 300_000)
    broken = tmp_path / "broken.csv.gz"
    broken.write_bytes(b"\x1f\x8b" + b"\x00" * 40)  # gzip magic, then nothing gzip can read
    with pytest.raises(FeedError, match="broken.csv.gz: cannot read"):
        check_file_timeframe(broken, 300_000)


def test_gapped_file_of_the_right_timeframe_is_accepted(tmp_path: Path) -> None:
    rows = [Candle(3_600_000 * i, 1.0, 2.0, 0.5, 1.5, 3.0) for i in (*range(10), *range(20, 30))]
    path = tmp_path / "X_USDT-1h.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("timestamp,open,high,low,close,volume\n")
        f.writelines(f"{c.ts},{c.open},{c.high},{c.low},{c.close},{c.volume}\n" for c in rows)
    feed = ReplayFeed(path, "XUSDT", "1h", None)
    assert feed.history(10**15, 100)[-1].ts == rows[-1].ts
    assert np.all(np.diff([c.ts for c in feed.history(10**15, 100)]) > 0)


@pytest.mark.parametrize(("env", "key"), [
    ({"ALPHAPULSE_FEED": "binance"}, "feed.source"),
    ({"WEEX_REST_URL": "api-contract.weex.com"}, "exchange.rest_url"),
    ({"WEEX_WS_URL": "https://ws-contract.weex.com/v3/ws"}, "exchange.ws_url"),
])
def test_exchange_settings_are_validated(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(None, env=env)
    assert (e.value.source, e.value.key) == ("environment", key)


def test_exchange_urls_from_the_environment() -> None:
    s = load_settings(None, env={"WEEX_REST_URL": "http://127.0.0.1:9999/", "WEEX_WS_URL": "ws://127.0.0.1:9999/v3/ws",
                                 "ALPHAPULSE_FEED": "weex"})
    assert (s.rest_url, s.ws_url, s.feed_source) == ("http://127.0.0.1:9999", "ws://127.0.0.1:9999/v3/ws", "weex")
    # unset, they are WEEX's own addresses (the reference's), and the feed is the replay
    d = load_settings(None, env={})
    assert (d.rest_url, d.ws_url, d.feed_source) == ("https://api-contract.weex.com",
                                                     "wss://ws-contract.weex.com/v3/ws", "replay")
