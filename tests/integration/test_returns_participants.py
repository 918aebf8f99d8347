"""The participants' side of the returns saga, on the real database (and, for the public fact,
the real broker): the order's RETURN_PENDING -> RETURNED | COMPLETED, inventory's RestockItems
(back on the shelf exactly once), and shipping's BookPickup/CancelPickup with the carrier
(never booked twice, a tombstone for a cancel that comes first)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import topology
from messaging.codec import Incoming, encode
from messaging.consumer import Context, Handler, Preparation, TwoPhase
from messaging.db import create_schema
from messaging.errors import PermanentError, TransientError
from messaging.service import Runtime
from messaging.settings import Settings
from participants.analytics import service as analytics
from participants.inventory import service as inventory
from participants.notification import service as notification
from participants.order import service as order
from participants.shipping import service as shipping
from participants.shipping.carrier import NO_PICKUP_REASON, Carrier
from schemas.base import Message
from schemas.common import LineItem, ShippingAddress
from schemas.inventory import (
    InventoryReleased,
    InventoryReserved,
    ItemsRestocked,
    ReleaseInventory,
    ReserveInventory,
    RestockItems,
)
from schemas.order import (
    CancelReturn,
    CompleteOrder,
    CompleteReturn,
    CreateOrder,
    MarkReturnPending,
    OrderCompleted,
    OrderReturnCancelled,
    OrderReturned,
    OrderReturnPending,
    OrderReturnRefused,
)
from schemas.shipping import (
    BookPickup,
    CancelPickup,
    CancelShipment,
    CreateShipment,
    PickupBooked,
    PickupCancelled,
    PickupFailed,
    ShipmentCreated,
)
from tests.support import (
    ADDRESS,
    count,
    deliver,
    delivery,
    facts,
    one,
    publish,
    replied,
    wait_for,
)

pytestmark = pytest.mark.integration


async def run(
    engine: AsyncEngine,
    handler: Handler,
    service: str,
    body: Message,
    saga_id: uuid.UUID | None = None,
) -> Context:
    return await deliver(engine, handler, service, body, saga_id)


# -- order ---------------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def orders(engine: AsyncEngine, database: Settings) -> dict[str, Handler]:
    definition = order.definition(database)
    await create_schema(engine, order.SCHEMA, order.metadata)
    return definition.handlers


async def completed_order(engine: AsyncEngine, handlers: dict[str, Handler], order_id: str) -> None:
    create = CreateOrder(order_id=order_id, customer_id="cus_r", amount_minor=4200, currency="EUR")
    await run(engine, handlers[CreateOrder.TYPE], "order", create)
    ctx = await run(engine, handlers[CompleteOrder.TYPE], "order", CompleteOrder(order_id=order_id))
    assert isinstance(replied(ctx), OrderCompleted)


async def status_of(engine: AsyncEngine, order_id: str) -> str:
    return str((await one(engine, order.orders, order_id=order_id)).status)


async def test_a_completed_order_is_returned_and_the_fact_is_published_once(
    engine: AsyncEngine, orders: dict[str, Handler], uid: str
) -> None:
    order_id = f"ret-{uid}"
    await completed_order(engine, orders, order_id)
    mark = MarkReturnPending(order_id=order_id)

    for _ in range(2):  # a re-send while RETURN_PENDING answers the same
        ctx = await run(engine, orders[MarkReturnPending.TYPE], "order", mark)
        assert replied(ctx) == OrderReturnPending(order_id=order_id)
        assert facts(ctx) == []
        assert await status_of(engine, order_id) == "RETURN_PENDING"

    expected = OrderReturned(
        order_id=order_id, customer_id="cus_r", amount_minor=4200, currency="EUR"
    )
    ctx = await run(engine, orders[CompleteReturn.TYPE], "order", CompleteReturn(order_id=order_id))
    assert replied(ctx) == expected
    assert facts(ctx) == [expected]  # to notification and analytics
    assert await status_of(engine, order_id) == "RETURNED"

    # a re-send replies the same fact, and publishes nothing again
    ctx = await run(engine, orders[CompleteReturn.TYPE], "order", CompleteReturn(order_id=order_id))
    assert replied(ctx) == expected
    assert facts(ctx) == []

    # returned for good: no second return, and a late CancelReturn changes nothing
    ctx = await run(engine, orders[MarkReturnPending.TYPE], "order", mark)
    assert replied(ctx) == OrderReturnRefused(order_id=order_id, reason="order already returned")
    ctx = await run(engine, orders[CancelReturn.TYPE], "order", CancelReturn(order_id=order_id))
    assert replied(ctx) == OrderReturnCancelled(order_id=order_id, had_return=False)
    assert await status_of(engine, order_id) == "RETURNED"


async def test_an_order_that_is_not_completed_is_refused(
    engine: AsyncEngine, orders: dict[str, Handler], uid: str
) -> None:
    unknown, pending = f"ret-unknown-{uid}", f"ret-pending-{uid}"
    create = CreateOrder(order_id=pending, customer_id="cus_r", amount_minor=100, currency="EUR")
    await run(engine, orders[CreateOrder.TYPE], "order", create)
    for order_id in (unknown, pending):
        ctx = await run(
            engine, orders[MarkReturnPending.TYPE], "order", MarkReturnPending(order_id=order_id)
        )
        assert replied(ctx) == OrderReturnRefused(order_id=order_id, reason="order not completed")
        # the saga never sends CompleteReturn then: it is a dead letter
        with pytest.raises(PermanentError):
            await run(
                engine, orders[CompleteReturn.TYPE], "order", CompleteReturn(order_id=order_id)
            )
    assert await status_of(engine, pending) == "PENDING"
    assert await count(engine, order.orders, order_id=unknown) == 0


async def test_a_cancelled_return_leaves_the_order_completed(
    engine: AsyncEngine, orders: dict[str, Handler], uid: str
) -> None:
    order_id = f"ret-cancel-{uid}"
    await completed_order(engine, orders, order_id)
    mark = MarkReturnPending(order_id=order_id)
    await run(engine, orders[MarkReturnPending.TYPE], "order", mark)

    ctx = await run(engine, orders[CancelReturn.TYPE], "order", CancelReturn(order_id=order_id))
    assert replied(ctx) == OrderReturnCancelled(order_id=order_id, had_return=True)
    assert await status_of(engine, order_id) == "COMPLETED"
    ctx = await run(engine, orders[CancelReturn.TYPE], "order", CancelReturn(order_id=order_id))
    assert replied(ctx) == OrderReturnCancelled(order_id=order_id, had_return=False)
    with pytest.raises(PermanentError):  # not RETURN_PENDING any more
        await run(engine, orders[CompleteReturn.TYPE], "order", CompleteReturn(order_id=order_id))

    # a CancelReturn for an order we do not know is a no-op (it writes nothing)
    other = f"ret-cancel-unknown-{uid}"
    ctx = await run(engine, orders[CancelReturn.TYPE], "order", CancelReturn(order_id=other))
    assert replied(ctx) == OrderReturnCancelled(order_id=other, had_return=False)
    assert await count(engine, order.orders, order_id=other) == 0

    # the order may be returned later after all (another returns saga)
    ctx = await run(engine, orders[MarkReturnPending.TYPE], "order", mark)
    assert replied(ctx) == OrderReturnPending(order_id=order_id)


async def test_a_late_mark_of_a_cancelled_return_marks_nothing(
    engine: AsyncEngine, orders: dict[str, Handler], uid: str
) -> None:
    """The returns saga timed out on its MarkReturnPending and compensated; the command, delayed
    by a retry, is processed after the CancelReturn: the order must stay COMPLETED."""
    order_id = f"ret-late-mark-{uid}"
    saga_id = uuid.uuid4()
    await completed_order(engine, orders, order_id)
    mark = MarkReturnPending(order_id=order_id)
    ctx = await run(engine, orders[CancelReturn.TYPE], "order", CancelReturn(order_id=order_id), saga_id)
    assert replied(ctx) == OrderReturnCancelled(order_id=order_id, had_return=False)

    ctx = await run(engine, orders[MarkReturnPending.TYPE], "order", mark, saga_id)
    assert replied(ctx) == OrderReturnRefused(order_id=order_id, reason="return cancelled")
    assert await status_of(engine, order_id) == "COMPLETED"

    # and after a real mark, the cancel, then a re-sent mark of the same saga
    other = uuid.uuid4()
    await run(engine, orders[MarkReturnPending.TYPE], "order", mark, other)
    assert await status_of(engine, order_id) == "RETURN_PENDING"
    await run(engine, orders[CancelReturn.TYPE], "order", CancelReturn(order_id=order_id), other)
    ctx = await run(engine, orders[MarkReturnPending.TYPE], "order", mark, other)
    assert isinstance(replied(ctx), OrderReturnRefused)
    assert await status_of(engine, order_id) == "COMPLETED"


async def test_order_returned_reaches_notification_and_analytics(
    services: Runtime, engine: AsyncEngine, database: Settings, amqp: Any, uid: str
) -> None:
    """The fact goes out through the order's outbox to the fan-out, and both choreographed
    consumers take it (they would dead-letter a type they have no handler for)."""
    order_id = f"ret-fact-{uid}"
    handlers = services.consumers["order"].handlers
    await completed_order(engine, handlers, order_id)
    await run(
        engine, handlers[MarkReturnPending.TYPE], "order", MarkReturnPending(order_id=order_id)
    )

    async def returned_count() -> int:
        async with engine.connect() as conn:
            found = await conn.execute(
                select(analytics.outcomes.c.count).where(analytics.outcomes.c.outcome == "returned")
            )
            return int(found.scalar_one_or_none() or 0)

    before = await returned_count()
    message = delivery(CompleteReturn(order_id=order_id), step="complete_return")
    exchange, key = topology.command_route("order", CompleteReturn.TYPE)
    await publish(amqp, exchange, key, encode(message.envelope, message.body))

    async def emailed() -> Any:
        found = await count(
            engine, notification.notifications, order_id=order_id, template="order_returned"
        )
        return found or None

    assert await wait_for(emailed, what="the order_returned email") == 1

    async def counted() -> int:
        return await returned_count() - before

    assert await wait_for(counted, what="the returned outcome counted") == 1
    assert await status_of(engine, order_id) == "RETURNED"


# -- inventory: RestockItems ---------------------------------------------------------------------


@pytest_asyncio.fixture
async def stock(engine: AsyncEngine, database: Settings) -> dict[str, Handler]:
    definition = inventory.definition(database)
    await create_schema(engine, inventory.SCHEMA, inventory.metadata)
    return definition.handlers


async def available(engine: AsyncEngine, sku: str) -> int:
    return int((await one(engine, inventory.stock, sku=sku)).available)


async def test_restock_puts_back_what_the_reservation_took_once(
    engine: AsyncEngine, stock: dict[str, Handler], uid: str
) -> None:
    a, b = f"SKU-RA-{uid}", f"SKU-RB-{uid}"
    order_id = f"restock-{uid}"
    async with engine.begin() as conn:
        await inventory.seed(conn, {a: 5, b: 1})
    items = (
        LineItem(sku=a, quantity=2, unit_price_minor=100),
        LineItem(sku=b, quantity=1, unit_price_minor=100),
        LineItem(sku=a, quantity=1, unit_price_minor=100),  # a SKU twice takes both
    )
    reserve = ReserveInventory(order_id=order_id, items=items)
    ctx = await run(engine, stock[ReserveInventory.TYPE], "inventory", reserve)
    assert isinstance(replied(ctx), InventoryReserved)
    assert (await available(engine, a), await available(engine, b)) == (2, 0)

    for _ in range(2):  # a re-send answers the same count and restocks nothing more
        ctx = await run(
            engine, stock[RestockItems.TYPE], "inventory", RestockItems(order_id=order_id)
        )
        assert replied(ctx) == ItemsRestocked(order_id=order_id, units_restocked=4)
        assert (await available(engine, a), await available(engine, b)) == (5, 1)
    assert (await one(engine, inventory.reservations, order_id=order_id)).status == "RESTOCKED"

    # restocked units are not released a second time, nor taken again by a re-sent reservation
    ctx = await run(
        engine, stock[ReleaseInventory.TYPE], "inventory", ReleaseInventory(order_id=order_id)
    )
    assert replied(ctx) == InventoryReleased(order_id=order_id, units_released=0)
    ctx = await run(engine, stock[ReserveInventory.TYPE], "inventory", reserve)
    assert isinstance(replied(ctx), InventoryReserved)
    assert (await available(engine, a), await available(engine, b)) == (5, 1)


async def test_restock_of_a_reservation_that_took_nothing_restocks_nothing(
    engine: AsyncEngine, stock: dict[str, Handler], uid: str
) -> None:
    sku = f"SKU-RN-{uid}"
    async with engine.begin() as conn:
        await inventory.seed(conn, {sku: 3})
    items = (LineItem(sku=sku, quantity=2, unit_price_minor=100),)
    released, short, unknown = f"rs-rel-{uid}", f"rs-short-{uid}", f"rs-unknown-{uid}"
    # reserved, then released by a compensation: the units went back already
    await run(
        engine,
        stock[ReserveInventory.TYPE],
        "inventory",
        ReserveInventory(order_id=released, items=items),
    )
    await run(
        engine, stock[ReleaseInventory.TYPE], "inventory", ReleaseInventory(order_id=released)
    )
    # refused: took nothing
    too_many = (LineItem(sku=sku, quantity=99, unit_price_minor=100),)
    await run(
        engine,
        stock[ReserveInventory.TYPE],
        "inventory",
        ReserveInventory(order_id=short, items=too_many),
    )
    assert await available(engine, sku) == 3
    for order_id in (released, short, unknown):
        ctx = await run(
            engine, stock[RestockItems.TYPE], "inventory", RestockItems(order_id=order_id)
        )
        assert replied(ctx) == ItemsRestocked(order_id=order_id, units_restocked=0)
    assert await available(engine, sku) == 3
    assert await count(engine, inventory.reservations, order_id=unknown) == 0


# -- shipping: pickups -----------------------------------------------------------------------------


@pytest_asyncio.fixture
async def carrier(database: Settings, engine: AsyncEngine) -> AsyncIterator[Carrier]:
    await create_schema(engine, shipping.SCHEMA, shipping.metadata)
    c = Carrier(shipping.bookings, dsn=database.asyncpg_url)
    yield c
    await c.close()


@pytest.fixture
def ship(carrier: Carrier, database: Settings) -> dict[str, Handler]:
    return shipping.make_handlers(carrier, database)


async def shipped(
    engine: AsyncEngine,
    handlers: dict[str, Handler],
    order_id: str,
    address: ShippingAddress = ADDRESS,
) -> None:
    """A booked shipment for ``order_id`` (its checkout saga)."""
    create = CreateShipment(
        order_id=order_id,
        items=(LineItem(sku="SKU-S", quantity=1, unit_price_minor=100),),
        shipping_address=address,
    )
    ctx = await run(engine, handlers[CreateShipment.TYPE], "shipping", create)
    assert isinstance(replied(ctx), ShipmentCreated)


async def booking(engine: AsyncEngine, key: str) -> Any:
    async with engine.connect() as conn:
        found = await conn.execute(
            select(shipping.bookings.c.status, shipping.bookings.c.tracking_number).where(
                shipping.bookings.c.idempotency_key == key
            )
        )
        return found.one_or_none()


def carrier_calls(carrier: Carrier, operation: str) -> int:
    return sum(1 for c in carrier.history if c.operation == operation)


async def test_a_pickup_is_booked_once_and_cancelled(
    engine: AsyncEngine, carrier: Carrier, ship: dict[str, Handler], uid: str
) -> None:
    order_id = f"pickup-{uid}"
    await shipped(engine, ship, order_id)
    saga_id = uuid.uuid4()  # the returns saga's
    book = BookPickup(order_id=order_id)

    ctx = await run(engine, ship[BookPickup.TYPE], "shipping", book, saga_id)
    answer = replied(ctx)
    assert isinstance(answer, PickupBooked)
    assert answer.pickup_id.startswith("PU")
    ctx = await run(engine, ship[BookPickup.TYPE], "shipping", book, saga_id)  # a re-send
    assert replied(ctx) == answer
    assert carrier_calls(carrier, "book_pickup") == 1
    assert tuple(await booking(engine, f"{saga_id}:pickup")) == ("BOOKED", answer.pickup_id)

    cancel = CancelPickup(order_id=order_id)
    for _ in range(2):  # a re-send answers the same
        ctx = await run(engine, ship[CancelPickup.TYPE], "shipping", cancel, saga_id)
        assert replied(ctx) == PickupCancelled(order_id=order_id, had_pickup=True)
    assert (await booking(engine, f"{saga_id}:pickup")).status == "CANCELLED"
    row = await one(engine, shipping.pickups, order_id=order_id, saga_id=saga_id)
    assert (row.status, row.pickup_id) == ("CANCELLED", answer.pickup_id)
    # the shipment itself is untouched
    assert (await one(engine, shipping.shipments, order_id=order_id)).status == "CREATED"


async def test_no_shipment_no_pickup(
    engine: AsyncEngine, carrier: Carrier, ship: dict[str, Handler], uid: str
) -> None:
    never, cancelled = f"pickup-none-{uid}", f"pickup-cancelled-{uid}"
    await shipped(engine, ship, cancelled)
    await run(engine, ship[CancelShipment.TYPE], "shipping", CancelShipment(order_id=cancelled))
    for order_id in (never, cancelled):
        saga_id = uuid.uuid4()
        for _ in range(2):
            ctx = await run(
                engine, ship[BookPickup.TYPE], "shipping", BookPickup(order_id=order_id), saga_id
            )
            assert replied(ctx) == PickupFailed(
                order_id=order_id, reason="no shipment for this order"
            )
    assert carrier_calls(carrier, "book_pickup") == 0


@pytest.mark.parametrize("line1", ["No Pickup Lane 4", "no pickup, gate 2", "NO PICKUP"])
async def test_the_carrier_cannot_collect_at_a_no_pickup_address(
    engine: AsyncEngine, carrier: Carrier, ship: dict[str, Handler], uid: str, line1: str
) -> None:
    order_id = f"pickup-refused-{uid}"
    await shipped(engine, ship, order_id, ADDRESS.model_copy(update={"line1": line1}))  # shipped
    saga_id = uuid.uuid4()
    for _ in range(2):
        ctx = await run(
            engine, ship[BookPickup.TYPE], "shipping", BookPickup(order_id=order_id), saga_id
        )
        assert replied(ctx) == PickupFailed(order_id=order_id, reason=NO_PICKUP_REASON)
    assert NO_PICKUP_REASON == "carrier cannot collect at this address"
    assert await booking(engine, f"{saga_id}:pickup") is None
    ctx = await run(
        engine, ship[CancelPickup.TYPE], "shipping", CancelPickup(order_id=order_id), saga_id
    )
    assert replied(ctx) == PickupCancelled(order_id=order_id, had_pickup=False)


async def test_a_cancel_before_its_pickup_leaves_a_tombstone(
    engine: AsyncEngine, carrier: Carrier, ship: dict[str, Handler], uid: str
) -> None:
    order_id = f"pickup-tomb-{uid}"
    await shipped(engine, ship, order_id)
    saga_id = uuid.uuid4()
    ctx = await run(
        engine, ship[CancelPickup.TYPE], "shipping", CancelPickup(order_id=order_id), saga_id
    )
    assert replied(ctx) == PickupCancelled(order_id=order_id, had_pickup=False)

    ctx = await run(
        engine, ship[BookPickup.TYPE], "shipping", BookPickup(order_id=order_id), saga_id
    )
    assert replied(ctx) == PickupFailed(order_id=order_id, reason="cancelled before booking")
    assert carrier_calls(carrier, "book_pickup") == 0
    assert await booking(engine, f"{saga_id}:pickup") is None

    # another returns saga of the same order is not blocked by this one's tombstone
    ctx = await run(engine, ship[BookPickup.TYPE], "shipping", BookPickup(order_id=order_id))
    assert isinstance(replied(ctx), PickupBooked)


async def test_a_lost_carrier_answer_books_one_pickup(
    engine: AsyncEngine, database: Settings, carrier: Carrier, ship: dict[str, Handler], uid: str
) -> None:
    """The carrier books and its answer is lost: the lookup finds the booking (no second one);
    and when it fails outright, the command is retried, then fails on its last delivery."""
    order_id = f"pickup-lost-{uid}"
    await shipped(engine, ship, order_id)
    saga_id = uuid.uuid4()
    carrier.lose_response_rate = 1.0
    ctx = await run(
        engine, ship[BookPickup.TYPE], "shipping", BookPickup(order_id=order_id), saga_id
    )
    answer = replied(ctx)
    assert isinstance(answer, PickupBooked)
    assert carrier_calls(carrier, "book_pickup") == 1
    assert tuple(await booking(engine, f"{saga_id}:pickup")) == ("BOOKED", answer.pickup_id)

    carrier.lose_response_rate, carrier.failure_rate = 0.0, 1.0
    failing = delivery(BookPickup(order_id=order_id))
    handler = ship[BookPickup.TYPE]
    assert isinstance(handler, TwoPhase)
    with pytest.raises(TransientError):
        await handler.prepare(Preparation(failing, 0, engine))
    # the consumer's last delivery: an answer, not a dead letter
    ctx = await run_prepared(engine, handler, failing, retries=database.max_attempts - 1)
    reply = replied(ctx)
    assert isinstance(reply, PickupFailed)
    assert reply.reason.startswith("carrier failed 1 times")
    assert await booking(engine, f"{failing.envelope.saga_id}:pickup") is None


async def run_prepared(
    engine: AsyncEngine, handler: TwoPhase, message: Incoming, *, retries: int
) -> Context:
    prepared = await handler.prepare(Preparation(message, retries, engine))
    async with engine.begin() as conn:
        ctx = Context(conn, message, "shipping", retries=retries)
        ctx.prepared = prepared
        await handler(ctx)
    return ctx
