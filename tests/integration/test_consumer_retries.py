"""The consumer's failure routes on the real broker: transient errors go round the delay queues
and come back, a bounded number of times; permanent errors and exhausted retries are
dead-lettered with the reason. Driven with a ``Consumer`` built directly over a throwaway queue
declared by ``topology.declare`` itself."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

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
from schemas.order import CreateOrder, OrderCreated
from tests.support import DeadLetters, count, headers_of, publish, queue_depth, wait_until
from tests.support import text as as_text

pytestmark = pytest.mark.integration


@dataclass
class Flaky:
    """A handler that fails the first ``failures[order_id]`` deliveries of a message."""

    failures: dict[str, int] = field(default_factory=dict)
    errors: dict[str, type[Exception]] = field(default_factory=dict)
    calls: dict[str, list[int]] = field(default_factory=dict)

    async def __call__(self, ctx: Context) -> None:
        body = ctx.incoming.body
        assert isinstance(body, CreateOrder)
        seen = self.calls.setdefault(body.order_id, [])
        seen.append(ctx.retries)
        if len(seen) <= self.failures.get(body.order_id, 0):
            raise self.errors.get(body.order_id, TransientError)(f"flaky #{len(seen)}")
        ctx.reply(OrderCreated(order_id=body.order_id))


@dataclass
class Rig:
    consumer: Consumer
    handler: Flaky
    spec: topology.QueueSpec
    routing_key: str
    engine: AsyncEngine
    inbox: Any
    outbox: Any
    amqp: AbstractRobustConnection
    deliveries: list[dict[str, Any]]

    async def send(self, order_id: str) -> str:
        body = CreateOrder(order_id=order_id, customer_id="cus_1", amount_minor=1, currency="EUR")
        env = Envelope(
            message_id=uuid.uuid4(),
            type=body.TYPE,
            saga_id=uuid.uuid4(),
            correlation_id=uuid.uuid4(),
            step="order",
            occurred_at=datetime.now(UTC),
        )
        await publish(self.amqp, topology.COMMANDS_EXCHANGE, self.routing_key, encode(env, body))
        return str(env.message_id)


@pytest_asyncio.fixture
async def rig(
    database: Settings,
    engine: AsyncEngine,
    amqp: AbstractRobustConnection,
    uid: str,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Rig]:
    service = f"it-retry-{uid}"
    spec = topology.QueueSpec(
        service, f"sagabus.{service}", ((topology.COMMANDS_EXCHANGE, f"{service}.#"),)
    )
    monkeypatch.setitem(topology.QUEUES, service, spec)
    # the one route its commands may come by (messaging.trust)
    route = topology.Route(topology.COMMANDS_EXCHANGE, f"{service}.CreateOrder")
    monkeypatch.setitem(
        topology.ACCEPTED, spec.name, {CreateOrder.TYPE: (route, topology.ANY_SENDER)}
    )
    channel = await amqp.channel()
    await topology.declare(channel, database, (service,))

    schema = f"it_consumer_{uid}"
    metadata = MetaData(schema=schema)
    inbox, outbox = inbox_table(metadata), outbox_table(metadata)
    await create_schema(engine, schema, metadata)

    handler = Flaky()
    publisher = await Publisher.open(amqp)
    consumer = Consumer(
        service=service,
        spec=spec,
        engine=engine,
        inbox=inbox,
        outbox=Outbox(outbox, schema),
        handlers={CreateOrder.TYPE: handler},
        publisher=publisher,
        settings=database,
        tracer=telemetry.tracer(service),
    )
    deliveries: list[dict[str, Any]] = []
    process = consumer.on_message

    async def recording(delivery: AbstractIncomingMessage) -> None:
        deliveries.append(headers_of(delivery) | {"_routing_key": delivery.routing_key})
        await process(delivery)

    consumer.on_message = recording  # type: ignore[method-assign]
    await consumer.start(await amqp.channel())
    yield Rig(
        consumer, handler, spec, f"{service}.CreateOrder", engine, inbox, outbox, amqp, deliveries
    )
    await consumer.stop()
    await publisher.close()
    for name in (spec.name, spec.dlq, *(spec.retry_queue(t) for t in range(1, 5))):
        await channel.queue_delete(name)
    await channel.close()
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


def x_death_queues(headers: dict[str, Any]) -> set[str]:
    return {as_text(d["queue"]) for d in headers.get("x-death", [])}


async def test_transient_failures_go_round_the_delay_queues_then_succeed_once(
    rig: Rig, database: Settings
) -> None:
    rig.handler.failures["o-flaky"] = 2
    message_id = await rig.send("o-flaky")

    await wait_until(lambda: rig.consumer.counts["processed"] == 1, what="processing")

    assert rig.handler.calls["o-flaky"] == [0, 1, 2]
    assert rig.consumer.counts == {
        "processed": 1,
        "duplicates": 0,
        "retried": 2,
        "dead_lettered": 0,
        "rejected_security": 0,
    }
    first, second, third = rig.deliveries
    assert HeaderNames.RETRY_COUNT not in first
    assert (second[HeaderNames.RETRY_COUNT], third[HeaderNames.RETRY_COUNT]) == (1, 2)
    # each retry waited in the next delay tier and was dead-lettered back to the work queue
    assert x_death_queues(second) == {rig.spec.retry_queue(1)}
    assert x_death_queues(third) == {rig.spec.retry_queue(1), rig.spec.retry_queue(2)}
    assert second["_routing_key"] == third["_routing_key"] == rig.spec.name
    assert second[HeaderNames.ERROR_CLASS] == "TransientError"
    assert second[HeaderNames.ORIGINAL_EXCHANGE] == topology.COMMANDS_EXCHANGE
    assert third[HeaderNames.ORIGINAL_ROUTING_KEY] == rig.routing_key
    # processed exactly once: one inbox row, one reply in the outbox
    assert await count(rig.engine, rig.inbox, message_id=uuid.UUID(message_id)) == 1
    assert await count(rig.engine, rig.outbox, message_type=OrderCreated.TYPE) == 1
    assert await queue_depth(rig.amqp, rig.spec.dlq) == 0


async def test_retries_exhausted_dead_letter_with_the_reason(
    rig: Rig, database: Settings, dead_letters: DeadLetters
) -> None:
    rig.handler.failures["o-broken"] = 1000
    message_id = await rig.send("o-broken")

    dead = await dead_letters.wait(rig.spec.dlq, message_id)

    assert rig.handler.calls["o-broken"] == list(range(database.max_attempts))
    h = headers_of(dead)
    assert h[HeaderNames.FAILURE_KIND] == "retries_exhausted"
    assert h[HeaderNames.RETRY_COUNT] == database.max_attempts - 1
    assert h[HeaderNames.ERROR_CLASS] == "TransientError"
    assert h[HeaderNames.ERROR_MESSAGE] == f"flaky #{database.max_attempts}"
    assert h[HeaderNames.FAILED_QUEUE] == rig.spec.name
    # the first exchange and routing key survive the trips through the delay queues
    assert h[HeaderNames.ORIGINAL_EXCHANGE] == topology.COMMANDS_EXCHANGE
    assert h[HeaderNames.ORIGINAL_ROUTING_KEY] == rig.routing_key
    assert dead.type == CreateOrder.TYPE
    assert CreateOrder.model_validate_json(dead.body).order_id == "o-broken"
    assert rig.consumer.counts["retried"] == database.max_attempts - 1
    assert rig.consumer.counts["dead_lettered"] == 1
    # nothing of the failed attempts was committed
    assert await count(rig.engine, rig.inbox, message_id=uuid.UUID(message_id)) == 0
    assert await count(rig.engine, rig.outbox) == 0


@pytest.mark.parametrize(
    ("error", "retries"),
    [(PermanentError, 0), (ValueError, None)],
    ids=["permanent-at-once", "unexpected-error-bounded"],
)
async def test_other_handler_errors(
    rig: Rig,
    database: Settings,
    dead_letters: DeadLetters,
    error: type[Exception],
    retries: int | None,
) -> None:
    """A ``PermanentError`` dead-letters at once; an unexpected exception (a bug) is retried like
    a transient one, boundedly, then dead-lettered with its class."""
    rig.handler.failures["o-err"] = 1000
    rig.handler.errors["o-err"] = error
    message_id = await rig.send("o-err")

    dead = await dead_letters.wait(rig.spec.dlq, message_id)

    h = headers_of(dead)
    expected_calls = 1 if retries == 0 else database.max_attempts
    assert len(rig.handler.calls["o-err"]) == expected_calls
    assert h[HeaderNames.ERROR_CLASS] == error.__name__
    assert h[HeaderNames.FAILURE_KIND] == ("permanent" if retries == 0 else "retries_exhausted")
    assert rig.consumer.counts["retried"] == expected_calls - 1


async def test_a_transient_error_sets_its_own_headers_on_the_retried_copy(rig: Rig) -> None:
    """A handler's own retry bookkeeping (shipping counts carrier failures this way) travels on
    the copy that goes round the delay queue; the consumer's retry count is not its to set."""
    seen: list[tuple[int, int]] = []

    async def counting(ctx: Context) -> None:
        body = ctx.incoming.body
        assert isinstance(body, CreateOrder)
        own = int(ctx.incoming.headers.get("x-test-own-count", 0))
        seen.append((own, ctx.retries))
        if own < 2:
            raise TransientError(
                "again", headers={"x-test-own-count": own + 1, HeaderNames.RETRY_COUNT: 99}
            )
        ctx.reply(OrderCreated(order_id=body.order_id))

    rig.consumer.handlers[CreateOrder.TYPE] = counting
    await rig.send("o-own-count")

    await wait_until(lambda: rig.consumer.counts["processed"] == 1, what="processing")
    assert seen == [(0, 0), (1, 1), (2, 2)]
    assert [d.get("x-test-own-count") for d in rig.deliveries] == [None, 1, 2]
