"""The payment's compensation ladder past the refund: a credit note (store credit) when the
refund is refused, and the returns saga's RefundOrder, which refunds exactly what was captured
and shares the one refund of the ledger with RefundPayment (handlers in real transactions on the
real database)."""

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
    CreditNoteIssued,
    CreditNoteRefused,
    GetPaymentStatus,
    IssueCreditNote,
    PaymentAuthorized,
    PaymentCaptured,
    PaymentRefunded,
    PaymentRefundFailed,
    PaymentStatusReported,
    RefundOrder,
    RefundPayment,
    VoidAuthorization,
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


class Order:
    def __init__(self, engine: AsyncEngine, order_id: str) -> None:
        self.engine, self.id, self.saga_id = engine, order_id, uuid.uuid4()

    async def send(self, handler: Handler, body: Message) -> Any:
        return await handle(self.engine, handler, self.saga_id, body)

    async def authorize(self, token: str) -> None:
        reply = await self.send(
            payment.authorize,
            AuthorizePayment(
                order_id=self.id, amount_minor=AUTHORIZED, currency="EUR", payment_token=token
            ),
        )
        assert isinstance(reply, PaymentAuthorized)

    async def capture(self) -> None:
        reply = await self.send(
            payment.capture,
            CapturePayment(order_id=self.id, amount_minor=CAPTURED, currency="EUR"),
        )
        assert isinstance(reply, PaymentCaptured)

    async def refund_payment(self) -> Any:
        return await self.send(
            payment.refund,
            RefundPayment(order_id=self.id, amount_minor=AUTHORIZED, currency="EUR"),
        )

    async def refund_order(self) -> Any:
        return await self.send(payment.refund_order, RefundOrder(order_id=self.id))

    async def credit(self, amount: int = CAPTURED) -> Any:
        return await self.send(
            payment.issue_credit_note,
            IssueCreditNote(order_id=self.id, amount_minor=amount, currency="EUR"),
        )

    async def status(self) -> str:
        reply = await self.send(payment.status, GetPaymentStatus(order_id=self.id))
        assert isinstance(reply, PaymentStatusReported)
        return reply.status

    async def ledger(self) -> list[tuple[str, int]]:
        return [
            (r.kind, r.amount_minor)
            for r in await rows(self.engine, payment.ledger, order_id=self.id)
        ]


@pytest.fixture
async def order(engine: AsyncEngine, uid: str) -> Order:
    await create_schema(engine, payment.SCHEMA, payment.metadata)
    return Order(engine, f"credit-{uid}")


# -- the credit note -----------------------------------------------------------------------------


async def test_a_refused_refund_is_followed_by_a_credit_note(order: Order) -> None:
    await order.authorize("tok_refund_fails")
    await order.capture()
    assert await order.refund_payment() == PaymentRefundFailed(
        order_id=order.id, reason="refund refused by PSP"
    )
    issued = await order.credit()
    assert issued == CreditNoteIssued(
        order_id=order.id,
        credit_note_id=payment.credit_note_id(order.id),
        amount_minor=CAPTURED,
    )
    # a re-send (even one with another amount) gets the same credit note, and moves nothing
    assert await order.credit() == issued
    assert await order.credit(amount=1) == issued
    assert await order.ledger() == [
        ("authorize", AUTHORIZED),
        ("capture", CAPTURED),
        ("credit_note", CAPTURED),
    ]
    (row,) = await rows(order.engine, payment.payments, order_id=order.id)
    assert row.status == "CREDITED"
    assert await order.status() == "credited"
    # after store credit, neither refund pays out; a void changes nothing
    assert await order.refund_payment() == PaymentRefundFailed(
        order_id=order.id, reason="refund refused by PSP"
    )
    assert await order.refund_order() == PaymentRefundFailed(
        order_id=order.id, reason="refund refused by PSP"
    )
    assert (await order.send(payment.void, VoidAuthorization(order_id=order.id))).had_authorization
    assert len(await order.ledger()) == 3


async def test_a_credit_note_of_part_of_the_capture(order: Order) -> None:
    await order.authorize("tok_visa")
    await order.capture()
    issued = await order.credit(amount=CAPTURED - 1)
    assert isinstance(issued, CreditNoteIssued) and issued.amount_minor == CAPTURED - 1
    # store credit was given: a refund as well would pay twice
    assert await order.refund_order() == PaymentRefundFailed(
        order_id=order.id, reason="credit note issued"
    )
    assert await order.refund_payment() == PaymentRefundFailed(
        order_id=order.id, reason="credit note issued"
    )
    assert [k for k, _ in await order.ledger()] == ["authorize", "capture", "credit_note"]


async def test_no_credit_token_refuses_refund_and_credit_note(order: Order) -> None:
    await order.authorize("tok_no_credit")
    await order.capture()
    assert await order.refund_payment() == PaymentRefundFailed(
        order_id=order.id, reason="refund refused by PSP"
    )
    assert await order.refund_order() == PaymentRefundFailed(
        order_id=order.id, reason="refund refused by PSP"
    )
    refused = CreditNoteRefused(order_id=order.id, reason="store credit not available")
    assert await order.credit() == refused
    assert await order.credit() == refused
    assert await order.ledger() == [("authorize", AUTHORIZED), ("capture", CAPTURED)]
    assert await order.status() == "captured"


async def test_a_credit_note_above_the_capture_is_refused(order: Order) -> None:
    await order.authorize("tok_refund_fails")
    await order.capture()
    assert await order.credit(amount=CAPTURED + 1) == CreditNoteRefused(
        order_id=order.id, reason="amount exceeds what was captured and not refunded"
    )
    assert await order.credit(amount=0) == CreditNoteRefused(
        order_id=order.id, reason="nothing to credit"
    )
    assert await order.status() == "captured"


async def test_a_credit_note_after_a_refund_is_refused(order: Order) -> None:
    await order.authorize("tok_visa")
    await order.capture()
    assert await order.refund_payment() == PaymentRefunded(order_id=order.id, amount_minor=CAPTURED)
    assert await order.credit(amount=1) == CreditNoteRefused(
        order_id=order.id, reason="amount exceeds what was captured and not refunded"
    )
    assert await order.status() == "refunded"


@pytest.mark.parametrize("authorized", [False, True])
async def test_a_credit_note_without_a_capture_is_refused(order: Order, authorized: bool) -> None:
    if authorized:
        await order.authorize("tok_visa")
    assert await order.credit() == CreditNoteRefused(order_id=order.id, reason="nothing captured")
    assert ("credit_note", CAPTURED) not in await order.ledger()


# -- RefundOrder (the returns saga) ----------------------------------------------------------------


async def test_refund_order_refunds_the_captured_amount_once(order: Order) -> None:
    await order.authorize("tok_visa")
    await order.capture()
    refunded = await order.refund_order()
    assert refunded == PaymentRefunded(order_id=order.id, amount_minor=CAPTURED)
    assert await order.refund_order() == refunded
    # the compensation's refund finds the same ledger row: never a second refund
    assert await order.refund_payment() == refunded
    assert await order.ledger() == [
        ("authorize", AUTHORIZED),
        ("capture", CAPTURED),
        ("refund", CAPTURED),
    ]
    assert await order.status() == "refunded"


async def test_refund_order_after_refund_payment_replies_the_same(order: Order) -> None:
    await order.authorize("tok_visa")
    await order.capture()
    refunded = await order.refund_payment()
    assert refunded == PaymentRefunded(order_id=order.id, amount_minor=CAPTURED)
    assert await order.refund_order() == refunded
    assert [k for k, _ in await order.ledger()] == ["authorize", "capture", "refund"]


@pytest.mark.parametrize("token", ["tok_refund_fails", "tok_no_credit"])
async def test_refund_order_refused_by_the_psp(order: Order, token: str) -> None:
    await order.authorize(token)
    await order.capture()
    refused = PaymentRefundFailed(order_id=order.id, reason="refund refused by PSP")
    assert await order.refund_order() == refused
    assert await order.refund_order() == refused
    assert await order.status() == "captured"


@pytest.mark.parametrize("authorized", [False, True])
async def test_refund_order_with_nothing_captured(order: Order, authorized: bool) -> None:
    if authorized:
        await order.authorize("tok_visa")
    assert await order.refund_order() == PaymentRefundFailed(
        order_id=order.id, reason="nothing captured"
    )
    # never a void: the authorization is left as it is
    assert await order.status() == ("authorized" if authorized else "none")
