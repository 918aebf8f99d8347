"""The shipping handlers and their carrier: no second connection from the service's pool while a
handler holds one (a pool deadlock), a carrier budget that only carrier failures spend, and the
races between a CreateShipment's carrier call (``prepare``, outside any transaction) and its
recording (``apply``)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.codec import Incoming
from messaging.consumer import Context, Handler, Preparation, TwoPhase
from messaging.db import create_schema, make_engine
from messaging.errors import TransientError
from messaging.settings import Settings
from participants.shipping import service as shipping
from participants.shipping.carrier import UNAVAILABLE_POSTAL_CODE, Carrier
from schemas.common import LineItem
from schemas.envelope import Envelope
from schemas.shipping import (
    CancelShipment,
    CreateShipment,
    ShipmentCancelled,
    ShipmentCreated,
    ShipmentFailed,
)
from tests.support import ADDRESS

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def carrier(database: Settings, engine: AsyncEngine) -> AsyncIterator[Carrier]:
    await create_schema(engine, shipping.SCHEMA, shipping.metadata)
    c = Carrier(shipping.bookings, dsn=database.asyncpg_url)
    yield c
    await c.close()


def create_shipment(order_id: str, *, postal_code: str = "3511AA") -> Incoming:
    body = CreateShipment(
        order_id=order_id,
        items=(LineItem(sku="SKU-S", quantity=1, unit_price_minor=100),),
        shipping_address=ADDRESS.model_copy(update={"postal_code": postal_code}),
    )
    saga_id = uuid.uuid4()
    env = Envelope(
        message_id=uuid.uuid4(),
        type=body.TYPE,
        saga_id=saga_id,
        correlation_id=saga_id,
        idempotency_key=f"{saga_id}:shipping",
        step="shipping",
        occurred_at=datetime.now(UTC),
    )
    return Incoming(env, body)


def cancel_shipment(created: Incoming) -> Incoming:
    """The CancelShipment of the same saga as ``created`` (a CreateShipment)."""
    env, body = created.envelope, created.body
    assert isinstance(body, CreateShipment)
    return Incoming(
        env.model_copy(
            update={
                "message_id": uuid.uuid4(),
                "type": CancelShipment.TYPE,
                "step": "cancel_shipment",
                "idempotency_key": f"{env.saga_id}:cancel_shipment",
            }
        ),
        CancelShipment(order_id=body.order_id),
    )


async def prepare(
    engine: AsyncEngine, handler: Handler, incoming: Incoming, *, retries: int = 0
) -> Any:
    """A two-phase handler's ``prepare``, outside any transaction, as the consumer runs it."""
    assert isinstance(handler, TwoPhase)
    return await handler.prepare(Preparation(incoming, retries, engine))


async def apply(
    engine: AsyncEngine,
    handler: Handler,
    incoming: Incoming,
    prepared: Any,
    *,
    retries: int = 0,
) -> Context:
    """One delivery's transaction, as the consumer runs it (minus inbox and outbox)."""
    async with engine.begin() as conn:
        ctx = Context(conn, incoming, "shipping", retries=retries)
        ctx.prepared = prepared
        await handler(ctx)
    return ctx


async def handle(
    engine: AsyncEngine, handler: Handler, incoming: Incoming, *, retries: int = 0
) -> Context:
    """One delivery: ``prepare`` (outside any transaction), then its transaction."""
    prepared = await prepare(engine, handler, incoming, retries=retries)
    return await apply(engine, handler, incoming, prepared, retries=retries)


async def test_many_deliveries_on_a_small_pool_do_not_deadlock(
    database: Settings, carrier: Carrier, uid: str
) -> None:
    """Eight deliveries at once on a pool of two connections (one plus one overflow). With the
    carrier borrowing from the same pool, both connections were held by handlers waiting for a
    third: nothing moved until the pool's checkout timeout. (The carrier is now called outside
    the transaction, but a rare race still cancels a booking inside it.)"""
    small = make_engine(database.model_copy(update={"db_pool_size": 1}))
    create = shipping.make_handlers(carrier, database)[CreateShipment.TYPE]
    carrier.latency_ms = 5
    orders = [f"ship-pool-{uid}-{i}" for i in range(8)]
    try:
        tasks = [asyncio.create_task(handle(small, create, create_shipment(o))) for o in orders]
        done, pending = await asyncio.wait(tasks, timeout=20)
        for task in pending:
            task.cancel()
        assert not pending, f"{len(pending)} of {len(tasks)} deliveries stuck: pool deadlock"
        replies = [t.result().outgoing[0].body for t in done]
        assert all(isinstance(r, ShipmentCreated) for r in replies), replies
        async with small.connect() as conn:
            booked = (
                await conn.execute(
                    select(func.count())
                    .select_from(shipping.bookings)
                    .where(shipping.bookings.c.order_id.in_(orders))
                )
            ).scalar_one()
        assert booked == len(orders)
    finally:
        await small.dispose()


def _only_reply(ctx: Context) -> Any:
    assert len(ctx.outgoing) == 1
    return ctx.outgoing[0].body


async def test_retries_for_other_reasons_do_not_spend_the_carrier_budget(
    database: Settings, engine: AsyncEngine, carrier: Carrier, uid: str
) -> None:
    """A delivery that already went round the delay queues for other reasons (a database
    restart, say) still gets ``shipping_max_attempts`` carrier attempts."""
    assert database.shipping_max_attempts == 3
    create = shipping.make_handlers(carrier, database)[CreateShipment.TYPE]
    incoming = create_shipment(f"ship-budget-{uid}")
    carrier.failure_rate = 1.0

    # two retries for a database outage, then the carrier fails: the first carrier failure
    with pytest.raises(TransientError) as failed:
        await handle(engine, create, incoming, retries=2)
    assert failed.value.headers == {shipping.CARRIER_ATTEMPTS: 1}

    # the copy from the delay queue carries the count; now the carrier answers
    carrier.failure_rate = 0.0
    retried = Incoming(
        incoming.envelope, incoming.body, {shipping.CARRIER_ATTEMPTS: 1, "sagabus-retry-count": 3}
    )
    ctx = await handle(engine, create, retried, retries=3)
    assert isinstance(_only_reply(ctx), ShipmentCreated)


async def test_carrier_failures_still_give_up_after_the_budget(
    database: Settings, engine: AsyncEngine, carrier: Carrier, uid: str
) -> None:
    create = shipping.make_handlers(carrier, database)[CreateShipment.TYPE]
    incoming = create_shipment(f"ship-gives-up-{uid}", postal_code=UNAVAILABLE_POSTAL_CODE)

    attempts: list[int] = []
    headers: dict[str, Any] = {}
    for retries in range(database.shipping_max_attempts):
        try:
            ctx = await handle(
                engine, create, Incoming(incoming.envelope, incoming.body, headers), retries=retries
            )
        except TransientError as e:
            attempts.append(int(e.headers[shipping.CARRIER_ATTEMPTS]))
            headers = dict(e.headers)
            continue
        reply = _only_reply(ctx)
        assert isinstance(reply, ShipmentFailed)
        assert reply.reason.startswith(f"carrier failed {database.shipping_max_attempts} times")
        break
    else:
        pytest.fail("the shipment never gave up")
    assert attempts == list(range(1, database.shipping_max_attempts))


async def test_the_last_delivery_answers_even_with_carrier_budget_left(
    database: Settings, engine: AsyncEngine, carrier: Carrier, uid: str
) -> None:
    """Retries for other reasons spent the consumer's deliveries: on the last one a carrier
    failure answers ShipmentFailed (the process manager compensates) instead of raising into
    a dead letter, although the carrier budget is not spent."""
    assert database.shipping_max_attempts < database.max_attempts
    create = shipping.make_handlers(carrier, database)[CreateShipment.TYPE]
    incoming = create_shipment(f"ship-last-{uid}", postal_code=UNAVAILABLE_POSTAL_CODE)
    ctx = await handle(engine, create, incoming, retries=database.max_attempts - 1)
    reply = _only_reply(ctx)
    assert isinstance(reply, ShipmentFailed)
    assert reply.reason.startswith("carrier failed 1 times")


async def _booking_status(engine: AsyncEngine, order_id: str) -> str | None:
    async with engine.connect() as conn:
        return (
            await conn.execute(
                select(shipping.bookings.c.status).where(shipping.bookings.c.order_id == order_id)
            )
        ).scalar_one_or_none()


async def test_two_deliveries_that_both_booked_answer_one_shipment(
    database: Settings, engine: AsyncEngine, carrier: Carrier, uid: str
) -> None:
    """A re-send racing its original: both prepare (no row yet) and reach the carrier with the
    saga's key; the second to record finds the first's row and answers from it."""
    create = shipping.make_handlers(carrier, database)[CreateShipment.TYPE]
    order_id = f"ship-twice-{uid}"
    original = create_shipment(order_id)
    resent = Incoming(
        original.envelope.model_copy(update={"message_id": uuid.uuid4()}), original.body
    )
    first, second = await asyncio.gather(
        prepare(engine, create, original), prepare(engine, create, resent)
    )
    assert isinstance(first, shipping.Booked) and first == second
    one = _only_reply(await apply(engine, create, original, first))
    two = _only_reply(await apply(engine, create, resent, second))
    assert isinstance(one, ShipmentCreated) and one == two
    async with engine.connect() as conn:
        booked = (
            await conn.execute(
                select(func.count())
                .select_from(shipping.bookings)
                .where(shipping.bookings.c.order_id == order_id)
            )
        ).scalar_one()
    assert booked == 1


async def test_a_booking_the_recorded_answer_does_not_hold_is_cancelled(
    database: Settings, engine: AsyncEngine, carrier: Carrier, uid: str
) -> None:
    """One delivery gave up on the carrier and answered ShipmentFailed; a re-send's prepare
    then booked. The re-send answers from the row (ShipmentFailed) and cancels its booking."""
    create = shipping.make_handlers(carrier, database)[CreateShipment.TYPE]
    order_id = f"ship-gave-up-{uid}"
    original = create_shipment(order_id)
    resent = Incoming(
        original.envelope.model_copy(update={"message_id": uuid.uuid4()}), original.body
    )
    booked = await prepare(engine, create, resent)
    assert isinstance(booked, shipping.Booked)
    failed = _only_reply(
        await apply(engine, create, original, shipping.GaveUp("carrier failed 3 times: 503"))
    )
    assert isinstance(failed, ShipmentFailed)
    again = _only_reply(await apply(engine, create, resent, booked))
    assert again == failed
    assert await _booking_status(engine, order_id) == "CANCELLED"


async def test_a_cancel_that_recorded_after_a_late_booking_cancels_it(
    database: Settings, engine: AsyncEngine, carrier: Carrier, uid: str
) -> None:
    """CancelShipment's prepare cancels at the carrier before CreateShipment's prepare books;
    CreateShipment records CREATED first; the cancel, recording second, finds CREATED although
    its carrier cancel found nothing, and cancels the booking."""
    handlers = shipping.make_handlers(carrier, database)
    create, cancel = handlers[CreateShipment.TYPE], handlers[CancelShipment.TYPE]
    order_id = f"ship-late-booking-{uid}"
    created = create_shipment(order_id)
    cancelling = cancel_shipment(created)
    assert await prepare(engine, cancel, cancelling) is False  # nothing booked yet
    booked = await prepare(engine, create, created)
    assert isinstance(booked, shipping.Booked)
    assert isinstance(_only_reply(await apply(engine, create, created, booked)), ShipmentCreated)
    reply = _only_reply(await apply(engine, cancel, cancelling, False))
    assert reply == ShipmentCancelled(order_id=order_id, had_shipment=True)
    assert await _booking_status(engine, order_id) == "CANCELLED"


async def test_a_booking_left_by_a_crashed_instance_is_cancelled_by_the_retry(
    database: Settings, engine: AsyncEngine, carrier: Carrier, uid: str
) -> None:
    """Two shipping instances: one booked at the carrier, then crashed before recording; the
    other recorded the cancel's tombstone meanwhile. The create's retry finds the tombstone and
    must not leave that booking live (goods shipped for a compensated saga)."""
    handlers = shipping.make_handlers(carrier, database)
    create, cancel = handlers[CreateShipment.TYPE], handlers[CancelShipment.TYPE]
    order_id = f"ship-orphan-{uid}"
    created = create_shipment(order_id)
    env = created.envelope
    cancelling = cancel_shipment(created)
    # the other instance's cancel: nothing at the carrier yet, a tombstone recorded
    assert await prepare(engine, cancel, cancelling) is False
    await apply(engine, cancel, cancelling, False)
    # this instance's booking lands after it, and the instance dies before its transaction
    body = created.body
    assert isinstance(body, CreateShipment)
    await carrier.book(shipping._key(env), order_id, body.shipping_address)
    assert await _booking_status(engine, order_id) == "BOOKED"
    # the redelivered CreateShipment: answered from the tombstone, and the booking cancelled
    reply = _only_reply(await handle(engine, create, created))
    assert isinstance(reply, ShipmentFailed)
    assert await _booking_status(engine, order_id) == "CANCELLED"
