"""The returns saga end to end, and the checkout's compensation ladder past the refund: every
service in-process on the real broker and database (a vhost and database of this module's own,
with the dead-letter collector storing every dead letter), sagas started the way an external
AMQP client starts them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import deadletters
from messaging.db import make_engine
from messaging.service import Runtime, migrate
from messaging.settings import Settings
from messaging.topology import start_routing_key
from participants.inventory import service as inventory
from participants.notification import service as notification
from participants.order import service as order
from participants.payment import service as payment
from process_manager import bootstrap, ops, store
from process_manager.definitions import checkout as checkouts
from process_manager.definitions import returns
from process_manager.engine import ForceCompensate
from process_manager.service import operator_action
from schemas.checkout import StartCheckout
from schemas.returns import StartReturn
from tests.e2e.isolated import HOLDING, Gate, isolated, wait_saga
from tests.support import checkout, count, one, rows, wait_for

pytestmark = pytest.mark.e2e

RETURN_STEPS = [s.name for s in returns.V1.steps]


@pytest_asyncio.fixture(scope="module")
async def settings() -> AsyncIterator[Settings]:
    async with isolated("ret", **HOLDING, step_timeout_s=120) as s:
        yield s


@pytest_asyncio.fixture(scope="module")
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    e = make_engine(settings)
    await migrate(bootstrap.definitions(settings), e)
    yield e
    await e.dispose()


@pytest.fixture(scope="module")
def gate() -> Gate:
    return Gate()


@pytest_asyncio.fixture(scope="module")
async def services(settings: Settings, engine: AsyncEngine, gate: Gate) -> AsyncIterator[Runtime]:
    """Every service (the process manager unpinned: checkout v2), the participants behind the
    gate, and the dead-letter collector."""
    runtime = Runtime(
        gate.around(bootstrap.definitions(settings)), settings, engine=engine, dead_letters=True
    )
    await runtime.start()
    yield runtime
    await runtime.stop()


# -- helpers -------------------------------------------------------------------------------------


async def stock(engine: AsyncEngine, sku: str) -> int:
    return int((await one(engine, inventory.stock, sku=sku)).available)


async def ledger(engine: AsyncEngine, order_id: str) -> list[tuple[str, int]]:
    return [(r.kind, r.amount_minor) for r in await rows(engine, payment.ledger, order_id=order_id)]


async def order_status(engine: AsyncEngine, order_id: str) -> str:
    return str((await one(engine, order.orders, order_id=order_id)).status)


async def completed_checkout(
    settings: Settings, engine: AsyncEngine, cmd: StartCheckout, *, state: str = "COMPLETED"
) -> dict[str, Any]:
    await ops.publish_starts(settings.amqp_url, [ops.start_message(cmd)])
    status = await wait_saga(engine, cmd.order_id)
    assert status["state"] == state, status
    return status


async def start_return(settings: Settings, body: StartReturn, message_id: uuid.UUID) -> None:
    await ops.publish_starts(
        settings.amqp_url,
        [ops.start_message(body, message_id=message_id)],
        routing_key=start_routing_key("returns"),
    )


async def dead_letter(engine: AsyncEngine, message_id: uuid.UUID) -> Any:
    """The collector's row for ``message_id``, once it is stored."""
    t = deadletters.dead_letters

    async def probe() -> Any:
        async with engine.connect() as conn:
            return (await conn.execute(select(t).where(t.c.message_id == str(message_id)))).first()

    return await wait_for(probe, what=f"the dead letter of {message_id}")


async def history_of(engine: AsyncEngine, order_id: str, message_id: uuid.UUID) -> Any:
    """The returns saga's history row for ``message_id``, once it is written."""

    async def probe() -> Any:
        s = await ops.saga_status(engine, order_id, saga_type="returns")
        found = [h for h in (s or {}).get("history", []) if h["message_id"] == str(message_id)]
        return found[0] if found else None

    return await wait_for(probe, what=f"{message_id} in the history of the return of {order_id}")


async def returns_sagas(engine: AsyncEngine, order_id: str) -> int:
    return await count(engine, store.sagas, saga_type="returns", business_key=order_id)


# -- the outcomes --------------------------------------------------------------------------------


async def test_a_completed_order_is_returned_refunded_and_restocked_once(
    services: Runtime, settings: Settings, engine: AsyncEngine, uid: str
) -> None:
    sku = f"SKU-RET-{uid}"
    async with engine.begin() as conn:
        await inventory.seed(conn, {sku: 5})
    cmd = checkout(f"ret-{uid}", sku=sku, quantity=2, price=1250)
    await completed_checkout(settings, engine, cmd)
    assert await stock(engine, sku) == 3

    await start_return(settings, StartReturn(order_id=cmd.order_id, reason="too big"), uuid.uuid4())
    status = await wait_saga(engine, cmd.order_id, saga_type="returns")

    assert status["state"] == "RETURNED"
    assert status["phase"] == "COMPLETED"
    assert status["definition_version"] == "returns.v1"
    assert status["completed_steps"] == RETURN_STEPS
    assert status["saga_id"] == str(returns.V1.saga_id(StartReturn(order_id=cmd.order_id)))
    assert await ledger(engine, cmd.order_id) == [
        ("authorize", 2500),
        ("capture", 2500),
        ("refund", 2500),
    ]
    assert (await one(engine, payment.payments, order_id=cmd.order_id)).status == "REFUNDED"
    assert await order_status(engine, cmd.order_id) == "RETURNED"
    assert await stock(engine, sku) == 5

    async def returned_email() -> Any:
        found = await rows(
            engine, notification.notifications, order_id=cmd.order_id, template="order_returned"
        )
        return found

    assert len(await wait_for(returned_email, what="the order_returned email")) == 1
    # the checkout saga it returned is untouched
    assert (await wait_saga(engine, cmd.order_id))["state"] == "COMPLETED"

    # a second return of the same order is refused, and remembered as refused
    again = uuid.uuid4()
    await start_return(settings, StartReturn(order_id=cmd.order_id), again)
    dl = await dead_letter(engine, again)
    assert "already ran" in dl.error_message, dl.error_message
    assert dl.failure_kind == "permanent"
    note = await history_of(engine, cmd.order_id, again)
    assert (note["outcome"], note["note"].split(":")[0]) == ("rejected", "refused")
    assert await returns_sagas(engine, cmd.order_id) == 1
    assert (await ops.saga_status(engine, cmd.order_id, saga_type="returns") or {})[
        "state"
    ] == "RETURNED"
    assert [k for k, _ in await ledger(engine, cmd.order_id)].count("refund") == 1
    assert await stock(engine, sku) == 5


async def test_a_failed_pickup_compensates_the_return(
    services: Runtime, settings: Settings, engine: AsyncEngine, uid: str
) -> None:
    sku = f"SKU-NOPICK-{uid}"
    async with engine.begin() as conn:
        await inventory.seed(conn, {sku: 4})
    base = checkout(f"nopick-{uid}", sku=sku, quantity=1, price=800)
    cmd = base.model_copy(
        update={
            "shipping_address": base.shipping_address.model_copy(
                update={"line1": "No Pickup, 3 Canal Street"}
            )
        }
    )
    await completed_checkout(settings, engine, cmd)

    await start_return(settings, StartReturn(order_id=cmd.order_id), uuid.uuid4())
    status = await wait_saga(engine, cmd.order_id, saga_type="returns")

    assert status["state"] == "COMPENSATED"
    assert status["completed_steps"] == ["return_pending"]
    assert status["compensated_steps"] == ["cancel_return"]
    assert "pickup failed: PickupFailed" in status["failure_reason"], status["failure_reason"]
    assert await order_status(engine, cmd.order_id) == "COMPLETED"
    assert await ledger(engine, cmd.order_id) == [("authorize", 800), ("capture", 800)]
    assert await stock(engine, sku) == 3


async def test_a_return_of_an_order_whose_checkout_was_compensated_is_refused(
    services: Runtime, settings: Settings, engine: AsyncEngine, uid: str
) -> None:
    sku = f"SKU-RETDECL-{uid}"
    async with engine.begin() as conn:
        await inventory.seed(conn, {sku: 2})
    cmd = checkout(f"retdecl-{uid}", sku=sku, token="tok_decline")
    await completed_checkout(settings, engine, cmd, state="COMPENSATED")

    message_id = uuid.uuid4()
    await start_return(settings, StartReturn(order_id=cmd.order_id), message_id)
    dl = await dead_letter(engine, message_id)

    assert "not completed" in dl.error_message, dl.error_message
    assert "COMPENSATED" in dl.error_message
    assert dl.message_type == StartReturn.TYPE
    assert dl.failure_kind == "permanent"
    assert await returns_sagas(engine, cmd.order_id) == 0
    assert await ops.saga_status(engine, cmd.order_id, saga_type="returns") is None
    assert await order_status(engine, cmd.order_id) == "CANCELLED"


async def test_a_duplicate_return_while_the_first_runs_starts_nothing(
    services: Runtime, settings: Settings, engine: AsyncEngine, gate: Gate, uid: str
) -> None:
    sku = f"SKU-RETDUP-{uid}"
    async with engine.begin() as conn:
        await inventory.seed(conn, {sku: 3})
    cmd = checkout(f"retdup-{uid}", sku=sku, quantity=1, price=1999)
    await completed_checkout(settings, engine, cmd)
    body = StartReturn(order_id=cmd.order_id, reason="changed my mind")
    saga_id = returns.V1.saga_id(body)
    first, second = uuid.uuid4(), uuid.uuid4()

    # the first return waits at its pickup (held back in the retry queues) ...
    gate.hold(saga_id, "pickup")
    try:
        await start_return(settings, body, first)

        async def at_pickup() -> bool:
            s = await ops.saga_status(engine, cmd.order_id, saga_type="returns")
            return (
                s is not None
                and s["state"] == "PENDING_PICKUP"
                and gate.held[(saga_id, "pickup")] > 0
            )

        await wait_for(at_pickup, what="the return held at its pickup")
        # ... while the same request comes again, under a new message id
        await start_return(settings, body, second)
        note = await history_of(engine, cmd.order_id, second)
    finally:
        gate.release(saga_id)

    assert note["outcome"] == "ignored"
    assert note["note"].startswith("duplicate StartReturn"), note["note"]
    status = await wait_saga(engine, cmd.order_id, saga_type="returns")
    assert status["state"] == "RETURNED"
    starts = [
        (h["message_id"], h["outcome"])
        for h in status["history"]
        if h["message_type"] == StartReturn.TYPE
    ]
    assert starts == [(str(first), "applied"), (str(second), "ignored")]
    assert await returns_sagas(engine, cmd.order_id) == 1
    assert await ledger(engine, cmd.order_id) == [
        ("authorize", 1999),
        ("capture", 1999),
        ("refund", 1999),
    ]
    assert await stock(engine, sku) == 3
    assert await count(engine, deadletters.dead_letters, message_id=str(second)) == 0


# -- the checkout's ladder past the refund (v2) --------------------------------------------------


@pytest.mark.parametrize(
    ("token", "state"),
    [("tok_refund_fails", "COMPENSATED"), ("tok_no_credit", "FAILED_NEEDS_MANUAL")],
    ids=["credit-note", "credit-note-refused"],
)
async def test_an_operator_compensation_past_the_capture_falls_back_to_a_credit_note(
    services: Runtime,
    settings: Settings,
    engine: AsyncEngine,
    gate: Gate,
    uid: str,
    token: str,
    state: str,
) -> None:
    """A completed saga cannot be compensated (the engine ignores a ForceCompensate in a
    terminal phase), so the operator acts while the saga is past its capture, its completion
    held back: the refund is refused (the token refuses every refund), and the next rung, a
    credit note, settles the payment; refused too, a human is called."""
    sku = f"SKU-CREDIT-{uid}"
    async with engine.begin() as conn:
        await inventory.seed(conn, {sku: 2})
    cmd = checkout(f"credit-{uid}", sku=sku, quantity=1, price=4200, token=token)
    saga_id = checkouts.V2.saga_id(cmd)

    gate.hold(saga_id, "completion")
    await ops.publish_starts(settings.amqp_url, [ops.start_message(cmd)])

    async def completing() -> bool:
        s = await ops.saga_status(engine, cmd.order_id)
        return (
            s is not None and s["state"] == "COMPLETING" and gate.held[(saga_id, "completion")] > 0
        )

    await wait_for(completing, what="the checkout held at its completion")
    decision = await operator_action(
        engine, settings, saga_id, ForceCompensate("customer cancelled after capture")
    )
    assert decision is not None and decision.outcome == "applied"
    status = await wait_saga(engine, cmd.order_id)
    # the held CompleteOrder is never let through: it would only be ignored as stale

    assert status["state"] == state, status
    assert status["definition_version"] == "checkout.v2"
    assert status["failure_reason"].startswith("operator: customer cancelled after capture")
    events = [(h["event"], h["step"]) for h in status["history"]]
    assert ("compensation_refused", "refund_payment") in events, events
    kinds = [k for k, _ in await ledger(engine, cmd.order_id)]
    assert "refund" not in kinds
    paid = await one(engine, payment.payments, order_id=cmd.order_id)
    cases = await rows(engine, store.manual_cases, saga_id=saga_id)
    if token == "tok_refund_fails":
        assert await ledger(engine, cmd.order_id) == [
            ("authorize", 4200),
            ("capture", 4200),
            ("credit_note", 4200),
        ]
        assert paid.status == "CREDITED"
        assert "refund_payment" in status["compensated_steps"]
        assert status["compensated_steps"][-1] == "cancel_order"
        assert await order_status(engine, cmd.order_id) == "CANCELLED"
        assert cases == []
    else:
        assert kinds == ["authorize", "capture"]
        assert paid.status == "CAPTURED"
        assert "issue_credit_note" in status["failure_reason"], status["failure_reason"]
        assert [c.resolved_at for c in cases] == [None]
