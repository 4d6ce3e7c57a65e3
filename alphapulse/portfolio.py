"""Pure accounting for one USDT-margined perpetual position: cash, PnL, equity, drawdown, daily roll-over.

No I/O: the engine feeds it fills and marks, the store persists its ``snapshot()``.  Cash is the wallet
balance (initial equity + realized PnL - fees); equity adds the unrealized PnL at the last mark.  All
booked amounts are quantised with :func:`alphapulse.costs.money`, so ``cash - initial`` equals the sum of
every fill's ``realized_pnl - fee`` exactly (funding payments and reconciliation adjustments are booked as
cash-flow fills), which is what ``trades.csv`` lets an operator check.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from alphapulse.costs import money
from alphapulse.domain import CASH_FLOW_SIDES, Fill, Position, Side

DAY_MS = 86_400_000
ZERO = Decimal(0)


def utc_day(ts_ms: int) -> int:
    """Days since the epoch (UTC) of a timestamp: the daily loss limit resets when this changes."""
    return ts_ms // DAY_MS


def realized_on_fill(pos: Position, signed_qty: Decimal, price: Decimal) -> tuple[Position, Decimal]:
    """New position and the gross PnL realized by trading ``signed_qty`` at ``price`` (one-way netting)."""
    q = pos.qty
    if q == 0 or (q > 0) == (signed_qty > 0):
        new_q = q + signed_qty
        entry = (abs(q) * pos.entry_price + abs(signed_qty) * price) / abs(new_q)
        return Position(pos.symbol, new_q, entry), ZERO
    closing = min(abs(q), abs(signed_qty))
    direction = 1 if q > 0 else -1
    pnl = money(closing * (price - pos.entry_price) * direction)
    new_q = q + signed_qty
    if new_q == 0:
        return Position(pos.symbol, ZERO, ZERO), pnl
    if (new_q > 0) == (q > 0):
        return Position(pos.symbol, new_q, pos.entry_price), pnl
    return Position(pos.symbol, new_q, price), pnl  # flipped: the remainder opens at the fill price


@dataclass
class Portfolio:
    symbol: str
    initial_equity: Decimal
    cash: Decimal
    position: Position
    mark_price: Decimal = ZERO
    realized_pnl: Decimal = ZERO  # cumulative gross
    fees_paid: Decimal = ZERO
    funding: Decimal = ZERO  # cumulative funding received (< 0: paid)
    adjustments: Decimal = ZERO  # cumulative balance corrections from reconciliation with the exchange
    peak_equity: Decimal = ZERO
    day: int = -1
    day_start_equity: Decimal = ZERO
    fills: int = 0
    _last_ts: int = field(default=0, repr=False)
    # (cash, position, mark_price, unrealized_pnl, equity) of the last valuation, keyed by the identity of its
    # immutable inputs: the per-candle path asks for equity ~5 times between changes (mark, state machine,
    # sizing, risk check, the driver), and each recomputation is a Decimal multiply and quantize.
    _valued: tuple[Decimal, Position, Decimal, Decimal, Decimal] | None = field(
        default=None, repr=False, compare=False)
    # (equity, day_start_equity, peak_equity, daily_loss, drawdown): the same memo for the two loss fractions.
    _losses: tuple[Decimal, Decimal, Decimal, float, float] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def new(cls, symbol: str, initial_equity: Decimal) -> Portfolio:
        eq = money(initial_equity)
        return cls(symbol, eq, eq, Position(symbol), peak_equity=eq, day_start_equity=eq)

    # ---- derived values -------------------------------------------------------------------
    def _valuation(self) -> tuple[Decimal, Decimal, Decimal, Decimal, Decimal]:
        """The cached valuation tuple, recomputed only when cash, position or mark price was replaced.

        Sound because all three are immutable values (Decimal, frozen Position) that change only by
        assignment, so an identity check is a complete staleness check.
        """
        cash, pos, mark = self.cash, self.position, self.mark_price
        v = self._valued
        if v is not None and v[0] is cash and v[1] is pos and v[2] is mark:
            return v  # type: ignore[return-value]
        if pos.qty == 0 or mark == 0:  # flat: equity *is* cash, the same object from bar to bar
            self._valued = v = (cash, pos, mark, ZERO, cash)
        else:
            upnl = money(pos.qty * (mark - pos.entry_price))
            self._valued = v = (cash, pos, mark, upnl, cash + upnl)
        return v  # type: ignore[return-value]

    @property
    def unrealized_pnl(self) -> Decimal:
        return self._valuation()[3]

    @property
    def equity(self) -> Decimal:
        return self._valuation()[4]

    @property
    def notional(self) -> Decimal:
        return abs(self.position.qty) * self.mark_price

    @property
    def daily_pnl(self) -> Decimal:
        return self.equity - self.day_start_equity

    @property
    def drawdown(self) -> float:
        """Fraction below the peak equity, >= 0."""
        return self.drawdown_at(self.equity)

    def drawdown_at(self, equity: Decimal) -> float:
        """:attr:`drawdown` for an equity the caller already computed (the per-candle path does it once)."""
        if self.peak_equity <= 0:
            return 0.0
        return max(0.0, float(1 - equity / self.peak_equity))

    @property
    def daily_loss(self) -> float:
        """Loss since the start of the UTC day as a fraction of that day's starting equity, >= 0."""
        return self.daily_loss_at(self.equity)

    def daily_loss_at(self, equity: Decimal) -> float:
        if self.day_start_equity <= 0:
            return 0.0
        return max(0.0, float((self.day_start_equity - equity) / self.day_start_equity))

    def loss_fractions(self, equity: Decimal) -> tuple[float, float]:
        """``(daily_loss_at(equity), drawdown_at(equity))``, the state machine's inputs on every candle.

        Memoised on the identity of equity, day-start equity and peak (immutable Decimals): while flat or
        between fills nothing changes from bar to bar, and each fraction is a Decimal division.
        """
        day0, peak = self.day_start_equity, self.peak_equity
        m = self._losses
        if m is not None and m[0] is equity and m[1] is day0 and m[2] is peak:
            return m[3], m[4]
        daily, dd = self.daily_loss_at(equity), self.drawdown_at(equity)
        self._losses = (equity, day0, peak, daily, dd)
        return daily, dd

    @property
    def leverage(self) -> float:
        eq = self.equity
        return float(self.notional / eq) if eq > 0 else float("inf") if self.notional > 0 else 0.0

    # ---- events ---------------------------------------------------------------------------
    def mark(self, price: Decimal, ts_ms: int) -> bool:
        """Mark to ``price`` at ``ts_ms``; returns True when a new UTC day started (daily PnL resets)."""
        self.mark_price = price
        self._last_ts = ts_ms
        day = utc_day(ts_ms)
        rolled = day != self.day
        eq = self.equity
        if rolled:
            # The day's reference is the equity at the first mark of the day.
            self.day = day
            self.day_start_equity = eq
        if eq > self.peak_equity:
            self.peak_equity = eq
        return rolled

    def apply_fill(self, fill: Fill) -> Fill:
        """Book a fill; returns it with ``realized_pnl`` filled in (gross, before its fee).

        A cash flow (funding, adjustment) moves cash by its ``realized_pnl`` and leaves the position alone.
        """
        if fill.side in CASH_FLOW_SIDES:
            amount = money(fill.realized_pnl)
            self.cash += amount
            if fill.side is Side.FUNDING:
                self.funding += amount
            else:
                self.adjustments += amount
            return fill if amount == fill.realized_pnl else replace(fill, realized_pnl=amount)
        self.position, pnl = realized_on_fill(self.position, fill.signed_qty, fill.price)
        if fill.trade_id is not None:  # an exchange's execution: its realized PnL is the truth (same to 1e-8)
            pnl = money(fill.realized_pnl)
        self.realized_pnl += pnl
        self.fees_paid += fill.fee
        self.cash += pnl - fill.fee
        self.fills += 1
        if self.mark_price == 0:
            self.mark_price = fill.price
        return replace(fill, realized_pnl=pnl)

    def adopt_position(self, qty: Decimal, entry_price: Decimal) -> None:
        """Take the exchange's position as ours (reconciliation): no cash moves, the mark values it from now."""
        self.position = Position(self.symbol, qty, entry_price if qty else ZERO)

    def rebase(self) -> None:
        """Measure drawdown and the day's loss from the current equity (live trading starts from the exchange's
        account, not from the paper books that came before it)."""
        self.peak_equity = self.day_start_equity = self.equity

    def reset_peak(self) -> None:
        """After an operator resumes from a drawdown halt, measure drawdown from here."""
        self.peak_equity = self.equity

    # ---- persistence ----------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "initial_equity": str(self.initial_equity),
            "cash": str(self.cash),
            "qty": str(self.position.qty),
            "entry_price": str(self.position.entry_price),
            "mark_price": str(self.mark_price),
            "realized_pnl": str(self.realized_pnl),
            "fees_paid": str(self.fees_paid),
            "funding": str(self.funding),
            "adjustments": str(self.adjustments),
            "peak_equity": str(self.peak_equity),
            "day": self.day,
            "day_start_equity": str(self.day_start_equity),
            "fills": self.fills,
        }

    @classmethod
    def restore(cls, snap: dict[str, Any]) -> Portfolio:
        d = Decimal
        return cls(
            symbol=snap["symbol"],
            initial_equity=d(snap["initial_equity"]),
            cash=d(snap["cash"]),
            position=Position(snap["symbol"], d(snap["qty"]), d(snap["entry_price"])),
            mark_price=d(snap["mark_price"]),
            realized_pnl=d(snap["realized_pnl"]),
            fees_paid=d(snap["fees_paid"]),
            funding=d(snap.get("funding", "0")),
            adjustments=d(snap.get("adjustments", "0")),
            peak_equity=d(snap["peak_equity"]),
            day=int(snap["day"]),
            day_start_equity=d(snap["day_start_equity"]),
            fills=int(snap["fills"]),
        )
