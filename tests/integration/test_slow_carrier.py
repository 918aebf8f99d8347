"""A slow carrier delays its own shipments only (issue 10, item 5).

The consumer runs deliveries that wait together in one shared transaction. Shipping used to call
the carrier inside it, so 32 shipments on a 1 s carrier held every other reply for about 32 s.
The carrier is now called before the transaction, outside it: the shipments' carrier calls
overlap, and the other messages on the same consumer commit while the carrier is still busy.
"""

from __future__ import annotations

from typing import Any

import pytest
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import topology
from messaging.service import Runtime
from messaging.settings import Settings
from participants.shipping import service as shipping
from participants.shipping.carrier import Carrier, CarrierCall
from schemas.shipping import ShipmentCancelled, ShipmentCreated
from tests.integration.test_participant_races import (
    cancel_shipment,
    carrier_installed,
    create_shipment,
    replies,
    send,
)
from tests.support import paused, queue_depth, wait_for

pytestmark = pytest.mark.integration

SHIPPING = topology.QUEUES["shipping"]
#: slow shipments waiting together, and other commands (cancels for other orders) among them
SHIPMENTS = 16
OTHERS = 8


def most_at_once(calls: list[CarrierCall]) -> int:
    """The largest number of ``calls`` in flight at one moment."""
    edges = sorted(
        [(c.started, 1) for c in calls] + [(c.ended, -1) for c in calls if c.ended is not None],
        key=lambda e: (e[0], e[1]),  # an end before a start at the same instant
    )
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


async def test_a_slow_carrier_does_not_hold_other_deliveries(
    services: Runtime,
    engine: AsyncEngine,
    database: Settings,
    amqp: AbstractRobustConnection,
    uid: str,
) -> None:
    slow = database.model_copy(update={"carrier_latency_ms": 1000})
    assert slow.consumer_batch >= SHIPMENTS + OTHERS  # they can all share one transaction
    carrier = Carrier(shipping.bookings, dsn=slow.asyncpg_url, latency_ms=slow.carrier_latency_ms)
    created = [create_shipment(f"slow-{uid}-{i}") for i in range(SHIPMENTS)]
    others = [cancel_shipment(f"other-{uid}-{i}") for i in range(OTHERS)]
    async with carrier_installed(services, slow, carrier):
        # queued first, then delivered together: the consumer batches what waits together
        async with paused(services, "shipping"):
            for i, command in enumerate(created):
                await send(amqp, *command)
                if i % 2:
                    await send(amqp, *others[i // 2])

            async def all_queued() -> bool:
                return await queue_depth(amqp, SHIPPING.name) == SHIPMENTS + OTHERS

            await wait_for(all_queued, what="every shipping command queued")

        async def answered(commands: list[Any], reply: str) -> Any:
            found = [
                (await replies(services, engine, env.saga_id)).get(reply) for env, _ in commands
            ]
            return found if all(found) else None

        cancels = await wait_for(
            lambda: answered(others, ShipmentCancelled.TYPE), what="every other order answered"
        )
        shipments = await wait_for(
            lambda: answered(created, ShipmentCreated.TYPE), what="every shipment answered"
        )

    # Every shipment's carrier call overlapped every other's: none waited for another.
    keys = {shipping._key(env) for env, _ in created}
    booked = [c for c in carrier.history if c.operation == "book" and c.key in keys]
    assert len(booked) == SHIPMENTS
    assert all(c.outcome == "ok" for c in booked)
    assert most_at_once(booked) == SHIPMENTS

    # Every other message was committed and its reply published (``sent_at``, after the commit)
    # before the slowest shipment's booking was written at the carrier (``created_at``, at the
    # end of its slow call): by the database's clock, no timing threshold.
    async with engine.connect() as conn:
        last_booking = (
            await conn.execute(
                select(func.max(shipping.bookings.c.created_at)).where(
                    shipping.bookings.c.idempotency_key.in_(keys)
                )
            )
        ).scalar_one()
    assert max(sent_at for _, sent_at in cancels) < last_booking
    assert all(body["had_shipment"] is False for body, _ in cancels)
    assert len({body["tracking_number"] for body, _ in shipments}) == SHIPMENTS
