"""A deploy never changes a saga in flight: checkout v1 sagas waiting at every one of their steps
when a process manager that starts v2 (with its fraud screening) replaces the v1 one each end
as v1 ends them, while new sagas take the fraud step. And a process manager refuses to start
over live sagas of a version it does not have.

Deterministic, without sleeps: while the first runtime runs, a gate in the participants holds
each saga's command of one step back in the retry queues (the participant raises
``TransientError`` for it, so it goes round the delay queue again and again). The test waits
until every saga shows that step's status and its command was held, stops that runtime, and
starts the new one, which finds the held commands coming back from the delay queues."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import pytest_asyncio
from sqlalchemy import delete, insert
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.db import make_engine
from messaging.errors import StartRefused
from messaging.service import Runtime, migrate
from messaging.settings import Settings
from participants.inventory import service as inventory
from participants.payment import service as payment
from participants.risk import service as risk
from process_manager import bootstrap, ops, store
from process_manager.definitions import checkout as definitions
from schemas.checkout import StartCheckout
from tests.e2e.isolated import HOLDING, Gate, isolated, wait_saga
from tests.e2e.test_cli import sagabus
from tests.support import checkout, count, one, rows, wait_for

pytestmark = pytest.mark.e2e

V1, V2 = definitions.V1, definitions.V2
V1_STEPS = [s.name for s in V1.steps]


@pytest_asyncio.fixture(scope="module")
async def base() -> AsyncIterator[Settings]:
    # no step times out while its command is held back (a re-send would be held all the same)
    async with isolated("ver", **HOLDING, step_timeout_s=120) as s:
        yield s


@pytest_asyncio.fixture(scope="module")
async def engine(base: Settings) -> AsyncIterator[AsyncEngine]:
    e = make_engine(base)
    await migrate(bootstrap.definitions(base), e)
    yield e
    await e.dispose()


async def start(settings: Settings, *commands: StartCheckout) -> None:
    await ops.publish_starts(settings.amqp_url, [ops.start_message(c) for c in commands])


async def test_v1_sagas_in_flight_at_every_step_end_on_v1_after_a_v2_deploy(
    base: Settings, engine: AsyncEngine
) -> None:
    uid = uuid.uuid4().hex[:8]
    sku = f"SKU-VER-{uid}"
    async with engine.begin() as conn:
        await inventory.seed(conn, {sku: 100})
    # one saga per v1 step, each held at that step; different amounts, so a capture of the
    # wrong saga would show
    sagas = {
        step: checkout(f"ver-{step}-{uid}", sku=sku, quantity=1, price=1000 + i)
        for i, step in enumerate(V1_STEPS)
    }
    gate = Gate()
    for step, cmd in sagas.items():
        gate.hold(V1.saga_id(cmd), step)

    pinned = base.model_copy(update={"saga_versions": "checkout=1"})
    r1 = Runtime(gate.around(bootstrap.definitions(pinned)), pinned, engine=engine)
    await r1.start()
    try:
        await start(base, *sagas.values())
        for i, spec in enumerate(V1.steps):
            cmd = sagas[spec.name]

            async def waiting(
                cmd: StartCheckout = cmd, step: str = spec.name, status: str = spec.status
            ) -> bool:
                s = await ops.saga_status(engine, cmd.order_id)
                held = gate.held[(V1.saga_id(cmd), step)]
                return s is not None and s["state"] == status and held > 0

            await wait_for(waiting, what=f"the v1 saga held at {spec.name}")
            s = await ops.saga_status(engine, cmd.order_id)
            assert s is not None
            assert s["definition_version"] == "checkout.v1"
            assert s["completed_steps"] == V1_STEPS[:i]
            assert s["current_step"] == spec.name
    finally:
        await r1.stop()

    # the new process manager: no pin, so new checkouts start on v2; the participants let
    # everything through, and the held commands come back from the delay queues
    r2 = Runtime(bootstrap.definitions(base), base, engine=engine)
    await r2.start()
    try:
        fresh = checkout(f"ver-new-{uid}", sku=sku, quantity=1, price=999)
        await start(base, fresh)
        for step, cmd in sagas.items():
            status = await wait_saga(engine, cmd.order_id)
            assert status["state"] == "COMPLETED", (step, status)
            assert status["completed_steps"] == V1_STEPS, step
            assert status["definition_version"] == "checkout.v1"
            captures = await rows(engine, payment.ledger, order_id=cmd.order_id, kind="capture")
            assert [c.amount_minor for c in captures] == [cmd.amount_minor], step
            assert await count(engine, risk.screenings, order_id=cmd.order_id) == 0, step
        new = await wait_saga(engine, fresh.order_id)
    finally:
        await r2.stop()

    assert new["state"] == "COMPLETED"
    assert new["definition_version"] == "checkout.v2"
    assert new["completed_steps"] == [s.name for s in V2.steps]
    assert "risk" in new["completed_steps"]
    assert (await one(engine, risk.screenings, order_id=fresh.order_id)).decision == "APPROVED"
    captures = await rows(engine, payment.ledger, order_id=fresh.order_id, kind="capture")
    assert [c.amount_minor for c in captures] == [999]
    # every held command was refused by the gate in the first runtime, and only there
    assert all(gate.held[(V1.saga_id(c), step)] > 0 for step, c in sagas.items())


# -- a version this build does not have --------------------------------------------------------


@pytest_asyncio.fixture
async def live_v99(engine: AsyncEngine) -> AsyncIterator[uuid.UUID]:
    """A live checkout saga recorded on ``checkout.v99``, a version no build registers."""
    saga_id = uuid.uuid4()
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(
            insert(store.sagas).values(
                saga_id=saga_id,
                saga_type="checkout",
                business_key=f"v99-{saga_id.hex[:8]}",
                order_id=f"v99-{saga_id.hex[:8]}",
                status="PENDING_PAYMENT",
                phase="RUNNING",
                seq=2,
                version=3,
                definition_version="checkout.v99",
                state={},
                correlation_id=saga_id,
                started_at=now,
                updated_at=now,
            )
        )
    yield saga_id
    async with engine.begin() as conn:
        await conn.execute(delete(store.sagas).where(store.sagas.c.saga_id == saga_id))


async def test_a_process_manager_refuses_to_start_over_live_sagas_of_an_unknown_version(
    base: Settings, engine: AsyncEngine, live_v99: uuid.UUID
) -> None:
    runtime = Runtime(bootstrap.definitions(base, ["process-manager"]), base, engine=engine)
    try:
        with pytest.raises(StartRefused) as refused:
            await runtime.start()
    finally:
        await runtime.stop()
    message = str(refused.value)
    assert "1 live saga(s) on checkout.v99" in message
    assert "\n" not in message

    # once that saga has ended, it no longer stands in the way
    async with engine.begin() as conn:
        await conn.execute(
            store.sagas.update()
            .where(store.sagas.c.saga_id == live_v99)
            .values(phase="COMPLETED", status="COMPLETED")
        )
    runtime = Runtime(bootstrap.definitions(base, ["process-manager"]), base, engine=engine)
    await runtime.start()
    await runtime.stop()


async def test_sagabus_run_says_why_it_refuses_in_one_line(
    base: Settings, live_v99: uuid.UUID
) -> None:
    result = await asyncio.wait_for(
        sagabus(
            "run",
            "process-manager",
            amqp_url=base.amqp_url,
            database_url=base.database_url,
        ),
        timeout=90,
    )
    assert result.code == 1, result.err
    assert len(result.err_lines) == 1, result.err
    assert "1 live saga(s) on checkout.v99" in result.err_lines[0]
    assert os.linesep not in result.err_lines[0]
