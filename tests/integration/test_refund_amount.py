"""A refund gives back what was captured, not what was authorized, nor what the command says
(issue 10): the handlers in real transactions on the real database."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.consumer import Handler
from messaging.db import create_schema
from participants.payment import service as payment
from schemas.base import Message
from schemas.payment import (
    AuthorizePayment,
    CapturePayment,
    PaymentAuthorized,
    PaymentCaptured,
    PaymentRefunded,
    RefundPayment,
)
from tests.support import deliver, rows

pytestmark = pytest.mark.integration

AUTHORIZED = 10_000
CAPTURED = 6_250


async def handle(engine: AsyncEngine, handler: Handler, saga_id: uuid.UUID, body: Message) -> Any:
    """One delivery's transaction, as the consumer runs it (minus inbox and outbox); the reply."""
    ctx = await deliver(
        engine,
        handler,
        "payment",
        body,
        saga_id,
        step="payment",
        idempotency_key=f"{saga_id}:{type(body).__name__}",
    )
    assert len(ctx.outgoing) == 1
    return ctx.outgoing[0].body


@pytest.fixture
async def authorized(engine: AsyncEngine, uid: str) -> tuple[str, uuid.UUID]:
    await create_schema(engine, payment.SCHEMA, payment.metadata)
    order_id, saga_id = f"refund-{uid}", uuid.uuid4()
    reply = await handle(
        engine,
        payment.authorize,
        saga_id,
        AuthorizePayment(
            order_id=order_id, amount_minor=AUTHORIZED, currency="EUR", payment_token="tok_visa"
        ),
    )
    assert isinstance(reply, PaymentAuthorized)
    return order_id, saga_id


def refund_of(order_id: str) -> RefundPayment:
    # the saga's checkout total, as the process manager sends it
    return RefundPayment(order_id=order_id, amount_minor=AUTHORIZED, currency="EUR")


async def test_a_refund_returns_the_captured_amount(
    engine: AsyncEngine, authorized: tuple[str, uuid.UUID]
) -> None:
    order_id, saga_id = authorized
    captured = await handle(
        engine,
        payment.capture,
        saga_id,
        CapturePayment(order_id=order_id, amount_minor=CAPTURED, currency="EUR"),
    )
    assert isinstance(captured, PaymentCaptured) and captured.amount_minor == CAPTURED

    refunded = await handle(engine, payment.refund, saga_id, refund_of(order_id))
    assert refunded == PaymentRefunded(order_id=order_id, amount_minor=CAPTURED)
    # a re-sent refund moves no money and says what the refund gave back
    again = await handle(engine, payment.refund, saga_id, refund_of(order_id))
    assert again == refunded

    ledger = [
        (r.kind, r.amount_minor) for r in await rows(engine, payment.ledger, order_id=order_id)
    ]
    assert ledger == [("authorize", AUTHORIZED), ("capture", CAPTURED), ("refund", CAPTURED)]
    (row,) = await rows(engine, payment.payments, order_id=order_id)
    assert row.status == "REFUNDED"


async def test_a_refund_of_an_uncaptured_payment_is_a_void(
    engine: AsyncEngine, authorized: tuple[str, uuid.UUID]
) -> None:
    order_id, saga_id = authorized
    refunded = await handle(engine, payment.refund, saga_id, refund_of(order_id))
    assert refunded == PaymentRefunded(order_id=order_id, amount_minor=0)
    again = await handle(engine, payment.refund, saga_id, refund_of(order_id))
    assert again == refunded

    ledger = [
        (r.kind, r.amount_minor) for r in await rows(engine, payment.ledger, order_id=order_id)
    ]
    assert ledger == [("authorize", AUTHORIZED), ("void", AUTHORIZED)]
    (row,) = await rows(engine, payment.payments, order_id=order_id)
    assert row.status == "VOIDED"
