"""The test kit itself (``process_manager.testing``): samples for every registered definition,
the fake clock, the fake bus, and assertion messages that tell the story. And a property over
every registered definition, driven through the kit."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from process_manager import definitions
from process_manager.definitions import checkout, returns
from process_manager.engine import (
    Definition,
    Expire,
    ForceCompensate,
    Input,
    Phase,
    Reply,
    Resume,
    SagaState,
    past_pivot,
)
from process_manager.testing import (
    HARNESS_EPOCH,
    SAMPLE_REPLIES,
    SAMPLE_STARTS,
    SagaHarness,
    sample_checkout,
    sample_reply,
)
from schemas.order import OrderCreated
from schemas.payment import PaymentStatusReported

pytestmark = pytest.mark.unit

REPLY_TYPES = sorted({r for d in definitions.ALL for r in d.reply_types}, key=lambda r: r.TYPE)


@pytest.mark.parametrize("kind", REPLY_TYPES, ids=lambda r: r.TYPE)
def test_every_reply_type_of_every_registered_definition_has_a_sample(kind: type) -> None:
    assert kind in SAMPLE_REPLIES
    for d in definitions.ALL:
        start = SAMPLE_STARTS[d.start]()
        body = sample_reply(kind, start)
        assert type(body) is kind
        assert getattr(body, "order_id", None) == getattr(start, "order_id", None)


def test_every_registered_definition_has_a_sample_start() -> None:
    for d in definitions.ALL:
        assert isinstance(SAMPLE_STARTS[d.start](), d.start)


def test_sample_overrides_are_validated() -> None:
    assert sample_checkout(order_id="ord-9").order_id == "ord-9"
    body = sample_reply(PaymentStatusReported, sample_checkout(), status="captured")
    assert body.status == "captured"  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        sample_reply(PaymentStatusReported, sample_checkout(), status="teleported")


def test_the_clock_starts_at_a_fixed_instant_and_advance_fires_each_deadline_when_due() -> None:
    saga = SagaHarness(checkout.V1)  # step timeout 30 s, 3 sends
    saga.start()
    assert saga.now == HARNESS_EPOCH and saga.state.deadline == HARNESS_EPOCH + timedelta(
        seconds=30
    )
    assert saga.advance(seconds=29) == []
    fired = saga.advance(seconds=2)
    assert [d.event for d in fired] == ["resent"]
    assert saga.state.sent_at == HARNESS_EPOCH + timedelta(seconds=30)  # at the deadline
    fired = saga.advance(seconds=60)  # the third send at 60 s, the give-up at 90 s
    assert [d.event for d in fired] == ["resent", "timed_out"]
    assert saga.now == HARNESS_EPOCH + timedelta(seconds=91)
    saga.expect_sent("order.CancelOrder.v1")
    assert [c.attempt for c in saga.bus.to("order")] == [1, 2, 3, 1]


def test_a_failed_expectation_tells_the_story() -> None:
    saga = SagaHarness(checkout.V2)
    saga.start()
    saga.reply(OrderCreated)
    with pytest.raises(AssertionError) as e:
        saga.expect_sent("payment.AuthorizePayment.v1")
    text = str(e.value)
    assert "sent ['risk.ScreenOrder.v1']" in text
    assert "PENDING_RISK" in text and "awaiting risk" in text
    assert "OrderCreated@1: applied step_succeeded" in text
    with pytest.raises(AssertionError, match="expected status COMPLETED"):
        saga.expect_status("COMPLETED")


def test_the_kit_refuses_what_cannot_be_answered() -> None:
    saga = SagaHarness(checkout.V1)
    with pytest.raises(AssertionError, match="has not started"):
        _ = saga.status
    saga.start()
    saga.run_to("completion")
    with pytest.raises(AssertionError, match="cannot fail"):
        saga.answer(ok=False)
    saga.answer()
    with pytest.raises(AssertionError, match="nothing is awaited"):
        saga.answer()


def test_duplicate_and_stale_replies_through_the_kit() -> None:
    saga = SagaHarness(checkout.V1)
    saga.start()
    saga.answer()
    saga.duplicate_last_reply()
    saga.expect_outcome("ignored")
    assert "stale fence 1" in saga.last.note
    saga.reply(OrderCreated, fence=1, token=None)
    saga.expect_outcome("rejected")


def test_two_runs_of_one_story_publish_the_same_commands() -> None:
    def story() -> SagaHarness:
        saga = SagaHarness(returns.V1)
        saga.start()
        saga.run_to("refund")
        saga.advance(seconds=95)
        saga.answer()
        saga.finish()
        return saga

    a, b = story(), story()
    assert a.sent == b.sent and a.state == b.state
    assert a.status == "RETURNED"


# ---------------------------------------------------------------------------------------------
# One property over every registered definition

ACTIONS = (
    "ok",
    "fail",
    "timeout",
    "advance",
    "duplicate",
    "stale",
    "expire",
    "resume",
    "compensate",
)


def _check(d: Definition, prev: SagaState, msg: Input, new: SagaState, cmds: tuple) -> None:
    comps = {c.name for c in d.compensations}
    if past_pivot(d, prev) and not prev.compensating and not isinstance(msg, ForceCompensate):
        # past the point of no return only an operator sends a saga back
        assert not [c for c in cmds if c.step in comps], (prev, msg, cmds)
        assert not new.compensating
    if new.phase is Phase.RUNNING:
        assert new.status in d.running_statuses
    elif new.phase is Phase.COMPLETED:
        assert new.status in d.end_statuses
        assert not new.compensating and new.completed == new.route
    else:
        assert new.status == new.phase.value
    if new.phase.terminal:
        assert new.awaiting is None and new.deadline is None
    else:
        assert new.awaiting is not None and new.deadline is not None
    assert new.seq >= prev.seq
    assert new.completed[: len(prev.completed)] == prev.completed
    if prev.phase.terminal and not isinstance(msg, Resume | Reply):
        assert new == prev


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    d=st.sampled_from(definitions.ALL),
    backorder=st.booleans(),
    actions=st.lists(st.sampled_from(ACTIONS), max_size=30),
)
def test_any_interleaving_on_any_definition_keeps_the_invariants_and_ends(
    data: st.DataObject, d: Definition, backorder: bool, actions: list[str]
) -> None:
    saga = SagaHarness(d)
    saga.start(sample_checkout(allow_backorder=backorder) if d.name == "checkout" else None)
    for action in actions:
        prev = saga.state
        spec = d.step(prev.awaiting) if prev.awaiting else None
        if action in ("ok", "fail") and spec is not None:
            if action == "fail" and not spec.failure and d.query(spec.name) is None:
                continue
            if action == "ok" and spec.branches and data.draw(st.booleans(), label="branch"):
                saga.reply(next(iter(spec.branches)))
            else:
                saga.answer(ok=action == "ok")
        elif action == "timeout":
            saga.timeout()
        elif action == "advance":
            saga.advance(seconds=data.draw(st.integers(1, 3600), label="seconds"))
        elif action == "duplicate" and any(isinstance(m, Reply) for m in saga.inputs):
            saga.duplicate_last_reply()
        elif action == "stale" and saga.sent:
            c = data.draw(st.sampled_from(saga.sent), label="stale of")
            spec_c = d.step(c.step)
            saga.reply(spec_c.success[0], fence=c.fence)
        elif action == "expire":
            saga.deliver(Expire("alive too long"))
        elif action == "resume":
            saga.resume()
        elif action == "compensate":
            saga.compensate("operator")
        else:
            continue
        _check(d, prev, saga.inputs[-1], saga.state, saga.last.commands)
    saga.finish()
    assert saga.phase.terminal
