"""Builders for the saga unit tests: one checkout, one policy, one clock, real wire models.

Everything here is deterministic: reply message ids are derived from what they answer, so a
failing example always replays the same way.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from process_manager.saga import (
    FORWARD,
    Decision,
    Input,
    Policy,
    Reply,
    SagaState,
    Start,
    decide,
    reply_token,
    start,
)
from schemas.base import Message
from schemas.checkout import StartCheckout, saga_id_for_order
from schemas.common import LineItem, ShippingAddress
from schemas.inventory import InventoryReleased, InventoryReserved, InventoryUnavailable
from schemas.order import OrderCancelled, OrderCompleted, OrderCreated
from schemas.payment import (
    AuthorizationVoided,
    PaymentAuthorized,
    PaymentCaptured,
    PaymentCaptureFailed,
    PaymentDeclined,
    PaymentRefunded,
    PaymentRefundFailed,
    PaymentStatusReported,
)
from schemas.shipping import ShipmentCancelled, ShipmentCreated, ShipmentFailed

NOW = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)

#: distinct values for every bound, so a test that mixes them up fails
POLICY = Policy(
    step_timeout=timedelta(seconds=11),
    max_step_attempts=3,
    compensation_timeout=timedelta(seconds=17),
    max_compensation_attempts=4,
)

ADDRESS = ShippingAddress(line1="1 Test Street", city="Utrecht", postal_code="3511AA", country="NL")

CHECKOUT = StartCheckout(
    order_id="ord-1",
    customer_id="cus_1",
    currency="EUR",
    items=(
        LineItem(sku="SKU-1", quantity=2, unit_price_minor=1500),
        LineItem(sku="SKU-2", quantity=1, unit_price_minor=500),
    ),
    payment_token="tok_visa",
    shipping_address=ADDRESS,
)
AMOUNT = 3500
START_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
REPLY_NS = uuid.UUID("00000000-0000-4000-8000-0000000000ff")

FORWARD_NAMES: tuple[str, ...] = tuple(s.name for s in FORWARD)

_SUCCESS: dict[str, Callable[[StartCheckout], Message]] = {
    # forward steps
    "order": lambda c: OrderCreated(order_id=c.order_id),
    "authorization": lambda c: PaymentAuthorized(
        order_id=c.order_id, authorization_id="auth_1", amount_minor=c.amount_minor
    ),
    "inventory": lambda c: InventoryReserved(order_id=c.order_id, reservation_id="res-1"),
    "shipment": lambda c: ShipmentCreated(order_id=c.order_id, tracking_number="TRK-1"),
    "capture": lambda c: PaymentCaptured(
        order_id=c.order_id, authorization_id="auth_1", amount_minor=c.amount_minor
    ),
    "completion": lambda c: OrderCompleted(
        order_id=c.order_id,
        customer_id=c.customer_id,
        amount_minor=c.amount_minor,
        currency=c.currency,
        duration_ms=1234,
    ),
    # compensations
    "cancel_order": lambda c: OrderCancelled(
        order_id=c.order_id,
        customer_id=c.customer_id,
        amount_minor=c.amount_minor,
        currency=c.currency,
        duration_ms=2345,
        reason="checkout_compensated",
    ),
    "void_authorization": lambda c: AuthorizationVoided(
        order_id=c.order_id, had_authorization=True
    ),
    "release_inventory": lambda c: InventoryReleased(order_id=c.order_id, units_released=3),
    # the status query after a payment step's timeouts: "nothing happened"
    "payment_status": lambda c: PaymentStatusReported(order_id=c.order_id, status="none"),
    "cancel_shipment": lambda c: ShipmentCancelled(order_id=c.order_id, had_shipment=True),
    "refund_payment": lambda c: PaymentRefunded(order_id=c.order_id, amount_minor=c.amount_minor),
}

_FAILURE: dict[str, Callable[[StartCheckout], Message]] = {
    # the status query's other answer: "it did happen" (captured counts for both payment steps)
    "payment_status": lambda c: PaymentStatusReported(order_id=c.order_id, status="captured"),
    "authorization": lambda c: PaymentDeclined(order_id=c.order_id, reason="card declined"),
    "inventory": lambda c: InventoryUnavailable(order_id=c.order_id, skus=("SKU-1",)),
    "shipment": lambda c: ShipmentFailed(order_id=c.order_id, reason="carrier down"),
    "capture": lambda c: PaymentCaptureFailed(order_id=c.order_id, reason="expired"),
    "refund_payment": lambda c: PaymentRefundFailed(order_id=c.order_id, reason="card closed"),
}

STEPS_WITH_FAILURE: tuple[str, ...] = tuple(_FAILURE)


def success_body(step: str, checkout: StartCheckout = CHECKOUT) -> Message:
    return _SUCCESS[step](checkout)


def failure_body(step: str, checkout: StartCheckout = CHECKOUT) -> Message:
    return _FAILURE[step](checkout)


def has_failure(step: str) -> bool:
    return step in _FAILURE


def reply(step: str, fence: int, *, ok: bool = True, copy: int = 0) -> Reply:
    """The reply a participant sends for ``step`` sent with ``fence``. ``copy`` distinguishes
    a second, independently produced reply from a redelivery of the same one."""
    body = success_body(step) if ok else failure_body(step)
    return Reply(
        body=body,
        fence=fence,
        message_id=uuid.uuid5(REPLY_NS, f"{step}:{fence}:{ok}:{copy}"),
        # the participant echoes the token of the dispatch it answers (the tests decide with
        # the empty nonce, so every dispatch's token is known here)
        token=reply_token("", saga_id_for_order(CHECKOUT.order_id), fence),
    )


def started(checkout: StartCheckout = CHECKOUT, *, policy: Policy = POLICY) -> Decision:
    return start(Start(checkout, START_ID), now=NOW, policy=policy)


def step(state: SagaState | None, message: Input, *, now: datetime = NOW) -> Decision:
    return decide(state, message, now=now, policy=POLICY)


def answer(state: SagaState, *, ok: bool = True, now: datetime = NOW) -> Decision:
    """Deliver the correct reply to whatever ``state`` awaits."""
    assert state.awaiting is not None, f"nothing awaited in {state.status}"
    return step(state, reply(state.awaiting, state.seq, ok=ok), now=now)


def awaiting(name: str) -> SagaState:
    """A fresh saga driven by successful replies until it awaits forward step ``name``."""
    state = started().state
    assert state is not None
    while state.awaiting != name:
        d = answer(state)
        assert d.state is not None
        state = d.state
    return state


def all_forward_done() -> SagaState:
    """A saga whose six forward steps all succeeded."""
    state = awaiting("completion")
    d = answer(state)
    assert d.state is not None
    return d.state


def drain_compensations(state: SagaState) -> tuple[SagaState, list[str]]:
    """Answer every compensation successfully; return the final state and the steps sent."""
    sent: list[str] = []
    while state.awaiting is not None:
        d = answer(state)
        assert d.state is not None
        sent.extend(c.step for c in d.commands)
        state = d.state
    return state, sent
