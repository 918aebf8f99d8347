"""The dead-letter store: a collector moves messages from every ``<queue>.dlq`` into PostgreSQL,
where operators query, group, replay and purge them with SQL behind the CLI.

Nothing is lost: a dead letter is acked on its DLQ only after its row commits, and the row id is
derived from (message id, failed queue, failed-at), so a redelivered dead letter is stored once.
A replay republishes the original body, properties and message id to the queue that failed it
(through the replay exchange, where only that queue is bound to its name, so the other
subscribers of a fan-out do not see it again), waits for the broker's confirm, and only then
marks the row replayed. Killed midway, a replay at worst republishes a message the broker already
has; consumers' inboxes drop that duplicate.

Personal data: what the store shows (``list``, ``show``, ``groups``, a replay's report) has
payment tokens and addresses masked, in the body, the headers and the error text; a replay
publishes the stored bytes, unmasked. Rows expire after ``dead_letter_retention_s``
(``RETAINED``), and ``sagabus erase`` redacts the stored bodies of an erased customer.
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage
from opentelemetry import trace
from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    Uuid,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import telemetry, topology
from messaging.publisher import Publisher
from messaging.retention import RetentionRule
from messaging.telemetry import mask_json_body, mask_personal, mask_text
from schemas.envelope import HeaderNames

log = structlog.get_logger("sagabus.dead_letters")

SCHEMA = "dead_letters"
SERVICE = "dead-letters"
metadata = MetaData(schema=SCHEMA)
DL_NAMESPACE = uuid.UUID("c0c5a8f2-4f5d-4a3b-8f38-4a8f1f0e5d77")

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("message_id", Text, nullable=True, index=True),
    Column("message_type", Text, nullable=True),
    Column("saga_id", Text, nullable=True, index=True),
    Column("queue", Text, nullable=False),
    Column("original_exchange", Text, nullable=True),
    Column("original_routing_key", Text, nullable=True),
    Column("error_class", Text, nullable=False),
    Column("error_message", Text, nullable=False),
    Column("failure_kind", Text, nullable=False),
    Column("fingerprint", Text, nullable=False, index=True),
    Column("retry_count", Integer, nullable=False),
    Column("trace_id", Text, nullable=True),
    Column("headers", JSONB, nullable=False),
    Column("properties", JSONB, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("failed_at", DateTime(timezone=True), nullable=False),
    Column("collected_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    #: open | replayed | purged (purged rows are archived, never deleted)
    Column("status", Text, nullable=False, index=True),
    Column("replay_count", Integer, nullable=False, server_default="0"),
    Column("last_replayed_at", DateTime(timezone=True), nullable=True),
    Column("last_replayed_by", Text, nullable=True),
    Column("purged_at", DateTime(timezone=True), nullable=True),
    Column("purged_by", Text, nullable=True),
)

#: every stored dead letter, whatever its status, expires after ``dead_letter_retention_s`` (no
#: row here absorbs a duplicate: a replay's copy meets the consumers' inboxes and idempotency)
#: an open dead letter is work nobody has done yet: it stays until it is replayed or purged
RETAINED = (
    RetentionRule(
        dead_letters,
        "collected_at",
        "dead_letter_retention_s",
        where="status <> 'open'",
        guard=False,
    ),
)

_UUIDISH = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
_NUMBER = re.compile(r"\d+")
_HEXISH = re.compile(r"\b(?=[\w-]*\d)[\w-]{8,}\b")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def normalise(message: str) -> str:
    """Strip ids, numbers, quoted values and detail lines so the same failure groups together."""
    m = (message.strip().splitlines() or [""])[0]
    m = _UUIDISH.sub("<id>", m)
    m = _HEXISH.sub("<id>", m)
    m = _QUOTED.sub("<value>", m)
    return _NUMBER.sub("<n>", m)[:300]


def fingerprint(error_class: str, message: str, queue: str, message_type: str | None) -> str:
    key = "\x1f".join([error_class, normalise(message), queue, message_type or ""])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _s(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)


def row_from_delivery(delivery: AbstractIncomingMessage, dlq: str) -> dict[str, Any]:
    headers = dict(delivery.headers or {})
    queue = dlq.removesuffix(".dlq")
    error_class = _s(headers.get(HeaderNames.ERROR_CLASS))
    error_message = _s(headers.get(HeaderNames.ERROR_MESSAGE))
    kind = _s(headers.get(HeaderNames.FAILURE_KIND))
    failed_at_raw = _s(headers.get(HeaderNames.FAILED_AT))
    if error_class is None:
        # Dead-lettered by the broker itself (x-delivery-limit, rejected, expired): read x-death.
        deaths = headers.get("x-death")
        death: dict[str, Any] = (
            dict(deaths[0])
            if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict)
            else {}
        )
        reason = _s(death.get("reason")) or "unknown"
        error_class = f"broker:{reason}"
        error_message = {
            "delivery_limit": "redelivered too often (x-delivery-limit): the consumer kept failing",
            "rejected": "rejected by a consumer without requeue",
            "expired": "expired before it was consumed",
        }.get(reason, f"dead-lettered by the broker: {reason}")
        kind = "broker"
        queue = _s(death.get("queue")) or queue
        exchange = _s(death.get("exchange"))
        keys = death.get("routing-keys")
        if exchange:
            # It came straight to the work queue and crashed its consumer until the broker gave
            # up: its route and sender are what the broker saw, whatever its headers claim (a
            # replay is judged by them). A retry copy (exchange "") keeps the ones we wrote.
            headers[HeaderNames.ORIGINAL_EXCHANGE] = exchange
            headers[HeaderNames.ORIGINAL_ROUTING_KEY] = (
                _s(keys[0]) if isinstance(keys, list) and keys else ""
            )
            if delivery.user_id:
                headers[HeaderNames.ORIGINAL_USER_ID] = delivery.user_id
            else:
                headers.pop(HeaderNames.ORIGINAL_USER_ID, None)
    failed_at = datetime.fromisoformat(failed_at_raw) if failed_at_raw else datetime.now(UTC)
    traceparent = _s(headers.get(HeaderNames.TRACEPARENT))
    trace_id = traceparent.split("-")[1] if traceparent and traceparent.count("-") == 3 else None
    message_id = delivery.message_id
    dl_id = uuid.uuid5(
        DL_NAMESPACE, f"{message_id}|{queue}|{failed_at_raw or delivery.delivery_tag}"
    )
    properties = {
        "content_type": delivery.content_type,
        "content_encoding": delivery.content_encoding,
        "correlation_id": delivery.correlation_id,
        "message_id": message_id,
        "type": delivery.type,
        "timestamp": delivery.timestamp.isoformat()
        if isinstance(delivery.timestamp, datetime)
        else None,
        "app_id": delivery.app_id,
        "priority": delivery.priority,
        "reply_to": delivery.reply_to,
    }
    return {
        "id": dl_id,
        "message_id": message_id,
        "message_type": delivery.type,
        "saga_id": _s(headers.get(HeaderNames.SAGA_ID)),
        "queue": queue,
        "original_exchange": _s(headers.get(HeaderNames.ORIGINAL_EXCHANGE)),
        "original_routing_key": _s(headers.get(HeaderNames.ORIGINAL_ROUTING_KEY)),
        "error_class": error_class,
        "error_message": error_message or "",
        "failure_kind": kind or "permanent",
        "fingerprint": fingerprint(error_class, error_message or "", queue, delivery.type),
        "retry_count": int(_s(headers.get(HeaderNames.RETRY_COUNT)) or 0),
        "trace_id": trace_id,
        "headers": _jsonable(headers),
        "properties": properties,
        "body": delivery.body,
        "failed_at": failed_at,
        "status": "open",
    }


class Collector:
    """Consumes every DLQ and stores each dead letter once, then acks it."""

    def __init__(self, engine: AsyncEngine, tracer: trace.Tracer) -> None:
        self.engine = engine
        self.tracer = tracer
        self.collected = 0

    async def start(
        self, connection: aio_pika.abc.AbstractRobustConnection, services: Sequence[str]
    ) -> None:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=32)
        for service in services:
            dlq = topology.QUEUES[service].dlq
            # passive declare: restored with its consumer after a reconnect (see Consumer.start)
            queue = await channel.declare_queue(dlq, passive=True)
            await queue.consume(self._handler(dlq))

    def _handler(self, dlq: str) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def handle(delivery: AbstractIncomingMessage) -> None:
            await self.on_message(delivery, dlq)

        return handle

    async def on_message(self, delivery: AbstractIncomingMessage, dlq: str) -> None:
        try:
            row = row_from_delivery(delivery, dlq)
            parent = telemetry.extract(dict(delivery.headers or {}))
            with self.tracer.start_as_current_span(
                f"process {dlq}",
                context=parent,
                kind=trace.SpanKind.CONSUMER,
                attributes=telemetry.messaging_attributes(
                    "process",
                    destination=dlq,
                    message_id=delivery.message_id or "",
                    message_type=delivery.type or "",
                    extra={
                        "sagabus.dead_letter.id": str(row["id"]),
                        "sagabus.dead_letter.error_class": row["error_class"],
                    },
                ),
            ):
                async with self.engine.begin() as conn:
                    await conn.execute(insert(dead_letters).values(**row).on_conflict_do_nothing())
            await delivery.ack()
            self.collected += 1
            log.info(
                "dead_letter_collected",
                dead_letter_id=str(row["id"]),
                queue=row["queue"],
                message_id=row["message_id"],
                error_class=row["error_class"],
                saga_id=row["saga_id"],
            )
        except Exception as e:  # keep it on the DLQ; it will come back
            log.error("dead_letter_collect_failed", error=f"{type(e).__name__}: {e}")
            await asyncio.sleep(0.5)
            try:
                await delivery.nack(requeue=True)
            except Exception:
                pass


@dataclass(frozen=True)
class Filters:
    ids: tuple[uuid.UUID, ...] = ()
    queue: str | None = None
    message_type: str | None = None
    saga_id: str | None = None
    error: str | None = None
    since: timedelta | None = None
    group: str | None = None
    status: str | None = "open"

    def any(self) -> bool:
        return bool(
            self.ids
            or self.queue
            or self.message_type
            or self.saga_id
            or self.error
            or self.since
            or self.group
        )


def _where(stmt: Any, f: Filters) -> Any:
    t = dead_letters
    if f.ids:
        stmt = stmt.where(t.c.id.in_(f.ids))
    if f.queue:
        stmt = stmt.where(t.c.queue == f.queue)
    if f.message_type:
        stmt = stmt.where(t.c.message_type == f.message_type)
    if f.saga_id:
        stmt = stmt.where(t.c.saga_id == f.saga_id)
    if f.error:
        stmt = stmt.where(
            (t.c.error_message.ilike(f"%{f.error}%")) | (t.c.error_class.ilike(f"%{f.error}%"))
        )
    if f.since:
        stmt = stmt.where(t.c.failed_at >= datetime.now(UTC) - f.since)
    if f.group:
        stmt = stmt.where(t.c.fingerprint == f.group)
    if f.status:
        stmt = stmt.where(t.c.status == f.status)
    return stmt


def to_json(row: Any, *, full: bool = False) -> dict[str, Any]:
    out = {
        "id": str(row.id),
        "message_id": row.message_id,
        "message_type": row.message_type,
        "saga_id": row.saga_id,
        "queue": row.queue,
        "error_class": row.error_class,
        "error_message": mask_text(row.error_message),
        "failure_kind": row.failure_kind,
        "group": row.fingerprint,
        "retry_count": row.retry_count,
        "failed_at": row.failed_at.isoformat(),
        "status": row.status,
        "replay_count": row.replay_count,
        "last_replayed_at": row.last_replayed_at.isoformat() if row.last_replayed_at else None,
        "last_replayed_by": row.last_replayed_by,
        "trace_id": row.trace_id,
    }
    if full:
        out["original_exchange"] = row.original_exchange
        out["original_routing_key"] = row.original_routing_key
        out["headers"] = mask_personal(row.headers)
        out["properties"] = row.properties
        try:
            row.body.decode("utf-8")
        except UnicodeDecodeError:
            out["body_hex"] = row.body.hex()
        else:
            out["body"] = mask_json_body(row.body)
        out["purged_at"] = row.purged_at.isoformat() if row.purged_at else None
        out["purged_by"] = row.purged_by
    return out


async def list_dead_letters(engine: AsyncEngine, f: Filters, limit: int) -> list[dict[str, Any]]:
    stmt = _where(select(dead_letters), f).order_by(dead_letters.c.failed_at.desc()).limit(limit)
    async with engine.connect() as conn:
        return [to_json(r) for r in (await conn.execute(stmt)).all()]


async def show(engine: AsyncEngine, dl_id: uuid.UUID) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        row = (await conn.execute(select(dead_letters).where(dead_letters.c.id == dl_id))).first()
    return to_json(row, full=True) if row else None


async def groups(engine: AsyncEngine, f: Filters) -> list[dict[str, Any]]:
    t = dead_letters
    stmt = _where(
        select(
            t.c.fingerprint,
            t.c.error_class,
            t.c.queue,
            t.c.message_type,
            func.count().label("count"),
            func.min(t.c.error_message).label("example"),
            func.min(t.c.failed_at).label("first"),
            func.max(t.c.failed_at).label("last"),
        ).group_by(t.c.fingerprint, t.c.error_class, t.c.queue, t.c.message_type),
        f,
    ).order_by(func.count().desc())
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    return [
        {
            "group": r.fingerprint,
            "count": r.count,
            "error_class": r.error_class,
            "queue": r.queue,
            "message_type": r.message_type,
            "example": mask_text(normalise(r.example)),
            "first_failed_at": r.first.isoformat(),
            "last_failed_at": r.last.isoformat(),
        }
        for r in rows
    ]


_STRIP = {
    HeaderNames.ERROR_CLASS,
    HeaderNames.ERROR_MESSAGE,
    HeaderNames.FAILED_QUEUE,
    HeaderNames.FAILED_AT,
    HeaderNames.FAILURE_KIND,
    HeaderNames.RETRY_COUNT,
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-delivery-count",
}


def replay_message(row: Any, tracer: trace.Tracer) -> tuple[aio_pika.Message, trace.Span]:
    headers = {
        k: v
        for k, v in row.headers.items()
        if k not in _STRIP and not k.startswith(HeaderNames.RETRY_STATE_PREFIX)
    }
    original = telemetry.extract(row.headers)
    original_ctx = trace.get_current_span(original).get_span_context()
    exchange, key = topology.replay_route(row.queue)
    span = tracer.start_span(
        f"publish {row.queue}",
        context=original,
        kind=trace.SpanKind.PRODUCER,
        links=[trace.Link(original_ctx, {"sagabus.link": "replayed_message"})]
        if original_ctx.is_valid
        else [],
        attributes=telemetry.messaging_attributes(
            "publish",
            destination=exchange,
            routing_key=key,
            message_id=row.message_id or "",
            message_type=row.message_type or "",
            extra={"sagabus.dead_letter.id": str(row.id), "sagabus.replay": "true"},
        ),
    )
    headers.update(telemetry.inject(trace.set_span_in_context(span)))
    headers[HeaderNames.REPLAYED_FROM] = str(row.id)
    p = row.properties
    ts = p.get("timestamp")
    message = aio_pika.Message(
        body=row.body,
        headers=headers,
        content_type=p.get("content_type"),
        content_encoding=p.get("content_encoding"),
        correlation_id=p.get("correlation_id"),
        message_id=p.get("message_id"),
        type=p.get("type"),
        timestamp=datetime.fromisoformat(ts) if ts else None,
        app_id=p.get("app_id"),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    return message, span


async def replay(
    engine: AsyncEngine,
    publisher: Publisher,
    f: Filters,
    *,
    limit: int,
    rate: float | None = None,
    dry_run: bool = False,
    tracer: trace.Tracer | None = None,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Replay matching open dead letters one at a time: lock, publish, confirm, mark, commit."""
    tracer = tracer or telemetry.tracer("cli")
    who = getpass.getuser()
    done: list[dict[str, Any]] = []
    if dry_run:
        return await list_dead_letters(engine, f, limit)
    while len(done) < limit:
        async with engine.begin() as conn:
            row = (
                await conn.execute(
                    _where(select(dead_letters), f)
                    .order_by(dead_letters.c.failed_at)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
            ).first()
            if row is None:
                break
            message, span = replay_message(row, tracer)
            try:
                await publisher.publish(*topology.replay_route(row.queue), message)
            finally:
                span.end()
            await conn.execute(
                update(dead_letters)
                .where(dead_letters.c.id == row.id)
                .values(
                    status="replayed",
                    replay_count=dead_letters.c.replay_count + 1,
                    last_replayed_at=datetime.now(UTC),
                    last_replayed_by=who,
                )
            )
        done.append(to_json(row))
        log.info(
            "dead_letter_replayed",
            dead_letter_id=str(row.id),
            queue=row.queue,
            message_id=row.message_id,
        )
        if progress is not None:
            progress()
        if rate:
            await asyncio.sleep(1 / rate)
    return done


async def purge(engine: AsyncEngine, f: Filters, *, limit: int) -> int:
    t = dead_letters
    who = getpass.getuser()
    async with engine.begin() as conn:
        ids = select(t.c.id).where(t.c.status == "open")
        ids = _where(ids, f).limit(limit).scalar_subquery()
        result = await conn.execute(
            update(t)
            .where(t.c.id.in_(ids))
            .values(status="purged", purged_at=datetime.now(UTC), purged_by=who)
        )
    return int(result.rowcount)
