"""Risk service: fraud screening of an order before any money moves. Screening changes nothing
that would need undoing, so it has no compensation command."""

from __future__ import annotations

from typing import ClassVar

from schemas.base import Message
from schemas.common import Currency, MinorUnits, OrderId, Reason, Token


class ScreenOrder(Message):
    TYPE: ClassVar[str] = "risk.ScreenOrder.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId
    customer_id: Token
    amount_minor: MinorUnits
    currency: Currency


class RiskApproved(Message):
    TYPE: ClassVar[str] = "risk.RiskApproved.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    screening_id: Token


class RiskRejected(Message):
    TYPE: ClassVar[str] = "risk.RiskRejected.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    #: ``amount_above_limit`` or ``customer_blocked``
    reason: Reason
