"""The outbox relay against the real broker and database: publisher confirms, rows marked sent
only after the broker has the message, and unroutable rows left unsent."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import aiormq
import pytest
import pytest_asyncio
from aio_pika import ExchangeType
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from sqlalchemy import MetaData, text
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import telemetry
from messaging.db import create_schema, outbox_table
from messaging.outbox import Outbox, OutgoingMessage, Relay
from messaging.publisher import Publisher
from messaging.settings import Settings
from schemas.envelope import Envelope, HeaderNames
from schemas.order import CreateOrder
from tests.support import headers_of, rows, wait_for

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN}-01"


@dataclass
class Rig:
    outbox: Outbox
    relay: Relay
    exchange: str
    queue: AbstractQueue
    engine: AsyncEngine

    async def write(self, *messages: OutgoingMessage) -> None:
        async with self.engine.begin() as conn:
            await self.outbox.write(conn, messages)

    async def unsent(self) -> list[uuid.UUID]:
        found = await rows(self.engine, self.outbox.table)
        return [r.message_id for r in found if r.sent_at is None]

    async def received(self, n: int, *, timeout: float = 30) -> list[AbstractIncomingMessage]:
        got: list[AbstractIncomingMessage] = []

        async def probe() -> bool:
            while (m := await self.queue.get(no_ack=True, fail=False)) is not None:
                got.append(m)
            return len(got) >= n

        await wait_for(probe, timeout=timeout, what=f"{n} messages on the test queue")
        return got


@pytest_asyncio.fixture
async def rig(
    database: Settings, engine: AsyncEngine, amqp: AbstractRobustConnection, uid: str
) -> AsyncIterator[Rig]:
    """An outbox table in a schema of its own, a relay over it, and a throwaway exchange with one
    queue bound for routing key ``routed``."""
    schema = f"it_outbox_{uid}"
    metadata = MetaData(schema=schema)
    table = outbox_table(metadata)
    await create_schema(engine, schema, metadata)
    channel = await amqp.channel()
    exchange = await channel.declare_exchange(
        f"it.relay.{uid}", ExchangeType.TOPIC, auto_delete=True
    )
    queue = await channel.declare_queue(f"it.relay.{uid}", exclusive=True)
    await queue.bind(exchange, routing_key="routed")
    outbox = Outbox(table, schema)
    publisher = await Publisher.open(amqp)
    relay = Relay(
        service="it-relay",
        engine=engine,
        outbox=outbox,
        publisher=publisher,
        settings=database,
        tracer=telemetry.tracer("it-relay"),
    )
    yield Rig(outbox, relay, exchange.name, queue, engine)
    await publisher.close()
    await channel.close()
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


def message(exchange: str, routing_key: str, n: int = 1) -> OutgoingMessage:
    saga_id = uuid.uuid4()
    body = CreateOrder(
        order_id=f"relay-{n}", customer_id="cus_1", amount_minor=100 * n, currency="EUR"
    )
    env = Envelope(
        message_id=uuid.uuid4(),
        type=body.TYPE,
        saga_id=saga_id,
        correlation_id=uuid.uuid4(),
        causation_id=uuid.uuid4(),
        idempotency_key=f"{saga_id}:order",
        step="order",
        attempt=1,
        fence=n,
        occurred_at=datetime.now(UTC),
        traceparent=TRACEPARENT,
    )
    return OutgoingMessage(env, body, exchange, routing_key)


async def test_relay_publishes_rows_with_their_envelope_and_marks_them_sent(rig: Rig) -> None:
    sent = [message(rig.exchange, "routed", n) for n in (1, 2, 3)]
    await rig.write(*sent)
    assert sorted(await rig.unsent()) == sorted(m.envelope.message_id for m in sent)

    assert await rig.relay.drain() == 3

    got = {m.message_id: m for m in await rig.received(3)}
    assert set(got) == {str(m.envelope.message_id) for m in sent}
    for m in sent:
        amqp = got[str(m.envelope.message_id)]
        assert amqp.type == "order.CreateOrder.v1"
        assert amqp.content_type == "application/json"
        assert amqp.correlation_id == str(m.envelope.correlation_id)
        assert amqp.body == m.body.model_dump_json().encode()
        h = headers_of(amqp)
        assert h[HeaderNames.SAGA_ID] == str(m.envelope.saga_id)
        assert h[HeaderNames.CAUSATION_ID] == str(m.envelope.causation_id)
        assert h[HeaderNames.IDEMPOTENCY_KEY] == m.envelope.idempotency_key
        assert h[HeaderNames.STEP] == "order"
        assert h[HeaderNames.FENCE] == m.envelope.fence
        assert h[HeaderNames.OCCURRED_AT] == m.envelope.occurred_at.isoformat()
        # the relay's PRODUCER span continues the trace the row was written in
        version, trace_id, span_id, _flags = h["traceparent"].split("-")
        assert (version, trace_id) == ("00", TRACE_ID)
        assert span_id != PARENT_SPAN
    assert await rig.unsent() == []
    assert all(r.sent_at is not None for r in await rows(rig.engine, rig.outbox.table))

    # nothing is published twice once marked sent
    assert await rig.relay.drain() == 0
    assert await rig.queue.get(no_ack=True, fail=False) is None


async def test_unroutable_row_rolls_back_the_batch_and_is_published_once_routable(rig: Rig) -> None:
    """``mandatory`` + ``on_return_raises``: the broker returns a message no queue is bound for,
    the publish raises, the claiming transaction rolls back and every row of the batch stays
    unsent. Routable rows of that batch did reach the broker and are published again later
    (at-least-once, same message id, for the consumers' inboxes to drop)."""
    good = message(rig.exchange, "routed", 1)
    lost = message(rig.exchange, "nobody-listens", 2)
    await rig.write(good, lost)

    with pytest.raises(aiormq.exceptions.PublishError):
        await rig.relay.drain()

    first = await rig.received(1)
    assert [m.message_id for m in first] == [str(good.envelope.message_id)]
    both = sorted([good.envelope.message_id, lost.envelope.message_id])
    assert sorted(await rig.unsent()) == both
    assert rig.relay.published == 0

    # the route appears (for example a topology fix): the next drain publishes both rows
    await rig.queue.bind(rig.exchange, routing_key="nobody-listens")
    assert await rig.relay.drain() == 2
    again = await rig.received(2)
    assert sorted(m.message_id for m in again) == sorted(
        [str(good.envelope.message_id), str(lost.envelope.message_id)]
    )
    assert await rig.unsent() == []


async def test_rows_written_in_a_rolled_back_transaction_are_never_published(rig: Rig) -> None:
    m = message(rig.exchange, "routed")

    class Abort(Exception):
        pass

    with pytest.raises(Abort):
        async with rig.engine.begin() as conn:
            await rig.outbox.write(conn, [m])
            raise Abort

    assert await rig.relay.drain() == 0
    assert await rows(rig.engine, rig.outbox.table) == []
    assert await rig.queue.get(no_ack=True, fail=False) is None


async def test_a_commit_signalled_during_a_drain_is_published_without_waiting_for_the_poll(
    rig: Rig, database: Settings
) -> None:
    # This relay hears only the in-process signal and would otherwise poll once an hour.
    relay = _relay(rig, _quiet(database))
    late = message(rig.exchange, "routed")
    drain = relay.drain
    drains = 0

    async def drain_then_a_commit_lands(**kw: float) -> int:
        nonlocal drains
        published = await drain(**kw)
        drains += 1
        if drains == 1:  # a writer commits after this drain's last (empty) claim
            await rig.write(late)
            rig.outbox.committed()
        return published

    relay.drain = drain_then_a_commit_lands  # type: ignore[method-assign]
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    try:
        got = await rig.received(1, timeout=5)
    finally:
        stop.set()
        await running
    assert [m.message_id for m in got] == [str(late.envelope.message_id)]


def _quiet(database: Settings, **extra: object) -> Settings:
    """Settings for a relay that hears no NOTIFY (its LISTEN connection has nowhere to go) and
    would poll once an hour: only what the test does wakes it."""
    return database.model_copy(
        update={
            "database_url": "postgresql://postgres@127.0.0.1:1/nowhere",
            "outbox_poll_s": 3600,
            **extra,
        }
    )


def _relay(rig: Rig, settings: Settings) -> Relay:
    return Relay(
        service="it-relay-dispatch",
        engine=rig.engine,
        outbox=rig.outbox,
        publisher=rig.relay.publisher,
        settings=settings,
        tracer=telemetry.tracer("it-relay"),
    )


async def _write_and_hand_over(rig: Rig, *messages: OutgoingMessage) -> None:
    async with rig.engine.begin() as conn:
        written = await rig.outbox.write(conn, messages, notify=False)
    assert [p.message_id for p in written] == [m.envelope.message_id for m in messages]
    rig.outbox.committed(written)


async def test_committed_rows_are_dispatched_without_reading_them_back(
    rig: Rig, database: Settings
) -> None:
    """The writer hands its committed rows to its own process's relay: they are published,
    with the same envelope as the sweep gives them, and marked sent, and no sweep ran for
    them (the sweep only ran once, at start-up, before they existed)."""
    relay = _relay(rig, _quiet(database))
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    try:
        await wait_for(lambda: _true(relay.drains == 1), timeout=10, what="the start-up sweep")
        sent = [message(rig.exchange, "routed", n) for n in (1, 2)]
        await _write_and_hand_over(rig, *sent)
        got = await rig.received(2, timeout=10)
        await wait_for(lambda: _unsent_is_empty(rig), timeout=10, what="the rows to be marked sent")
    finally:
        stop.set()
        await running
    assert sorted(m.message_id for m in got) == sorted(str(m.envelope.message_id) for m in sent)
    for amqp, m in zip(
        sorted(got, key=lambda g: g.message_id or ""),
        sorted(sent, key=lambda s: str(s.envelope.message_id)),
        strict=True,
    ):
        h = headers_of(amqp)
        assert amqp.body == m.body.model_dump_json().encode()
        assert h[HeaderNames.SAGA_ID] == str(m.envelope.saga_id)
        assert h[HeaderNames.FENCE] == m.envelope.fence
        assert h["traceparent"].split("-")[1] == TRACE_ID
    assert (relay.dispatched, relay.drains) == (2, 1)
    assert rig.outbox.in_flight == set()


async def test_the_polled_sweep_leaves_young_and_in_flight_rows_to_their_dispatcher(
    rig: Rig,
) -> None:
    young = message(rig.exchange, "routed", 1)
    await rig.write(young)
    # on the poll the sweep takes only rows older than the grace period
    assert await rig.relay.drain(grace_s=3600) == 0
    # rows this process is dispatching are never the sweep's, whatever their age
    [row] = [r for r in await rows(rig.engine, rig.outbox.table)]
    rig.outbox.in_flight.add(row.id)
    assert await rig.relay.drain() == 0
    rig.outbox.in_flight.clear()
    # a writer's wake-up (or a restart) takes every unsent row at once
    assert await rig.relay.drain() == 1
    assert [m.message_id for m in await rig.received(1)] == [str(young.envelope.message_id)]


async def test_a_failed_dispatch_leaves_the_rows_to_the_sweep(rig: Rig, database: Settings) -> None:
    """An unroutable row makes the dispatch's publish raise: nothing is marked sent, and the
    sweep publishes the rows once they can be routed (at-least-once, same ids)."""
    # one row per batch: the failing batch also gives the row queued behind it to the sweep
    relay = _relay(rig, _quiet(database, outbox_dispatch_grace_s=0, outbox_batch=1))
    rig.outbox.dispatching = True  # as Relay.run sets it; dispatch is driven by hand here
    good = message(rig.exchange, "routed", 1)
    lost = message(rig.exchange, "nobody-listens-yet", 2)
    await _write_and_hand_over(rig, lost, good)
    assert await relay.dispatch_once() == 0
    assert rig.outbox.in_flight == set() and not rig.outbox.pending
    assert sorted(await rig.unsent()) == sorted(
        [good.envelope.message_id, lost.envelope.message_id]
    )
    await rig.queue.bind(rig.exchange, routing_key="nobody-listens-yet")
    assert await relay.drain() == 2  # one batch of one row after the other
    assert await rig.unsent() == []


async def _true(value: bool) -> bool:
    return value


async def _unsent_is_empty(rig: Rig) -> bool:
    return await rig.unsent() == []


async def test_if_dispatch_dies_the_sweep_takes_its_rows(rig: Rig, database: Settings) -> None:
    """A dispatcher that fails unexpectedly (a bug) hands the rows it held back to the sweep:
    nothing stays excluded from the sweep, and the rows are published all the same."""
    relay = _relay(rig, _quiet(database))

    async def broken() -> int:
        raise RuntimeError("a bug in dispatch")

    relay.dispatch_once = broken  # type: ignore[method-assign]
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    try:
        await wait_for(lambda: _true(relay.drains == 1), timeout=10, what="the start-up sweep")
        sent = message(rig.exchange, "routed", 1)
        await _write_and_hand_over(rig, sent)
        got = await rig.received(1, timeout=10)
        assert [m.message_id for m in got] == [str(sent.envelope.message_id)]
        assert rig.outbox.in_flight == set()
        assert not rig.outbox.dispatching
    finally:
        stop.set()
        await running
