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
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
import structlog
from aio_pika import DeliveryMode
from opentelemetry import trace
from sqlalchemy import Table, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from messaging import telemetry
from messaging.db import OUTBOX_CHANNEL, driver
from messaging.publisher import Publisher
from messaging.settings import Settings
from schemas.base import Message
from schemas.envelope import Envelope, HeaderNames

log = structlog.get_logger("sagabus.outbox")


def _qualified(table: Table) -> str:
    return ".".join(f'"{p}"' for p in (table.schema, table.name) if p)


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
        name = _qualified(table)
        # Plain SQL: SQLAlchemy 2.0 does not cache the compiled form of PostgreSQL's
        # INSERT .. ON CONFLICT, and compiling it for every message cost more than running it.
        # The arrays make it one prepared statement for any batch size.
        self.insert_sql = (
            f"INSERT INTO {name} (message_id, message_type, saga_id, exchange, routing_key,"
            " correlation_id, headers, body)"
            " SELECT m, t, s, e, r, c, h::jsonb, b FROM unnest($1::uuid[], $2::text[],"
            " $3::uuid[], $4::text[], $5::text[], $6::uuid[], $7::text[], $8::bytea[])"
            " AS x(m, t, s, e, r, c, h, b) ON CONFLICT (message_id) DO NOTHING"
        )
        self.claim_sql = (
            "SELECT id, message_id, message_type, saga_id, exchange, routing_key,"
            f" correlation_id, headers, body, created_at FROM {name}"
            " WHERE sent_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
        )
        self.mark_sent_sql = (
            f"UPDATE {name} SET sent_at = clock_timestamp() WHERE id = ANY($1::bigint[])"
        )

    async def write(
        self,
        conn: AsyncConnection,
        messages: Sequence[OutgoingMessage],
        *,
        notify: bool = True,
    ) -> None:
        """Insert ``messages`` in the caller's transaction (one statement for any number).

        ``notify`` sends ``NOTIFY`` so relays in *other* processes wake on commit. A writer whose
        own process runs the relay calls :meth:`committed` after the commit instead and passes
        ``notify=False``: a ``NOTIFY`` per transaction costs a statement and a lock on the
        notification queue at every commit, for a wake-up the process gives itself anyway.
        """
        if not messages:
            return
        pg = await driver(conn)
        await pg.execute(
            self.insert_sql,
            [m.envelope.message_id for m in messages],
            [m.envelope.type for m in messages],
            [m.envelope.saga_id for m in messages],
            [m.exchange for m in messages],
            [m.routing_key for m in messages],
            [m.envelope.correlation_id for m in messages],
            [json.dumps(m.envelope.headers()) for m in messages],
            [m.body.model_dump_json().encode() for m in messages],
        )
        if notify:
            await conn.execute(
                text("SELECT pg_notify(:ch, :schema)"),
                {"ch": OUTBOX_CHANNEL, "schema": self.schema},
            )

    def committed(self) -> None:
        """Called after the writing transaction commits: wake this process's relay now."""
        self.local_wakeup.set()


class _Row:
    """Attribute access over an asyncpg record."""

    __slots__ = ("_r",)

    def __init__(self, record: Any) -> None:
        self._r = record

    def __getattr__(self, name: str) -> Any:
        return self._r[name]


def _headers(raw: Any) -> dict[str, Any]:
    return dict(json.loads(raw) if isinstance(raw, str | bytes) else raw)


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
        self.drains = 0

    async def _publish(self, rows: list[_Row]) -> None:
        """Publish the claimed rows, each in a PRODUCER span, and wait for every confirm."""
        batch = []
        spans = []
        for row in rows:
            headers = _headers(row.headers)
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

    async def drain(self) -> int:
        """Publish every unsent row visible when it starts; returns how many were published."""
        total = 0
        while True:
            # The relay's own statements need nothing of SQLAlchemy but its pool: the claim, the
            # publish and the mark run in an asyncpg transaction on a pooled connection.
            async with self.engine.connect() as conn:
                pg = await driver(conn)
                try:
                    async with pg.transaction():
                        records = await pg.fetch(self.outbox.claim_sql, self.settings.outbox_batch)
                        rows = [_Row(r) for r in records]
                        if rows:
                            await self._publish(rows)
                            await pg.execute(self.outbox.mark_sent_sql, [r.id for r in rows])
                except BaseException:
                    # Not back into the pool: SQLAlchemy never saw this connection fail, and one
                    # interrupted mid-statement (a restart, a cancellation) is unusable.
                    with contextlib.suppress(Exception):
                        await conn.invalidate()
                    raise
            self.drains += 1
            if not rows:
                return total
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
            if len(rows) < self.settings.outbox_batch:
                # Every row that was visible and unclaimed is done; asking again would cost an
                # empty transaction per wake-up. A commit that lands from now on sets the wake-up
                # (cleared before this drain began), so the run loop drains again at once.
                return total

    async def run(self, stop: asyncio.Event) -> None:
        listener = asyncio.create_task(self._listen(stop))
        backoff = 0.2
        try:
            while not stop.is_set():
                # clear before draining: a commit signalled during the drain wakes the next one
                self.outbox.local_wakeup.clear()
                try:
                    published = await self.drain()
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
                if not self.outbox.local_wakeup.is_set():
                    await _wait_any(stop, self.outbox.local_wakeup, self.settings.outbox_poll_s)
                if published and self.settings.outbox_linger_s > 0:
                    # Busy: let the commits landing meanwhile join the next batch, so that one
                    # claim, one confirm round and one UPDATE serve many rows.
                    await asyncio.sleep(self.settings.outbox_linger_s)
        finally:
            log.info(
                "outbox_relay_stopped",
                service=self.service,
                published=self.published,
                drains=self.drains,
            )
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
