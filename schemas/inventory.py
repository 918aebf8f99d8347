"""Inventory service: reservations per saga, never oversell."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from schemas.base import Message
from schemas.common import LineItem, OrderId, Sku


class ReserveInventory(Message):
    TYPE: ClassVar[str] = "inventory.ReserveInventory.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId
    items: tuple[LineItem, ...] = Field(min_length=1, max_length=100)


class ReleaseInventory(Message):
    TYPE: ClassVar[str] = "inventory.ReleaseInventory.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId


class InventoryReserved(Message):
    TYPE: ClassVar[str] = "inventory.InventoryReserved.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    reservation_id: str


class InventoryUnavailable(Message):
    TYPE: ClassVar[str] = "inventory.InventoryUnavailable.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    skus: tuple[Sku, ...]
    #: True when the reservation was refused because it had already been released (tombstone).
    released_before_reserve: bool = False


class InventoryReleased(Message):
    TYPE: ClassVar[str] = "inventory.InventoryReleased.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    units_released: int
