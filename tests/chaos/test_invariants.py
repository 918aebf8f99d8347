"""The chaos run's new invariants can fail: each is fed a hand-made database state with exactly
its violation (rows fabricated under an order-id prefix of the test's own, in the test session's
scratch database) and must report it, and nothing for the clean state beside it."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import deadletters
from messaging.db import create_schema
from messaging.service import migrate
from messaging.settings import Settings
from participants.inventory import service as inventory
from process_manager import bootstrap
from schemas.base import saga_id_for
from tests.chaos import invariants

pytestmark = [pytest.mark.chaos]

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
#: the engine's phase of each status the tests give a saga
PHASE_OF = {
    "COMPLETED": "COMPLETED",
    "BACKORDERED": "COMPLETED",
    "RETURNED": "COMPLETED",
    "COMPENSATED": "COMPENSATED",
    "FAILED_NEEDS_MANUAL": "FAILED_NEEDS_MANUAL",
}


@pytest_asyncio.fixture
async def db(database: Settings, engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    await migrate(bootstrap.definitions(database), engine)
    await create_schema(engine, deadletters.SCHEMA, deadletters.metadata)
    yield engine


@pytest.fixture
def prefix(uid: str) -> str:
    return f"inv-{uid}-"


async def saga(
    engine: AsyncEngine, order_id: str, status: str, saga_type: str = "checkout"
) -> uuid.UUID:
    saga_id = saga_id_for(saga_type, order_id)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO process_manager.sagas (saga_id, saga_type, business_key, order_id, "
                "status, phase, seq, version, definition_version, state, correlation_id, "
                "started_at, updated_at) VALUES (:s, :type, :o, :o, :st, :phase, 1, 1, :ref, "
                "CAST(:state AS jsonb), :s, :t, :t)"
            ),
            {
                "s": saga_id,
                "type": saga_type,
                "o": order_id,
                "st": status,
                "phase": PHASE_OF.get(status, "RUNNING"),
                # a registered version: the session's process manager refuses to start beside
                # live sagas of a version it does not have
                "ref": "returns.v1" if saga_type == "returns" else "checkout.v2",
                "state": json.dumps({}),
                "t": NOW,
            },
        )
    return saga_id


async def return_(engine: AsyncEngine, order_id: str, status: str) -> uuid.UUID:
    return await saga(engine, order_id, status, "returns")


async def order(engine: AsyncEngine, order_id: str, status: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO orders.orders (order_id, saga_id, status, created_at, updated_at) "
                "VALUES (:o, :s, :st, :t, :t)"
            ),
            {"o": order_id, "s": saga_id_for("checkout", order_id), "st": status, "t": NOW},
        )


async def ledger(engine: AsyncEngine, order_id: str, kind: str, amount: int = 1999) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO payment.ledger (order_id, saga_id, kind, amount_minor, at) "
                "VALUES (:o, :s, :k, :a, :t)"
            ),
            {
                "o": order_id,
                "s": saga_id_for("checkout", order_id),
                "k": kind,
                "a": amount,
                "t": NOW,
            },
        )


async def told(engine: AsyncEngine, order_id: str, template: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO notification.notifications (fact_id, saga_id, order_id, "
                "customer_token, template, channel, sent_at) "
                "VALUES (:f, :s, :o, 'cus_1', :tpl, 'email', :t)"
            ),
            {
                "f": uuid.uuid4(),
                "s": saga_id_for("checkout", order_id),
                "o": order_id,
                "tpl": template,
                "t": NOW,
            },
        )


async def history(
    engine: AsyncEngine,
    order_id: str,
    note: str,
    at: datetime,
    *,
    event: str | None = None,
    saga_type: str = "checkout",
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO process_manager.history (saga_id, at, seq, message_type, outcome, "
                "note, event) VALUES (:s, :at, 7, 'timeout', 'applied', :n, :e)"
            ),
            {"s": saga_id_for(saga_type, order_id), "at": at, "n": note, "e": event},
        )


async def reservation(engine: AsyncEngine, order_id: str, status: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO inventory.reservations (order_id, saga_id, status, items, updated_at)"
                " VALUES (:o, :s, :st, '[]', :t)"
            ),
            {"o": order_id, "s": saga_id_for("checkout", order_id), "st": status, "t": NOW},
        )


async def dead_letter(
    engine: AsyncEngine, message_id: str, reason: str, failure_kind: str = "permanent"
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO dead_letters.dead_letters (id, message_id, queue, error_class, "
                "error_message, failure_kind, fingerprint, retry_count, headers, properties, "
                "body, failed_at, status) VALUES (:id, :m, 'sagabus.process-manager', "
                "'PermanentError', :r, :k, 'fp', 0, '{}', '{}', :b, :t, 'open')"
            ),
            {
                "id": uuid.uuid4(),
                "m": message_id,
                "r": reason,
                "k": failure_kind,
                "b": b"{}",
                "t": NOW,
            },
        )


async def settled(engine: AsyncEngine, prefix: str) -> tuple[str, str]:
    """Every way an order can end, everything as it should be: a completed checkout, a
    compensated one, a backordered one, a completed one returned, and a completed one whose
    return was compensated (a failed pickup)."""
    done, undone = f"{prefix}done", f"{prefix}undone"
    await saga(engine, done, "COMPLETED")
    await order(engine, done, "COMPLETED")
    await ledger(engine, done, "capture")
    await told(engine, done, "order_confirmed")
    await saga(engine, undone, "COMPENSATED")
    await order(engine, undone, "CANCELLED")
    await ledger(engine, undone, "void")
    await told(engine, undone, "order_cancelled")
    waiting = f"{prefix}waiting"
    await saga(engine, waiting, "BACKORDERED")
    await order(engine, waiting, "BACKORDERED")
    await ledger(engine, waiting, "void")
    await told(engine, waiting, "order_backordered")
    back = f"{prefix}back"
    await saga(engine, back, "COMPLETED")
    await return_(engine, back, "RETURNED")
    await order(engine, back, "RETURNED")
    await ledger(engine, back, "capture")
    await ledger(engine, back, "refund")
    await told(engine, back, "order_confirmed")
    await told(engine, back, "order_returned")
    kept = f"{prefix}kept"
    await saga(engine, kept, "COMPLETED")
    await return_(engine, kept, "COMPENSATED")
    await order(engine, kept, "COMPLETED")
    await ledger(engine, kept, "capture")
    await told(engine, kept, "order_confirmed")
    return done, undone


@pytest.mark.parametrize("kind", invariants.MONEY_BACK)
async def test_a_refund_or_void_of_a_completed_saga_is_reported(
    db: AsyncEngine, prefix: str, kind: str
) -> None:
    done, _ = await settled(db, prefix)
    assert await invariants.money_back_on_completed(db, prefix) == []

    await ledger(db, done, kind)

    assert await invariants.money_back_on_completed(db, prefix) == [
        f"{done}: COMPLETED, yet a {kind} of 1999"
    ]


@pytest.mark.parametrize(
    ("saga_status", "order_status"),
    [("COMPLETED", "CANCELLED"), ("COMPENSATED", "COMPLETED"), ("COMPLETED", "PENDING")],
)
async def test_an_order_disagreeing_with_its_saga_is_reported(
    db: AsyncEngine, prefix: str, saga_status: str, order_status: str
) -> None:
    await settled(db, prefix)
    assert await invariants.order_status_agreement(db, prefix) == invariants.OrderAgreement([], [])

    odd = f"{prefix}odd"
    await saga(db, odd, saga_status)
    await order(db, odd, order_status)

    got = await invariants.order_status_agreement(db, prefix)
    assert got.disagree == [f"{odd}: saga {saga_status}, order {order_status}"]
    assert got.manual == []


async def test_an_order_without_its_saga_or_a_saga_without_its_order_is_reported(
    db: AsyncEngine, prefix: str
) -> None:
    await settled(db, prefix)
    await saga(db, f"{prefix}a", "COMPLETED")
    await order(db, f"{prefix}b", "COMPLETED")

    got = await invariants.order_status_agreement(db, prefix)
    assert got.disagree == [
        f"{prefix}a: saga COMPLETED, order None",
        f"{prefix}b: saga None, order COMPLETED",
    ]


async def test_a_saga_needing_a_human_is_reported_with_its_order_not_as_a_violation(
    db: AsyncEngine, prefix: str
) -> None:
    await settled(db, prefix)
    stuck = f"{prefix}stuck"
    await saga(db, stuck, "FAILED_NEEDS_MANUAL")
    await order(db, stuck, "PENDING")

    got = await invariants.order_status_agreement(db, prefix)
    assert got == invariants.OrderAgreement(
        [], [f"{stuck}: saga FAILED_NEEDS_MANUAL, order PENDING"]
    )


@pytest.mark.parametrize(
    ("saga_status", "templates"),
    [
        ("COMPLETED", ["order_confirmed", "order_confirmed"]),  # told twice
        ("COMPLETED", ["order_cancelled"]),  # told the wrong outcome
        ("COMPLETED", ["order_cancelled", "order_confirmed"]),  # told both
        ("COMPENSATED", ["order_confirmed"]),
        ("COMPENSATED", []),  # never told
        ("FAILED_NEEDS_MANUAL", ["order_cancelled", "order_confirmed"]),
    ],
)
async def test_a_customer_not_told_one_right_outcome_is_reported(
    db: AsyncEngine, prefix: str, saga_status: str, templates: list[str]
) -> None:
    await settled(db, prefix)
    assert await invariants.customers_not_told_one_right_outcome(db, prefix) == []

    odd = f"{prefix}odd"
    await saga(db, odd, saga_status)
    for template in templates:
        await told(db, odd, template)

    assert await invariants.customers_not_told_one_right_outcome(db, prefix) == [
        f"{odd}: saga {saga_status}, customer told {templates}"
    ]


async def test_a_customer_told_about_an_order_without_a_saga_is_reported(
    db: AsyncEngine, prefix: str
) -> None:
    await settled(db, prefix)
    await told(db, f"{prefix}ghost", "order_confirmed")

    assert await invariants.customers_not_told_one_right_outcome(db, prefix) == [
        f"{prefix}ghost: saga None, customer told ['order_confirmed']"
    ]


async def test_an_order_stall_without_a_completion_resent_or_with_a_refund_is_reported(
    db: AsyncEngine, prefix: str
) -> None:
    done, undone = await settled(db, prefix)
    stall = (NOW, NOW + timedelta(seconds=8))
    note = "completion timed out: re-sent as attempt 2 (past the pivot)"
    # a re-send outside the stall, and a re-send of another step inside it, do not count
    await history(db, done, note, NOW - timedelta(seconds=1))
    await history(db, undone, "order timed out: re-sent as attempt 2", NOW + timedelta(seconds=5))

    assert await invariants.stalled_completions_not_clean(db, prefix, [stall]) == [
        f"no completion re-sent during the order service's stalls {[stall]}"
    ]

    await history(db, done, note, NOW + timedelta(seconds=5))
    assert await invariants.resent_during(db, prefix, [stall]) == {done: "COMPLETED"}
    assert await invariants.stalled_completions_not_clean(db, prefix, [stall]) == []

    await ledger(db, done, "refund")
    assert await invariants.stalled_completions_not_clean(db, prefix, [stall]) == [
        f"{done}: completion re-sent during an order stall, ended COMPLETED with ['refund']"
    ]

    stuck = f"{prefix}stuck"
    await saga(db, stuck, "FAILED_NEEDS_MANUAL")
    await history(db, stuck, note, NOW + timedelta(seconds=6))
    assert f"{stuck}: completion re-sent during an order stall, ended FAILED_NEEDS_MANUAL" in (
        await invariants.stalled_completions_not_clean(db, prefix, [stall])
    )


async def test_a_refund_of_a_returned_order_is_allowed_but_not_a_void_or_a_failed_pickups(
    db: AsyncEngine, prefix: str
) -> None:
    await settled(db, prefix)
    assert await invariants.money_back_on_completed(db, prefix) == []

    await ledger(db, f"{prefix}back", "void")  # a returned order is refunded, never voided
    await ledger(db, f"{prefix}kept", "refund")  # its pickup failed: it keeps its money

    assert await invariants.money_back_on_completed(db, prefix) == [
        f"{prefix}back: COMPLETED, yet a void of 1999 (return RETURNED)",
        f"{prefix}kept: COMPLETED, yet a refund of 1999 (return COMPENSATED)",
    ]


@pytest.mark.parametrize("kind", invariants.REFUNDS)
@pytest.mark.parametrize(
    ("checkout", "returned"),
    [
        ("COMPENSATED", None),
        ("COMPLETED", None),
        ("COMPLETED", "COMPENSATED"),
        ("BACKORDERED", None),
    ],
)
async def test_a_refund_or_credit_without_a_returned_return_is_reported(
    db: AsyncEngine, prefix: str, kind: str, checkout: str, returned: str | None
) -> None:
    await settled(db, prefix)
    assert await invariants.refunds_without_a_return(db, prefix) == []

    odd = f"{prefix}odd"
    await saga(db, odd, checkout)
    if returned:
        await return_(db, odd, returned)
    await ledger(db, odd, kind)

    shown = f"saga {checkout}" + (f", return {returned}" if returned else "")
    assert await invariants.refunds_without_a_return(db, prefix) == [
        f"{odd}: a {kind} of 1999, yet {shown}"
    ]

    # the one other way money goes back: an operator's compensate
    await history(db, odd, "operator: compensate", NOW, event=invariants.OPERATOR_COMPENSATE)
    assert await invariants.refunds_without_a_return(db, prefix) == []


@pytest.mark.parametrize(
    ("ledger_rows", "shown"),
    [
        ([("capture", 1999), ("refund", 1000)], "captured [1999], refunded [1000]"),
        ([("capture", 1999)], "captured [1999], refunded None"),
        ([("refund", 1999)], "captured None, refunded [1999]"),
        (
            [("capture", 1999), ("refund", 1999), ("credit_note", 1999)],
            "captured [1999], refunded [1999], credited [1999]",
        ),
    ],
)
async def test_a_return_not_refunding_exactly_the_capture_is_reported(
    db: AsyncEngine, prefix: str, ledger_rows: list[tuple[str, int]], shown: str
) -> None:
    await settled(db, prefix)
    assert await invariants.returns_refunded_wrong_amount(db, prefix) == []

    odd = f"{prefix}odd"
    await saga(db, odd, "COMPLETED")
    await return_(db, odd, "RETURNED")
    for kind, amount in ledger_rows:
        await ledger(db, odd, kind, amount)

    assert await invariants.returns_refunded_wrong_amount(db, prefix) == [
        f"{odd}: RETURNED, {shown}"
    ]


@pytest.mark.parametrize(
    ("checkout", "returned", "order_status"),
    [
        ("BACKORDERED", None, "PENDING"),
        ("BACKORDERED", None, "CANCELLED"),
        ("COMPLETED", "RETURNED", "COMPLETED"),  # returned, yet the order says completed
        ("COMPLETED", "RETURNED", "RETURN_PENDING"),
        ("COMPLETED", "COMPENSATED", "RETURN_PENDING"),  # a failed pickup left it pending
        ("COMPLETED", "COMPENSATED", "RETURNED"),
        ("COMPLETED", "PENDING_PICKUP", "RETURN_PENDING"),  # a return still running
        ("COMPENSATED", "RETURNED", "RETURNED"),  # a return of an order that never completed
    ],
)
async def test_an_order_disagreeing_with_its_return_or_backorder_is_reported(
    db: AsyncEngine, prefix: str, checkout: str, returned: str | None, order_status: str
) -> None:
    await settled(db, prefix)
    assert await invariants.order_status_agreement(db, prefix) == invariants.OrderAgreement([], [])

    odd = f"{prefix}odd"
    await saga(db, odd, checkout)
    if returned:
        await return_(db, odd, returned)
    await order(db, odd, order_status)

    shown = f"saga {checkout}" + (f", return {returned}" if returned else "")
    got = await invariants.order_status_agreement(db, prefix)
    assert got.disagree == [f"{odd}: {shown}, order {order_status}"]
    assert got.manual == []


async def test_a_return_needing_a_human_is_reported_with_its_order_not_as_a_violation(
    db: AsyncEngine, prefix: str
) -> None:
    await settled(db, prefix)
    stuck = f"{prefix}stuck"
    await saga(db, stuck, "COMPLETED")
    await return_(db, stuck, "FAILED_NEEDS_MANUAL")
    await order(db, stuck, "RETURN_PENDING")

    got = await invariants.order_status_agreement(db, prefix)
    assert got == invariants.OrderAgreement(
        [], [f"{stuck}: saga COMPLETED, return FAILED_NEEDS_MANUAL, order RETURN_PENDING"]
    )


@pytest.mark.parametrize(
    ("checkout", "returned", "templates"),
    [
        ("COMPLETED", "RETURNED", ["order_confirmed"]),  # never told of the return
        ("COMPLETED", "RETURNED", ["order_confirmed", "order_returned", "order_returned"]),
        ("COMPLETED", "RETURNED", ["order_returned"]),
        ("COMPLETED", "COMPENSATED", ["order_confirmed", "order_returned"]),  # pickup failed
        ("COMPLETED", None, ["order_confirmed", "order_returned"]),  # no return at all
        ("BACKORDERED", None, ["order_confirmed"]),
        ("BACKORDERED", None, ["order_backordered", "order_backordered"]),
        ("BACKORDERED", None, []),
    ],
)
async def test_a_customer_not_told_of_the_return_or_backorder_once_is_reported(
    db: AsyncEngine, prefix: str, checkout: str, returned: str | None, templates: list[str]
) -> None:
    await settled(db, prefix)
    assert await invariants.customers_not_told_one_right_outcome(db, prefix) == []

    odd = f"{prefix}odd"
    await saga(db, odd, checkout)
    if returned:
        await return_(db, odd, returned)
    for template in templates:
        await told(db, odd, template)

    shown = f"saga {checkout}" + (f", return {returned}" if returned else "")
    assert await invariants.customers_not_told_one_right_outcome(db, prefix) == [
        f"{odd}: {shown}, customer told {templates}"
    ]


@pytest.mark.parametrize(
    ("available", "back_reservation", "wrong"),
    [
        (8, "RESTOCKED", []),  # 10 less the 2 units kept; the 3 returned are back
        (5, "RESTOCKED", ["{sku}: 5 available, expected 10 - 2 sold (3 more sold and returned)"]),
        (11, "RESTOCKED", ["{sku}: 11 available, expected 10 - 2 sold (3 more sold and returned)"]),
        (8, "RESERVED", ["{back}: RETURNED, reservation RESERVED"]),
    ],
)
async def test_stock_not_restocked_exactly_once_is_reported(
    db: AsyncEngine, prefix: str, available: int, back_reservation: str, wrong: list[str]
) -> None:
    done, _ = await settled(db, prefix)
    back, kept = f"{prefix}back", f"{prefix}kept"
    sku = f"{prefix}SKU"
    await reservation(db, back, back_reservation)
    async with db.begin() as conn:
        await inventory.seed(conn, {sku: available})
    items = {done: [(sku, 1)], back: [(sku, 3)], kept: [(sku, 1)], f"{prefix}undone": [(sku, 4)]}

    assert await invariants.stock_not_restocked_once(db, prefix, {sku: 10}, items) == [
        w.format(sku=sku, back=back) for w in wrong
    ]


async def test_a_refused_return_with_a_saga_or_without_its_dead_letter_is_reported(
    db: AsyncEngine, prefix: str
) -> None:
    await settled(db, prefix)
    undone = f"{prefix}undone"
    refused = {undone: str(uuid.uuid4())}
    why = f"refused: order {undone} is not completed (its checkout is COMPENSATED)"

    assert await invariants.refused_returns_not_refused(db, prefix, refused) == [
        f"{undone}: no dead letter of {refused[undone]} saying 'not completed': []"
    ]

    await dead_letter(db, refused[undone], f"refused: returns for {undone} already ran")
    assert len(await invariants.refused_returns_not_refused(db, prefix, refused)) == 1

    await dead_letter(db, refused[undone], why)
    assert await invariants.refused_returns_not_refused(db, prefix, refused) == []

    await return_(db, undone, "COMPENSATED")
    assert await invariants.refused_returns_not_refused(db, prefix, refused) == [
        f"{undone}: refused expected, yet a returns saga (saga COMPENSATED, return COMPENSATED)"
    ]


@pytest.mark.parametrize("failure_kind", ["security", "permanent"])
async def test_a_legitimate_message_refused_is_reported_and_expected_refusals_are_not(
    db: AsyncEngine, failure_kind: str
) -> None:
    legitimate, poison = str(uuid.uuid4()), str(uuid.uuid4())
    await dead_letter(db, legitimate, "forbidden route: a reply on the start route", failure_kind)
    await dead_letter(db, poison, "forbidden route: a forged reply", failure_kind)

    got = await invariants.refused_legitimate(db, {poison}, failure_kind)

    assert (
        f"sagabus.process-manager: {legitimate}: forbidden route: a reply on the start route" in got
    )
    assert not any(poison in line for line in got)
    other = "permanent" if failure_kind == "security" else "security"
    assert not any(
        legitimate in line for line in await invariants.refused_legitimate(db, set(), other)
    )


async def test_an_unsent_outbox_row_of_the_risk_service_is_reported(db: AsyncEngine) -> None:
    schemas = ("process_manager", "risk")
    before = await invariants.unsent_outbox_rows(db, schemas)
    message_id = uuid.uuid4()
    async with db.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO risk.outbox (message_id, message_type, exchange, routing_key, "
                "headers, body) VALUES (:m, 'risk.RiskApproved.v1', 'sagabus.replies', "
                "'risk.RiskApproved.v1', '{}', :b)"
            ),
            {"m": message_id, "b": b"{}"},
        )
    try:
        after = await invariants.unsent_outbox_rows(db, schemas)
        assert after.get("risk", 0) == before.get("risk", 0) + 1
    finally:
        async with db.begin() as conn:
            await conn.execute(
                text("DELETE FROM risk.outbox WHERE message_id = :m"), {"m": message_id}
            )


async def test_a_refund_after_a_stalled_completion_is_allowed_only_for_a_returned_order(
    db: AsyncEngine, prefix: str
) -> None:
    await settled(db, prefix)
    stall = (NOW, NOW + timedelta(seconds=8))
    note = "completion timed out: re-sent as attempt 2 (past the pivot)"
    for o in (f"{prefix}back", f"{prefix}kept"):
        await history(db, o, note, NOW + timedelta(seconds=5))

    assert await invariants.stalled_completions_not_clean(db, prefix, [stall]) == []

    await ledger(db, f"{prefix}kept", "refund")
    assert await invariants.stalled_completions_not_clean(db, prefix, [stall]) == [
        f"{prefix}kept: completion re-sent during an order stall, ended COMPLETED with ['refund']"
    ]
