"""Timeouts, unknown outcomes, fencing, tombstones, the sweeper and the refund ladder, against the
real broker and database with participants taken down and brought back."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import aio_pika
import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.codec import encode
from messaging.outbox import Outbox
from messaging.settings import Settings
from participants.inventory import service as inventory
from participants.payment import service as payment
from participants.shipping import service as shipping
from process_manager import ops, store
from process_manager import service as pm
from process_manager.engine import ForceCompensate, Phase
from schemas.checkout import saga_id_for_order
from schemas.common import LineItem
from schemas.envelope import Envelope
from schemas.inventory import ReleaseInventory, ReserveInventory
from tests.operations.conftest import Start
from tests.support import checkout, wait_for

pytestmark = pytest.mark.integration

SERVICES = (
    "process-manager",
    "order",
    "risk",
    "payment",
    "inventory",
    "shipping",
    "notification",
    "analytics",
)


def ALL_BUT(*skip: str) -> list[str]:
    return [n for n in SERVICES if n not in skip]


async def _status(engine: AsyncEngine, order_id: str) -> dict[str, Any] | None:
    return await ops.saga_status(engine, order_id)


async def _state_is(engine: AsyncEngine, order_id: str, *states: str) -> dict[str, Any] | None:
    s = await _status(engine, order_id)
    return s if s and s["state"] in states else None


async def _seed(engine: AsyncEngine, **levels: int) -> None:
    async with engine.begin() as conn:
        await inventory.seed(conn, levels)


async def test_step_timeout_resends_with_same_key_and_applies_once(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    """Inventory is down: the process manager re-sends ReserveInventory with the same
    idempotency key; when inventory comes back, one reservation is made and the saga completes."""
    sku = f"SKU-TO-{uuid.uuid4().hex[:6]}"
    await _seed(ops_engine, **{sku: 3})
    # Many 1 s attempts: inventory, started once the re-send is seen, must answer before the
    # process manager gives the step up, however slowly this machine starts a service.
    patient = ops_settings.model_copy(update={"max_step_attempts": 30})
    await start_services("process-manager", settings=patient)
    await start_services(*ALL_BUT("inventory", "process-manager"))
    cmd = checkout(sku=sku)
    await ops.publish_starts(ops_settings.amqp_url, [ops.start_message(cmd)])

    async def resent() -> Any:
        s = await _status(ops_engine, cmd.order_id)
        return s if s and s["current_step"] == "inventory" and s["attempt"] >= 2 else None

    s = await wait_for(resent, what="ReserveInventory re-sent after its timeout")
    fence = s["seq"]
    # Both sends wait on the inventory queue: same key, same fence, attempts 1 and 2.
    connection = await aio_pika.connect(ops_settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue("sagabus.inventory", ensure=True)
        seen = []
        held = []
        while len(seen) < 2:
            m = await queue.get(no_ack=False, fail=False)
            if m is None:
                break
            held.append(m)
            if m.headers.get("sagabus-saga-id") == str(saga_id_for_order(cmd.order_id)):
                seen.append(
                    (
                        m.headers["sagabus-idempotency-key"],
                        m.headers["sagabus-fence"],
                        m.headers["sagabus-attempt"],
                        m.message_id,
                    )
                )
        for m in held:
            await m.reject(requeue=True)
    assert len({k for k, _, _, _ in seen}) == 1, seen
    assert {f for _, f, _, _ in seen} == {fence}
    assert sorted(a for _, _, a, _ in seen)[:2] == [1, 2]
    assert len({mid for *_, mid in seen}) == len(seen)  # distinct message ids, same key

    await start_services("inventory")
    done = await wait_for(
        lambda: _state_is(
            ops_engine, cmd.order_id, "COMPLETED", "COMPENSATED", "FAILED_NEEDS_MANUAL"
        ),
        timeout=60,
        what="saga end",
    )
    assert done["state"] == "COMPLETED", done
    async with ops_engine.connect() as conn:
        left = (
            await conn.execute(
                select(inventory.stock.c.available).where(inventory.stock.c.sku == sku)
            )
        ).scalar_one()
    assert left == 2  # one unit taken, however many ReserveInventory were delivered


async def test_lost_carrier_response_resolved_without_second_shipment(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    """The carrier books and loses every answer (lose rate 1.0): the shipping service asks the
    carrier by idempotency key and records the existing booking instead of booking again."""
    sku = f"SKU-LOST-{uuid.uuid4().hex[:6]}"
    await _seed(ops_engine, **{sku: 2})
    await start_services(*ALL_BUT())
    cmd = checkout(sku=sku)
    await ops.publish_starts(ops_settings.amqp_url, [ops.start_message(cmd)])
    done = await wait_for(
        lambda: _state_is(ops_engine, cmd.order_id, "COMPLETED", "COMPENSATED"),
        timeout=60,
        what="saga end",
    )
    assert done["state"] == "COMPLETED"
    async with ops_engine.connect() as conn:
        bookings = (
            await conn.execute(
                select(shipping.bookings).where(shipping.bookings.c.order_id == cmd.order_id)
            )
        ).all()
        shipment = (
            await conn.execute(
                select(shipping.shipments).where(shipping.shipments.c.order_id == cmd.order_id)
            )
        ).one()
    assert len(bookings) == 1
    assert shipment.status == "CREATED"
    assert shipment.tracking_number == bookings[0].tracking_number


async def test_late_shipment_after_compensation_is_cancelled_and_saga_stays_compensated(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    sku = f"SKU-LATE-{uuid.uuid4().hex[:6]}"
    await _seed(ops_engine, **{sku: 2})
    await start_services(*ALL_BUT("shipping"))
    cmd = checkout(sku=sku)
    await ops.publish_starts(ops_settings.amqp_url, [ops.start_message(cmd)])

    async def compensating_shipment() -> Any:
        s = await _status(ops_engine, cmd.order_id)
        return (
            s
            if s and s["state"] == "COMPENSATING" and s["current_step"] == "cancel_shipment"
            else None
        )

    await wait_for(compensating_shipment, timeout=30, what="timed-out shipment being compensated")
    await start_services("shipping")  # now the late CreateShipment is processed, then the cancel
    done = await wait_for(
        lambda: _state_is(
            ops_engine, cmd.order_id, "COMPENSATED", "COMPLETED", "FAILED_NEEDS_MANUAL"
        ),
        timeout=60,
        what="saga end",
    )
    assert done["state"] == "COMPENSATED", done
    notes = [h["note"] for h in done["history"]]
    assert any(
        ("ShipmentCreated" in n and "ignored" in n) or "late ShipmentCreated" in n for n in notes
    ), notes
    assert all(h["to"] != "COMPLETED" for h in done["history"])
    async with ops_engine.connect() as conn:
        booking = (
            await conn.execute(
                select(shipping.bookings).where(shipping.bookings.c.order_id == cmd.order_id)
            )
        ).one()
        stock = (
            await conn.execute(
                select(inventory.stock.c.available).where(inventory.stock.c.sku == sku)
            )
        ).scalar_one()
        pay = (
            await conn.execute(
                select(payment.payments).where(payment.payments.c.order_id == cmd.order_id)
            )
        ).one()
    assert booking.status == "CANCELLED"
    assert stock == 2
    assert pay.status == "VOIDED"


async def test_release_before_reserve_leaves_a_tombstone(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    sku = f"SKU-TOMB-{uuid.uuid4().hex[:6]}"
    await _seed(ops_engine, **{sku: 1})
    await start_services("inventory")
    order_id = f"tomb-{uuid.uuid4().hex[:8]}"
    saga_id = saga_id_for_order(order_id)
    from datetime import UTC, datetime

    def env(body: Any, step: str) -> Envelope:
        return Envelope(
            message_id=uuid.uuid4(),
            type=body.TYPE,
            saga_id=saga_id,
            correlation_id=saga_id,
            idempotency_key=f"{saga_id}:{step}",
            step=step,
            fence=1,
            occurred_at=datetime.now(UTC),
        )

    release = ReleaseInventory(order_id=order_id)
    reserve = ReserveInventory(
        order_id=order_id, items=(LineItem(sku=sku, quantity=1, unit_price_minor=1),)
    )
    connection = await aio_pika.connect(ops_settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        ex = await channel.get_exchange("sagabus.commands")
        await ex.publish(
            encode(env(release, "release_inventory"), release), "inventory.ReleaseInventory"
        )
        await ex.publish(encode(env(reserve, "inventory"), reserve), "inventory.ReserveInventory")

    async def both_handled() -> Any:
        async with ops_engine.connect() as conn:
            n = (
                await conn.execute(
                    text("SELECT count(*) FROM inventory.inbox WHERE saga_id = :s"), {"s": saga_id}
                )
            ).scalar_one()
        return n == 2

    await wait_for(both_handled, what="both inventory commands handled")
    async with ops_engine.connect() as conn:
        row = (
            await conn.execute(
                select(inventory.reservations).where(inventory.reservations.c.order_id == order_id)
            )
        ).one()
        stock = (
            await conn.execute(
                select(inventory.stock.c.available).where(inventory.stock.c.sku == sku)
            )
        ).scalar_one()
    assert row.status == "RELEASED"
    assert stock == 1  # the late reservation took nothing


async def test_sweeper_moves_stuck_saga_to_manual(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    # No order service: the saga sits in PENDING_ORDER (its re-sends time out slowly enough).
    slow = ops_settings.model_copy(update={"step_timeout_s": 300})
    await start_services("process-manager", settings=slow)
    cmd = checkout()
    await ops.publish_starts(ops_settings.amqp_url, [ops.start_message(cmd)])
    await wait_for(
        lambda: _state_is(ops_engine, cmd.order_id, "PENDING_ORDER"), what="saga started"
    )
    d = pm.definition(slow)
    sctx = SimpleNamespace(engine=ops_engine, outbox=Outbox(d.outbox, d.schema))
    from datetime import timedelta

    swept = await pm.sweep_expired(sctx, pm.policy_from(slow), timedelta(seconds=0))  # type: ignore[arg-type]
    assert swept >= 1
    s = await _status(ops_engine, cmd.order_id)
    assert s is not None and s["state"] == "FAILED_NEEDS_MANUAL"
    assert "time-to-live" in s["failure_reason"]
    stuck = await ops.list_sagas(ops_engine, stuck=True, limit=10_000)
    assert cmd.order_id in {r["order_id"] for r in stuck}  # `sagabus list --stuck` shows it
    async with ops_engine.connect() as conn:
        case = (
            await conn.execute(
                select(store.manual_cases).where(store.manual_cases.c.order_id == cmd.order_id)
            )
        ).one()
    assert case.resolved_at is None


async def test_refund_failure_ends_in_a_manual_case(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    """Captured, then forced to compensate while completing: the refund is refused and so is
    the credit note (its fallback), so the saga stops in FAILED_NEEDS_MANUAL with an open case,
    and nothing is refunded or credited."""
    sku = f"SKU-REF-{uuid.uuid4().hex[:6]}"
    await _seed(ops_engine, **{sku: 2})
    slow = ops_settings.model_copy(update={"step_timeout_s": 300})
    # The order service is down after CreateOrder: start it, then stop it before completion.
    order_rt = await start_services("order", settings=slow)
    await start_services(
        "process-manager", "risk", "payment", "inventory", "shipping", settings=slow
    )
    cmd = checkout(sku=sku, token="tok_no_credit")
    await ops.publish_starts(ops_settings.amqp_url, [ops.start_message(cmd)])
    await wait_for(
        lambda: _state_is(
            ops_engine,
            cmd.order_id,
            "PENDING_RISK",
            "PENDING_PAYMENT",
            "PENDING_INVENTORY",
            "PENDING_SHIPMENT",
            "PENDING_CAPTURE",
            "COMPLETING",
        ),
        what="order created",
    )
    await order_rt.stop()
    await wait_for(
        lambda: _state_is(ops_engine, cmd.order_id, "COMPLETING"),
        timeout=30,
        what="saga waiting for CompleteOrder",
    )
    decision = await pm.operator_action(
        ops_engine, slow, saga_id_for_order(cmd.order_id), ForceCompensate("test")
    )
    assert decision is not None and decision.state is not None
    assert decision.state.phase is Phase.COMPENSATING
    assert decision.state.status == "COMPENSATING"
    assert decision.commands[0].step == "refund_payment"
    done = await wait_for(
        lambda: _state_is(ops_engine, cmd.order_id, "FAILED_NEEDS_MANUAL"),
        timeout=30,
        what="manual state",
    )
    assert "issue_credit_note failed: CreditNoteRefused" in done["failure_reason"]
    notes = [h["note"] for h in done["history"]]
    assert any(
        n.startswith("refund_payment failed: PaymentRefundFailed") and "issue_credit_note" in n
        for n in notes
    ), notes
    async with ops_engine.connect() as conn:
        case = (
            await conn.execute(
                select(store.manual_cases).where(store.manual_cases.c.order_id == cmd.order_id)
            )
        ).one()
        kinds = (
            (
                await conn.execute(
                    select(payment.ledger.c.kind).where(payment.ledger.c.order_id == cmd.order_id)
                )
            )
            .scalars()
            .all()
        )
    assert case.resolved_at is None
    assert sorted(kinds) == ["authorize", "capture"]  # captured once, never refunded or credited


async def test_unknown_authorization_is_reconciled_by_payment_status_not_compensated(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    """Payment is down: AuthorizePayment times out on every attempt, so the process manager asks
    GetPaymentStatus instead of compensating. When payment comes back it authorizes (once, however
    many copies it gets), reports "authorized", and the saga carries on to COMPLETED."""
    sku = f"SKU-REC-{uuid.uuid4().hex[:6]}"
    await _seed(ops_engine, **{sku: 2})
    await start_services(*ALL_BUT("payment"))
    cmd = checkout(sku=sku)
    await ops.publish_starts(ops_settings.amqp_url, [ops.start_message(cmd)])

    async def asking() -> Any:
        s = await _status(ops_engine, cmd.order_id)
        return s if s and s["current_step"] == "payment_status" else None

    await wait_for(asking, timeout=30, what="payment status query after the timeouts")
    # one delivery at a time, so payment meets the commands in the order they were sent: the
    # authorizations first, then the status query (with concurrent handling the query may win
    # the race; then it fences the authorization off and the saga compensates instead, which
    # the payment unit of work guarantees is money-safe)
    await start_services("payment", settings=ops_settings.model_copy(update={"prefetch": 1}))
    done = await wait_for(
        lambda: _state_is(
            ops_engine, cmd.order_id, "COMPLETED", "COMPENSATED", "FAILED_NEEDS_MANUAL"
        ),
        timeout=60,
        what="saga end",
    )
    assert done["state"] == "COMPLETED", done
    assert any("reconciled: payment authorized" in h["note"] for h in done["history"])
    async with ops_engine.connect() as conn:
        kinds = (
            (
                await conn.execute(
                    select(payment.ledger.c.kind).where(payment.ledger.c.order_id == cmd.order_id)
                )
            )
            .scalars()
            .all()
        )
    assert sorted(kinds) == ["authorize", "capture"]
