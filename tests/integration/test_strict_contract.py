"""Issue 10, item 3: the contract is as strict as its schema, on the real broker and database.

A ``StartCheckout`` with ``"quantity": "2"``, one whose total exceeds 10^12 minor units and one in
currency ``ZZZ`` are each dead-lettered at once (failure kind ``permanent``, never retried) with
a reason that names the field, and start nothing: no saga, no order, no payment.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import topology
from messaging.service import Runtime
from participants.order import service as order
from participants.payment import service as payment
from process_manager import ops
from process_manager.store import sagas
from schemas.checkout import StartCheckout, saga_id_for_order
from schemas.envelope import HeaderNames
from tests.support import DeadLetters, checkout, count, headers_of, publish

pytestmark = pytest.mark.integration

PM_QUEUE = topology.QUEUES["process-manager"]


def _body(order_id: str, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(checkout(order_id).model_dump_json())
    body.update(changes)
    return body


def _item(**changes: Any) -> dict[str, Any]:
    return {"sku": "SKU-STRICT", "quantity": 1, "unit_price_minor": 1500, **changes}


#: case -> (body changes, the reason the dead letter must carry)
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "quantity-as-string": (
        {"items": [_item(quantity="2")]},
        "invalid checkout.StartCheckout.v1: items.0.quantity: Input should be a valid integer",
    ),
    "total-above-10^12": (
        {"items": [_item(quantity=10_000, unit_price_minor=10**8 + 1)]},
        "invalid checkout.StartCheckout.v1: items: Value error, the total of the items is "
        "1000000010000 minor units, above the limit of 10^12",
    ),
    "currency-zzz": (
        {"currency": "ZZZ"},
        "invalid checkout.StartCheckout.v1: currency: Value error, 'ZZZ' is not an active "
        "ISO 4217 currency code",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_start_that_breaks_the_schema_is_dead_lettered_at_once_and_starts_nothing(
    case: str,
    services: Runtime,
    engine: AsyncEngine,
    amqp: AbstractRobustConnection,
    dead_letters: DeadLetters,
    uid: str,
) -> None:
    changes, reason = CASES[case]
    order_id = f"strict-{case.replace('^', '')}-{uid}"
    body = json.dumps(_body(order_id, **changes)).encode()
    sent = aio_pika.Message(
        body,
        content_type="application/json",
        type=StartCheckout.TYPE,
        message_id=str(uuid.uuid4()),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    consumer = services.consumers["process-manager"]
    retried_before = consumer.counts["retried"]

    await publish(amqp, topology.COMMANDS_EXCHANGE, topology.START_ROUTING_KEY, sent)
    dead = await dead_letters.wait(PM_QUEUE.dlq, str(sent.message_id))

    h = headers_of(dead)
    assert h[HeaderNames.FAILURE_KIND] == "permanent"
    assert h[HeaderNames.ERROR_CLASS] == "PermanentError"
    assert h[HeaderNames.ERROR_MESSAGE].startswith(reason), h[HeaderNames.ERROR_MESSAGE]
    assert h[HeaderNames.RETRY_COUNT] == 0
    assert h[HeaderNames.FAILED_QUEUE] == PM_QUEUE.name
    assert dead.body == body  # the message as sent
    assert consumer.counts["retried"] == retried_before
    # nothing started: no saga row, no order, no payment
    assert await count(engine, sagas, saga_id=saga_id_for_order(order_id)) == 0
    assert await ops.saga_status(engine, order_id) is None
    assert await count(engine, order.orders, order_id=order_id) == 0
    assert await count(engine, payment.payments, order_id=order_id) == 0
    assert await count(engine, payment.ledger, order_id=order_id) == 0
