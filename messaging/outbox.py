"""Transactional outbox: rows are written with the state change, a relay publishes them.

The relay claims unsent rows with ``FOR UPDATE SKIP LOCKED`` (so several relays share the work),
publishes them with publisher confirms, marks them sent and only then commits. A crash anywhere
before the commit leaves the rows unsent and they are published again: at-least-once, with stable
message ids so consumers' inboxes drop the duplicates. The relay wakes on ``NOTIFY`` from the
writing transaction, on an in-process signal, or after a short poll.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
import structlog
from aio_pika import DeliveryMode
from opentelemetry import trace
from sqlalchemy import Table, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from messaging import telemetry
from messaging.db import OUTBOX_CHANNEL
from messaging.publisher import Publisher
from messaging.settings import Settings
from schemas.base import Message
from schemas.envelope import Envelope, HeaderNames

log = structlog.get_logger("sagabus.outbox")


@dataclass(frozen=True)
class OutgoingMessage:
    envelope: Envelope
    body: Message
    exchange: str
    routing_key: str


class Outbox:
    def __init__(self, table: Table, schema: str) -> None:
        self.table = table
        self.schema = schema
        self.local_wakeup = asyncio.Event()

    async def write(self, conn: AsyncConnection, messages: Sequence[OutgoingMessage]) -> None:
        if not messages:
            return
        rows = [
            {
                "message_id": m.envelope.message_id,
                "message_type": m.envelope.type,
                "saga_id": m.envelope.saga_id,
                "exchange": m.exchange,
                "routing_key": m.routing_key,
                "correlation_id": m.envelope.correlation_id,
                "headers": m.envelope.headers(),
                "body": m.body.model_dump_json().encode(),
            }
            for m in messages
        ]
        stmt = insert(self.table).values(rows).on_conflict_do_nothing(index_elements=["message_id"])
        await conn.execute(stmt)
        await conn.execute(
            text("SELECT pg_notify(:ch, :schema)"), {"ch": OUTBOX_CHANNEL, "schema": self.schema}
        )

    def committed(self) -> None:
        """Called after the writing transaction commits: wake this process's relay now."""
        self.local_wakeup.set()


def _amqp_message(row: Any, headers: dict[str, Any]) -> aio_pika.Message:
    occurred = headers.get(HeaderNames.OCCURRED_AT)
    return aio_pika.Message(
        body=row.body,
        content_type="application/json",
        delivery_mode=DeliveryMode.PERSISTENT,
        message_id=str(row.message_id),
        type=row.message_type,
        correlation_id=str(row.correlation_id) if row.correlation_id else None,
        timestamp=datetime.fromisoformat(occurred) if occurred else datetime.now(UTC),
        headers=headers,
    )


class Relay:
    def __init__(
        self,
        *,
        service: str,
        engine: AsyncEngine,
        outbox: Outbox,
        publisher: Publisher,
        settings: Settings,
        tracer: trace.Tracer,
    ) -> None:
        self.service = service
        self.engine = engine
        self.outbox = outbox
        self.publisher = publisher
        self.settings = settings
        self.tracer = tracer
        self.published = 0

    async def drain(self) -> int:
        """Publish every unsent row; returns how many were published."""
        t = self.outbox.table
        total = 0
        while True:
            async with self.engine.begin() as conn:
                rows = (
                    await conn.execute(
                        select(t)
                        .where(t.c.sent_at.is_(None))
                        .order_by(t.c.id)
                        .limit(self.settings.outbox_batch)
                        .with_for_update(skip_locked=True)
                    )
                ).all()
                if not rows:
                    return total
                batch = []
                spans = []
                for row in rows:
                    headers = dict(row.headers)
                    parent = telemetry.extract(headers)
                    span = self.tracer.start_span(
                        f"publish {row.exchange}",
                        context=parent,
                        kind=trace.SpanKind.PRODUCER,
                        attributes=telemetry.messaging_attributes(
                            "publish",
                            destination=row.exchange,
                            routing_key=row.routing_key,
                            message_id=row.message_id,
                            conversation_id=row.correlation_id,
                            body_size=len(row.body),
                            message_type=row.message_type,
                            extra={
                                "sagabus.saga.id": str(row.saga_id),
                                "sagabus.outbox.lag_ms": int(
                                    (datetime.now(UTC) - row.created_at).total_seconds() * 1000
                                ),
                            },
                        ),
                    )
                    spans.append(span)
                    headers.update(telemetry.inject(trace.set_span_in_context(span)))
                    batch.append((row.exchange, row.routing_key, _amqp_message(row, headers)))
                try:
                    await self.publisher.publish_many(batch)
                except BaseException as e:
                    for span in spans:
                        span.record_exception(e)
                        span.set_status(trace.StatusCode.ERROR, str(e))
                        span.end()
                    raise
                for span in spans:
                    span.end()
                await conn.execute(
                    update(t)
                    .where(t.c.id.in_([r.id for r in rows]))
                    .values(sent_at=datetime.now(UTC))
                )
            total += len(rows)
            self.published += len(rows)
            for row in rows:
                log.debug(
                    "command_published"
                    if row.exchange.endswith("commands")
                    else "message_published",
                    service=self.service,
                    message_id=str(row.message_id),
                    message_type=row.message_type,
                    exchange=row.exchange,
                    routing_key=row.routing_key,
                    saga_id=str(row.saga_id),
                )

    async def run(self, stop: asyncio.Event) -> None:
        listener = asyncio.create_task(self._listen(stop))
        backoff = 0.2
        try:
            while not stop.is_set():
                # clear before draining: a commit signalled during the drain wakes the next one
                self.outbox.local_wakeup.clear()
                try:
                    await self.drain()
                    backoff = 0.2
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.warning(
                        "outbox_relay_failed",
                        service=self.service,
                        error=f"{type(e).__name__}: {e}",
                        retry_in_s=backoff,
                    )
                    await _wait(stop, backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                await _wait_any(stop, self.outbox.local_wakeup, self.settings.outbox_poll_s)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await listener

    async def _listen(self, stop: asyncio.Event) -> None:
        """LISTEN for other processes' commits; reconnect quietly when the database goes away."""
        while not stop.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.settings.asyncpg_url, timeout=10)

                def wake(_c: object, _pid: int, _ch: str, payload: str) -> None:
                    if payload == self.outbox.schema:
                        self.outbox.local_wakeup.set()

                await conn.add_listener(OUTBOX_CHANNEL, wake)
                while not stop.is_set() and not conn.is_closed():
                    await _wait(stop, 5.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                await _wait(stop, 2.0)
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=2)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> None:
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
