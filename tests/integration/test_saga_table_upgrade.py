"""A process manager schema made before saga definitions (sagas keyed by order, no saga type,
business key or phase; history without event kinds) is upgraded in place, and its sagas in
flight load and go on as checkout v1."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from process_manager import store
from process_manager.engine import Phase, Reply, decide
from schemas.base import saga_id_for
from schemas.order import OrderCreated
from tests.conftest import PG_ADMIN
from tests.unit.samples import SAMPLES

pytestmark = pytest.mark.integration

#: the tables as the release before saga definitions made them
_OLD_SCHEMA = (
    "CREATE SCHEMA process_manager",
    "CREATE TABLE process_manager.sagas (saga_id uuid PRIMARY KEY, order_id text NOT NULL"
    " UNIQUE, status text NOT NULL, seq integer NOT NULL, version integer NOT NULL,"
    " definition_version text NOT NULL, state jsonb NOT NULL, correlation_id uuid NOT NULL,"
    " traceparent text, deadline_at timestamptz, failure_reason text, started_at timestamptz"
    " NOT NULL, updated_at timestamptz NOT NULL, finished_at timestamptz)",
    "CREATE TABLE process_manager.history (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    " saga_id uuid NOT NULL, at timestamptz NOT NULL DEFAULT now(), seq integer NOT NULL,"
    " message_id uuid, message_type text NOT NULL, from_status text, to_status text,"
    " outcome text NOT NULL, note text NOT NULL)",
)


@pytest_asyncio.fixture
async def old_database() -> AsyncIterator[AsyncEngine]:
    name = f"sagabus_upgrade_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(PG_ADMIN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    engine = create_async_engine(url.replace("postgresql://", "postgresql+asyncpg://"))
    try:
        yield engine
    finally:
        await engine.dispose()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def test_a_v1_saga_in_flight_survives_the_upgrade_and_goes_on_as_v1(
    old_database: AsyncEngine,
) -> None:
    start = SAMPLES["checkout.StartCheckout.v1"]
    saga_id = saga_id_for("checkout", start.order_id)  # type: ignore[attr-defined]
    now = datetime.now(UTC)
    async with old_database.begin() as conn:
        for statement in _OLD_SCHEMA:
            await conn.execute(text(statement))
        # awaiting its order step, saved with the start body under "checkout", no reply tokens
        await conn.execute(
            text(
                "INSERT INTO process_manager.sagas (saga_id, order_id, status, seq, version,"
                " definition_version, state, correlation_id, started_at, updated_at)"
                " VALUES (:id, :o, 'PENDING_ORDER', 1, 1, 'checkout.v1', CAST(:s AS jsonb), :id,"
                " :now, :now)"
            ),
            {
                "id": saga_id,
                "o": start.order_id,  # type: ignore[attr-defined]
                "now": now,
                "s": json.dumps(
                    {
                        "checkout": json.loads(start.model_dump_json()),
                        "completed": [],
                        "awaiting": "order",
                        "attempt": 1,
                        "compensation_plan": [],
                        "compensated": [],
                    }
                ),
            },
        )

    await store.upgrade(old_database)
    await store.upgrade(old_database)  # idempotent

    async with old_database.begin() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT saga_type, business_key, phase FROM process_manager.sagas"
                    " WHERE saga_id = :id"
                ),
                {"id": saga_id},
            )
        ).one()
        assert tuple(row) == ("checkout", start.order_id, "RUNNING")  # type: ignore[attr-defined]
        loaded = await store.load(conn, saga_id)
        assert loaded is not None
        state = loaded.state
        assert (state.saga_type, state.version, state.phase) == ("checkout", 1, Phase.RUNNING)
        assert state.start == start
        # the reply of a dispatch made before reply tokens carries none, and is believed
        decision = decide(
            store.definition_of(state.ref),
            state,
            Reply(OrderCreated(order_id=state.order_id), fence=1, message_id=uuid.uuid4()),
            now=now,
        )
        assert decision.outcome == "applied"
        assert decision.commands[0].body.TYPE == "payment.AuthorizePayment.v1"  # v1: no risk
        await store.save(conn, loaded, decision.state, now, decision=decision)  # type: ignore[arg-type]
        event = (
            await conn.execute(text("SELECT event, step FROM process_manager.history"))
        ).one()
        assert tuple(event) == ("step_succeeded", "order")
        # a return of the same order is now possible beside its checkout: the old unique key
        # on order_id is gone
        await conn.execute(
            text(
                "INSERT INTO process_manager.sagas (saga_id, saga_type, business_key, order_id,"
                " status, phase, seq, version, definition_version, state, correlation_id,"
                " started_at, updated_at) VALUES (:id, 'returns', :o, :o, 'PENDING_RETURN',"
                " 'RUNNING', 0, 1, 'returns.v1', '{}'::jsonb, :id, :now, :now)"
            ),
            {"id": saga_id_for("returns", start.order_id), "o": start.order_id, "now": now},  # type: ignore[attr-defined]
        )
