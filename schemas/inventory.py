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
    #: when a SKU is short: True records a backorder and takes no stock (``InventoryBackordered``),
    #: False refuses (``InventoryUnavailable``)
    allow_backorder: bool = False


class ReleaseInventory(Message):
    TYPE: ClassVar[str] = "inventory.ReleaseInventory.v1"
    KIND: ClassVar[str] = "command"
    order_id: OrderId


class RestockItems(Message):
    """Put back on the shelf what the order's reservation took (a returned order), once."""

    TYPE: ClassVar[str] = "inventory.RestockItems.v1"
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


class InventoryBackordered(Message):
    """Some SKUs were short and the order may wait: a backorder is recorded, no stock taken."""

    TYPE: ClassVar[str] = "inventory.InventoryBackordered.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    #: the short SKUs
    skus: tuple[Sku, ...]


class ItemsRestocked(Message):
    TYPE: ClassVar[str] = "inventory.ItemsRestocked.v1"
    KIND: ClassVar[str] = "reply"
    order_id: OrderId
    #: units put back now or by an earlier delivery of the same command; 0: nothing to put back
    units_restocked: int = Field(ge=0)
