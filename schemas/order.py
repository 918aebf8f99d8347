"""Order service: commands it obeys, replies it sends, public facts it publishes."""

from __future__ import annotations

from typing import ClassVar, Literal

from schemas.base import Message
from schemas.common import Currency, FactCurrency, MinorUnits, OrderId, Token

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
