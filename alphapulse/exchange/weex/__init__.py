"""WEEX USDT-margined perpetual futures (contract API V3): signing, client, live feed, broker and a local fake.

Facts about the API are collected in the project's reference notes; nothing in the test suite reaches the
real exchange: every test runs against :mod:`alphapulse.exchange.weex.fake` on 127.0.0.1.
"""
