"""Two writers on one saga: optimistic concurrency in the store, and two process-manager
instances sharing one queue and one database."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.errors import ConcurrencyConflict
from messaging.service import Runtime, migrate
from messaging.settings import Settings
from participants.inventory import service as inventory
from participants.payment import service as payment
from process_manager import ops, store
from process_manager import service as pm
from process_manager.definitions import checkout as checkout_saga
from process_manager.engine import Phase, Policy, SagaState, Start, decide
from schemas.checkout import saga_id_for_order
from tests.support import checkout, count, one, rows, wait_for

pytestmark = pytest.mark.integration


async def test_two_saves_from_one_loaded_version_one_wins_one_conflicts(
    engine: AsyncEngine, database: Settings, uid: str
) -> None:
    await migrate([pm.definition(database)], engine)
    now = datetime.now(UTC)
    cmd = checkout(f"occ-{uid}")
    d = checkout_saga.V2
    started = decide(d, None, Start(cmd, uuid.uuid4()), now=now, policy=Policy()).state
    assert started is not None
    # terminal, without a deadline: the running process manager's timeout loop leaves it alone
    started = replace(
        started, status="COMPENSATED", phase=Phase.COMPENSATED, awaiting=None, deadline=None
    )
    async with engine.begin() as conn:
        assert await store.insert_new(
            conn,
            started,
            correlation_id=started.saga_id,
            traceparent=None,
            now=now,
            business_key=d.business_key(cmd),
        )
    async with engine.connect() as conn:
        loaded = await store.load(conn, started.saga_id)
    assert loaded is not None and loaded.version == 1

    a = replace(loaded.state, failure_reason="writer a")
    b = replace(loaded.state, failure_reason="writer b")
    both_in_transaction = asyncio.Barrier(2)

    async def write(state: SagaState) -> None:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("SELECT 1")
            await both_in_transaction.wait()
            await store.save(conn, loaded, state, datetime.now(UTC))

    results = await asyncio.gather(write(a), write(b), return_exceptions=True)

    conflicts = [r for r in results if isinstance(r, ConcurrencyConflict)]
    assert len(conflicts) == 1, results
    assert results.count(None) == 1, results
    winner = a if results[0] is None else b
    async with engine.connect() as conn:
        after = await store.load(conn, started.saga_id)
    assert after is not None
    assert after.version == 2
    assert after.state.failure_reason == winner.failure_reason


async def test_two_process_manager_instances_apply_every_step_exactly_once(
    services: Runtime, engine: AsyncEngine, database: Settings, uid: str
) -> None:
    """A second process-manager Runtime competes with the session's one on the same queue and
    database. Every StartCheckout is sent twice (different message ids) so the instances also
    race to create the same saga."""
    n = 30
    sku = f"SKU-2PM-{uid}"
    async with engine.begin() as conn:
        await inventory.seed(conn, {sku: n})
    commands = [checkout(f"2pm-{uid}-{i:02d}", sku=sku) for i in range(n)]
    session_pm = services.consumers["process-manager"]
    before = session_pm.counts["processed"]

    async with Runtime([pm.definition(database)], database) as second:
        starts = [ops.start_message(c) for c in commands for _ in range(2)]
        await ops.publish_starts(database.amqp_url, starts)

        async def all_terminal() -> bool:
            counts = await ops.counts_by_status(engine, f"2pm-{uid}-")
            return sum(counts.values()) == n and set(counts) <= {
                "COMPLETED",
                "COMPENSATED",
                "FAILED_NEEDS_MANUAL",
            }

        await wait_for(all_terminal, timeout=60, what="all sagas terminal")
        second_processed = second.consumers["process-manager"].counts["processed"]

    assert await ops.counts_by_status(engine, f"2pm-{uid}-") == {"COMPLETED": n}
    # both instances did part of the work
    assert second_processed > 0
    assert session_pm.counts["processed"] - before > 0

    expected = ["started", *(f"{s.name} succeeded" for s in checkout_saga.V2.steps)]
    for c in commands:
        saga_id = saga_id_for_order(c.order_id)
        history = await rows(engine, store.history, saga_id=saga_id)
        applied = [h.note for h in history if h.outcome == "applied"]
        assert applied == expected, (c.order_id, applied)
        ignored = [h.note for h in history if h.outcome == "ignored"]
        assert ignored == ["duplicate StartCheckout: a checkout saga exists for this key"], ignored
        assert await count(engine, payment.ledger, order_id=c.order_id, kind="authorize") == 1
        assert await count(engine, payment.ledger, order_id=c.order_id, kind="capture") == 1
        assert (await one(engine, inventory.reservations, order_id=c.order_id)).status == "RESERVED"
    assert (await one(engine, inventory.stock, sku=sku)).available == 0
