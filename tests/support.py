"""Helpers for tests against the real RabbitMQ and PostgreSQL: isolation, polling, and looking
into queues, dead-letter queues and tables."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import aio_pika
import asyncpg
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import topology
from messaging.codec import Incoming
from messaging.consumer import Context, Handler, Preparation, TwoPhase
from messaging.management import LOCAL_ADMIN_URL, Management, ManagementError
from messaging.service import Runtime
from process_manager import ops
from schemas.base import Message
from schemas.checkout import StartCheckout
from schemas.common import LineItem, ShippingAddress
from schemas.envelope import Envelope

T = TypeVar("T")

ADDRESS = ShippingAddress(line1="1 Test Street", city="Utrecht", postal_code="3511AA", country="NL")


async def wait_for(
    probe: Callable[[], Awaitable[T]],
    *,
    timeout: float = 30,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``probe`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval)


def checkout(
    order_id: str | None = None,
    *,
    sku: str = "SKU-T",
    quantity: int = 1,
    price: int = 1500,
    token: str = "tok_visa",
    postal_code: str = "3511AA",
) -> StartCheckout:
    return StartCheckout(
        order_id=order_id or f"t-{uuid.uuid4().hex[:12]}",
        customer_id="cus_test",
        currency="EUR",
        items=(LineItem(sku=sku, quantity=quantity, unit_price_minor=price),),
        payment_token=token,
        shipping_address=ADDRESS.model_copy(update={"postal_code": postal_code}),
    )


async def wait_until(predicate: Callable[[], Any], **kwargs: Any) -> Any:
    """``wait_for`` with a plain (synchronous) predicate, such as a counter reaching a value."""

    async def probe() -> Any:
        return predicate()

    return await wait_for(probe, **kwargs)


async def wait_terminal(
    engine: AsyncEngine,
    order_id: str,
    *,
    timeout: float = 30,
) -> dict[str, Any]:
    """Poll until the saga of ``order_id`` is in a terminal state; returns ``ops.saga_status``."""

    async def probe() -> dict[str, Any] | None:
        s = await ops.saga_status(engine, order_id)
        return s if s and s["terminal"] else None

    return await wait_for(probe, timeout=timeout, what=f"saga of {order_id} to finish")


def text(value: Any) -> Any:
    """AMQP header values may arrive as bytes; compare them as text."""
    return value.decode() if isinstance(value, bytes) else value


def headers_of(message: AbstractIncomingMessage) -> dict[str, Any]:
    return {k: text(v) for k, v in (message.headers or {}).items()}


# -- PostgreSQL queries ------------------------------------------------------------------------


async def count(engine: AsyncEngine, table: Table, **where: Any) -> int:
    stmt = select(func.count()).select_from(table)
    for column, value in where.items():
        stmt = stmt.where(table.c[column] == value)
    async with engine.connect() as conn:
        return int((await conn.execute(stmt)).scalar_one())


async def rows(engine: AsyncEngine, table: Table, **where: Any) -> list[Any]:
    stmt = select(table)
    for column, value in where.items():
        stmt = stmt.where(table.c[column] == value)
    if "id" in table.c:
        stmt = stmt.order_by(table.c.id)
    async with engine.connect() as conn:
        return list((await conn.execute(stmt)).all())


async def one(engine: AsyncEngine, table: Table, **where: Any) -> Any:
    found = await rows(engine, table, **where)
    assert len(found) == 1, f"expected one {table.fullname} row for {where}, found {len(found)}"
    return found[0]


# -- RabbitMQ ----------------------------------------------------------------------------------


async def queue_depth(connection: AbstractConnection, queue: str) -> int:
    """Ready messages in ``queue`` (a fresh channel: aio-pika caches declarations per channel)."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def publish(
    connection: AbstractConnection, exchange: str, routing_key: str, message: aio_pika.Message
) -> None:
    """Publish with publisher confirms; unroutable messages raise."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    try:
        ex = (
            channel.default_exchange
            if exchange == ""
            else await channel.get_exchange(exchange, ensure=False)
        )
        await ex.publish(message, routing_key=routing_key, mandatory=True)
    finally:
        await channel.close()


async def sent_outbox_row(
    engine: AsyncEngine,
    table: Table,
    saga_id: uuid.UUID,
    message_type: str,
    *,
    timeout: float = 30,
) -> Any:
    """Wait until the outbox row of ``message_type`` for ``saga_id`` has been published."""

    async def probe() -> Any:
        found = [
            r
            for r in await rows(engine, table, saga_id=saga_id, message_type=message_type)
            if r.sent_at is not None
        ]
        return found[0] if found else None

    return await wait_for(probe, timeout=timeout, what=f"{message_type} of {saga_id} published")


def copy_of_outbox_row(row: Any, *, message_id: uuid.UUID | None = None) -> aio_pika.Message:
    """The AMQP message a relay publishes for an outbox row (optionally under a new id)."""
    return aio_pika.Message(
        body=row.body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(message_id or row.message_id),
        type=row.message_type,
        correlation_id=str(row.correlation_id) if row.correlation_id else None,
        headers=dict(row.headers),
    )


class DeadLetters:
    """Takes messages off dead-letter queues and keeps them by (queue, message id), so tests
    sharing one DLQ each find their own message without requeueing the others'."""

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self.seen: dict[tuple[str, str | None], AbstractIncomingMessage] = {}

    async def _drain(self, queue: str) -> None:
        channel = await self.connection.channel()
        try:
            q = await channel.get_queue(queue, ensure=False)
            while (m := await q.get(no_ack=True, fail=False)) is not None:
                self.seen[(queue, m.message_id)] = m
        finally:
            await channel.close()

    async def wait(
        self,
        queue: str,
        message_id: str,
        *,
        timeout: float = 30,
    ) -> AbstractIncomingMessage:
        async def probe() -> AbstractIncomingMessage | None:
            await self._drain(queue)
            return self.seen.get((queue, message_id))

        return await wait_for(probe, timeout=timeout, what=f"{message_id} in {queue}")

    async def absent(self, queue: str, message_id: str) -> bool:
        await self._drain(queue)
        return (queue, message_id) not in self.seen


@contextlib.asynccontextmanager
async def paused(runtime: Runtime, service: str) -> AsyncIterator[None]:
    """Stop ``service`` consuming (its messages wait in its queue), then resume on exit."""
    consumer = runtime.consumers[service]
    await consumer.stop()
    try:
        yield
    finally:
        assert runtime.connection is not None
        await consumer.start(await runtime.connection.channel())


def mgmt_json(path: str) -> Any:
    return Management(LOCAL_ADMIN_URL).call("GET", path)


def vhost_path(vhost: str) -> str:
    return urllib.parse.quote(vhost, safe="")


def env_for(amqp_url: str, database_url: str, base: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in base.items() if not k.startswith("SAGABUS_")}
    env.update(SAGABUS_AMQP_URL=amqp_url, SAGABUS_DATABASE_URL=database_url)
    return env


# -- RabbitMQ vhosts -------------------------------------------------------------------------


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def create_vhost(name: str) -> None:
    try:
        Management(LOCAL_ADMIN_URL).create_vhost(name, user="guest")
        return
    except ManagementError:
        pass
    if shutil.which("rabbitmqctl") is None:
        raise RuntimeError("cannot create a RabbitMQ vhost: no management API and no rabbitmqctl")
    _ctl("add_vhost", name)
    _ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")


def delete_vhost(name: str) -> None:
    try:
        Management(LOCAL_ADMIN_URL).delete_vhost(name)
        return
    except ManagementError:
        pass
    _ctl("delete_vhost", name)


async def drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# -- one participant delivery, as the consumer runs it (minus inbox and outbox) ----------------


def delivery(
    body: Message,
    saga_id: uuid.UUID | None = None,
    *,
    step: str = "step",
    idempotency_key: str | None = None,
) -> Incoming:
    """``body`` as the process manager would send it for ``saga_id`` (a fresh one by default)."""
    saga_id = saga_id or uuid.uuid4()
    return Incoming(
        Envelope(
            message_id=uuid.uuid4(),
            type=body.TYPE,
            saga_id=saga_id,
            correlation_id=saga_id,
            idempotency_key=idempotency_key or f"{saga_id}:{step}",
            step=step,
            fence=1,
            occurred_at=datetime.now(UTC),
        ),
        body,
    )


async def deliver(
    engine: AsyncEngine,
    handler: Handler,
    service: str,
    body: Message,
    saga_id: uuid.UUID | None = None,
    *,
    step: str = "step",
    idempotency_key: str | None = None,
) -> Context:
    """One delivery: a two-phase handler's ``prepare`` outside any transaction, then the
    handler in the delivery's transaction."""
    message = delivery(body, saga_id, step=step, idempotency_key=idempotency_key)
    prepared = None
    if isinstance(handler, TwoPhase):
        prepared = await handler.prepare(Preparation(message, 0, engine))
    async with engine.begin() as conn:
        ctx = Context(conn, message, service)
        ctx.prepared = prepared
        await handler(ctx)
    return ctx


def replied(ctx: Context) -> Message:
    """The one reply a delivery sent to the process manager."""
    found = [m.body for m in ctx.outgoing if m.exchange == topology.REPLIES_EXCHANGE]
    assert len(found) == 1, ctx.outgoing
    return found[0]


def facts(ctx: Context) -> list[Message]:
    """The public facts a delivery published."""
    return [m.body for m in ctx.outgoing if m.exchange == topology.FACTS_EXCHANGE]
