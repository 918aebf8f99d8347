"""Order service: commands it obeys, replies it sends, public facts it publishes."""

from __future__ import annotations

from typing import ClassVar, Literal

from schemas.base import Message
from schemas.common import Currency, FactCurrency, MinorUnits, OrderId, Reason, Token

#: Why an order was cancelled: a code, never free text (the fact is public).
CancelReason = Literal["checkout_compensated", "operator_cancelled"]


class CreateOrder(Message):
    TYPE: ClassVar[str] = "order.CreateOrder.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId
    customer_id: Token
    amount_minor: MinorUnits
    currency: Currency


class CompleteOrder(Message):
    TYPE: ClassVar[str] = "order.CompleteOrder.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId


class CancelOrder(Message):
    TYPE: ClassVar[str] = "order.CancelOrder.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId
    reason: CancelReason


class OrderCreated(Message):
    TYPE: ClassVar[str] = "order.OrderCreated.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId


class OrderCompleted(Message):
    """Reply to the process manager, and also the public fact fanned out on ``sagabus.facts``."""

    TYPE: ClassVar[str] = "order.OrderCompleted.v1"
    KIND: ClassVar[str] = "fact"
    order_id: OrderId
    customer_id: Token
    amount_minor: MinorUnits
    currency: FactCurrency
    duration_ms: int


class OrderCancelled(Message):
    """Reply to the process manager, and also the public fact fanned out on ``sagabus.facts``."""

    TYPE: ClassVar[str] = "order.OrderCancelled.v1"
    KIND: ClassVar[str] = "fact"
    order_id: OrderId
    customer_id: Token
    amount_minor: MinorUnits
    currency: FactCurrency
    duration_ms: int
    reason: CancelReason
    outcome: Literal["cancelled", "needs_manual"] = "cancelled"


# -- the returns saga ---------------------------------------------------------------------------


class MarkReturnPending(Message):
    """A completed order is being returned: RETURN_PENDING until the return completes (or is
    cancelled)."""

    TYPE: ClassVar[str] = "order.MarkReturnPending.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId


class CancelReturn(Message):
    """Undo ``MarkReturnPending``: RETURN_PENDING -> COMPLETED."""

    TYPE: ClassVar[str] = "order.CancelReturn.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId


class CompleteReturn(Message):
    """RETURN_PENDING -> RETURNED; answered with the public fact ``OrderReturned``."""

    TYPE: ClassVar[str] = "order.CompleteReturn.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId


class OrderReturnPending(Message):
    TYPE: ClassVar[str] = "order.OrderReturnPending.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId


class OrderReturnRefused(Message):
    """The order cannot be returned: "order not completed" (unknown, pending, cancelled,
    backordered) or "order already returned"."""

    TYPE: ClassVar[str] = "order.OrderReturnRefused.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    reason: Reason


class OrderReturnCancelled(Message):
    TYPE: ClassVar[str] = "order.OrderReturnCancelled.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    #: False: the order was not RETURN_PENDING (a repeat, or nothing to cancel)
    had_return: bool


class OrderReturned(Message):
    """Reply to the process manager, and also the public fact fanned out on ``sagabus.facts``."""

    TYPE: ClassVar[str] = "order.OrderReturned.v1"
    KIND: ClassVar[str] = "fact"
    order_id: OrderId
    customer_id: Token
    amount_minor: MinorUnits
    currency: FactCurrency


# -- backorders ---------------------------------------------------------------------------------


class MarkOrderBackordered(Message):
    """An order whose stock is short waits for it: PENDING -> BACKORDERED."""

    TYPE: ClassVar[str] = "order.MarkOrderBackordered.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId


class OrderBackordered(Message):
    """Reply to the process manager, and also the public fact fanned out on ``sagabus.facts``."""

    TYPE: ClassVar[str] = "order.OrderBackordered.v1"
    KIND: ClassVar[str] = "fact"
    order_id: OrderId
    customer_id: Token
    amount_minor: MinorUnits
    currency: FactCurrency
