"""The public entry point of the returns saga."""

from __future__ import annotations

from typing import ClassVar

from schemas.base import Message
from schemas.common import OrderId, Reason


class StartReturn(Message):
    """Start the return of a completed order. Published by any AMQP client to exchange
    ``sagabus.commands`` with routing key ``returns.start``. One return per order: the saga id
    is derived from ``order_id``."""

    TYPE: ClassVar[str] = "returns.StartReturn.v1"
    KIND: ClassVar[str] = "command"
    SAGA_KEY: ClassVar[str] = "order_id"

    order_id: OrderId
    reason: Reason | None = None
