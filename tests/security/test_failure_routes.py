"""A consumer on its own restricted user retries and dead-letters its own messages end to end:
a transient failure goes round its delay queue (through the retry exchange) and comes back, a
permanent one lands in its DLQ (through the dead-letter exchange) with the reason headers, and
the dead-letter collector's user reads it there. The refusals for another service's routes are
in ``test_broker_permissions.py``.

The vhost is this test's own (``own_provisioned``): nothing else consumes ``sagabus.payment``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from sqlalchemy import MetaData, text
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import telemetry, topology
from messaging.codec import encode
from messaging.consumer import Consumer, Context
from messaging.db import create_schema, inbox_table, outbox_table
from messaging.errors import PermanentError, TransientError
from messaging.outbox import Outbox
from messaging.publisher import Publisher
from messaging.settings import Settings
from schemas.envelope import Envelope, HeaderNames
from schemas.payment import AuthorizePayment
from tests.security.conftest import Provisioned
from tests.support import DeadLetters, count, headers_of, publish, queue_depth, wait_until
from tests.support import text as as_text

pytestmark = pytest.mark.integration

SPEC = topology.QUEUES["payment"]
ROUTING_KEY = "payment.AuthorizePayment"


@dataclass
class Failing:
    """Fails the first ``failures[order_id]`` deliveries of a message with ``errors[order_id]``."""

    failures: dict[str, int] = field(default_factory=dict)
    errors: dict[str, type[Exception]] = field(default_factory=dict)
    calls: dict[str, list[int]] = field(default_factory=dict)

    async def __call__(self, ctx: Context) -> None:
        body = ctx.incoming.body
        assert isinstance(body, AuthorizePayment)
        seen = self.calls.setdefault(body.order_id, [])
        seen.append(ctx.retries)
        if len(seen) <= self.failures.get(body.order_id, 0):
            raise self.errors.get(body.order_id, TransientError)(f"failing #{len(seen)}")


@dataclass
class Rig:
    consumer: Consumer
    handler: Failing
    engine: AsyncEngine
    inbox: Any
    #: what the consumer was delivered: headers, plus the exchange and routing key
    deliveries: list[dict[str, Any]]
    #: the process manager's connection (it sends payment its commands)
    commands: AbstractRobustConnection
    #: the dead-letter collector's connection (it reads every DLQ)
    collector: AbstractRobustConnection
    #: the admin's connection, to look into queues
    admin: AbstractRobustConnection

    async def send(self, order_id: str) -> str:
        body = AuthorizePayment(
            order_id=order_id, amount_minor=100, currency="EUR", payment_token="tok_visa"
        )
        env = Envelope(
            message_id=uuid.uuid4(),
            type=body.TYPE,
            saga_id=uuid.uuid4(),
            correlation_id=uuid.uuid4(),
            step="authorization",
            occurred_at=datetime.now(UTC),
        )
        await publish(self.commands, topology.COMMANDS_EXCHANGE, ROUTING_KEY, encode(env, body))
        return str(env.message_id)


@pytest_asyncio.fixture
async def rig(
    own_provisioned: Provisioned, sec_settings: Settings, sec_engine: AsyncEngine
) -> AsyncIterator[Rig]:
    """payment's consumer, connected as payment's user, over an inbox and outbox of its own."""
    schema = f"sec_failure_routes_{uuid.uuid4().hex[:8]}"
    metadata = MetaData(schema=schema)
    inbox, outbox = inbox_table(metadata), outbox_table(metadata)
    await create_schema(sec_engine, schema, metadata)

    connections = {
        p: await aio_pika.connect_robust(url)
        for p, url in (
            ("payment", own_provisioned.url("payment")),
            ("process-manager", own_provisioned.url("process-manager")),
            ("dead-letters", own_provisioned.url("dead-letters")),
            ("admin", own_provisioned.admin_url),
        )
    }
    publisher = await Publisher.open(connections["payment"])
    handler = Failing()
    consumer = Consumer(
        service="payment",
        spec=SPEC,
        engine=sec_engine,
        inbox=inbox,
        outbox=Outbox(outbox, schema),
        handlers={AuthorizePayment.TYPE: handler},
        publisher=publisher,
        settings=sec_settings,
        tracer=telemetry.tracer("payment"),
    )
    deliveries: list[dict[str, Any]] = []
    process = consumer.on_message

    async def recording(delivery: AbstractIncomingMessage) -> None:
        deliveries.append(
            headers_of(delivery)
            | {"_exchange": delivery.exchange, "_routing_key": delivery.routing_key}
        )
        await process(delivery)

    consumer.on_message = recording  # type: ignore[method-assign]
    await consumer.start(await connections["payment"].channel())
    try:
        yield Rig(
            consumer,
            handler,
            sec_engine,
            inbox,
            deliveries,
            connections["process-manager"],
            connections["dead-letters"],
            connections["admin"],
        )
    finally:
        await consumer.stop()
        await publisher.close()
        for connection in connections.values():
            await connection.close()
        async with sec_engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


def deaths(headers: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(queue, exchange, routing keys) of each x-death entry."""
    return [
        (as_text(d["queue"]), as_text(d["exchange"]), [as_text(k) for k in d["routing-keys"]])
        for d in headers.get("x-death", [])
    ]


async def nothing_reached_other_services(rig: Rig) -> None:
    for spec in topology.QUEUES.values():
        if spec is not SPEC:
            for queue in (spec.name, spec.dlq, *spec.retry_queues):
                assert await queue_depth(rig.admin, queue) == 0, queue


async def test_a_transient_failure_goes_round_payments_delay_queue_and_comes_back(
    rig: Rig,
) -> None:
    rig.handler.failures["o-transient"] = 1
    message_id = await rig.send("o-transient")

    await wait_until(lambda: rig.consumer.counts["processed"] == 1, what="processing")

    assert rig.handler.calls["o-transient"] == [0, 1]
    assert rig.consumer.counts["retried"] == 1
    assert rig.consumer.counts["dead_lettered"] == 0
    first, second = rig.deliveries
    assert (first["_exchange"], first["_routing_key"]) == (topology.COMMANDS_EXCHANGE, ROUTING_KEY)
    # published to the retry exchange with its delay queue's name, expired back to the work queue
    exchange, key = topology.retry_route(SPEC, 1)
    assert deaths(second) == [(SPEC.retry_queue(1), exchange, [key])]
    assert second["_routing_key"] == SPEC.name
    assert second[HeaderNames.RETRY_COUNT] == 1
    assert second[HeaderNames.ERROR_CLASS] == "TransientError"
    assert await count(rig.engine, rig.inbox, message_id=uuid.UUID(message_id)) == 1
    assert await queue_depth(rig.admin, SPEC.dlq) == 0
    await nothing_reached_other_services(rig)


@pytest.mark.parametrize(
    ("error", "failures", "kind"),
    [(PermanentError, 1, "permanent"), (TransientError, 1000, "retries_exhausted")],
    ids=["permanent", "retries-exhausted"],
)
async def test_a_failed_message_lands_in_payments_dlq_with_the_reason(
    rig: Rig, sec_settings: Settings, error: type[Exception], failures: int, kind: str
) -> None:
    rig.handler.failures["o-failed"] = failures
    rig.handler.errors["o-failed"] = error
    message_id = await rig.send("o-failed")

    dead = await DeadLetters(rig.collector).wait(SPEC.dlq, message_id)

    attempts = 1 if kind == "permanent" else sec_settings.max_attempts
    assert len(rig.handler.calls["o-failed"]) == attempts
    assert (dead.exchange, dead.routing_key) == topology.dead_letter_route(SPEC.name)
    h = headers_of(dead)
    assert h[HeaderNames.FAILURE_KIND] == kind
    assert h[HeaderNames.ERROR_CLASS] == error.__name__
    assert h[HeaderNames.ERROR_MESSAGE] == f"failing #{attempts}"
    assert h[HeaderNames.FAILED_QUEUE] == SPEC.name
    assert h[HeaderNames.RETRY_COUNT] == attempts - 1
    assert h[HeaderNames.ORIGINAL_EXCHANGE] == topology.COMMANDS_EXCHANGE
    assert h[HeaderNames.ORIGINAL_ROUTING_KEY] == ROUTING_KEY
    assert h[HeaderNames.FAILED_AT]
    assert AuthorizePayment.model_validate_json(dead.body).order_id == "o-failed"
    assert rig.consumer.counts["dead_lettered"] == 1
    assert rig.consumer.counts["retried"] == attempts - 1
    await nothing_reached_other_services(rig)
