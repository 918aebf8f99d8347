"""Transactional outbox: rows are written with the state change, then published.

Two paths publish a row, and both only after the writing transaction committed:

* **Dispatch** (the fast path, as in MassTransit's and NServiceBus's outboxes): the process that
  wrote and committed the rows hands them to its relay in memory; the relay publishes them with
  publisher confirms and then marks them sent. No query reads them back.
* **Sweep** (the safety net): the relay claims unsent rows with ``FOR UPDATE SKIP LOCKED`` (so
  several relays share the work), publishes them with confirms, marks them sent and only then
  commits. It takes rows older than a grace period, and never the rows its own process is
  dispatching, so the two paths do not race in the ordinary case. It runs at start-up, on a
  ``NOTIFY`` from a writer in another process, on an in-process signal, and on a short poll:
  it finds what a crash, a failed publish or a lost "sent" mark left behind.

A crash anywhere before a row is marked sent leaves it unsent and it is published again:
at-least-once, with stable message ids so consumers' inboxes drop the duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import structlog
from aio_pika import DeliveryMode
from opentelemetry import trace
from sqlalchemy import Table, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from messaging import telemetry
from messaging.db import OUTBOX_CHANNEL, driver, qualified
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


@dataclass(slots=True)
class Pending:
    """An outbox row on its way to the broker: what the relay needs to publish it."""

    id: int
    message_id: uuid.UUID
    message_type: str
    saga_id: uuid.UUID | None
    exchange: str
    routing_key: str
    correlation_id: uuid.UUID | None
    headers: dict[str, Any]
    body: bytes
    created_at: datetime

    @classmethod
    def from_record(cls, r: Any) -> Pending:
        return cls(
            r["id"],
            r["message_id"],
            r["message_type"],
            r["saga_id"],
            r["exchange"],
            r["routing_key"],
            r["correlation_id"],
            _headers(r["headers"]),
            r["body"],
            r["created_at"],
        )


class Outbox:
    def __init__(self, table: Table, schema: str) -> None:
        self.table = table
        self.schema = schema
        #: wakes the relay's sweep (set by writers that do not hand over their rows)
        self.local_wakeup = asyncio.Event()
        #: committed rows handed over for dispatch, and the ids being dispatched
        self.pending: deque[Pending] = deque()
        self.pending_ready = asyncio.Event()
        self.in_flight: set[int] = set()
        #: true while a relay in this process dispatches (set by :meth:`Relay.run`)
        self.dispatching = False
        #: most rows waiting for dispatch in memory; beyond, new rows are left to the sweep
        self.max_pending = 10_000
        name = qualified(table)
        # Plain SQL: SQLAlchemy 2.0 does not cache the compiled form of PostgreSQL's
        # INSERT .. ON CONFLICT, and compiling it for every message cost more than running it.
        # The arrays make it one prepared statement for any batch size.
        self.insert_sql = (
            f"INSERT INTO {name} (message_id, message_type, saga_id, exchange, routing_key,"
            " correlation_id, headers, body, created_at)"
            # created_at: this statement's time, not the transaction's start, which may be
            # long before the commit (a batch, a lock wait): the sweep's grace counts from it
            " SELECT m, t, s, e, r, c, h::jsonb, b, clock_timestamp() FROM unnest($1::uuid[],"
            " $2::text[],"
            " $3::uuid[], $4::text[], $5::text[], $6::uuid[], $7::text[], $8::bytea[])"
            " AS x(m, t, s, e, r, c, h, b) ON CONFLICT (message_id) DO NOTHING"
            " RETURNING id, message_id, created_at"
        )
        # $2: only rows at least this old; $3: not these (being dispatched by this process)
        self.claim_sql = (
            "SELECT id, message_id, message_type, saga_id, exchange, routing_key,"
            f" correlation_id, headers, body, created_at FROM {name}"
            " WHERE sent_at IS NULL AND created_at <= now() - $2::interval"
            " AND id <> ALL($3::bigint[])"
            " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
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
    ) -> list[Pending]:
        """Insert ``messages`` in the caller's transaction (one statement for any number) and
        return the rows inserted (a message id already in the outbox is not inserted again).

        ``notify`` sends ``NOTIFY`` so relays in *other* processes wake on commit. A writer whose
        own process runs the relay passes ``notify=False`` and, after the commit, hands the rows
        to :meth:`committed`: a ``NOTIFY`` per transaction costs a statement and a lock on the
        notification queue at every commit, and reading the rows back costs a query.
        """
        if not messages:
            return []
        pg = await driver(conn)
        headers = [m.envelope.headers() for m in messages]
        bodies = [m.body.model_dump_json().encode() for m in messages]
        records = await pg.fetch(
            self.insert_sql,
            [m.envelope.message_id for m in messages],
            [m.envelope.type for m in messages],
            [m.envelope.saga_id for m in messages],
            [m.exchange for m in messages],
            [m.routing_key for m in messages],
            [m.envelope.correlation_id for m in messages],
            [json.dumps(h) for h in headers],
            bodies,
        )
        if notify:
            await conn.execute(
                text("SELECT pg_notify(:ch, :schema)"),
                {"ch": OUTBOX_CHANNEL, "schema": self.schema},
            )
        inserted = {r["message_id"]: r for r in records}
        rows = []
        for m, h, b in zip(messages, headers, bodies, strict=True):
            r = inserted.pop(m.envelope.message_id, None)
            if r is None:
                continue
            env = m.envelope
            rows.append(
                Pending(
                    r["id"],
                    env.message_id,
                    env.type,
                    env.saga_id,
                    m.exchange,
                    m.routing_key,
                    env.correlation_id,
                    h,
                    b,
                    r["created_at"],
                )
            )
        return rows

    def committed(self, rows: Sequence[Pending] = ()) -> None:
        """Called after the writing transaction commits. ``rows`` (what :meth:`write` returned)
        go to this process's relay to be published at once; without them, with no relay
        dispatching here, or with a backlog of ``max_pending`` rows already waiting (the broker
        is slow or away), the relay's sweep is woken instead and reads them from the table."""
        if rows and self.dispatching and len(self.pending) < self.max_pending:
            self.pending.extend(rows)
            self.in_flight.update(r.id for r in rows)
            self.pending_ready.set()
        else:
            self.local_wakeup.set()


def _headers(raw: Any) -> dict[str, Any]:
    return dict(json.loads(raw) if isinstance(raw, str | bytes) else raw)


def _amqp_message(row: Pending, headers: dict[str, Any]) -> aio_pika.Message:
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
        #: rows published by either path, and by dispatch alone
        self.published = 0
        self.dispatched = 0
        #: sweep transactions run, and dispatch batches
        self.drains = 0
        self.dispatches = 0

    async def _publish(self, rows: Sequence[Pending]) -> None:
        """Publish rows, each in a PRODUCER span, and wait for every confirm."""
        batch = []
        spans = []
        now = datetime.now(UTC)
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
                        "sagabus.outbox.lag_ms": int((now - row.created_at).total_seconds() * 1000),
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

    def _published(self, rows: Sequence[Pending]) -> None:
        self.published += len(rows)
        for row in rows:
            log.debug(
                "command_published" if row.exchange.endswith("commands") else "message_published",
                service=self.service,
                message_id=str(row.message_id),
                message_type=row.message_type,
                exchange=row.exchange,
                routing_key=row.routing_key,
                saga_id=str(row.saga_id),
            )

    async def drain(self, *, grace_s: float = 0.0) -> int:
        """Sweep: publish every unsent row, at least ``grace_s`` old, that this process is not
        dispatching, visible when it starts; returns how many were published."""
        total = 0
        grace = timedelta(seconds=grace_s)
        while True:
            # The relay's own statements need nothing of SQLAlchemy but its pool: the claim, the
            # publish and the mark run in an asyncpg transaction on a pooled connection.
            async with self.engine.connect() as conn:
                pg = await driver(conn)
                try:
                    async with pg.transaction():
                        records = await pg.fetch(
                            self.outbox.claim_sql,
                            self.settings.outbox_batch,
                            grace,
                            list(self.outbox.in_flight),
                        )
                        rows = [Pending.from_record(r) for r in records]
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
            self._published(rows)
            if len(rows) < self.settings.outbox_batch:
                # Every row that was visible and unclaimed is done; asking again would cost an
                # empty transaction per wake-up. A commit that lands from now on sets the wake-up
                # (cleared before this drain began), so the run loop drains again at once.
                return total

    async def dispatch_once(self) -> int:
        """Dispatch: publish the rows handed over by this process's committed transactions
        (at most one batch), then mark them sent. Returns how many were published.

        A failed publish leaves the rows, and every other row waiting, unsent for the sweep
        (woken at once); a failed mark
        leaves published rows unsent, which the sweep publishes again later and the consumers'
        inboxes drop."""
        out = self.outbox
        n = min(len(out.pending), self.settings.outbox_batch)
        if n == 0:
            return 0
        rows = [out.pending.popleft() for _ in range(n)]
        try:
            await self._publish(rows)
        except Exception as e:
            self._warn("outbox_dispatch_failed", rows, e)
            # The broker is away or refusing: every row waiting goes to the sweep, which
            # publishes them in order with its own back-off, instead of each batch waiting out
            # its own publish timeout here.
            out.pending.clear()
            out.in_flight.clear()
            return 0
        else:
            try:
                await self._mark_sent(rows)
            except Exception as e:
                self._warn("outbox_mark_sent_failed", rows, e)
        finally:
            out.in_flight.difference_update(r.id for r in rows)
        self.dispatches += 1
        self.dispatched += n
        self._published(rows)
        return n

    async def _mark_sent(self, rows: Sequence[Pending]) -> None:
        async with self.engine.connect() as conn:
            pg = await driver(conn)  # no transaction: one autocommitted statement
            try:
                await pg.execute(self.outbox.mark_sent_sql, [r.id for r in rows])
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.invalidate()  # as in drain: not back into the pool
                raise

    def _warn(self, event: str, rows: Sequence[Pending], e: Exception) -> None:
        log.warning(event, service=self.service, rows=len(rows), error=f"{type(e).__name__}: {e}")

    async def _dispatch_loop(self, stop: asyncio.Event) -> None:
        out = self.outbox
        try:
            while not stop.is_set():
                if not out.pending:
                    out.pending_ready.clear()
                    await _wait_any(stop, out.pending_ready, self.settings.outbox_poll_s)
                    continue
                if not await self.dispatch_once():
                    # the rows went back to the sweep: it tries them now, with its own back-off
                    out.local_wakeup.set()
        except Exception as e:  # a bug: never leave rows excluded from the sweep for good
            log.error("outbox_dispatch_stopped", service=self.service, error=f"{e!r}")
            raise
        finally:
            # whatever ends dispatch hands what it held back to the sweep
            out.dispatching = False
            out.pending.clear()
            out.in_flight.clear()
            out.local_wakeup.set()

    async def run(self, stop: asyncio.Event) -> None:
        listener = asyncio.create_task(self._listen(stop))
        dispatcher: asyncio.Task[None] | None = None
        if self.settings.outbox_dispatch:
            self.outbox.dispatching = True
            dispatcher = asyncio.create_task(self._dispatch_loop(stop))
        backoff = 0.2
        # the first sweep takes everything: whatever a previous incarnation left unsent
        grace = 0.0
        try:
            while not stop.is_set():
                # clear before draining: a commit signalled during the drain wakes the next one
                self.outbox.local_wakeup.clear()
                try:
                    published = await self.drain(grace_s=grace)
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
                woken = self.outbox.local_wakeup.is_set()
                if not woken:
                    await _wait_any(stop, self.outbox.local_wakeup, self.settings.outbox_poll_s)
                    woken = self.outbox.local_wakeup.is_set()
                # Woken by a writer (NOTIFY, or a commit that did not hand its rows over): take
                # every row now. On the poll: only rows older than the grace period, so that a
                # row another process is dispatching this instant is left to it.
                grace = (
                    0.0
                    if woken or not self.settings.outbox_dispatch
                    else self.settings.outbox_dispatch_grace_s
                )
                if published and self.settings.outbox_linger_s > 0:
                    # Busy: let the commits landing meanwhile join the next batch, so that one
                    # claim, one confirm round and one UPDATE serve many rows.
                    await asyncio.sleep(self.settings.outbox_linger_s)
        finally:
            self.outbox.dispatching = False
            log.info(
                "outbox_relay_stopped",
                service=self.service,
                published=self.published,
                dispatched=self.dispatched,
                drains=self.drains,
                dispatches=self.dispatches,
            )
            for task in (listener, dispatcher):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

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
