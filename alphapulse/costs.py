"""Trading costs: taker fee and slippage. The one definition the paper broker, the backtester and the
training environment all use, so a result in one means the same in the others.

Money is ``Decimal`` quantised to 1e-8 USDT (the exchange's precision), so fills, fees and PnL
reconcile to the cent by construction.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

from alphapulse.domain import Side

MONEY_Q = Decimal("0.00000001")
BPS = Decimal(10_000)


def money(x: Decimal) -> Decimal:
    """Quantise an amount of quote currency to the booking precision."""
    return x.quantize(MONEY_Q, rounding=ROUND_HALF_EVEN)


def price_with_slippage(side: Side, reference: Decimal, slippage_bps: Decimal) -> Decimal:
    """A market order pays ``slippage_bps`` against it: buys fill higher, sells lower."""
    adj = reference * slippage_bps / BPS
    return money(reference + adj if side is Side.BUY else reference - adj)


def taker_fee(qty: Decimal, price: Decimal, rate: Decimal) -> Decimal:
    """Fee on the traded notional, always >= 0."""
    return money(abs(qty) * price * rate)


def funding_payment(position_qty: Decimal, mark_price: Decimal, rate: Decimal) -> Decimal:
    """What the account *pays* at one funding event: ``position_qty * mark_price * rate``, quantised.

    Perpetual-futures convention: with a positive rate longs pay shorts, with a negative rate shorts pay
    longs. So the result is positive (cash out) for a long with a positive rate or a short with a negative
    one, negative (cash in) for the opposite, and exactly zero when flat. Book it as
    ``equity -= funding_payment(...)``; it is quantised per event like every other amount of money, so a
    trades/summary file reconciles to the 1e-8 by summing the booked events.
    """
    return money(position_qty * mark_price * rate)
