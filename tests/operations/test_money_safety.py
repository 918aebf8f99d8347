"""Issue 10, item 1: a stall after the capture never refunds an order that then completes.

The order service goes away after creating the order; the saga screens, authorizes, reserves,
ships and captures, then waits for `CompleteOrder` past every deadline, long enough to call a
human. When the order service comes back, the backlog is answered and the saga completes. Before
issue 10 the completion's timeouts compensated: the ledger showed a refund, the shipment was
cancelled, and then the order completed anyway.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.settings import Settings
from participants.inventory import service as inventory
from participants.notification import service as notification
from participants.order import service as order
from participants.payment import service as payment
from participants.shipping import service as shipping
from process_manager import ops, store
from tests.operations.conftest import Start
from tests.support import checkout, count, one, rows, wait_for

pytestmark = pytest.mark.integration

OTHERS = (
    "process-manager",
    "risk",
    "payment",
    "inventory",
    "shipping",
    "notification",
    "analytics",
)


async def _status(engine: AsyncEngine, order_id: str) -> dict[str, Any]:
    s = await ops.saga_status(engine, order_id)
    assert s is not None
    return s


async def test_a_stall_after_the_capture_never_refunds(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine, uid: str
) -> None:
    # short waits after the pivot, so the saga calls a human within seconds
    s = ops_settings.model_copy(update={"max_retriable_attempts": 3, "retriable_max_delay_s": 1.5})
    order_rt = await start_services("order", settings=s)
    await start_services(*OTHERS, settings=s)
    sku = f"SKU-STALL-{uid}"
    async with ops_engine.begin() as conn:
        await inventory.seed(conn, {sku: 1})
    cmd = checkout(f"stall-{uid}", sku=sku)
    await ops.publish_starts(s.amqp_url, [ops.start_message(cmd)])

    async def order_created() -> bool:
        st = (
            await _status(ops_engine, cmd.order_id)
            if await count(ops_engine, store.sagas, order_id=cmd.order_id)
            else None
        )
        return st is not None and "order" in st["completed_steps"]

    await wait_for(order_created, what="the order created")
    await order_rt.stop()  # the order service stalls: CompleteOrder will wait in its queue

    async def needs_a_human() -> dict[str, Any] | None:
        st = await _status(ops_engine, cmd.order_id)
        return st if st["state"] == "FAILED_NEEDS_MANUAL" else None

    stalled = await wait_for(needs_a_human, timeout=60, what="the saga to call a human")
    assert stalled["completed_steps"][-1] == "capture"
    resent = [h for h in stalled["history"] if "re-sent as attempt" in h["note"]]
    assert len(resent) == 2, stalled["history"]  # attempts 2 and 3 of CompleteOrder
    assert "not compensated" in stalled["failure_reason"]
    # nothing was undone while the order service was away
    assert [r.kind for r in await rows(ops_engine, payment.ledger, order_id=cmd.order_id)] == [
        "authorize",
        "capture",
    ]
    assert (await one(ops_engine, shipping.shipments, order_id=cmd.order_id)).status == "CREATED"
    case = await one(ops_engine, store.manual_cases, saga_id=stalled["saga_id"])
    assert case.resolved_at is None

    # the order service comes back and works off its backlog: the late answer completes the saga
    await start_services("order", settings=s)

    async def completed() -> dict[str, Any] | None:
        st = await _status(ops_engine, cmd.order_id)
        return st if st["state"] == "COMPLETED" else None

    final = await wait_for(completed, timeout=60, what="the late completion applied")
    assert final["completed_steps"][-1] == "completion"
    assert [r.kind for r in await rows(ops_engine, payment.ledger, order_id=cmd.order_id)] == [
        "authorize",
        "capture",
    ]
    assert (await one(ops_engine, shipping.shipments, order_id=cmd.order_id)).status == "CREATED"
    assert (await one(ops_engine, inventory.reservations, order_id=cmd.order_id)).status != (
        "RELEASED"
    )
    assert (await one(ops_engine, order.orders, order_id=cmd.order_id)).status == "COMPLETED"
    assert (
        await one(ops_engine, store.manual_cases, saga_id=final["saga_id"])
    ).resolved_at is not None

    async def told_once() -> list[Any] | None:
        found = await rows(ops_engine, notification.notifications, order_id=cmd.order_id)
        return found or None

    told = await wait_for(told_once, what="the customer notified")
    assert [n.template for n in told] == ["order_confirmed"]


async def test_a_saga_this_version_cannot_read_is_set_aside_and_the_others_go_on(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine, uid: str
) -> None:
    """A saga stored by an earlier, looser version (here a currency no longer accepted) must not
    stop the timeout loop for every other saga: it is set aside for a human, with a case."""
    from sqlalchemy import text

    # the process manager alone: CreateOrder waits in the order queue, so both sagas time out
    await start_services("process-manager")
    bad, good = checkout(f"legacy-{uid}"), checkout(f"fine-{uid}")
    await ops.publish_starts(
        ops_settings.amqp_url, [ops.start_message(bad), ops.start_message(good)]
    )

    async def both_started() -> bool:
        return (
            await count(ops_engine, store.sagas, order_id=bad.order_id)
            + await count(ops_engine, store.sagas, order_id=good.order_id)
            == 2
        )

    await wait_for(both_started, what="both sagas stored")
    async with ops_engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE process_manager.sagas SET state = jsonb_set(state,"
                " '{start,currency}', to_jsonb('ZZZ'::text)) WHERE order_id = :o"
            ),
            {"o": bad.order_id},
        )

    async def set_aside() -> Any:
        row = await one(ops_engine, store.sagas, order_id=bad.order_id)
        return row if row.status == "FAILED_NEEDS_MANUAL" else None

    row = await wait_for(set_aside, what="the unreadable saga set aside")
    assert "cannot be read by this version" in row.failure_reason
    case = await one(ops_engine, store.manual_cases, saga_id=row.saga_id)
    assert case.resolved_at is None

    async def good_resent() -> bool:
        s = await _status(ops_engine, good.order_id)
        return any("re-sent as attempt" in h["note"] for h in s["history"])

    await wait_for(good_resent, what="the readable saga's timeout handled")
