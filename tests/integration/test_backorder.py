"""The backorder path, on the real database (and, for the public fact, the real broker):
inventory's ReserveInventory with ``allow_backorder`` takes no stock and records a backorder,
its ReleaseInventory cancels it; the order's MarkOrderBackordered publishes OrderBackordered
once, and notification and analytics take it."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_asyncio
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import topology
from messaging.codec import encode
from messaging.consumer import Context, Handler
from messaging.db import create_schema
from messaging.errors import PermanentError
from messaging.service import Runtime
from messaging.settings import Settings
from participants.analytics import service as analytics
from participants.inventory import service as inventory
from participants.notification import service as notification
from participants.order import service as order
from schemas.base import Message
from schemas.common import LineItem
from schemas.inventory import (
    InventoryBackordered,
    InventoryReleased,
    InventoryReserved,
    InventoryUnavailable,
    ReleaseInventory,
    ReserveInventory,
)
from schemas.order import (
    CancelOrder,
    CompleteOrder,
    CreateOrder,
    MarkOrderBackordered,
    OrderBackordered,
    OrderCancelled,
    OrderCompleted,
)
from tests.support import count, deliver, delivery, facts, one, publish, replied, wait_for

pytestmark = pytest.mark.integration


async def run(engine: AsyncEngine, handler: Handler, service: str, body: Message) -> Context:
    return await deliver(engine, handler, service, body)


# -- inventory -----------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def stock(engine: AsyncEngine, database: Settings) -> dict[str, Handler]:
    definition = inventory.definition(database)
    await create_schema(engine, inventory.SCHEMA, inventory.metadata)
    return definition.handlers


async def levels(engine: AsyncEngine, *skus: str) -> tuple[int, ...]:
    return tuple([int((await one(engine, inventory.stock, sku=s)).available) for s in skus])


async def test_a_short_order_that_may_wait_is_backordered_and_takes_no_stock(
    engine: AsyncEngine, stock: dict[str, Handler], uid: str
) -> None:
    plenty, scarce, missing = f"SKU-BP-{uid}", f"SKU-BS-{uid}", f"SKU-BM-{uid}"
    order_id = f"bo-{uid}"
    async with engine.begin() as conn:
        await inventory.seed(conn, {plenty: 10, scarce: 1})
    items = (
        LineItem(sku=plenty, quantity=3, unit_price_minor=100),
        LineItem(sku=scarce, quantity=2, unit_price_minor=100),
        LineItem(sku=missing, quantity=1, unit_price_minor=100),
    )
    reserve = ReserveInventory(order_id=order_id, items=items, allow_backorder=True)
    expected = InventoryBackordered(order_id=order_id, skus=tuple(sorted((scarce, missing))))
    for _ in range(2):  # a re-send answers the same and takes nothing
        ctx = await run(engine, stock[ReserveInventory.TYPE], "inventory", reserve)
        assert replied(ctx) == expected
        assert await levels(engine, plenty, scarce) == (10, 1)  # not even the SKU in stock
    backorder = await one(engine, inventory.backorders, order_id=order_id)
    assert backorder.status == "OPEN"
    assert backorder.items == [i.model_dump() for i in items]
    assert (await one(engine, inventory.reservations, order_id=order_id)).status == "BACKORDERED"

    # the checkout is compensated: the backorder is cancelled, nothing is released
    for _ in range(2):
        ctx = await run(
            engine, stock[ReleaseInventory.TYPE], "inventory", ReleaseInventory(order_id=order_id)
        )
        assert replied(ctx) == InventoryReleased(order_id=order_id, units_released=0)
        assert (await one(engine, inventory.backorders, order_id=order_id)).status == "CANCELLED"
    assert await levels(engine, plenty, scarce) == (10, 1)
    # a late re-send of the reservation still answers as before, and takes nothing
    ctx = await run(engine, stock[ReserveInventory.TYPE], "inventory", reserve)
    assert replied(ctx) == expected
    assert await levels(engine, plenty, scarce) == (10, 1)


async def test_without_allow_backorder_a_short_order_is_refused_as_before(
    engine: AsyncEngine, stock: dict[str, Handler], uid: str
) -> None:
    sku = f"SKU-BN-{uid}"
    order_id = f"bo-no-{uid}"
    async with engine.begin() as conn:
        await inventory.seed(conn, {sku: 1})
    items = (LineItem(sku=sku, quantity=2, unit_price_minor=100),)
    ctx = await run(
        engine,
        stock[ReserveInventory.TYPE],
        "inventory",
        ReserveInventory(order_id=order_id, items=items),
    )
    assert replied(ctx) == InventoryUnavailable(order_id=order_id, skus=(sku,))
    assert await count(engine, inventory.backorders, order_id=order_id) == 0
    assert await levels(engine, sku) == (1,)


async def test_with_enough_stock_allow_backorder_reserves_as_usual(
    engine: AsyncEngine, stock: dict[str, Handler], uid: str
) -> None:
    sku = f"SKU-BY-{uid}"
    order_id = f"bo-yes-{uid}"
    async with engine.begin() as conn:
        await inventory.seed(conn, {sku: 2})
    items = (LineItem(sku=sku, quantity=2, unit_price_minor=100),)
    reserve = ReserveInventory(order_id=order_id, items=items, allow_backorder=True)
    ctx = await run(engine, stock[ReserveInventory.TYPE], "inventory", reserve)
    assert isinstance(replied(ctx), InventoryReserved)
    assert await levels(engine, sku) == (0,)
    assert await count(engine, inventory.backorders, order_id=order_id) == 0
    ctx = await run(
        engine, stock[ReleaseInventory.TYPE], "inventory", ReleaseInventory(order_id=order_id)
    )
    assert replied(ctx) == InventoryReleased(order_id=order_id, units_released=2)
    assert await levels(engine, sku) == (2,)


# -- order ---------------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def orders(engine: AsyncEngine, database: Settings) -> dict[str, Handler]:
    definition = order.definition(database)
    await create_schema(engine, order.SCHEMA, order.metadata)
    return definition.handlers


async def created(engine: AsyncEngine, handlers: dict[str, Handler], order_id: str) -> None:
    create = CreateOrder(order_id=order_id, customer_id="cus_b", amount_minor=900, currency="EUR")
    await run(engine, handlers[CreateOrder.TYPE], "order", create)


async def status_of(engine: AsyncEngine, order_id: str) -> str:
    return str((await one(engine, order.orders, order_id=order_id)).status)


async def test_an_order_in_its_checkout_is_backordered_once(
    engine: AsyncEngine, orders: dict[str, Handler], uid: str
) -> None:
    order_id = f"bo-order-{uid}"
    await created(engine, orders, order_id)
    mark = MarkOrderBackordered(order_id=order_id)
    expected = OrderBackordered(
        order_id=order_id, customer_id="cus_b", amount_minor=900, currency="EUR"
    )

    ctx = await run(engine, orders[MarkOrderBackordered.TYPE], "order", mark)
    assert replied(ctx) == expected
    assert facts(ctx) == [expected]
    assert await status_of(engine, order_id) == "BACKORDERED"
    ctx = await run(engine, orders[MarkOrderBackordered.TYPE], "order", mark)  # a re-send
    assert replied(ctx) == expected
    assert facts(ctx) == []

    # the stock came: the order completes (and its fact is published)
    ctx = await run(engine, orders[CompleteOrder.TYPE], "order", CompleteOrder(order_id=order_id))
    assert isinstance(replied(ctx), OrderCompleted)
    assert [type(f) for f in facts(ctx)] == [OrderCompleted]
    assert await status_of(engine, order_id) == "COMPLETED"
    with pytest.raises(PermanentError):  # not in its checkout any more
        await run(engine, orders[MarkOrderBackordered.TYPE], "order", mark)


async def test_a_backordered_order_may_be_cancelled(
    engine: AsyncEngine, orders: dict[str, Handler], uid: str
) -> None:
    order_id = f"bo-cancel-{uid}"
    await created(engine, orders, order_id)
    await run(
        engine, orders[MarkOrderBackordered.TYPE], "order", MarkOrderBackordered(order_id=order_id)
    )
    cancel = CancelOrder(order_id=order_id, reason="checkout_compensated")
    ctx = await run(engine, orders[CancelOrder.TYPE], "order", cancel)
    assert isinstance(replied(ctx), OrderCancelled)
    assert [type(f) for f in facts(ctx)] == [OrderCancelled]
    assert await status_of(engine, order_id) == "CANCELLED"


async def test_an_unknown_order_is_not_backordered(
    engine: AsyncEngine, orders: dict[str, Handler], uid: str
) -> None:
    order_id = f"bo-unknown-{uid}"
    with pytest.raises(PermanentError):
        await run(
            engine,
            orders[MarkOrderBackordered.TYPE],
            "order",
            MarkOrderBackordered(order_id=order_id),
        )
    assert await count(engine, order.orders, order_id=order_id) == 0


async def test_order_backordered_reaches_notification_and_analytics(
    services: Runtime, engine: AsyncEngine, amqp: AbstractRobustConnection, uid: str
) -> None:
    """Through the order's outbox and the fan-out: both choreographed consumers take the new
    fact (a type they had no handler for would be dead-lettered)."""
    order_id = f"bo-fact-{uid}"
    await created(engine, services.consumers["order"].handlers, order_id)

    async def backordered_count() -> int:
        async with engine.connect() as conn:
            found = await conn.execute(
                select(analytics.outcomes.c.count).where(
                    analytics.outcomes.c.outcome == "backordered"
                )
            )
            return int(found.scalar_one_or_none() or 0)

    before = await backordered_count()
    message = delivery(MarkOrderBackordered(order_id=order_id), step="backorder")
    exchange, key = topology.command_route("order", MarkOrderBackordered.TYPE)
    await publish(amqp, exchange, key, encode(message.envelope, message.body))

    async def emailed() -> Any:
        found = await count(
            engine, notification.notifications, order_id=order_id, template="order_backordered"
        )
        return found or None

    assert await wait_for(emailed, what="the order_backordered email") == 1

    async def counted() -> int:
        return await backordered_count() - before

    assert await wait_for(counted, what="the backordered outcome counted") == 1
    assert await status_of(engine, order_id) == "BACKORDERED"
