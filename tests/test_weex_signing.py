"""Signing: checked against openssl (an implementation that is not ours) and the reference's example prehash."""

from __future__ import annotations

import base64
import shutil
import subprocess

import orjson
import pytest

from alphapulse.exchange.weex import signing

REFERENCE_PREHASH = (
    '1733011200000POST/capi/v3/order{"symbol":"BTCUSDT","side":"BUY","quantity":"0.001","type":"MARKET",'
    '"positionSide":"LONG","newClientOrderId":"ap-1"}'
)
SECRET = "wX9-secret/with+odd=chars"


def openssl_hmac_b64(secret: str, message: str) -> str:
    """base64(HMAC-SHA256) computed by the openssl CLI, independently of Python's hmac module."""
    out = subprocess.run(["openssl", "dgst", "-sha256", "-hmac", secret, "-binary"], input=message.encode(),
                         capture_output=True, check=True, timeout=10)
    return base64.b64encode(out.stdout).decode()


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")


@needs_openssl
def test_signature_matches_openssl_for_the_reference_prehash() -> None:
    assert signing.sign(SECRET, REFERENCE_PREHASH) == openssl_hmac_b64(SECRET, REFERENCE_PREHASH)


def test_fixed_vector_written_down() -> None:
    """A vector frozen in the test (computed once with ``openssl dgst -sha256 -hmac``), so a change in
    our code cannot silently agree with itself."""
    assert signing.sign("secret", "1733011200000GET/capi/v3/market/time") == \
        "7obaUGQmbTh/a7JuxlMv74Itl0yw2h05mPIl1SutnKg="


@needs_openssl
def test_fixed_vector_is_what_openssl_says() -> None:
    assert openssl_hmac_b64("secret", "1733011200000GET/capi/v3/market/time") == \
        "7obaUGQmbTh/a7JuxlMv74Itl0yw2h05mPIl1SutnKg="


def test_reference_example_prehash_from_compact_json_body() -> None:
    """The body our client would send (orjson, keys in insertion order, no spaces) reproduces the
    reference's example byte for byte."""
    body = orjson.dumps({"symbol": "BTCUSDT", "side": "BUY", "quantity": "0.001", "type": "MARKET",
                         "positionSide": "LONG", "newClientOrderId": "ap-1"}).decode()
    assert signing.prehash(1733011200000, "post", "/capi/v3/order", "", body) == REFERENCE_PREHASH


@needs_openssl
def test_get_with_query_is_signed_with_question_mark_and_query_in_sent_order() -> None:
    q = signing.encode_query([("symbol", "BTCUSDT"), ("orderId", 123), ("origClientOrderId", None)])
    assert q == "symbol=BTCUSDT&orderId=123"
    msg = signing.prehash("1733011200000", "GET", "/capi/v3/order", q)
    assert msg == "1733011200000GET/capi/v3/order?symbol=BTCUSDT&orderId=123"
    headers = signing.signed_headers("k", SECRET, "p", 1733011200000, "GET", "/capi/v3/order", q)
    assert headers[signing.HEADER_SIGN] == openssl_hmac_b64(SECRET, msg)
    assert "Content-Type" not in headers
    assert signing.signed_headers("k", SECRET, "p", 1, "DELETE", "/x")["Content-Type"] == "application/json"


def test_encode_query_keeps_order_booleans_and_percent_encoding() -> None:
    q = signing.encode_query([("z", 1), ("a", True), ("m", False), ("s", "a b/c&d=é"), ("skip", None)])
    assert q == "z=1&a=true&m=false&s=a%20b%2Fc%26d%3D%C3%A9"


def test_verify_rejects_any_changed_byte() -> None:
    sig = signing.sign_request(SECRET, 1, "GET", "/p", "a=1")
    assert signing.verify(SECRET, sig, 1, "GET", "/p", "a=1")
    assert not signing.verify(SECRET, sig, 1, "GET", "/p", "a=2")
    assert not signing.verify(SECRET, sig, 2, "GET", "/p", "a=1")
