"""The inbox: a message delivered again (same message id) is acknowledged and does nothing."""

from __future__ import annotations

import pytest
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import topology
from messaging.service import Runtime
from messaging.settings import Settings
from participants.inventory import service as inventory
from participants.payment import service as payment
from process_manager import ops
from schemas.checkout import saga_id_for_order
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
    wait_until,
)

pytestmark = pytest.mark.integration

PAYMENT = topology.QUEUES["payment"]


async def test_same_command_delivered_twice_is_processed_once(
    services: Runtime,
    engine: AsyncEngine,
    database: Settings,
    amqp: AbstractRobustConnection,
    dead_letters: DeadLetters,
    uid: str,
) -> None:
    """Both copies of one AuthorizePayment wait in the payment queue together; one authorizes,
    the other finds its inbox row, is acked, and emits nothing."""
    sku = f"SKU-INBOX-{uid}"
    async with engine.begin() as conn:
        await inventory.seed(conn, {sku: 3})
    cmd = checkout(f"inbox-{uid}", sku=sku)
    saga_id = saga_id_for_order(cmd.order_id)
    consumer = services.consumers["payment"]

    async with paused(services, "payment"):
        await ops.publish_starts(database.amqp_url, [ops.start_message(cmd)])
        original = await sent_outbox_row(
            engine, services.relays["process-manager"].outbox.table, saga_id, AuthorizePayment.TYPE
        )
        await publish(
            amqp, topology.COMMANDS_EXCHANGE, original.routing_key, copy_of_outbox_row(original)
        )

        async def both_waiting() -> bool:
            return await queue_depth(amqp, PAYMENT.name) == 2

        await wait_for(both_waiting, what="both copies in the payment queue")
        before = dict(consumer.counts)

    status = await wait_terminal(engine, cmd.order_id)

    assert status["state"] == "COMPLETED"
    await wait_until(
        lambda: consumer.counts["duplicates"] == before["duplicates"] + 1,
        what="the copy to be acked as a duplicate",
    )
    assert await count(engine, consumer.inbox, message_id=original.message_id) == 1
    assert await count(engine, payment.ledger, order_id=cmd.order_id, kind="authorize") == 1
    assert await count(engine, payment.ledger, order_id=cmd.order_id, kind="capture") == 1
    # the duplicate emitted no second reply: the saga received exactly one PaymentAuthorized
    replies = [h for h in status["history"] if h["message_type"] == PaymentAuthorized.TYPE]
    assert [h["outcome"] for h in replies] == ["applied"]
    # both deliveries were acked: nothing waits, nothing unacked blocks, nothing dead-lettered
    assert await queue_depth(amqp, PAYMENT.name) == 0
    assert consumer.in_flight == 0
    assert await dead_letters.absent(PAYMENT.dlq, str(original.message_id))
