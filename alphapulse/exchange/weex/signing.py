"""Request signing for WEEX's private endpoints: one definition, used by our client and checked by our fake.

``ACCESS-SIGN = base64(HMAC_SHA256(secret, timestamp + METHOD + path + ("?" + query if any) + body))``, where
``path`` is the path as sent (starting with ``/``), ``query`` is the query string exactly as sent (order kept,
percent-encoded) and ``body`` the exact JSON text sent (empty for GET).  The private WebSocket signs
``timestamp + "/v3/ws/private"`` with no method and no body.  The server must see the same bytes the client
signed, which is why callers pass the encoded query and body they are about to send, never a dict.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable
from urllib.parse import quote

WS_PRIVATE_PATH = "/v3/ws/private"
#: Headers of a signed request (the content type is added for POST and DELETE by the client).
HEADER_KEY, HEADER_SIGN, HEADER_TIMESTAMP, HEADER_PASSPHRASE = (
    "ACCESS-KEY", "ACCESS-SIGN", "ACCESS-TIMESTAMP", "ACCESS-PASSPHRASE")


def prehash(timestamp_ms: int | str, method: str, path: str, query: str = "", body: str = "") -> str:
    """The exact string WEEX signs for one request."""
    return f"{timestamp_ms}{method.upper()}{path}{'?' + query if query else ''}{body}"


def sign(secret: str, message: str) -> str:
    """base64 of HMAC-SHA256(secret, message)."""
    digest = hmac.new(secret.encode(), message.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def sign_request(secret: str, timestamp_ms: int | str, method: str, path: str, query: str = "", body: str = "") -> str:
    return sign(secret, prehash(timestamp_ms, method, path, query, body))


def sign_ws_login(secret: str, timestamp_ms: int | str) -> str:
    return sign(secret, f"{timestamp_ms}{WS_PRIVATE_PATH}")


def encode_query(params: Iterable[tuple[str, object]]) -> str:
    """Query string in the given order, booleans as ``true``/``false``, values percent-encoded.

    The caller sends exactly this string, so the signature covers the bytes on the wire.
    """
    parts = []
    for k, v in params:
        if v is None:
            continue
        text = ("true" if v else "false") if isinstance(v, bool) else str(v)
        parts.append(f"{quote(str(k), safe='')}={quote(text, safe='')}")
    return "&".join(parts)


def signed_headers(api_key: str, secret: str, passphrase: str, timestamp_ms: int, method: str, path: str,
                   query: str = "", body: str = "") -> dict[str, str]:
    """The four authentication headers (plus the JSON content type for requests with a body method)."""
    headers = {
        HEADER_KEY: api_key,
        HEADER_SIGN: sign_request(secret, timestamp_ms, method, path, query, body),
        HEADER_TIMESTAMP: str(timestamp_ms),
        HEADER_PASSPHRASE: passphrase,
    }
    if method.upper() in ("POST", "DELETE"):
        headers["Content-Type"] = "application/json"
    return headers


def verify(secret: str, signature: str, timestamp_ms: int | str, method: str, path: str, query: str = "",
           body: str = "") -> bool:
    """Constant-time check of a received signature (the fake exchange's side)."""
    expected = sign_request(secret, timestamp_ms, method, path, query, body)
    return hmac.compare_digest(expected.encode(), signature.encode())
