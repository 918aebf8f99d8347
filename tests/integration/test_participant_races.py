"""Participants under concurrent deliveries: one step's command (a re-send racing the original),
with the race forced deterministically by holding a table lock the first transaction needs; and
a CancelShipment landing while a CreateShipment waits on the carrier, forced by a carrier that
books only when the test lets it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from messaging import topology
from messaging.codec import encode
from messaging.service import Runtime
from messaging.settings import Settings
from participants.inventory import service as inventory
from participants.payment import service as payment
from participants.shipping import service as shipping
from participants.shipping.carrier import Carrier
from process_manager import ops
from schemas.base import Message
from schemas.checkout import StartCheckout, saga_id_for_order
from schemas.common import LineItem, ShippingAddress
from schemas.envelope import Envelope
from schemas.payment import AuthorizePayment, PaymentAuthorized
from schemas.shipping import (
    CancelShipment,
    CreateShipment,
    ShipmentCancelled,
    ShipmentCreated,
    ShipmentFailed,
)
from tests.support import (
    ADDRESS,
    DeadLetters,
    checkout,
    copy_of_outbox_row,
    count,
    one,
    paused,
    publish,
    queue_depth,
    rows,
    sent_outbox_row,
    wait_for,
    wait_terminal,
    wait_until,
)

pytestmark = pytest.mark.integration

PAYMENT = topology.QUEUES["payment"]


@contextlib.asynccontextmanager
async def table_locked(engine: AsyncEngine, table: str) -> AsyncIterator[AsyncConnection]:
    async with engine.connect() as conn:
        await conn.execute(text(f"LOCK TABLE {table} IN EXCLUSIVE MODE"))
        try:
            yield conn
        finally:
            await conn.rollback()


async def waiting_backends(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(
            (
                await conn.execute(
                    text(
                        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                        "WHERE NOT l.granted AND a.datname = current_database()"
                    )
                )
            ).scalar_one()
        )


async def test_authorize_resent_while_the_original_is_in_flight_is_answered(
    services: Runtime,
    engine: AsyncEngine,
    database: Settings,
    amqp: AbstractRobustConnection,
    dead_letters: DeadLetters,
    uid: str,
) -> None:
    sku = f"SKU-RACE-{uid}"
    async with engine.begin() as conn:
        await inventory.seed(conn, {sku: 1})
    cmd = checkout(f"race-{uid}", sku=sku)
    resent = uuid.uuid4()
    # Two deliveries waiting together would share one transaction (the second then sees the
    # first's effect): one transaction per delivery makes them race, as two payment instances do.
    consumer = services.consumers["payment"]
    consumer.settings = database.model_copy(update={"consumer_batch": 1})
    try:
        await _race(services, engine, database, amqp, dead_letters, cmd, resent)
    finally:
        consumer.settings = database


async def _race(
    services: Runtime,
    engine: AsyncEngine,
    database: Settings,
    amqp: AbstractRobustConnection,
    dead_letters: DeadLetters,
    cmd: StartCheckout,
    resent: uuid.UUID,
) -> None:
    saga_id = saga_id_for_order(cmd.order_id)
    async with table_locked(engine, "payment.ledger"):
        async with paused(services, "payment"):
            await ops.publish_starts(database.amqp_url, [ops.start_message(cmd)])
            original = await sent_outbox_row(
                engine,
                services.relays["process-manager"].outbox.table,
                saga_id,
                AuthorizePayment.TYPE,
            )
            await publish(
                amqp,
                topology.COMMANDS_EXCHANGE,
                original.routing_key,
                copy_of_outbox_row(original, message_id=resent),
            )

            async def both_queued() -> bool:
                return await queue_depth(amqp, PAYMENT.name) == 2

            await wait_for(both_queued, what="both AuthorizePayment deliveries queued")

        # one delivery inserted the payment row and waits for the ledger; the other waits for it
        async def both_blocked() -> bool:
            return await waiting_backends(engine) >= 2

        await wait_for(both_blocked, what="both deliveries blocked in the database")

    inbox = services.consumers["payment"].inbox

    async def settled() -> str | None:
        if await count(engine, inbox, message_id=resent):
            return "answered"
        if not await dead_letters.absent(PAYMENT.dlq, str(resent)):
            return "dead-lettered"
        return None

    assert await wait_for(settled, what="the re-send to be settled") == "answered"
    status = await wait_terminal(engine, cmd.order_id)
    assert status["state"] == "COMPLETED"
    assert await count(engine, payment.ledger, order_id=cmd.order_id, kind="authorize") == 1
    assert await count(engine, payment.ledger, order_id=cmd.order_id, kind="capture") == 1

    async def both_replies() -> list[str] | None:
        s = await ops.saga_status(engine, cmd.order_id)
        assert s is not None
        found = sorted(
            h["outcome"] for h in s["history"] if h["message_type"] == PaymentAuthorized.TYPE
        )
        return found if len(found) == 2 else None

    # the second answer reached the saga and was ignored as stale
    assert await wait_for(both_replies, what="both replies recorded") == ["applied", "ignored"]


# -- shipping: a cancel between the carrier call and its recording -----------------------------


def shipping_command(body: Message, saga_id: uuid.UUID, step: str) -> Envelope:
    """The envelope the process manager would give a shipping command of ``saga_id``."""
    return Envelope(
        message_id=uuid.uuid4(),
        type=body.TYPE,
        saga_id=saga_id,
        correlation_id=saga_id,
        idempotency_key=f"{saga_id}:{step}",
        step=step,
        fence=1,
        occurred_at=datetime.now(UTC),
    )


def create_shipment(order_id: str, address: ShippingAddress = ADDRESS) -> tuple[Envelope, Message]:
    body = CreateShipment(
        order_id=order_id,
        items=(LineItem(sku="SKU-S", quantity=1, unit_price_minor=100),),
        shipping_address=address,
    )
    return shipping_command(body, uuid.uuid4(), "shipping"), body


def cancel_shipment(order_id: str, saga_id: uuid.UUID | None = None) -> tuple[Envelope, Message]:
    body = CancelShipment(order_id=order_id)
    return shipping_command(body, saga_id or uuid.uuid4(), "cancel_shipment"), body


async def send(amqp: AbstractRobustConnection, envelope: Envelope, body: Message) -> None:
    exchange, key = topology.command_route("shipping", body.TYPE)
    await publish(amqp, exchange, key, encode(envelope, body))


@contextlib.asynccontextmanager
async def carrier_installed(
    services: Runtime, settings: Settings, carrier: Carrier, *, replicas: bool = False
) -> AsyncIterator[None]:
    """The running shipping consumer's handlers, on ``carrier`` for the time being. With
    ``replicas``, CreateShipment and CancelShipment are handled as by two shipping processes
    (each its own handlers, sharing the carrier and the database)."""
    consumer = services.consumers["shipping"]
    saved = consumer.handlers
    handlers = shipping.make_handlers(carrier, settings)
    if replicas:
        other = shipping.make_handlers(carrier, settings)
        handlers[CancelShipment.TYPE] = other[CancelShipment.TYPE]
    consumer.handlers = {**saved, **handlers}
    try:
        yield
    finally:
        consumer.handlers = saved
        await carrier.close()


async def replies(services: Runtime, engine: AsyncEngine, saga_id: uuid.UUID) -> dict[str, Any]:
    """The shipping replies of ``saga_id`` that were published, by type: (body, sent_at)."""
    table = services.relays["shipping"].outbox.table
    return {
        r.message_type: (json.loads(r.body), r.sent_at)
        for r in await rows(engine, table, saga_id=saga_id)
        if r.sent_at is not None
    }


async def carrier_booking(engine: AsyncEngine, order_id: str) -> str | None:
    async with engine.connect() as conn:
        return (
            await conn.execute(
                select(shipping.bookings.c.status).where(shipping.bookings.c.order_id == order_id)
            )
        ).scalar_one_or_none()


class GatedCarrier(Carrier):
    """A carrier whose ``book`` waits until the test opens the gate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.booking = asyncio.Event()
        self.gate = asyncio.Event()
        #: when the booking call returned (``time.monotonic()``)
        self.booked_at = float("inf")

    async def book(self, key: str, order_id: str, address: ShippingAddress) -> str:
        self.booking.set()
        await self.gate.wait()
        try:
            return await super().book(key, order_id, address)
        finally:
            self.booked_at = time.monotonic()


async def test_cancel_between_the_carrier_call_and_its_recording_leaves_no_booking(
    services: Runtime,
    engine: AsyncEngine,
    database: Settings,
    amqp: AbstractRobustConnection,
    uid: str,
) -> None:
    """CreateShipment waits on the carrier (outside any transaction) while CancelShipment for the
    same order is handled by another shipping process: it finds nothing to cancel at the carrier
    and leaves a tombstone. Then the carrier books. Recording, CreateShipment finds the
    tombstone, cancels the booking at the carrier and answers ShipmentFailed, as a create after
    a cancel always did."""
    order_id = f"ship-cancel-race-{uid}"
    carrier = GatedCarrier(shipping.bookings, dsn=database.asyncpg_url)
    async with carrier_installed(services, database, carrier, replicas=True):
        create_env, create = create_shipment(order_id)
        saga_id = create_env.saga_id
        await send(amqp, create_env, create)
        await wait_until(carrier.booking.is_set, what="CreateShipment at the carrier")

        await send(amqp, *cancel_shipment(order_id, saga_id))

        async def cancelled() -> Any:
            return (await replies(services, engine, saga_id)).get(ShipmentCancelled.TYPE)

        body, _ = await wait_for(cancelled, what="CancelShipment answered")
        assert body == {"order_id": order_id, "had_shipment": False}
        assert await carrier_booking(engine, order_id) is None  # not booked yet

        carrier.gate.set()

        async def failed() -> Any:
            return (await replies(services, engine, saga_id)).get(ShipmentFailed.TYPE)

        body, _ = await wait_for(failed, what="CreateShipment answered")
    assert body == {"order_id": order_id, "reason": "cancelled before creation"}
    assert ShipmentCreated.TYPE not in await replies(services, engine, saga_id)
    assert await carrier_booking(engine, order_id) == "CANCELLED"  # booked, then cancelled
    row = await one(engine, shipping.shipments, order_id=order_id)
    assert (row.status, row.tracking_number) == ("CANCELLED", None)  # still the tombstone


async def test_a_cancel_waits_for_its_shipment_at_the_carrier_in_the_same_process(
    services: Runtime,
    engine: AsyncEngine,
    database: Settings,
    amqp: AbstractRobustConnection,
    uid: str,
) -> None:
    """A late CreateShipment and its CancelShipment delivered together to one shipping process:
    the cancel's carrier call waits for the shipment's, so it finds and cancels the booking
    outside any transaction (``had_shipment``), although it is the quicker call. Which of the
    two records first is then up to the database; either way no booking is left."""
    order_id = f"ship-cancel-after-{uid}"
    carrier = GatedCarrier(shipping.bookings, dsn=database.asyncpg_url)
    async with carrier_installed(services, database, carrier):
        create_env, create = create_shipment(order_id)
        saga_id = create_env.saga_id
        await send(amqp, create_env, create)
        await wait_until(carrier.booking.is_set, what="CreateShipment at the carrier")
        await send(amqp, *cancel_shipment(order_id, saga_id))

        async def delivered() -> bool:
            return await queue_depth(amqp, topology.QUEUES["shipping"].name) == 0

        await wait_for(delivered, what="CancelShipment delivered")
        carrier.gate.set()

        async def both() -> Any:
            found = await replies(services, engine, saga_id)
            return found if len(found) == 2 else None

        answered = await wait_for(both, what="both answered")
    cancels = [c for c in carrier.history if c.operation == "cancel"]
    assert cancels and cancels[0].started >= carrier.booked_at
    cancelled, _ = answered[ShipmentCancelled.TYPE]
    assert cancelled == {"order_id": order_id, "had_shipment": True}
    row = await one(engine, shipping.shipments, order_id=order_id)
    assert row.status == "CANCELLED"
    if ShipmentCreated.TYPE in answered:  # recorded first, then cancelled
        created, _ = answered[ShipmentCreated.TYPE]
        assert row.tracking_number == created["tracking_number"]
    else:  # the cancel recorded first: the shipment answers from its tombstone
        failed, _ = answered[ShipmentFailed.TYPE]
        assert failed == {"order_id": order_id, "reason": "cancelled before creation"}
    assert await carrier_booking(engine, order_id) == "CANCELLED"
