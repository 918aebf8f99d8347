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

from messaging.service import migrate
from messaging.settings import Settings
from process_manager import bootstrap
from schemas.checkout import saga_id_for_order
from tests.chaos import invariants

pytestmark = [pytest.mark.chaos]

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest_asyncio.fixture
async def db(database: Settings, engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    await migrate(bootstrap.definitions(database), engine)
    yield engine


@pytest.fixture
def prefix(uid: str) -> str:
    return f"inv-{uid}-"


async def saga(engine: AsyncEngine, order_id: str, status: str) -> uuid.UUID:
    saga_id = saga_id_for_order(order_id)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO process_manager.sagas (saga_id, order_id, status, seq, version, "
                "definition_version, state, correlation_id, started_at, updated_at) VALUES "
                "(:s, :o, :st, 1, 1, 'test', CAST(:state AS jsonb), :s, :t, :t)"
            ),
            {"s": saga_id, "o": order_id, "st": status, "state": json.dumps({}), "t": NOW},
        )
    return saga_id


async def order(engine: AsyncEngine, order_id: str, status: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO orders.orders (order_id, saga_id, status, created_at, updated_at) "
                "VALUES (:o, :s, :st, :t, :t)"
            ),
            {"o": order_id, "s": saga_id_for_order(order_id), "st": status, "t": NOW},
        )


async def ledger(engine: AsyncEngine, order_id: str, kind: str, amount: int = 1999) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO payment.ledger (order_id, saga_id, kind, amount_minor, at) "
                "VALUES (:o, :s, :k, :a, :t)"
            ),
            {"o": order_id, "s": saga_id_for_order(order_id), "k": kind, "a": amount, "t": NOW},
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
                "s": saga_id_for_order(order_id),
                "o": order_id,
                "tpl": template,
                "t": NOW,
            },
        )


async def history(engine: AsyncEngine, order_id: str, note: str, at: datetime) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO process_manager.history (saga_id, at, seq, message_type, outcome, "
                "note) VALUES (:s, :at, 7, 'timeout', 'applied', :n)"
            ),
            {"s": saga_id_for_order(order_id), "at": at, "n": note},
        )


async def settled(engine: AsyncEngine, prefix: str) -> tuple[str, str]:
    """One completed and one compensated saga, everything as it should be."""
    done, undone = f"{prefix}done", f"{prefix}undone"
    await saga(engine, done, "COMPLETED")
    await order(engine, done, "COMPLETED")
    await ledger(engine, done, "capture")
    await told(engine, done, "order_confirmed")
    await saga(engine, undone, "COMPENSATED")
    await order(engine, undone, "CANCELLED")
    await ledger(engine, undone, "void")
    await told(engine, undone, "order_cancelled")
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
