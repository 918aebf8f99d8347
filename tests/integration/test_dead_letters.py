"""Malformed messages on a work queue are dead-lettered at once, unchanged and with the reason,
and the consumer goes on serving."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import topology
from messaging.service import Runtime
from messaging.settings import Settings
from participants.inventory import service as inventory
from process_manager import ops
from schemas.envelope import HeaderNames
from schemas.payment import AuthorizePayment
from tests.support import DeadLetters, checkout, headers_of, publish, wait_terminal

pytestmark = pytest.mark.integration

QUEUE = topology.QUEUES["payment"]
ROUTING_KEY = "payment.AuthorizePayment"
VALID_BODY = {
    "order_id": "dl-1",
    "amount_minor": 100,
    "currency": "EUR",
    "payment_token": "tok_visa",
}

CASES = {
    "not-json": (AuthorizePayment.TYPE, b"\x00not json{", True, "body is not JSON"),
    "unknown-type": (
        "payment.Teleport.v1",
        json.dumps(VALID_BODY).encode(),
        True,
        "unknown message type 'payment.Teleport.v1'",
    ),
    "schema-invalid": (
        AuthorizePayment.TYPE,
        json.dumps({**VALID_BODY, "amount_minor": -5, "cvv": "123"}).encode(),
        True,
        "invalid payment.AuthorizePayment.v1: amount_minor: ",
    ),
    "no-saga-id": (
        AuthorizePayment.TYPE,
        json.dumps(VALID_BODY).encode(),
        False,
        f"missing header {HeaderNames.SAGA_ID}",
    ),
}


def malformed(type_: str, body: bytes, with_saga: bool) -> aio_pika.Message:
    headers = {
        HeaderNames.SAGA_ID: str(uuid.uuid4()),
        "traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01",
    }
    if not with_saga:
        del headers[HeaderNames.SAGA_ID]
    return aio_pika.Message(
        body=body,
        content_type="application/json",
        message_id=str(uuid.uuid4()),
        correlation_id=str(uuid.uuid4()),
        type=type_,
        timestamp=datetime.now(UTC),
        headers=headers,
    )


@pytest.mark.parametrize("case", list(CASES))
async def test_malformed_message_is_dead_lettered_with_its_reason(
    case: str, services: Runtime, amqp: AbstractRobustConnection, dead_letters: DeadLetters
) -> None:
    type_, body, with_saga, reason = CASES[case]
    sent = malformed(type_, body, with_saga)
    before = services.consumers["payment"].counts["dead_lettered"]

    await publish(amqp, topology.COMMANDS_EXCHANGE, ROUTING_KEY, sent)
    dead = await dead_letters.wait(QUEUE.dlq, str(sent.message_id))

    h = headers_of(dead)
    assert h[HeaderNames.FAILURE_KIND] == "permanent"
    assert h[HeaderNames.ERROR_CLASS] == "PermanentError"
    assert reason in h[HeaderNames.ERROR_MESSAGE]
    assert h[HeaderNames.FAILED_QUEUE] == QUEUE.name
    assert h[HeaderNames.ORIGINAL_EXCHANGE] == topology.COMMANDS_EXCHANGE
    assert h[HeaderNames.ORIGINAL_ROUTING_KEY] == ROUTING_KEY
    assert datetime.fromisoformat(h[HeaderNames.FAILED_AT]).tzinfo is not None
    assert h[HeaderNames.RETRY_COUNT] == 0
    # the original message, unchanged
    assert dead.body == body
    assert dead.type == type_
    assert dead.correlation_id == sent.correlation_id
    assert dead.content_type == "application/json"
    assert h["traceparent"] == sent.headers["traceparent"]
    assert services.consumers["payment"].counts["dead_lettered"] == before + 1


async def test_consumer_keeps_serving_after_malformed_messages(
    services: Runtime,
    engine: AsyncEngine,
    database: Settings,
    amqp: AbstractRobustConnection,
    dead_letters: DeadLetters,
    uid: str,
) -> None:
    poison = [malformed(t, b, s) for t, b, s, _ in CASES.values()]
    for m in poison:
        await publish(amqp, topology.COMMANDS_EXCHANGE, ROUTING_KEY, m)
    async with engine.begin() as conn:
        await inventory.seed(conn, {f"SKU-DL-{uid}": 1})
    cmd = checkout(f"dl-{uid}", sku=f"SKU-DL-{uid}")
    await ops.publish_starts(database.amqp_url, [ops.start_message(cmd)])

    status = await wait_terminal(engine, cmd.order_id)

    assert status["state"] == "COMPLETED"
    for m in poison:
        await dead_letters.wait(QUEUE.dlq, str(m.message_id))
