"""Risk screening: the rules, the block list and its seeding, and one decision per order however
often it is asked (handlers in real transactions on the real database); and one ScreenOrder
through the real broker to the running risk service."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import topology
from messaging.codec import Incoming, encode
from messaging.consumer import Context, Handler
from messaging.db import create_schema
from messaging.service import Runtime, ServiceContext
from messaging.settings import Settings
from participants.risk import service as risk
from schemas.base import Message
from schemas.envelope import Envelope
from schemas.risk import RiskApproved, RiskRejected, ScreenOrder
from tests.support import count, one, publish, rows, sent_outbox_row, wait_for

pytestmark = pytest.mark.integration

LIMIT = 1_000_000


def envelope(body: Message, saga_id: uuid.UUID) -> Envelope:
    return Envelope(
        message_id=uuid.uuid4(),
        type=body.TYPE,
        saga_id=saga_id,
        correlation_id=saga_id,
        idempotency_key=f"{saga_id}:risk",
        step="risk",
        fence=1,
        occurred_at=datetime.now(UTC),
    )


async def handle(engine: AsyncEngine, handler: Handler, body: Message) -> Any:
    """One delivery's transaction, as the consumer runs it (minus inbox and outbox); the reply."""
    async with engine.begin() as conn:
        ctx = Context(conn, Incoming(envelope(body, uuid.uuid4()), body), "risk")
        await handler(ctx)
    assert len(ctx.outgoing) == 1
    return ctx.outgoing[0].body


@pytest.fixture
async def schema(engine: AsyncEngine) -> None:
    await create_schema(engine, risk.SCHEMA, risk.metadata)


def screener(settings: Settings, **update: Any) -> Handler:
    return risk.make_screen(
        settings.model_copy(
            update={
                "risk_max_amount_minor": LIMIT,
                "risk_blocked_customers": "cus_blocked, cus_also_blocked",
                **update,
            }
        )
    )


def screen(order_id: str, amount: int = 5_000, customer: str = "cus_ok") -> ScreenOrder:
    return ScreenOrder(order_id=order_id, customer_id=customer, amount_minor=amount, currency="EUR")


@pytest.mark.parametrize(
    ("amount", "blocked", "expected"),
    [
        (0, False, ("APPROVED", None)),
        (LIMIT, False, ("APPROVED", None)),
        (LIMIT + 1, False, ("REJECTED", "amount_above_limit")),
        (1, True, ("REJECTED", "customer_blocked")),
        (LIMIT + 1, True, ("REJECTED", "customer_blocked")),
    ],
)
def test_decide(amount: int, blocked: bool, expected: tuple[str, str | None]) -> None:
    assert risk.decide(amount, blocked=blocked, max_amount_minor=LIMIT) == expected


def test_the_configured_block_list_ignores_blanks() -> None:
    s = Settings(risk_blocked_customers=" cus_a, ,cus_b,")
    assert risk.configured_block_list(s) == frozenset({"cus_a", "cus_b"})
    assert risk.configured_block_list(Settings()) == frozenset({"cus_blocked"})


async def test_an_order_within_the_limit_is_approved(
    engine: AsyncEngine, schema: None, settings: Settings, uid: str
) -> None:
    order_id = f"risk-ok-{uid}"
    reply = await handle(engine, screener(settings), screen(order_id, amount=LIMIT))
    assert reply == RiskApproved(order_id=order_id, screening_id=risk.screening_id(order_id))
    row = await one(engine, risk.screenings, order_id=order_id)
    assert (row.decision, row.reason, row.screening_id) == (
        "APPROVED",
        None,
        reply.screening_id,
    )


async def test_an_amount_above_the_limit_is_rejected(
    engine: AsyncEngine, schema: None, settings: Settings, uid: str
) -> None:
    order_id = f"risk-big-{uid}"
    reply = await handle(engine, screener(settings), screen(order_id, amount=LIMIT + 1))
    assert reply == RiskRejected(order_id=order_id, reason="amount_above_limit")
    row = await one(engine, risk.screenings, order_id=order_id)
    assert (row.decision, row.reason) == ("REJECTED", "amount_above_limit")


@pytest.mark.parametrize("customer", ["cus_blocked", "cus_also_blocked"])
async def test_a_configured_customer_is_rejected_before_any_seeding(
    engine: AsyncEngine, schema: None, settings: Settings, uid: str, customer: str
) -> None:
    order_id = f"risk-cfg-{uid}"
    reply = await handle(engine, screener(settings), screen(order_id, customer=customer))
    assert reply == RiskRejected(order_id=order_id, reason="customer_blocked")


async def test_a_customer_on_the_table_is_rejected(
    engine: AsyncEngine, schema: None, settings: Settings, uid: str
) -> None:
    customer = f"cus_fraud_{uid}"
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO risk.blocked_customers (customer_id, reason, added_at)"
                " VALUES (:c, 'chargebacks', now())"
            ),
            {"c": customer},
        )
    order_id = f"risk-tbl-{uid}"
    reply = await handle(engine, screener(settings), screen(order_id, customer=customer))
    assert reply == RiskRejected(order_id=order_id, reason="customer_blocked")


async def test_a_resent_screening_returns_the_recorded_decision(
    engine: AsyncEngine, schema: None, settings: Settings, uid: str
) -> None:
    approved, rejected = f"risk-re-a-{uid}", f"risk-re-r-{uid}"
    first_a = await handle(engine, screener(settings), screen(approved, amount=900_000))
    first_r = await handle(engine, screener(settings), screen(rejected, amount=LIMIT + 1))
    # the rules changed since (a lower limit, a higher one): the decision does not
    changed = screener(settings, risk_max_amount_minor=100, risk_blocked_customers="cus_ok")
    assert await handle(engine, changed, screen(approved, amount=900_000)) == first_a
    relaxed = screener(settings, risk_max_amount_minor=10 * LIMIT)
    assert await handle(engine, relaxed, screen(rejected, amount=LIMIT + 1)) == first_r
    assert isinstance(first_a, RiskApproved) and isinstance(first_r, RiskRejected)
    assert await count(engine, risk.screenings, order_id=approved) == 1
    assert await count(engine, risk.screenings, order_id=rejected) == 1


async def test_concurrent_deliveries_of_one_screening_agree(
    engine: AsyncEngine, schema: None, settings: Settings, uid: str
) -> None:
    order_id = f"risk-race-{uid}"
    replies = await asyncio.gather(
        *(handle(engine, screener(settings), screen(order_id)) for _ in range(4))
    )
    assert all(r == replies[0] for r in replies)
    assert isinstance(replies[0], RiskApproved)
    assert await count(engine, risk.screenings, order_id=order_id) == 1


async def test_seeding_adds_the_configured_customers_once(
    engine: AsyncEngine, schema: None, settings: Settings, uid: str
) -> None:
    a, b = f"cus_seed_a_{uid}", f"cus_seed_b_{uid}"
    s = settings.model_copy(update={"risk_blocked_customers": f"{a},{b}"})
    ctx = cast(ServiceContext, SimpleNamespace(engine=engine))
    seed = risk.block_list_seeder(s)
    await seed(ctx)
    await seed(ctx)  # every start seeds: nothing changes the second time
    found = {
        r.customer_id: r.reason
        for r in await rows(engine, risk.blocked_customers)
        if r.customer_id in (a, b)
    }
    assert found == {a: risk.CONFIGURED, b: risk.CONFIGURED}


async def test_screen_order_through_the_broker(
    services: Runtime, engine: AsyncEngine, amqp: AbstractRobustConnection, uid: str
) -> None:
    """The risk service runs with the others, its block list seeded from the default setting,
    and answers a ScreenOrder published on its command route."""

    async def seeded() -> bool:
        return await count(engine, risk.blocked_customers, customer_id="cus_blocked") == 1

    await wait_for(seeded, what="the default block list seeded")
    outbox = services.relays["risk"].outbox.table
    cases = [
        (screen(f"risk-bus-ok-{uid}"), RiskApproved.TYPE, "APPROVED"),
        (screen(f"risk-bus-bl-{uid}", customer="cus_blocked"), RiskRejected.TYPE, "REJECTED"),
    ]
    for body, reply_type, decision in cases:
        saga_id = uuid.uuid4()
        exchange, key = topology.command_route("risk", body.TYPE)
        await publish(amqp, exchange, key, encode(envelope(body, saga_id), body))
        await sent_outbox_row(engine, outbox, saga_id, reply_type)
        row = await one(engine, risk.screenings, order_id=body.order_id)
        assert row.decision == decision
