"""Saga persistence: one row per saga (state, version, deadline) and an append-only history."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    Uuid,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from messaging.errors import ConcurrencyConflict
from process_manager.saga import TERMINAL, Decision, SagaState, SagaStatus
from schemas.checkout import StartCheckout

SCHEMA = "process_manager"
metadata = MetaData(schema=SCHEMA)

sagas = Table(
    "sagas",
    metadata,
    Column("saga_id", Uuid, primary_key=True),
    Column("order_id", Text, nullable=False, unique=True),
    Column("status", Text, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("definition_version", Text, nullable=False),
    Column("state", JSONB, nullable=False),
    Column("correlation_id", Uuid, nullable=False),
    Column("traceparent", Text, nullable=True),
    Column("deadline_at", DateTime(timezone=True), nullable=True),
    Column("failure_reason", Text, nullable=True),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Index("sagas_due", "deadline_at", postgresql_where=text("deadline_at IS NOT NULL")),
    Index("sagas_status", "status", "updated_at"),
)

history = Table(
    "history",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("saga_id", Uuid, nullable=False, index=True),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("seq", Integer, nullable=False),
    Column("message_id", Uuid, nullable=True),
    Column("message_type", Text, nullable=False),
    Column("from_status", Text, nullable=True),
    Column("to_status", Text, nullable=True),
    Column("outcome", Text, nullable=False),
    Column("note", Text, nullable=False),
)


manual_cases = Table(
    "manual_cases",
    metadata,
    Column("saga_id", Uuid, primary_key=True),
    Column("order_id", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("opened_at", DateTime(timezone=True), nullable=False),
    Column("resolved_at", DateTime(timezone=True), nullable=True),
    Column("resolution", Text, nullable=True),
)


@dataclass(frozen=True)
class Loaded:
    state: SagaState
    version: int
    correlation_id: uuid.UUID
    traceparent: str | None


def _dump(state: SagaState) -> dict[str, Any]:
    return {
        "checkout": state.checkout.model_dump(mode="json"),
        "completed": list(state.completed),
        "awaiting": state.awaiting,
        "attempt": state.attempt,
        "compensation_plan": list(state.compensation_plan),
        "compensated": list(state.compensated),
        "unknown_step": state.unknown_step,
        "reconciling": state.reconciling,
    }


def _load(row: Any) -> SagaState:
    s = row.state
    return SagaState(
        saga_id=row.saga_id,
        checkout=StartCheckout.model_validate(s["checkout"]),
        status=SagaStatus(row.status),
        seq=row.seq,
        completed=tuple(s["completed"]),
        awaiting=s["awaiting"],
        attempt=s["attempt"],
        deadline=row.deadline_at,
        compensation_plan=tuple(s["compensation_plan"]),
        compensated=tuple(s["compensated"]),
        failure_reason=row.failure_reason,
        unknown_step=s.get("unknown_step"),
        reconciling=s.get("reconciling"),
        started_at=row.started_at,
        definition_version=row.definition_version,
    )


def _columns(state: SagaState, now: datetime) -> dict[str, Any]:
    return {
        "status": state.status.value,
        "seq": state.seq,
        "state": _dump(state),
        "deadline_at": state.deadline,
        "failure_reason": state.failure_reason,
        "updated_at": now,
        "finished_at": now if state.status in TERMINAL else None,
    }


async def insert_new(
    conn: AsyncConnection,
    state: SagaState,
    *,
    correlation_id: uuid.UUID,
    traceparent: str | None,
    now: datetime,
) -> bool:
    """Insert a new saga; False if one exists for the id or the order already."""
    result = await conn.execute(
        pg_insert(sagas)
        .values(
            saga_id=state.saga_id,
            order_id=state.order_id,
            version=1,
            definition_version=state.definition_version,
            correlation_id=correlation_id,
            traceparent=traceparent,
            started_at=now,
            **_columns(state, now),
        )
        .on_conflict_do_nothing()
    )
    return bool(result.rowcount)


async def load(conn: AsyncConnection, saga_id: uuid.UUID, *, lock: bool = False) -> Loaded | None:
    stmt = select(sagas).where(sagas.c.saga_id == saga_id)
    if lock:
        stmt = stmt.with_for_update()
    row = (await conn.execute(stmt)).first()
    if row is None:
        return None
    return Loaded(_load(row), row.version, row.correlation_id, row.traceparent)


async def save(conn: AsyncConnection, loaded: Loaded, state: SagaState, now: datetime) -> None:
    """Optimistic concurrency: the write applies only to the version we read."""
    result = await conn.execute(
        update(sagas)
        .where(sagas.c.saga_id == state.saga_id, sagas.c.version == loaded.version)
        .values(version=loaded.version + 1, **_columns(state, now))
    )
    if result.rowcount != 1:
        raise ConcurrencyConflict(f"saga {state.saga_id} changed since version {loaded.version}")


async def record(
    conn: AsyncConnection,
    saga_id: uuid.UUID,
    decision: Decision,
    *,
    seq: int,
    message_id: uuid.UUID | None,
    message_type: str,
) -> None:
    before, after = decision.transition
    await conn.execute(
        insert(history).values(
            saga_id=saga_id,
            seq=seq,
            message_id=message_id,
            message_type=message_type,
            from_status=str(before) if before else None,
            to_status=str(after) if after else None,
            outcome=decision.outcome,
            note=decision.note,
        )
    )


async def open_case(conn: AsyncConnection, state: SagaState, now: datetime) -> None:
    """A saga that needs a human gets one open case (reopened if it fails again)."""
    stmt = pg_insert(manual_cases).values(
        saga_id=state.saga_id,
        order_id=state.order_id,
        reason=state.failure_reason or "unknown",
        opened_at=now,
    )
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["saga_id"],
            set_={
                "reason": stmt.excluded.reason,
                "opened_at": now,
                "resolved_at": None,
                "resolution": None,
            },
        )
    )


async def resolve_case(
    conn: AsyncConnection, saga_id: uuid.UUID, resolution: str, now: datetime
) -> None:
    await conn.execute(
        update(manual_cases)
        .where(manual_cases.c.saga_id == saga_id, manual_cases.c.resolved_at.is_(None))
        .values(resolved_at=now, resolution=resolution)
    )
