"""Market data: feeds that deliver candles and the validator that gates them."""

from alphapulse.market.feed import Feed, FeedError
from alphapulse.market.replay import (
    DEFAULT_REPLAY_SYMBOL,
    DEFAULT_REPLAY_TIMEFRAME,
    ReplayFeed,
    default_replay_file,
    load_candles,
    parse_candle_file,
)
from alphapulse.market.validate import REJECT_REASONS, CandleValidator, valid_mask

__all__ = [
    "DEFAULT_REPLAY_SYMBOL",
    "DEFAULT_REPLAY_TIMEFRAME",
    "REJECT_REASONS",
    "CandleValidator",
    "Feed",
    "FeedError",
    "ReplayFeed",
    "default_replay_file",
    "load_candles",
    "parse_candle_file",
    "valid_mask",
]
