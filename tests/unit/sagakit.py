"""Builders for the table-driven checkout v1 tests: one checkout, one policy, one clock, real
wire models, all from ``process_manager.testing``.

Everything here is deterministic: reply message ids are derived from what they answer, so a
failing example always replays the same way. Scenario tests use ``SagaHarness`` directly; these
helpers decide one input at a time on explicit states, for tables and properties.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from process_manager.definitions import checkout
from process_manager.engine import (
    Decision,
    Definition,
    Input,
    Policy,
    Reply,
    SagaState,
    Start,
    decide,
    reply_token,
    start,
)
from process_manager.testing import HARNESS_EPOCH, sample_checkout, sample_reply
from schemas.base import Message
from schemas.checkout import StartCheckout, saga_id_for_order
from schemas.payment import PaymentStatusReported

#: the definition these tests pin: checkout v1 keeps the old saga's semantics exactly
V1: Definition = checkout.V1

NOW = HARNESS_EPOCH
LATER = NOW + timedelta(minutes=5)

#: distinct values for every bound, so a test that mixes them up fails
POLICY = Policy(
    step_timeout=timedelta(seconds=11),
    max_step_attempts=3,
    compensation_timeout=timedelta(seconds=17),
    max_compensation_attempts=4,
)

CHECKOUT = sample_checkout()
AMOUNT = 3500
START_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
REPLY_NS = uuid.UUID("00000000-0000-4000-8000-0000000000ff")

FORWARD = V1.steps
FORWARD_NAMES: tuple[str, ...] = tuple(s.name for s in FORWARD)
COMPENSATIONS: tuple[str, ...] = tuple(c.name for c in V1.compensations)
#: compensation -> the forward step it undoes
COMPENSATION_OF: dict[str, str] = {
    s.compensation: s.name for s in FORWARD if s.compensation is not None
}
#: forward steps whose unknown outcome a status query establishes
RECONCILED: frozenset[str] = frozenset(s.name for s in FORWARD if s.reconcile is not None)


def _status(status: str) -> Message:
    return PaymentStatusReported(order_id=CHECKOUT.order_id, status=status)  # type: ignore[arg-type]


def success_body(step: str, checkout_: StartCheckout = CHECKOUT) -> Message:
    if step == "payment_status":
        return _status("none")  # the status query's "nothing happened"
    return sample_reply(V1.step(step).success[0], checkout_)


def failure_body(step: str, checkout_: StartCheckout = CHECKOUT) -> Message:
    if step == "payment_status":
        return _status("captured")  # "it did happen" (captured counts for both payment steps)
    spec = V1.step(step)
    if not spec.failure:
        raise KeyError(f"{step} cannot fail")
    return sample_reply(spec.failure[0], checkout_)


def has_failure(step: str) -> bool:
    return step == "payment_status" or bool(V1.step(step).failure)


STEPS_WITH_FAILURE: tuple[str, ...] = tuple(
    s for s in (*FORWARD_NAMES, *COMPENSATIONS, "payment_status") if has_failure(s)
)


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


def started(checkout_: StartCheckout = CHECKOUT, *, policy: Policy = POLICY) -> Decision:
    return start(V1, Start(checkout_, START_ID), now=NOW, policy=policy)


def step(state: SagaState | None, message: Input, *, now: datetime = NOW) -> Decision:
    return decide(V1, state, message, now=now, policy=POLICY)


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
