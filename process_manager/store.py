"""Saga persistence: one row per saga (state, version, deadline) and an append-only history."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError
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
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from messaging.db import affected, driver
from messaging.errors import ConcurrencyConflict, PermanentError
from process_manager import definitions
from process_manager.engine import TERMINAL, Decision, Definition, Phase, SagaState

SCHEMA = "process_manager"
metadata = MetaData(schema=SCHEMA)

sagas = Table(
    "sagas",
    metadata,
    Column("saga_id", Uuid, primary_key=True),
    #: the saga's type and business key: one saga per (type, key)
    Column("saga_type", Text, nullable=False),
    Column("business_key", Text, nullable=False),
    #: the order it concerns (every saga here does), for operators' searches
    Column("order_id", Text, nullable=False),
    #: what users see, from the definition (PENDING_PAYMENT, RETURNED ...)
    Column("status", Text, nullable=False),
    #: where the engine is: RUNNING, COMPENSATING, COMPLETED, COMPENSATED, FAILED_NEEDS_MANUAL
    Column("phase", Text, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    #: the definition it runs on for its whole life, as ``<type>.v<version>``
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
    Index("sagas_key", "saga_type", "business_key", unique=True),
    Index("sagas_order", "order_id"),
    Index("sagas_phase", "phase", "definition_version"),
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
    #: what happened, as a kind (``step_succeeded``, ``timed_out`` ...), and the step
    Column("event", Text, nullable=True),
    Column("step", Text, nullable=True),
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
        "start": state.start.model_dump(mode="json"),
        "completed": list(state.completed),
        "route": list(state.route),
        "path": state.path,
        "sent_at": state.sent_at.isoformat() if state.sent_at else None,
        "awaiting": state.awaiting,
        "attempt": state.attempt,
        "compensation_plan": list(state.compensation_plan),
        "compensated": list(state.compensated),
        "refused": list(state.refused),
        "unknown_step": state.unknown_step,
        "reconciling": state.reconciling,
        "tokens": [[seq, token] for seq, token in state.tokens],
        "compensating": state.compensating,
        "stalled": state.stalled,
        "untokened_below": state.untokened_below,
    }


def definition_of(ref: str) -> Definition:
    """The definition a stored saga runs on (``checkout.v1``)."""
    return definitions.get(*definitions.parse_ref(ref))


def _load(row: Any) -> SagaState:
    s = row.state
    d = definition_of(row.definition_version)
    # sagas saved before definitions as data kept their start body under "checkout"
    start = d.start.model_validate(s["start"] if "start" in s else s["checkout"])
    phase = Phase(row.phase) if getattr(row, "phase", None) else _phase_of(row.status)
    sent_at = s.get("sent_at")
    return SagaState(
        saga_id=row.saga_id,
        saga_type=d.name,
        version=d.version,
        start=start,
        status=row.status,
        phase=phase,
        seq=row.seq,
        completed=tuple(s["completed"]),
        route=tuple(s.get("route") or (x.name for x in d.steps)),
        path=s.get("path") or "main",
        awaiting=s["awaiting"],
        attempt=s["attempt"],
        deadline=row.deadline_at,
        sent_at=datetime.fromisoformat(sent_at) if sent_at else None,
        compensation_plan=tuple(s["compensation_plan"]),
        compensated=tuple(s["compensated"]),
        refused=tuple(s.get("refused", ())),
        failure_reason=row.failure_reason,
        unknown_step=s.get("unknown_step"),
        reconciling=s.get("reconciling"),
        started_at=row.started_at,
        tokens=tuple((int(seq), str(token)) for seq, token in s.get("tokens", ())),
        # sagas saved before the flag: compensating if it began (a plan, or steps undone)
        compensating=bool(
            s.get(
                "compensating",
                row.status in ("COMPENSATING", "COMPENSATED")
                or s["compensation_plan"]
                or s["compensated"],
            )
        ),
        stalled=s.get("stalled"),
        # saved before reply tokens: every fence so far was dispatched without one
        untokened_below=int(s.get("untokened_below", 0 if "tokens" in s else row.seq + 1)),
    )


def _phase_of(status: str) -> Phase:
    """The phase of a saga stored before the phase column (checkout v1's statuses)."""
    try:
        return Phase(status)
    except ValueError:
        return Phase.RUNNING


def _columns(state: SagaState, now: datetime) -> dict[str, Any]:
    return {
        "status": state.status,
        "phase": state.phase.value,
        "seq": state.seq,
        "state": _dump(state),
        "deadline_at": state.deadline,
        "failure_reason": state.failure_reason,
        "updated_at": now,
        "finished_at": now if state.phase in TERMINAL else None,
    }


# The statements run on every message are plain SQL on the asyncpg connection, prepared once per
# connection: building, keying and executing a SQLAlchemy statement cost more Python time than
# PostgreSQL took to run it (and SQLAlchemy 2.0 compiles INSERT .. ON CONFLICT on every call).
_INSERT_NEW = (
    "INSERT INTO process_manager.sagas (saga_id, order_id, status, seq, version,"
    " definition_version, state, correlation_id, traceparent, deadline_at, failure_reason,"
    " started_at, updated_at, finished_at, saga_type, business_key, phase)"
    " VALUES ($1, $2, $3, $4, 1, $5, $6::jsonb, $7, $8, $9, $10, $11, $11, $12, $13, $14, $15)"
    " ON CONFLICT DO NOTHING"
)
_COLUMNS = (
    "saga_id, status, phase, seq, version, definition_version, state, correlation_id,"
    " traceparent, deadline_at, failure_reason, started_at"
)
_LOAD = f"SELECT {_COLUMNS} FROM process_manager.sagas WHERE saga_id = $1"
_LOAD_LOCKED = _LOAD + " FOR UPDATE"
_SET = (
    "UPDATE process_manager.sagas SET version = $3, status = $4, seq = $5, state = $6::jsonb,"
    " deadline_at = $7, failure_reason = $8, updated_at = $9, finished_at = $10, phase = $11"
    " WHERE saga_id = $1 AND version = $2"
)
_HISTORY_COLUMNS = (
    "saga_id, seq, message_id, message_type, from_status, to_status, outcome, note, event, step"
)
_RECORD = (
    f"INSERT INTO process_manager.history ({_HISTORY_COLUMNS})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
)
#: the state change and its history row in one round trip; no row when the version moved on
_SAVE_AND_RECORD = (
    f"WITH saved AS ({_SET} RETURNING saga_id)"
    f" INSERT INTO process_manager.history ({_HISTORY_COLUMNS})"
    " SELECT saga_id, $5, $12::uuid, $13::text, $14::text, $15::text, $16::text, $17::text,"
    " $18::text, $19::text FROM saved"
)


async def insert_new(
    conn: AsyncConnection,
    state: SagaState,
    *,
    correlation_id: uuid.UUID,
    traceparent: str | None,
    now: datetime,
    business_key: str,
) -> bool:
    """Insert a new saga; False if one exists for the id or its (type, key) already."""
    c = _columns(state, now)
    pg = await driver(conn)
    status = await pg.execute(
        _INSERT_NEW,
        state.saga_id,
        state.order_id,
        c["status"],
        c["seq"],
        state.ref,
        json.dumps(c["state"]),
        correlation_id,
        traceparent,
        c["deadline_at"],
        c["failure_reason"],
        now,
        c["finished_at"],
        state.saga_type,
        business_key,
        c["phase"],
    )
    return affected(status) == 1


async def load(conn: AsyncConnection, saga_id: uuid.UUID, *, lock: bool = False) -> Loaded | None:
    pg = await driver(conn)
    row = await pg.fetchrow(_LOAD_LOCKED if lock else _LOAD, saga_id)
    if row is None:
        return None
    try:
        state = _load(_Row(row))
    except (ValidationError, KeyError, TypeError, ValueError, LookupError) as e:
        raise UnloadableSaga(saga_id, e) from None
    return Loaded(state, row["version"], row["correlation_id"], row["traceparent"])


class UnloadableSaga(PermanentError):
    """A saga whose stored state this version cannot read (for example a body an earlier, looser
    version accepted). A message for it is dead-lettered with this reason; the timeout loop and
    the sweeper set it aside for a human (``quarantine``) instead of failing on it for ever."""

    def __init__(self, saga_id: uuid.UUID, cause: Exception) -> None:
        detail = str(cause).splitlines()[0][:300] if str(cause) else type(cause).__name__
        super().__init__(f"saga {saga_id}: stored state cannot be read by this version: {detail}")
        self.saga_id = saga_id


_QUARANTINE = (
    "UPDATE process_manager.sagas SET status = 'FAILED_NEEDS_MANUAL',"
    " phase = 'FAILED_NEEDS_MANUAL', deadline_at = NULL,"
    " failure_reason = $2, updated_at = $3, finished_at = $3, version = version + 1"
    " WHERE saga_id = $1"
)
_QUARANTINE_HISTORY = (
    f"INSERT INTO process_manager.history ({_HISTORY_COLUMNS})"
    " SELECT saga_id, seq, NULL, 'sagabus.Quarantine', status, 'FAILED_NEEDS_MANUAL',"
    " 'applied', $2, 'needs_manual', NULL FROM process_manager.sagas WHERE saga_id = $1"
)
_QUARANTINE_CASE = (
    "INSERT INTO process_manager.manual_cases (saga_id, order_id, reason, opened_at)"
    " SELECT saga_id, order_id, $2, $3 FROM process_manager.sagas WHERE saga_id = $1"
    " ON CONFLICT (saga_id) DO UPDATE SET reason = EXCLUDED.reason,"
    " opened_at = EXCLUDED.opened_at, resolved_at = NULL, resolution = NULL"
)


async def quarantine(conn: AsyncConnection, e: UnloadableSaga, now: datetime) -> None:
    """Stop an unreadable saga for a human, with a manual case and a history row, so the loops
    that claim due sagas go on with the others."""
    pg = await driver(conn)
    reason = str(e)
    await pg.execute(_QUARANTINE_HISTORY, e.saga_id, f"needs manual: {reason}")
    await pg.execute(_QUARANTINE, e.saga_id, reason, now)
    await pg.execute(_QUARANTINE_CASE, e.saga_id, reason, now)


class _Row:
    """Attribute access over an asyncpg record, with JSON decoded whichever codec is set."""

    def __init__(self, record: Any) -> None:
        self._r = record

    def __getattr__(self, name: str) -> Any:
        value = self._r[name]
        if name == "state" and isinstance(value, str):
            return json.loads(value)
        return value


def _history(
    decision: Decision, seq: int, message_id: uuid.UUID | None, message_type: str
) -> tuple[Any, ...]:
    before, after = decision.transition
    return (
        seq,
        message_id,
        message_type,
        str(before) if before else None,
        str(after) if after else None,
        decision.outcome,
        decision.note,
        decision.event,
        decision.step,
    )


async def save(
    conn: AsyncConnection,
    loaded: Loaded,
    state: SagaState,
    now: datetime,
    *,
    decision: Decision | None = None,
    message_id: uuid.UUID | None = None,
    message_type: str | None = None,
) -> None:
    """Optimistic concurrency: the write applies only to the version we read.

    With ``decision`` (and the message that caused it), the history row is written by the same
    statement, as :func:`record` would, saving a round trip per message."""
    c = _columns(state, now)
    params: tuple[Any, ...] = (
        state.saga_id,
        loaded.version,
        loaded.version + 1,
        c["status"],
        c["seq"],
        json.dumps(c["state"]),
        c["deadline_at"],
        c["failure_reason"],
        now,
        c["finished_at"],
        c["phase"],
    )
    pg = await driver(conn)
    if decision is None:
        status = await pg.execute(_SET, *params)
    else:
        history = _history(decision, state.seq, message_id, message_type or "")
        status = await pg.execute(_SAVE_AND_RECORD, *params, *history[1:])
    if affected(status) != 1:
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
    pg = await driver(conn)
    await pg.execute(_RECORD, saga_id, *_history(decision, seq, message_id, message_type))


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


# -- upgrades and the start check -----------------------------------------------------------

_UPGRADE = (
    # sagas stored before definitions as data: all checkout v1, keyed by their order
    "ALTER TABLE process_manager.sagas ADD COLUMN IF NOT EXISTS saga_type text",
    "ALTER TABLE process_manager.sagas ADD COLUMN IF NOT EXISTS business_key text",
    "ALTER TABLE process_manager.sagas ADD COLUMN IF NOT EXISTS phase text",
    "UPDATE process_manager.sagas SET saga_type = 'checkout' WHERE saga_type IS NULL",
    "UPDATE process_manager.sagas SET business_key = order_id WHERE business_key IS NULL",
    "UPDATE process_manager.sagas SET phase = CASE WHEN status IN ('COMPLETED', 'COMPENSATED',"
    " 'FAILED_NEEDS_MANUAL', 'COMPENSATING') THEN status ELSE 'RUNNING' END WHERE phase IS NULL",
    "ALTER TABLE process_manager.sagas ALTER COLUMN saga_type SET NOT NULL,"
    " ALTER COLUMN business_key SET NOT NULL, ALTER COLUMN phase SET NOT NULL",
    # one saga per order was the old key; now one per (type, key): a return shares its order
    "ALTER TABLE process_manager.sagas DROP CONSTRAINT IF EXISTS sagas_order_id_key",
    "CREATE UNIQUE INDEX IF NOT EXISTS sagas_key ON process_manager.sagas"
    " (saga_type, business_key)",
    "CREATE INDEX IF NOT EXISTS sagas_order ON process_manager.sagas (order_id)",
    "CREATE INDEX IF NOT EXISTS sagas_phase ON process_manager.sagas (phase, definition_version)",
    "ALTER TABLE process_manager.history ADD COLUMN IF NOT EXISTS event text",
    "ALTER TABLE process_manager.history ADD COLUMN IF NOT EXISTS step text",
)


async def upgrade(engine: Any) -> None:
    """Bring a process manager schema made before definitions as data up to date. Idempotent;
    serialised like ``create_schema``; needs the schema's owner (``sagabus migrate`` or
    ``sagabus provision`` as the administrator)."""
    from sqlalchemy import exc

    from messaging.db import SchemaNotProvisioned

    async with engine.begin() as conn:
        present = (
            await conn.execute(
                text(
                    "SELECT count(*) FROM information_schema.columns WHERE table_schema ="
                    " 'process_manager' AND table_name = 'sagas' AND column_name = 'phase'"
                )
            )
        ).scalar()
        event = (
            await conn.execute(
                text(
                    "SELECT count(*) FROM information_schema.columns WHERE table_schema ="
                    " 'process_manager' AND table_name = 'history' AND column_name = 'step'"
                )
            )
        ).scalar()
        if present and event:
            return
        await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('sagabus-migrate'))"))
        try:
            for statement in _UPGRADE:
                await conn.execute(text(statement))
        except exc.DBAPIError as e:
            if "permission" not in str(e).lower() and "owner" not in str(e).lower():
                raise
            raise SchemaNotProvisioned(
                "process_manager.sagas predates saga definitions (no phase column) and this role"
                " may not change it: run `sagabus migrate` or `sagabus provision` as the"
                " administrator"
            ) from None


#: phases in which a saga may still receive messages or be resumed
LIVE_PHASES = ("RUNNING", "COMPENSATING", "FAILED_NEEDS_MANUAL")


async def live_by_definition(conn: AsyncConnection) -> dict[str, int]:
    """``checkout.v1`` -> number of sagas on it that are not finished for good."""
    rows = (
        await conn.execute(
            text(
                "SELECT definition_version, count(*) FROM process_manager.sagas"
                " WHERE phase = ANY(:live) GROUP BY definition_version"
            ),
            {"live": list(LIVE_PHASES)},
        )
    ).all()
    return {ref: n for ref, n in rows}


async def count_by_definition(conn: AsyncConnection) -> dict[str, dict[str, int]]:
    """``checkout.v1`` -> {phase: count}."""
    rows = (
        await conn.execute(
            text(
                "SELECT definition_version, phase, count(*) FROM process_manager.sagas"
                " GROUP BY definition_version, phase"
            )
        )
    ).all()
    out: dict[str, dict[str, int]] = {}
    for ref, phase, n in rows:
        out.setdefault(ref, {})[phase] = n
    return out
