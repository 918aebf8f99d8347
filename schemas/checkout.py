"""The public entry point: the command that starts a checkout saga."""

from __future__ import annotations

import uuid
from typing import ClassVar

from pydantic import Field, field_validator

from schemas.base import SAGA_NAMESPACE as SAGA_NAMESPACE
from schemas.base import Message, saga_id_for
from schemas.common import (
    MAX_TOTAL_MINOR,
    Currency,
    LineItem,
    OrderId,
    ShippingAddress,
    Token,
)


def saga_id_for_order(order_id: str) -> uuid.UUID:
    """The saga id of an order's checkout: one order, one saga, whoever sends the start."""
    return saga_id_for("checkout", order_id)


class StartCheckout(Message):
    """Start one checkout saga. Published by any AMQP client to exchange ``sagabus.commands``
    with routing key ``checkout.start``. The saga id is derived from ``order_id``, so a second
    StartCheckout for the same order starts nothing new."""

    TYPE: ClassVar[str] = "checkout.StartCheckout.v1"
    KIND: ClassVar[str] = "command"
    SAGA_KEY: ClassVar[str] = "order_id"

    order_id: OrderId
    customer_id: Token
    currency: Currency
    items: tuple[LineItem, ...] = Field(
        min_length=1,
        max_length=100,
        description=(
            "Two rules JSON Schema cannot express: no sku may repeat (sum the quantities into "
            "one line instead), and the total, the sum of quantity x unit_price_minor over the "
            f"items, must not exceed {MAX_TOTAL_MINOR} (10^12) minor units."
        ),
    )
    payment_token: Token
    shipping_address: ShippingAddress
    allow_backorder: bool = Field(
        default=False,
        description=(
            "When stock is short: false (the default) compensates the checkout; true records a "
            "backorder instead, releases the card hold and ends the order BACKORDERED (checkout "
            "v2 and later; a v1 saga ignores it)."
        ),
    )

    @field_validator("items")
    @classmethod
    def _distinct_skus_and_bounded_total(cls, items: tuple[LineItem, ...]) -> tuple[LineItem, ...]:
        skus = [i.sku for i in items]
        if len(skus) != len(set(skus)):
            raise ValueError("items must not repeat a sku; sum the quantities instead")
        total = sum(i.quantity * i.unit_price_minor for i in items)
        if total > MAX_TOTAL_MINOR:
            raise ValueError(
                f"the total of the items is {total} minor units, above the limit of 10^12"
            )
        return items

    @property
    def amount_minor(self) -> int:
        return sum(i.quantity * i.unit_price_minor for i in self.items)
