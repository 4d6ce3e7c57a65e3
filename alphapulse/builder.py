"""One builder for the pipeline: every driver gets its engine, broker and feed here.

The daemon, the backtester and the training environment used to wire the engine, the paper broker and the
portfolio each in their own way; a cost or a limit added in one place could be missed in another.  Here the
wiring is written once (after NautilusTrader's kernel builder), so backtest/paper/live parity is a property
of the structure: only the candle source, the clock and the broker differ between drivers, and those are
chosen from the configuration (``ALPHAPULSE_FEED=replay|weex``, ``TRADING_MODE=paper|live``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from alphapulse.domain import TradingState, timeframe_ms
from alphapulse.engine import Cadence, DecisionPolicy, Engine, EngineConfig
from alphapulse.execution import Broker
from alphapulse.execution.paper import PaperBroker
from alphapulse.features import FeatureSet, FeatureSource, feature_set
from alphapulse.funding import FundingSchedule
from alphapulse.portfolio import Portfolio

if TYPE_CHECKING:
    from alphapulse.config import Settings
    from alphapulse.exchange.weex.client import WeexClient
    from alphapulse.market.feed import Feed
    from alphapulse.store import PersistedState


def engine_config(settings: Settings, symbol: str | None = None, timeframe: str | None = None) -> EngineConfig:
    """The engine's rules from the settings; ``symbol``/``timeframe`` override them (backtests, training)."""
    bar_ms = timeframe_ms(timeframe) if timeframe else settings.bar_ms
    return EngineConfig(symbol or settings.symbol, bar_ms, settings.lot_size, settings.confidence_threshold,
                        settings.risk)


def policy_feature_set(policy: Any) -> FeatureSet:
    """The feature set a policy reads: its model metadata's (``Policy``), a baseline's ``feature_set`` attribute,
    else the default ``short_v1``."""
    meta = getattr(policy, "meta", None)
    if meta is not None and hasattr(meta, "feature_set"):
        return meta.feature_set
    return feature_set(getattr(policy, "feature_set", None))


def policy_cadence(policy: Any) -> Cadence:
    """The decision cadence a policy's model metadata asks for (every bar when it names none)."""
    meta = getattr(policy, "meta", None)
    if meta is not None and hasattr(meta, "decision_every_bars"):
        return Cadence(meta.decision_every_bars, meta.decision_hour_utc)
    return Cadence()


def warmup_bars(policy: Any) -> int:
    """Candles the policy's feature set needs before its first observation (the daemon's warm-up)."""
    return policy_feature_set(policy).warmup_bars


def funding_schedule(settings: Settings, path: str | Path | None = None) -> FundingSchedule | None:
    """Simulated funding for a paper account: the rates in ``path`` (default ``feed.funding_file``), else the
    default 0.01 %/8 h; ``None`` in live mode, where the exchange books the real funding (the WEEX broker)."""
    if settings.mode == "live":
        return None
    p = path if path is not None else settings.funding_file
    return FundingSchedule.from_file(p) if p else FundingSchedule()


def paper_broker(settings: Settings) -> PaperBroker:
    """The simulated venue with the configured taker fee and slippage (the only cost model there is)."""
    return PaperBroker(settings.taker_fee, settings.slippage_bps)


def build_engine(
    settings: Settings,
    policy: DecisionPolicy,
    *,
    symbol: str | None = None,
    timeframe: str | None = None,
    features: FeatureSource | None = None,
    broker: Broker | None = None,
    persisted: PersistedState | None = None,
    feature_set: FeatureSet | None = None,
    cadence: Cadence | None = None,
    funding: FundingSchedule | None = None,
) -> Engine:
    """An engine for any driver: a new account, or the one ``persisted`` by the store before a restart.

    ``broker`` defaults to the paper broker; a restored engine hands the broker back the orders that were
    acknowledged but not yet filled, so a restart neither loses nor repeats them.  ``feature_set`` and
    ``cadence`` default to the policy's (:func:`policy_feature_set`, :func:`policy_cadence`); ``features``
    defaults to the set's streaming form (drivers with a whole history pass its batch form instead).
    ``funding`` (see :func:`funding_schedule`) is refused with a live broker: the exchange books real funding.
    """
    cfg = engine_config(settings, symbol, timeframe)
    broker = broker if broker is not None else paper_broker(settings)
    if funding is not None and not isinstance(broker, PaperBroker):
        raise ValueError("simulated funding is for paper accounts only; a live exchange books its own")
    fs = feature_set if feature_set is not None else policy_feature_set(policy)
    feats = features if features is not None else fs.streaming()
    cad = cadence if cadence is not None else policy_cadence(policy)
    if persisted is None:
        return Engine(cfg, policy, broker, Portfolio.new(cfg.symbol, settings.initial_equity), features=feats,
                      feature_set=fs, cadence=cad, funding=funding)
    broker.restore(persisted.open_orders)
    engine = Engine(cfg, policy, broker, Portfolio.restore(persisted.portfolio),
                    TradingState(persisted.trading_state), feats, persisted.last_candle_ts, feature_set=fs,
                    cadence=cad, funding=funding)
    engine.state_reason = persisted.state_reason
    return engine


def build_exchange_client(settings: Settings) -> WeexClient:
    """One WEEX REST client (one aiohttp session, created on the daemon's loop when started) for feed and broker."""
    from alphapulse.exchange.weex.client import WeexClient

    return WeexClient(settings.rest_url, settings.api_key, settings.secret_key, settings.passphrase,
                      timeout_s=settings.exchange_timeout_s)


def build_broker(settings: Settings, client: WeexClient | None = None) -> Broker:
    """The venue the configuration names: the paper broker in ``paper`` mode (on any feed), WEEX in ``live``."""
    if settings.mode == "paper":
        return paper_broker(settings)
    from alphapulse.exchange.weex.broker import WeexBroker

    return WeexBroker(client or build_exchange_client(settings), settings.symbol, leverage=settings.leverage,
                      margin_type=settings.margin_type)


def build_feed(settings: Settings, start_after_ts: int | None, client: WeexClient | None = None,
               warmup_bars: int | None = None) -> Feed:
    """The candle source the configuration names (``feed.source`` / ``ALPHAPULSE_FEED``), not yet opened.

    ``warmup_bars`` is the model's warm-up (:func:`warmup_bars`): the live feed prefetches that many bars; a fresh
    paced replay plays the bars before it unpaced."""
    if settings.feed_source == "replay":
        from alphapulse.market.replay import ReplayFeed, default_replay_file

        replay = settings.replay_file or default_replay_file(settings.timeframe)
        # a fresh replay warms the features up on its first warmup_bars - 1 candles (a restart warms up from the
        # file's history instead): nothing is decided on them, so they are not paced
        unpaced = warmup_bars - 1 if warmup_bars and start_after_ts is None else 0
        return ReplayFeed(replay, settings.symbol, settings.timeframe, settings.replay_speed,
                          start_after_ts=start_after_ts, unpaced_first=unpaced)
    from alphapulse.exchange.weex.feed import WeexFeed
    from alphapulse.features import WARMUP_BARS

    return WeexFeed(client or build_exchange_client(settings), settings.ws_url + "/public", settings.symbol,
                    settings.timeframe, start_after_ts=start_after_ts,
                    warmup_bars=WARMUP_BARS if warmup_bars is None else warmup_bars,
                    silence_timeout_s=settings.stream_silence_s)


def warmup_check(settings: Settings, policy: Any) -> tuple[bool, str]:
    """Whether the configured feed can warm the model's features up, and a sentence saying so.

    The replay feed warms up from its file (the first ``warmup_bars - 1`` valid candles are warm-up, nothing is
    decided on them), so the file needs more than that many valid candles; the live WEEX feed prefetches the
    warm-up over REST at start.  ``policy`` is a loaded :class:`~alphapulse.policy.Policy` or its ``ModelMeta``.
    """
    meta = getattr(policy, "meta", policy)
    fs = meta.feature_set
    need = fs.warmup_bars
    head = f"warm-up: {need} {settings.timeframe} bars ({fs.name} features of model {meta.version})"
    if settings.feed_source != "replay":
        return True, f"{head}; the {settings.feed_source} feed fetches them at start"
    from alphapulse.market.feed import FeedError
    from alphapulse.market.replay import check_spacing, default_replay_file, load_candles
    from alphapulse.market.validate import valid_mask

    path = settings.replay_file or default_replay_file(settings.timeframe)
    try:
        cols = load_candles(path)
    except FeedError as e:
        return False, f"{head}; replay file {path} cannot be read: {e}"
    try:  # a file of another timeframe: its few aligned candles would look like enough
        check_spacing(path, cols["ts"], settings.bar_ms)
    except FeedError as e:
        return False, str(e)
    have = int(valid_mask(cols, settings.bar_ms).sum())
    if have < need:
        return False, (f"{head}; replay file {path} has only {have} valid candles, so the daemon would never "
                       "decide: use a longer file")
    return True, f"{head}; replay file {path} has {have} valid candles: enough ({have - need + 1} decidable)"
