"""AlphaPulse-RL: a reinforcement-learning trading daemon for crypto perpetual futures."""

__version__ = "0.1.0"
