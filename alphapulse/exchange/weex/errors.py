"""Typed errors for WEEX answers, and the one rule that decides whether a body is an error.

Why typed: the broker and the feed must react differently to "try again later" (5xx, timeouts, 429),
"our clock drifted" (timestamp window), "this order does not exist" (reconciliation) and "this request
is wrong" (never retry).  Mapping codes in one place keeps that decision out of every call site.

WEEX answers Binance-style ``{"code": -1121, "msg": "..."}`` bodies, sometimes with HTTP 200, so the
status alone cannot be trusted: :func:`raise_for_body` is the single gate every response goes through.
"""

from __future__ import annotations

from typing import Any

#: Codes of the timestamp window (our clock, or the offset we keep, is off): re-sync and retry once.
TIMESTAMP_CODES = frozenset({-1045, -1046})
#: Authentication failures (key, signature, passphrase, permissions), the timestamp codes excepted.
AUTH_CODES = frozenset(range(-1049, -1039)) - TIMESTAMP_CODES
INVALID_ORDER_CODES = frozenset({-1115, -1116, -1117, -3007})
#: -2200 order not found; -3200 is "order not found" on contracts (ccxt calls it InvalidOrder, but for
#: reconciliation the meaning that matters is "the exchange has no such order").
ORDER_NOT_FOUND_CODES = frozenset({-2200, -3200})
UNKNOWN_SYMBOL_CODES = frozenset({-1121})


class WeexError(Exception):
    """An error answer from WEEX (or no usable answer at all).

    ``code`` is the exchange's code as an int when it has one (else None), ``msg`` its message,
    ``http_status`` the HTTP status (None when no response arrived), ``endpoint`` e.g.
    ``"GET /capi/v3/order"``.  ``retryable`` says whether the same request may succeed later unchanged.
    """

    def __init__(self, code: int | None, msg: str, http_status: int | None = None, endpoint: str = "") -> None:
        self.code = code
        self.msg = msg
        self.http_status = http_status
        self.endpoint = endpoint
        super().__init__(f"{endpoint}: HTTP {http_status} code {code}: {msg}")

    @property
    def retryable(self) -> bool:
        return False


class AuthError(WeexError):
    """Key, signature, passphrase or permission rejected: retrying the same request cannot help."""


class TimestampError(WeexError):
    """Our timestamp is outside the server's window: re-sync the offset, then a retry can succeed."""

    @property
    def retryable(self) -> bool:
        return True


class RateLimitError(WeexError):
    """HTTP 429: back off; ``retry_after_s`` is the server's Retry-After when it sent one."""

    def __init__(self, code: int | None, msg: str, http_status: int | None = 429, endpoint: str = "",
                 retry_after_s: float | None = None) -> None:
        super().__init__(code, msg, http_status, endpoint)
        self.retry_after_s = retry_after_s

    @property
    def retryable(self) -> bool:
        return True


class InvalidOrderError(WeexError):
    """The order was refused as malformed (size, price, precision, reduce-only...): never resend it as is."""


class OrderNotFoundError(WeexError):
    """The exchange knows no such order (id or client id)."""


class UnknownSymbolError(WeexError):
    """The symbol is not traded on this market."""


class ExchangeUnavailable(WeexError):
    """5xx, a connection error or a timeout: no (usable) answer, so the outcome of a write is unknown."""

    @property
    def retryable(self) -> bool:
        return True


def _int_code(code: Any) -> int | None:
    if isinstance(code, bool):
        return None
    if isinstance(code, int):
        return code
    if isinstance(code, str):
        try:
            return int(code.strip())
        except ValueError:
            return None
    return None


def error_for_code(code: Any, msg: str, http_status: int | None = None, endpoint: str = "") -> WeexError:
    """The typed error for a WEEX code (a generic :class:`WeexError` for codes we do not classify)."""
    c = _int_code(code)
    cls: type[WeexError] = WeexError
    if c in TIMESTAMP_CODES:
        cls = TimestampError
    elif c in AUTH_CODES:
        cls = AuthError
    elif c in INVALID_ORDER_CODES:
        cls = InvalidOrderError
    elif c in ORDER_NOT_FOUND_CODES:
        cls = OrderNotFoundError
    elif c in UNKNOWN_SYMBOL_CODES:
        cls = UnknownSymbolError
    return cls(c, msg, http_status, endpoint)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header given in seconds (HTTP dates are not used by WEEX); else None."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def is_success_body(body: Any) -> bool:
    """Whether a parsed JSON body is a success: no ``msg``, or exactly ``{"code": "200", "msg": "success"}``."""
    if not isinstance(body, dict) or "msg" not in body:
        return True
    return str(body.get("code")) == "200" and body.get("msg") == "success"


def raise_for_body(status: int, body: Any, endpoint: str, retry_after: str | None = None) -> None:
    """Raise the typed error for a response, or return if it is a success.

    Order of the checks, and why: 429 first (it must always back off, whatever the body says); then a
    body carrying ``msg`` (WEEX reports errors with HTTP 200 too, and a 4xx with a code is more precise
    than its status); then 5xx (the exchange is unwell); then any other non-2xx status.
    """
    if status == 429:
        code = _int_code(body.get("code")) if isinstance(body, dict) else None
        msg = str(body.get("msg", "rate limited")) if isinstance(body, dict) else "rate limited"
        raise RateLimitError(code, msg, status, endpoint, parse_retry_after(retry_after))
    if not is_success_body(body):
        assert isinstance(body, dict)
        err = error_for_code(body.get("code"), str(body.get("msg")), status, endpoint)
        if status >= 500 and type(err) is WeexError:  # an unclassified code on a 5xx: the server is unwell
            raise ExchangeUnavailable(err.code, err.msg, status, endpoint)
        raise err
    if status >= 500:
        raise ExchangeUnavailable(None, f"server error {status}", status, endpoint)
    if not 200 <= status < 300:
        raise WeexError(None, f"unexpected HTTP status {status}", status, endpoint)
