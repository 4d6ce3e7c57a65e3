"""Fault injection for the fake WEEX exchange: rules switchable at run time, targetable, seedable.

A rule is ``kind`` + when it fires (``probability`` per matching request, or ``count``: the next N matching
requests) + where (``endpoint``: ``"/capi/v3/order"`` or ``"POST /capi/v3/order"``; a path ending in ``*`` is a
prefix; None = everywhere) + kind-specific parameters.  Draws use one ``random.Random(seed)``, so a test that
seeds the fake sees the same faults on every run.

Kinds (what a client observes):

==================  ============================================================================================
``latency``         every matching request waits ``ms`` before it is handled
``timeout``         the request hangs ``ms`` (default 60 s, longer than any sane client timeout), then answers
``error5xx``        HTTP ``status`` (default 503) with a gateway's HTML body; the request is *not* executed
``ratelimit``       HTTP 429 with a gateway's text body; the request is not executed
``lost_response``   the request *is* executed (an order is created), then the answer is lost: ``mode`` "close"
                    drops the connection, "5xx" answers 500, "hang" answers only after ``ms``
``partial_fill``    a MARKET order fills in ``parts`` pieces over time (PARTIALLY_FILLED in between)
``ws_drop``         a WebSocket connection is closed by the server
``ws_silent``       a WebSocket connection stays open but gets no messages and no pings while the rule exists
``clock_skew``      the server's clock (``/market/time`` and the signature window) is offset by ``ms``
==================  ============================================================================================

The CLI spec is comma-separated ``kind[=value][:key=val...][@endpoint]``: ``value`` is a probability
(``0.1``), a count (``x3``: the next 3 requests) or a duration (``200ms``, ``2s``; probability 1), e.g.
``latency=200ms,error5xx=0.1@/capi/v3/market/*,lost_response=x1:mode=close@POST/capi/v3/order``.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("latency", "timeout", "error5xx", "ratelimit", "lost_response", "partial_fill", "ws_drop", "ws_silent",
         "clock_skew")
#: Kinds whose value is a duration, so "latency=200ms" means "always, 200 ms".
DURATION_KINDS = ("latency", "timeout", "clock_skew")
_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ms|s)$")


@dataclass
class FaultRule:
    kind: str
    probability: float = 1.0
    count: int | None = None  # fire for the next N matching requests, then retire
    endpoint: str | None = None  # "[METHOD ]/path" or "/prefix*"
    ms: int = 0
    status: int = 503
    parts: int = 3
    mode: str = "close"
    rule_id: int = 0
    fired: int = 0
    seen: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")
        if self.kind == "timeout" and self.ms == 0:
            self.ms = 60_000
        if self.mode not in ("close", "5xx", "hang"):
            raise ValueError(f"lost_response mode must be close, 5xx or hang, got {self.mode!r}")
        if self.parts < 2 and self.kind == "partial_fill":
            raise ValueError("partial_fill needs parts >= 2")

    def matches(self, method: str, path: str) -> bool:
        if self.endpoint is None:
            return True
        spec = self.endpoint.strip()
        want_method = None
        if not spec.startswith("/"):
            head, _, rest = spec.partition("/")
            want_method, spec = head.strip().upper(), "/" + rest
        if want_method and want_method != method.upper():
            return False
        if spec.endswith("*"):
            return path.startswith(spec[:-1])
        return path == spec

    @property
    def exhausted(self) -> bool:
        return self.count is not None and self.fired >= self.count

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Faults:
    """The active rules and the seeded random source they draw from."""

    seed: int | None = None
    rules: list[FaultRule] = field(default_factory=list)
    _rng: random.Random = field(init=False, repr=False)
    _ids: itertools.count[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._ids = itertools.count(1)

    def reseed(self, seed: int | None) -> None:
        self.seed = seed
        self._rng = random.Random(seed)

    def add(self, rule: FaultRule) -> FaultRule:
        rule.rule_id = next(self._ids)
        self.rules.append(rule)
        return rule

    def clear(self, kind: str | None = None) -> None:
        self.rules = [r for r in self.rules if kind is not None and r.kind != kind]

    def fire(self, kind: str, method: str = "", path: str = "") -> FaultRule | None:
        """The first live rule of ``kind`` matching the request that fires on this draw, else None."""
        for rule in self.rules:
            if rule.kind != kind or rule.exhausted or not rule.matches(method, path):
                continue
            rule.seen += 1
            if rule.count is not None or self._rng.random() < rule.probability:
                rule.fired += 1
                return rule
        return None

    def draw(self, rule: FaultRule) -> bool:
        """One draw of a given rule (WebSocket faults draw once per connection and rule)."""
        if rule.exhausted:
            return False
        rule.seen += 1
        if rule.count is not None or self._rng.random() < rule.probability:
            rule.fired += 1
            return True
        return False

    def active(self, kind: str) -> list[FaultRule]:
        return [r for r in self.rules if r.kind == kind and not r.exhausted]

    def clock_skew_ms(self) -> int:
        return sum(r.ms for r in self.active("clock_skew"))

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "rules": [r.to_json() for r in self.rules]}

    def apply_json(self, payload: dict[str, Any]) -> None:
        """``POST /fake/faults``: ``{"clear": true?, "seed": int?, "spec": "...", "faults": [rule, ...]}``."""
        if payload.get("clear"):
            self.clear()
        if "seed" in payload:
            self.reseed(payload["seed"])
        if payload.get("spec"):
            for rule in parse_spec(str(payload["spec"])):
                self.add(rule)
        for item in payload.get("faults", []) or []:
            self.add(rule_from_json(item))


def rule_from_json(item: dict[str, Any]) -> FaultRule:
    allowed = {"kind", "probability", "count", "endpoint", "ms", "status", "parts", "mode"}
    unknown = set(item) - allowed
    if unknown:
        raise ValueError(f"unknown fault fields {sorted(unknown)}; allowed {sorted(allowed)}")
    return FaultRule(**item)


def parse_duration_ms(text: str) -> int:
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"bad duration {text!r}; use e.g. 200ms or 2s")
    value = float(m.group(1))
    return int(value * 1000) if m.group(2) == "s" else int(value)


def parse_spec(spec: str) -> list[FaultRule]:
    """``--faults`` text to rules (grammar in the module docstring); ValueError with the offending item."""
    rules = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        item, _, endpoint = item.partition("@")
        head, *opts = item.split(":")
        kind, _, value = head.partition("=")
        kw: dict[str, Any] = {"kind": kind.strip(), "endpoint": endpoint.strip() or None}
        value = value.strip()
        try:
            if value:
                if value.startswith("x") or value.endswith("x"):
                    kw["count"] = int(value.strip("x"))
                elif _DURATION.match(value):
                    kw["ms"] = parse_duration_ms(value)
                else:
                    kw["probability"] = float(value)
            for opt in opts:
                key, _, val = opt.partition("=")
                key = key.strip()
                if key == "ms":
                    kw["ms"] = parse_duration_ms(val) if _DURATION.match(val.strip()) else int(val)
                elif key in ("status", "parts", "count"):
                    kw[key] = int(val)
                elif key == "p":
                    kw["probability"] = float(val)
                elif key == "mode":
                    kw["mode"] = val.strip()
                else:
                    raise ValueError(f"unknown option {key!r}")
            rules.append(FaultRule(**kw))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"bad fault {raw.strip()!r}: {exc}") from exc
    return rules
