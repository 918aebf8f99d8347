"""Operator queries and actions on sagas, shared by the CLI, the demo and the tests."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.topology import COMMANDS_EXCHANGE, START_ROUTING_KEY
from process_manager import store
from process_manager.engine import TERMINAL, Phase, saga_id_for
from schemas.base import Message


def start_message(
    cmd: Message, *, message_id: uuid.UUID | None = None, traceparent: str | None = None
) -> aio_pika.Message:
    """What any AMQP client sends to start a saga (see the README's contract)."""
    headers: dict[str, Any] = {}
    if traceparent:
        headers["traceparent"] = traceparent
    return aio_pika.Message(
        body=cmd.model_dump_json().encode(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(message_id or uuid.uuid4()),
        type=cmd.TYPE,
        timestamp=datetime.now(UTC),
        headers=headers,
    )


async def publish_starts(
    amqp_url: str, messages: list[aio_pika.Message], *, routing_key: str = START_ROUTING_KEY
) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=True)
        for i in range(0, len(messages), 100):
            batch = messages[i : i + 100]
            await asyncio.gather(*(exchange.publish(m, routing_key=routing_key) for m in batch))


def _saga_json(row: Any) -> dict[str, Any]:
    state = row.state
    return {
        "saga_id": str(row.saga_id),
        "order_id": row.order_id,
        "saga_type": row.saga_type,
        "state": row.status,
        "phase": row.phase,
        "terminal": row.phase in {s.value for s in TERMINAL},
        "current_step": state.get("awaiting"),
        "attempt": state.get("attempt"),
        "seq": row.seq,
        "version": row.version,
        "definition_version": row.definition_version,
        "completed_steps": state.get("completed", []),
        "compensated_steps": state.get("compensated", []),
        "failure_reason": row.failure_reason,
        "deadline_at": row.deadline_at.isoformat() if row.deadline_at else None,
        "started_at": row.started_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
        "trace_id": row.traceparent.split("-")[1] if row.traceparent else None,
    }


async def saga_status(
    engine: AsyncEngine, key: str, *, saga_type: str = "checkout"
) -> dict[str, Any] | None:
    """Status by saga id, or by business key (an order id) and saga type."""
    try:
        saga_id = uuid.UUID(key)
    except ValueError:
        saga_id = saga_id_for(saga_type, key)
    async with engine.connect() as conn:
        row = (
            await conn.execute(select(store.sagas).where(store.sagas.c.saga_id == saga_id))
        ).first()
        if row is None:
            return None
        h = store.history
        events = (
            await conn.execute(select(h).where(h.c.saga_id == saga_id).order_by(h.c.id))
        ).all()
    out = _saga_json(row)
    out["outcome"] = {
        "COMPLETED": "completed",
        "COMPENSATED": "compensated",
        "FAILED_NEEDS_MANUAL": "needs_manual",
    }.get(row.phase)
    out["history"] = [
        {
            "at": e.at.isoformat(),
            "seq": e.seq,
            "message_type": e.message_type,
            "message_id": str(e.message_id) if e.message_id else None,
            "from": e.from_status,
            "to": e.to_status,
            "outcome": e.outcome,
            "event": e.event,
            "step": e.step,
            "note": e.note,
        }
        for e in events
    ]
    return out


async def list_sagas(
    engine: AsyncEngine,
    *,
    state: str | None = None,
    older_than: timedelta | None = None,
    stuck: bool = False,
    ttl_s: float = 3600.0,
    limit: int = 50,
    saga_type: str | None = None,
) -> list[dict[str, Any]]:
    t = store.sagas
    stmt = select(t).order_by(t.c.updated_at.desc()).limit(limit)
    if state:
        stmt = stmt.where(t.c.status == state)
    if saga_type:
        stmt = stmt.where(t.c.saga_type == saga_type)
    if older_than is not None:
        stmt = stmt.where(t.c.updated_at < datetime.now(UTC) - older_than)
    if stuck:
        # Stuck: waiting past its step deadline (the timeout loop is not keeping up or is not
        # running), alive beyond its time-to-live, or stopped for a human (what the sweeper and
        # exhausted compensations leave behind).
        now = datetime.now(UTC)
        live = t.c.phase.not_in([s.value for s in TERMINAL])
        stmt = stmt.where(
            (t.c.phase == Phase.FAILED_NEEDS_MANUAL.value)
            | (live & (t.c.deadline_at < now - timedelta(seconds=5)))
            | (live & (t.c.started_at < now - timedelta(seconds=ttl_s)))
        )
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    return [_saga_json(r) for r in rows]


async def counts_by_status(engine: AsyncEngine, order_prefix: str | None = None) -> dict[str, int]:
    t = store.sagas
    stmt = select(t.c.status, func.count()).group_by(t.c.status)
    if order_prefix:
        stmt = stmt.where(t.c.order_id.startswith(order_prefix))
    async with engine.connect() as conn:
        return {s: n for s, n in (await conn.execute(stmt)).all()}


async def counts_by_phase(
    engine: AsyncEngine, order_prefix: str | None = None, *, saga_type: str | None = None
) -> dict[str, int]:
    t = store.sagas
    stmt = select(t.c.phase, func.count()).group_by(t.c.phase)
    if order_prefix:
        stmt = stmt.where(t.c.order_id.startswith(order_prefix))
    if saga_type:
        stmt = stmt.where(t.c.saga_type == saga_type)
    async with engine.connect() as conn:
        return {s: n for s, n in (await conn.execute(stmt)).all()}
