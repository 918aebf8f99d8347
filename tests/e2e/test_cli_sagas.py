"""``sagabus definitions``, ``sagabus return`` and ``status --saga-type`` as an operator runs
them: a subprocess with ``SAGABUS_*`` set, on the real broker and database."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.service import Runtime
from messaging.settings import Settings
from participants.inventory import service as inventory
from process_manager import ops
from schemas.base import saga_id_for
from tests.e2e.test_cli import _entry_point, sagabus
from tests.support import checkout, env_for, wait_for, wait_terminal

pytestmark = pytest.mark.e2e


async def test_definitions_json_lists_every_version_with_its_steps_and_live_sagas(
    services: Runtime, engine: AsyncEngine, database: Settings
) -> None:
    result = await sagabus(
        "definitions", "--json", amqp_url=database.amqp_url, database_url=database.database_url
    )
    assert result.code == 0, result.err
    rows = json.loads(result.out)
    by_ref = {(r["name"], r["version"]): r for r in rows}
    assert set(by_ref) == {("checkout", 1), ("checkout", 2), ("returns", 1)}
    for row in rows:
        assert isinstance(row["live"], int) and row["live"] >= 0
        assert all({"name", "participant", "kind"} <= set(s) for s in row["steps"])
    v1, v2 = by_ref[("checkout", 1)], by_ref[("checkout", 2)]
    assert [s["name"] for s in v1["steps"]] == [
        "order", "authorization", "inventory", "shipment", "capture", "completion"
    ]
    assert [s["name"] for s in v2["steps"]][:3] == ["order", "risk", "authorization"]
    assert (v1["current"], v2["current"], by_ref[("returns", 1)]["current"]) == (
        False, True, True
    )
    assert by_ref[("returns", 1)]["start_routing_key"] == "returns.start"
    assert [p["name"] for p in v2["paths"]] == ["backorder"]


async def test_definitions_counts_a_live_saga_on_its_version(
    services: Runtime, engine: AsyncEngine, database: Settings, uid: str
) -> None:
    async def live() -> int:
        result = await sagabus(
            "definitions", "--json", amqp_url=database.amqp_url, database_url=database.database_url
        )
        assert result.code == 0, result.err
        return next(r["live"] for r in json.loads(result.out) if r["ref"] == "checkout.v2")

    before = await live()
    cmd = checkout(f"defs-{uid}", sku=f"SKU-DEFS-{uid}")
    # a saga row that stays live (it waits on its risk step, with no deadline)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO process_manager.sagas (saga_id, saga_type, business_key, order_id,"
                " status, phase, seq, version, definition_version, state, correlation_id,"
                " started_at, updated_at) VALUES (:id, 'checkout', :o, :o, 'PENDING_RISK',"
                " 'RUNNING', 1, 1, 'checkout.v2', CAST(:s AS jsonb), :id, now(), now())"
            ),
            {
                "id": saga_id_for("checkout", cmd.order_id),
                "o": cmd.order_id,
                "s": json.dumps({"start": json.loads(cmd.model_dump_json())}),
            },
        )
    try:
        assert await live() == before + 1
    finally:
        async with engine.begin() as conn:
            await conn.execute(
                text("DELETE FROM process_manager.sagas WHERE order_id = :o"), {"o": cmd.order_id}
            )


async def test_return_prints_the_saga_id_and_the_return_runs(
    services: Runtime, engine: AsyncEngine, database: Settings, uid: str
) -> None:
    sku = f"SKU-RET-{uid}"
    async with engine.begin() as conn:
        await inventory.seed(conn, {sku: 3})
    cmd = checkout(f"ret-{uid}", sku=sku)
    await ops.publish_starts(database.amqp_url, [ops.start_message(cmd)])
    assert (await wait_terminal(engine, cmd.order_id))["state"] == "COMPLETED"

    result = await sagabus(
        "return",
        cmd.order_id,
        "--reason",
        "too small",
        "--json",
        amqp_url=database.amqp_url,
        database_url=database.database_url,
    )
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data == {
        "saga_id": str(saga_id_for("returns", cmd.order_id)),
        "order_id": cmd.order_id,
        "saga_type": "returns",
    }

    async def returned() -> dict | None:
        status = await ops.saga_status(engine, data["saga_id"])
        return status if status and status["terminal"] else None

    status = await wait_for(returned, timeout=60)
    assert status["state"] == "RETURNED"
    assert status["definition_version"] == "returns.v1"

    by_order = await sagabus(
        "status",
        cmd.order_id,
        "--saga-type",
        "returns",
        "--json",
        amqp_url=database.amqp_url,
        database_url=database.database_url,
    )
    assert by_order.code == 0, by_order.err
    assert json.loads(by_order.out)["saga_id"] == data["saga_id"]


async def test_return_of_a_malformed_order_id_is_one_line_and_exit_2(database: Settings) -> None:
    result = await sagabus(
        "return", "not an id", amqp_url=database.amqp_url, database_url=database.database_url
    )
    assert result.code == 2
    assert len(result.err_lines) == 1 and "order_id" in result.err


@pytest.mark.parametrize("value", ["checkout=7", "garbage", "billing=1"])
async def test_an_unregistered_or_malformed_saga_version_is_a_configuration_error(
    database: Settings, value: str
) -> None:
    env = env_for(database.amqp_url, database.database_url, os.environ)
    env["SAGABUS_SAGA_VERSIONS"] = value
    proc = await asyncio.create_subprocess_exec(
        *_entry_point(),
        "definitions",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert proc.returncode == 2
    assert len(lines) == 1 and "SAGABUS_SAGA_VERSIONS" in lines[0]


async def test_compensate_undoes_what_a_saga_in_flight_did(
    services: Runtime, engine: AsyncEngine, database: Settings, uid: str
) -> None:
    """A checkout v2 saga whose order was created and whose fraud screening is awaited: the
    operator's compensate cancels the order (and sends no resume of the screening)."""
    from process_manager import store
    from process_manager.definitions import checkout as definitions
    from process_manager.engine import Phase
    from process_manager.testing import SagaHarness, sample_checkout

    cmd = sample_checkout(order_id=f"comp-{uid}")
    saga = SagaHarness(definitions.V2)
    saga.start(cmd)
    saga.answer()  # OrderCreated: the risk step is awaited
    assert saga.status == "PENDING_RISK"
    now = datetime.now(UTC)
    state = replace(saga.state, started_at=now, deadline=now + timedelta(hours=1), sent_at=now)
    async with engine.begin() as conn:
        assert await store.insert_new(
            conn,
            state,
            correlation_id=state.saga_id,
            traceparent=None,
            now=now,
            business_key=cmd.order_id,
        )

    result = await sagabus(
        "compensate",
        cmd.order_id,
        "--reason",
        "customer called",
        amqp_url=database.amqp_url,
        database_url=database.database_url,
    )
    assert result.code == 0, result.err

    async def compensated() -> dict | None:
        status = await ops.saga_status(engine, cmd.order_id)
        return status if status and status["phase"] == Phase.COMPENSATED else None

    status = await wait_for(compensated, timeout=30)
    assert status["compensated_steps"] == ["cancel_order"]
    assert status["failure_reason"] == "operator: customer called"
    events = [h["event"] for h in status["history"]]
    assert "operator_compensate" in events and "operator_resume" not in events
