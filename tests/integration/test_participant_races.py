"""Participants under concurrent deliveries of one step's command (a re-send racing the original),
with the race forced deterministically by holding a table lock the first transaction needs."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from messaging import topology
from messaging.service import Runtime
from messaging.settings import Settings
from participants.inventory import service as inventory
from participants.payment import service as payment
from process_manager import ops
from schemas.checkout import StartCheckout, saga_id_for_order
from schemas.payment import AuthorizePayment, PaymentAuthorized
from tests.support import (
    DeadLetters,
    checkout,
    copy_of_outbox_row,
    count,
    paused,
    publish,
    queue_depth,
    sent_outbox_row,
    wait_for,
    wait_terminal,
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
