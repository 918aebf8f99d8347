"""Shipping service: books shipments with a flaky carrier."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from schemas.base import Message
from schemas.common import LineItem, OrderId, Reason, ShippingAddress, Token


class CreateShipment(Message):
    TYPE: ClassVar[str] = "shipping.CreateShipment.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId
    items: tuple[LineItem, ...] = Field(min_length=1, max_length=100)
    shipping_address: ShippingAddress


class CancelShipment(Message):
    TYPE: ClassVar[str] = "shipping.CancelShipment.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId


class ShipmentCreated(Message):
    TYPE: ClassVar[str] = "shipping.ShipmentCreated.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    tracking_number: Token


class ShipmentFailed(Message):
    TYPE: ClassVar[str] = "shipping.ShipmentFailed.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    reason: Reason


class ShipmentCancelled(Message):
    TYPE: ClassVar[str] = "shipping.ShipmentCancelled.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    had_shipment: bool


class BookPickup(Message):
    """Have the carrier collect a returned parcel at the order's shipping address."""

    TYPE: ClassVar[str] = "shipping.BookPickup.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId


class CancelPickup(Message):
    TYPE: ClassVar[str] = "shipping.CancelPickup.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId


class PickupBooked(Message):
    TYPE: ClassVar[str] = "shipping.PickupBooked.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    pickup_id: Token


class PickupFailed(Message):
    TYPE: ClassVar[str] = "shipping.PickupFailed.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    reason: Reason


class PickupCancelled(Message):
    TYPE: ClassVar[str] = "shipping.PickupCancelled.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    had_pickup: bool
