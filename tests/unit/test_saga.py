"""Table-driven tests of the pure checkout saga: every path through ``start`` and ``decide``."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import pytest

from process_manager.engine import (
    COMMAND_NAMESPACE,
    Command,
    Decision,
    Definition,
    DefinitionError,
    Expire,
    ForceCompensate,
    Input,
    InvalidTransition,
    Phase,
    Policy,
    Reply,
    Resume,
    SagaState,
    Start,
    Timeout,
    command_id,
    compensation_plan,
    decide,
    idempotency_key,
    reply_token,
    start,
)
from schemas.base import Message
from schemas.checkout import saga_id_for_order
from schemas.inventory import (
    InventoryReleased,
    InventoryReserved,
    ReleaseInventory,
    ReserveInventory,
)
from schemas.order import CancelOrder, CompleteOrder, CreateOrder, OrderCompleted, OrderCreated
from schemas.payment import (
    AuthorizePayment,
    CapturePayment,
    PaymentAuthorized,
    PaymentCaptured,
    PaymentStatusReported,
    RefundPayment,
    VoidAuthorization,
)
from schemas.shipping import CancelShipment, CreateShipment, ShipmentCreated
from tests.unit.sagakit import (
    AMOUNT,
    CHECKOUT,
    COMPENSATION_OF,
    FORWARD,
    FORWARD_NAMES,
    LATER,
    NOW,
    POLICY,
    RECONCILED,
    START_ID,
    V1,
    all_forward_done,
    answer,
    awaiting,
    drain_compensations,
    failure_body,
    reply,
    started,
    step,
    success_body,
)

pytestmark = pytest.mark.unit

SAGA_ID = saga_id_for_order(CHECKOUT.order_id)

Maker = Callable[[], SagaState]


def only(d: Decision) -> Command:
    assert len(d.commands) == 1, d.commands
    return d.commands[0]


def state_of(d: Decision) -> SagaState:
    assert d.state is not None
    return d.state


def assert_ignored(before: SagaState, d: Decision, note: str) -> None:
    assert d.outcome == "ignored"
    assert d.state == before
    assert d.commands == ()
    assert note in d.note


def timed_out(state: SagaState, times: int) -> tuple[SagaState, Decision]:
    """Fire ``times`` timeouts for the current fence."""
    d = Decision(state)
    for _ in range(times):
        d = step(state, Timeout(state.seq))
        state = state_of(d)
    return state, d


# ---------------------------------------------------------------------------------------------
# Definition


def test_definition_is_the_six_forward_steps_in_order() -> None:
    assert FORWARD_NAMES == (
        "order",
        "authorization",
        "inventory",
        "shipment",
        "capture",
        "completion",
    )
    assert COMPENSATION_OF == {
        "cancel_order": "order",
        "void_authorization": "authorization",
        "release_inventory": "inventory",
        "cancel_shipment": "shipment",
        "refund_payment": "capture",
    }


@pytest.mark.parametrize(
    ("phase", "terminal"),
    [(p, p.value in {"COMPLETED", "COMPENSATED", "FAILED_NEEDS_MANUAL"}) for p in Phase],
)
def test_terminal_phases(phase: Phase, terminal: bool) -> None:
    assert phase.terminal is terminal


# ---------------------------------------------------------------------------------------------
# Start


def test_start_creates_the_saga_and_sends_create_order() -> None:
    d = started()
    state = state_of(d)
    cmd = only(d)

    assert d.outcome == "applied"
    assert d.transition == (None, "PENDING_ORDER")
    assert state.saga_id == SAGA_ID
    assert state.start == CHECKOUT
    assert state.order_id == "ord-1"
    assert state.status == "PENDING_ORDER"
    assert (state.seq, state.attempt, state.awaiting) == (1, 1, "order")
    assert state.completed == ()
    assert state.started_at == NOW
    assert state.deadline == NOW + POLICY.step_timeout
    assert (state.saga_type, state.version, state.ref) == ("checkout", 1, "checkout.v1")
    assert state.phase is Phase.RUNNING

    assert cmd == Command(
        message_id=command_id(SAGA_ID, "order", 1, 1),
        participant="order",
        step="order",
        attempt=1,
        fence=1,
        idempotency_key=f"{SAGA_ID}:order",
        body=CreateOrder(
            order_id="ord-1", customer_id="cus_1", amount_minor=AMOUNT, currency="EUR"
        ),
        reply_token=reply_token("", SAGA_ID, 1),
    )
    assert state.tokens == ((1, cmd.reply_token),)


def test_decide_start_without_state_is_start() -> None:
    msg = Start(CHECKOUT, START_ID)
    assert decide(V1, None, msg, now=NOW, policy=POLICY) == start(V1, msg, now=NOW, policy=POLICY)


@pytest.mark.parametrize(
    "make_state",
    [
        pytest.param(lambda: state_of(started()), id="pending"),
        pytest.param(all_forward_done, id="completed"),
    ],
)
def test_duplicate_start_is_ignored(make_state: Maker) -> None:
    state = make_state()
    d = step(state, Start(CHECKOUT, uuid.uuid4()), now=LATER)
    assert_ignored(state, d, "duplicate start")


# ---------------------------------------------------------------------------------------------
# Happy path

HAPPY = [
    # awaited step, status while awaited, participant, command body
    (
        "order",
        "PENDING_ORDER",
        "order",
        CreateOrder(order_id="ord-1", customer_id="cus_1", amount_minor=AMOUNT, currency="EUR"),
    ),
    (
        "authorization",
        "PENDING_PAYMENT",
        "payment",
        AuthorizePayment(
            order_id="ord-1", amount_minor=AMOUNT, currency="EUR", payment_token="tok_visa"
        ),
    ),
    (
        "inventory",
        "PENDING_INVENTORY",
        "inventory",
        ReserveInventory(order_id="ord-1", items=CHECKOUT.items),
    ),
    (
        "shipment",
        "PENDING_SHIPMENT",
        "shipping",
        CreateShipment(
            order_id="ord-1", items=CHECKOUT.items, shipping_address=CHECKOUT.shipping_address
        ),
    ),
    (
        "capture",
        "PENDING_CAPTURE",
        "payment",
        CapturePayment(order_id="ord-1", amount_minor=AMOUNT, currency="EUR"),
    ),
    ("completion", "COMPLETING", "order", CompleteOrder(order_id="ord-1")),
]


def test_happy_path_walks_all_six_steps_to_completed() -> None:
    d = started()
    sent: list[Command] = []
    for i, (name, status, participant, body) in enumerate(HAPPY, start=1):
        state = state_of(d)
        cmd = only(d)
        sent.append(cmd)
        assert state.status is status
        assert state.awaiting == name
        assert state.completed == FORWARD_NAMES[: i - 1]
        assert (state.seq, state.attempt) == (i, 1)
        assert state.deadline == NOW + (i - 1) * timedelta(seconds=1) + POLICY.step_timeout
        assert cmd.step == name
        assert cmd.participant == participant
        assert cmd.body == body
        assert (cmd.fence, cmd.attempt) == (i, 1)
        assert cmd.idempotency_key == idempotency_key(SAGA_ID, name)
        assert cmd.message_id == command_id(SAGA_ID, name, i, 1)
        # each reply arrives one second later
        d = answer(state, now=NOW + i * timedelta(seconds=1))
        assert d.outcome == "applied"
        assert d.note == f"{name} succeeded"

    final = state_of(d)
    assert d.commands == ()
    assert d.transition == ("COMPLETING", "COMPLETED")
    assert final.status == "COMPLETED"
    assert final.completed == FORWARD_NAMES
    assert final.awaiting is None
    assert final.deadline is None
    assert final.attempt == 0
    assert final.compensated == ()
    assert final.compensation_plan == ()
    assert final.failure_reason is None
    assert len({c.message_id for c in sent}) == 6


@pytest.mark.parametrize(("name", "status", "participant", "body"), HAPPY[:-1])
def test_each_success_reports_the_transition(
    name: str, status: str, participant: str, body: Message
) -> None:
    state = awaiting(name)
    d = answer(state)
    nxt = FORWARD_NAMES[FORWARD_NAMES.index(name) + 1]
    assert d.transition == (status, state_of(d).status)
    assert state_of(d).awaiting == nxt


# ---------------------------------------------------------------------------------------------
# Business failures and compensation

FAILURES = [
    # failing step, reply, compensations sent in order
    ("authorization", "PaymentDeclined", [CancelOrder]),
    ("inventory", "InventoryUnavailable", [VoidAuthorization, CancelOrder]),
    ("shipment", "ShipmentFailed", [ReleaseInventory, VoidAuthorization, CancelOrder]),
    (
        "capture",
        "PaymentCaptureFailed",
        [CancelShipment, ReleaseInventory, VoidAuthorization, CancelOrder],
    ),
]


@pytest.mark.parametrize(("failing", "reply_name", "expected"), FAILURES)
def test_business_failure_compensates_completed_steps_in_reverse(
    failing: str, reply_name: str, expected: list[type[Message]]
) -> None:
    state = awaiting(failing)
    d = answer(state, ok=False)
    comp = state_of(d)
    first = only(d)

    assert d.outcome == "applied"
    assert d.transition == (state.status, "COMPENSATING")
    assert comp.status == "COMPENSATING"
    assert comp.completed == state.completed  # the failed step is not completed
    assert comp.seq == state.seq + 1
    assert comp.deadline == NOW + POLICY.compensation_timeout
    assert comp.failure_reason is not None
    assert comp.failure_reason.startswith(f"{failing} failed: {reply_name}")
    reason = getattr(failure_body(failing), "reason", None)
    if reason:
        assert comp.failure_reason.endswith(f"({reason})")
    assert first.fence == comp.seq
    assert first.attempt == 1
    assert first.message_id == command_id(SAGA_ID, first.step, comp.seq, 1)
    assert first.idempotency_key == idempotency_key(SAGA_ID, first.step)

    bodies = [type(first.body)]
    while comp.awaiting is not None:
        d = answer(comp)
        assert d.outcome == "applied"
        bodies.extend(type(c.body) for c in d.commands)
        comp = state_of(d)

    assert bodies == expected
    assert comp.status == "COMPENSATED"
    assert comp.compensated == compensation_plan(V1, state.completed)
    assert len(comp.compensated) == len(expected)
    assert comp.awaiting is None and comp.deadline is None
    assert d.transition == ("COMPENSATING", "COMPENSATED")


def test_compensation_commands_carry_the_checkout() -> None:
    d = step(awaiting("completion"), ForceCompensate("test"))
    sent = [only(d)]
    state = state_of(d)
    while state.awaiting is not None:
        d = answer(state)
        sent.extend(d.commands)
        state = state_of(d)
    assert [(c.participant, c.body) for c in sent] == [
        ("payment", RefundPayment(order_id="ord-1", amount_minor=AMOUNT, currency="EUR")),
        ("shipping", CancelShipment(order_id="ord-1")),
        ("inventory", ReleaseInventory(order_id="ord-1")),
        ("order", CancelOrder(order_id="ord-1", reason="checkout_compensated")),
    ]


PLANS = [
    # completed, unknown, plan
    ((), None, ()),
    (("order",), None, ("cancel_order",)),
    (("order", "authorization"), None, ("void_authorization", "cancel_order")),
    (
        ("order", "authorization", "inventory"),
        None,
        ("release_inventory", "void_authorization", "cancel_order"),
    ),
    (
        ("order", "authorization", "inventory", "shipment"),
        None,
        ("cancel_shipment", "release_inventory", "void_authorization", "cancel_order"),
    ),
    # payment ladder: captured -> refund, and no authorization left to void
    (
        FORWARD_NAMES[:5],
        None,
        ("refund_payment", "cancel_shipment", "release_inventory", "cancel_order"),
    ),
    (
        FORWARD_NAMES,
        None,
        ("refund_payment", "cancel_shipment", "release_inventory", "cancel_order"),
    ),
    # unknown outcome: compensate the step too (idempotent, a no-op if nothing happened)
    ((), "order", ("cancel_order",)),
    (("order",), "authorization", ("void_authorization", "cancel_order")),
    (
        FORWARD_NAMES[:3],
        "shipment",
        ("cancel_shipment", "release_inventory", "void_authorization", "cancel_order"),
    ),
    # capture unknown: the refund settles it either way (it voids what was never captured)
    (
        FORWARD_NAMES[:4],
        "capture",
        ("refund_payment", "cancel_shipment", "release_inventory", "cancel_order"),
    ),
    (
        FORWARD_NAMES[:5],
        "completion",
        ("refund_payment", "cancel_shipment", "release_inventory", "cancel_order"),
    ),
    # an unknown step that is already completed is not compensated twice
    (("order", "authorization"), "authorization", ("void_authorization", "cancel_order")),
]


@pytest.mark.parametrize(("completed", "unknown", "plan"), PLANS)
def test_compensation_plan(
    completed: tuple[str, ...], unknown: str | None, plan: tuple[str, ...]
) -> None:
    assert compensation_plan(V1, completed, unknown) == plan


def test_payment_ladder_refunds_after_capture_and_never_voids() -> None:
    state = awaiting("completion")
    assert "capture" in state.completed
    # past the pivot only an operator sends the saga back
    d = step(state, ForceCompensate("customer cancelled"))
    state = state_of(d)
    assert only(d).body == RefundPayment(order_id="ord-1", amount_minor=AMOUNT, currency="EUR")
    final, sent = drain_compensations(state)
    assert [only(d).step, *sent] == [
        "refund_payment",
        "cancel_shipment",
        "release_inventory",
        "cancel_order",
    ]
    assert "void_authorization" not in final.compensated
    assert final.status == "COMPENSATED"


def test_refund_failure_needs_a_human() -> None:
    state = state_of(step(awaiting("completion"), ForceCompensate("customer cancelled")))
    assert state.awaiting == "refund_payment"
    d = answer(state, ok=False)
    final = state_of(d)
    assert d.outcome == "applied"
    assert d.commands == ()
    assert d.transition == ("COMPENSATING", "FAILED_NEEDS_MANUAL")
    assert final.status == "FAILED_NEEDS_MANUAL"
    assert final.awaiting is None and final.deadline is None
    assert final.compensated == ()
    assert final.failure_reason == (
        "operator: customer cancelled; "
        "then refund_payment failed: PaymentRefundFailed (card closed)"
    )
    assert d.note == f"needs manual: {final.failure_reason}"


# ---------------------------------------------------------------------------------------------
# Replies that must not apply


def _pending_inventory() -> SagaState:
    state = awaiting("inventory")
    assert state.seq == 3
    return state


IGNORED_REPLIES = [
    # reply builder on a saga awaiting inventory at seq 3, expected note fragment
    pytest.param(reply("order", 1), "stale fence 1 (current 3)", id="duplicate-earlier-success"),
    pytest.param(reply("authorization", 1), "stale fence 1", id="wrong-type-old-fence"),
    pytest.param(reply("inventory", 2), "stale fence 2 (current 3)", id="right-type-old-fence"),
    pytest.param(
        reply("inventory", 2, ok=False), "stale fence 2", id="stale-failure-does-not-compensate"
    ),
    pytest.param(
        reply("shipment", 3),
        "unexpected ShipmentCreated while awaiting inventory",
        id="unexpected-type",
    ),
    pytest.param(
        reply("release_inventory", 3),
        "unexpected InventoryReleased while awaiting inventory",
        id="compensation-reply-while-forward",
    ),
    pytest.param(
        reply("shipment", 3, ok=False),
        "unexpected ShipmentFailed while awaiting inventory",
        id="unexpected-failure-type",
    ),
]


@pytest.mark.parametrize(("msg", "note"), IGNORED_REPLIES)
def test_replies_that_do_not_match_are_ignored(msg: Reply, note: str) -> None:
    state = _pending_inventory()
    d = step(state, msg, now=LATER)
    assert_ignored(state, d, note)
    assert d.transition == ("PENDING_INVENTORY", "PENDING_INVENTORY")


def test_duplicate_reply_is_ignored() -> None:
    state = awaiting("shipment")
    first = reply("shipment", state.seq)
    after = state_of(step(state, first))
    assert after.status == "PENDING_CAPTURE"
    d = step(after, first)
    assert_ignored(after, d, "stale fence")


def test_reply_on_a_terminal_saga_is_ignored() -> None:
    state = all_forward_done()
    d = step(state, reply("completion", 6))
    assert_ignored(state, d, "saga is not waiting for a reply")


@pytest.mark.parametrize(
    "msg",
    [
        reply("order", 1),
        Timeout(1),
        ForceCompensate("why"),
        Resume(),
        Expire("too old"),
    ],
    ids=lambda m: type(m).__name__,
)
def test_message_for_a_saga_that_does_not_exist_is_invalid(msg: Input) -> None:
    with pytest.raises(InvalidTransition, match="for a saga that does not exist"):
        decide(V1, None, msg, now=NOW, policy=POLICY)


# ---------------------------------------------------------------------------------------------
# Timeouts


#: forward steps before the point of no return (and the pivot itself)
BEFORE_PIVOT = tuple(s.name for s in FORWARD if s.kind != "retriable")


@pytest.mark.parametrize("name", BEFORE_PIVOT)
def test_timeout_resends_the_same_step_with_the_same_key(name: str) -> None:
    state = awaiting(name)
    first_cmd_id = command_id(SAGA_ID, name, state.seq, 1)
    ids = {first_cmd_id}
    for attempt in range(2, POLICY.max_step_attempts + 1):
        d = step(state, Timeout(state.seq), now=LATER)
        nxt = state_of(d)
        cmd = only(d)
        assert d.outcome == "applied"
        assert d.note == f"{name} timed out: re-sent as attempt {attempt}"
        assert nxt.status is state.status
        assert nxt.seq == state.seq  # same fence: a reply to any attempt is accepted
        assert nxt.attempt == attempt
        assert nxt.deadline == LATER + POLICY.step_timeout
        assert nxt.awaiting == name
        assert cmd.step == name
        assert cmd.fence == state.seq
        assert cmd.attempt == attempt
        assert cmd.idempotency_key == idempotency_key(SAGA_ID, name)
        assert cmd.body == FORWARD[FORWARD_NAMES.index(name)].build(CHECKOUT)
        assert cmd.message_id == command_id(SAGA_ID, name, state.seq, attempt)
        ids.add(cmd.message_id)
        state = nxt
    assert len(ids) == POLICY.max_step_attempts  # every send has its own message id


def test_reply_to_an_earlier_attempt_is_accepted() -> None:
    state = awaiting("shipment")
    state, _ = timed_out(state, 2)
    assert state.attempt == 3
    d = step(state, reply("shipment", state.seq))
    assert state_of(d).status == "PENDING_CAPTURE"


EXHAUSTED = [
    # timed-out step, full compensation plan (the unknown step's own compensation first)
    ("order", ("cancel_order",)),
    ("authorization", ("void_authorization", "cancel_order")),
    ("inventory", ("release_inventory", "void_authorization", "cancel_order")),
    (
        "shipment",
        ("cancel_shipment", "release_inventory", "void_authorization", "cancel_order"),
    ),
    # capture (the pivot) whose outcome stays unknown calls a human, and completion, past the
    # pivot, never compensates (the step-kinds tests below)
]


@pytest.mark.parametrize(("name", "plan"), EXHAUSTED)
def test_exhausted_timeouts_compensate_including_the_unknown_step(
    name: str, plan: tuple[str, ...]
) -> None:
    state = awaiting(name)
    seq = state.seq
    state, _ = timed_out(state, POLICY.max_step_attempts - 1)
    assert state.attempt == POLICY.max_step_attempts
    reason = f"{name} timed out after {POLICY.max_step_attempts} attempts"
    if name in RECONCILED:
        # a payment step is reconciled first; only a query that also times out compensates
        d = step(state, Timeout(seq), now=LATER)
        assert only(d).step == "payment_status"
        state = state_of(d)
        seq = state.seq
        state, _ = timed_out(state, POLICY.max_step_attempts - 1)
        reason = f"{name} timed out and so did the status query"
    d = step(state, Timeout(seq), now=LATER)
    comp = state_of(d)
    cmd = only(d)
    assert d.note == reason
    assert comp.failure_reason == reason
    assert comp.status == "COMPENSATING"
    assert comp.completed == state.completed
    assert comp.seq == seq + 1
    assert comp.attempt == 1
    assert comp.deadline == LATER + POLICY.compensation_timeout
    assert (cmd.step, *comp.compensation_plan) == plan

    final, sent = drain_compensations(comp)
    assert (cmd.step, *sent) == plan
    assert final.compensated == plan
    assert final.status == "COMPENSATED"


def test_policy_with_one_attempt_compensates_on_the_first_timeout() -> None:
    policy = Policy(max_step_attempts=1)
    state = state_of(started(policy=policy))
    d = decide(V1, state, Timeout(state.seq), now=NOW, policy=policy)
    assert state_of(d).status == "COMPENSATING"
    assert only(d).step == "cancel_order"


@pytest.mark.parametrize("delta", [-1, 1, 100])
def test_stale_timeout_is_ignored(delta: int) -> None:
    state = awaiting("shipment")
    d = step(state, Timeout(state.seq + delta), now=LATER)
    assert_ignored(state, d, f"stale timeout for fence {state.seq + delta}")


@pytest.mark.parametrize(
    "make_state",
    [
        all_forward_done,
        lambda: drain_compensations(state_of(answer(awaiting("inventory"), ok=False)))[0],
    ],
    ids=["completed", "compensated"],
)
def test_timeout_on_a_terminal_saga_is_ignored(make_state: Maker) -> None:
    state = make_state()
    assert state.phase.terminal
    d = step(state, Timeout(state.seq), now=LATER)
    assert_ignored(state, d, "stale timeout")


def test_timeout_of_the_old_step_after_a_reply_is_ignored() -> None:
    state = awaiting("authorization")
    old = state.seq
    state = state_of(answer(state))
    d = step(state, Timeout(old), now=LATER)
    assert_ignored(state, d, f"stale timeout for fence {old}")


def test_compensation_timeouts_resend_then_need_a_human() -> None:
    state = awaiting("authorization")
    comp = state_of(answer(state, ok=False))
    assert comp.awaiting == "cancel_order"
    seq = comp.seq
    for attempt in range(2, POLICY.max_compensation_attempts + 1):
        d = step(comp, Timeout(seq), now=LATER)
        comp = state_of(d)
        cmd = only(d)
        assert cmd.step == "cancel_order"
        assert (cmd.attempt, cmd.fence, comp.seq) == (attempt, seq, seq)
        assert cmd.idempotency_key == idempotency_key(SAGA_ID, "cancel_order")
        assert comp.deadline == LATER + POLICY.compensation_timeout
        assert comp.status == "COMPENSATING"

    d = step(comp, Timeout(seq), now=LATER)
    final = state_of(d)
    assert d.commands == ()
    assert final.status == "FAILED_NEEDS_MANUAL"
    assert final.awaiting is None and final.deadline is None
    assert final.failure_reason == (
        "authorization failed: PaymentDeclined (card declined); "
        f"then cancel_order timed out after {POLICY.max_compensation_attempts} attempts"
    )


def test_compensation_attempts_are_bounded_separately_from_forward_attempts() -> None:
    assert POLICY.max_compensation_attempts != POLICY.max_step_attempts
    comp = state_of(answer(awaiting("authorization"), ok=False))
    comp, _ = timed_out(comp, POLICY.max_step_attempts)
    assert comp.status == "COMPENSATING"  # still re-sending: the compensation limit is higher


# ---------------------------------------------------------------------------------------------
# Late successes: effects that appeared after we gave up


def _shipment_given_up() -> tuple[SagaState, int]:
    """Shipment timed out three times; compensation started. Returns (state, shipment fence)."""
    state = awaiting("shipment")
    fence = state.seq
    state, _ = timed_out(state, POLICY.max_step_attempts)
    assert state.status == "COMPENSATING"
    return state, fence


def test_late_success_while_compensating_is_undone_and_does_not_revive() -> None:
    state, fence = _shipment_given_up()
    late = reply("shipment", fence, copy=7)
    d = step(state, late, now=LATER)
    cmd = only(d)

    assert d.outcome == "ignored"
    assert d.state == state  # not revived, not completed, plan untouched
    assert "shipment" not in state.completed
    assert d.note == (
        f"late ShipmentCreated (fence {fence}) after compensation: sent cancel_shipment"
    )
    assert cmd == Command(
        message_id=uuid.uuid5(
            COMMAND_NAMESPACE, f"{SAGA_ID}:late:cancel_shipment:{late.message_id}"
        ),
        participant="shipping",
        step="cancel_shipment",
        attempt=1,
        fence=fence,
        idempotency_key=idempotency_key(SAGA_ID, "cancel_shipment"),
        body=CancelShipment(order_id="ord-1"),
        # its reply answers the fence of the late success, with that dispatch's token
        reply_token=state.token_for(fence) or "",
    )
    assert cmd.reply_token


def test_late_success_after_compensated_is_undone_and_stays_compensated() -> None:
    state, fence = _shipment_given_up()
    final, _ = drain_compensations(state)
    assert final.status == "COMPENSATED"
    d = step(final, reply("shipment", fence), now=LATER)
    assert d.outcome == "ignored"
    assert d.state == final
    assert d.transition == ("COMPENSATED", "COMPENSATED")
    assert type(only(d).body) is CancelShipment


def test_late_success_after_needs_manual_is_undone() -> None:
    state = awaiting("capture")
    fence = state.seq
    state = state_of(step(state, ForceCompensate("stuck")))
    assert state.awaiting == "refund_payment"
    manual = state_of(answer(state, ok=False))
    assert manual.status == "FAILED_NEEDS_MANUAL"
    d = step(manual, reply("capture", fence))
    assert d.state == manual
    assert type(only(d).body) is RefundPayment


def test_late_authorization_after_decline_is_voided() -> None:
    state = awaiting("authorization")
    fence = state.seq
    comp = state_of(answer(state, ok=False))
    d = step(comp, reply("authorization", fence, copy=1))
    assert type(only(d).body) is VoidAuthorization
    assert d.state == comp


def test_late_success_is_idempotent_per_reply() -> None:
    state, fence = _shipment_given_up()
    late = reply("shipment", fence)
    assert step(state, late) == step(state, late, now=LATER)
    other = step(state, reply("shipment", fence, copy=1))
    assert only(other).message_id != only(step(state, late)).message_id


@pytest.mark.parametrize(
    ("make_state", "msg"),
    [
        # a step that is already completed (its compensation is in the plan already)
        pytest.param(
            lambda: _shipment_given_up()[0], reply("inventory", 3), id="completed-step-duplicate"
        ),
        # the last step has no compensation
        pytest.param(
            lambda: state_of(step(awaiting("completion"), ForceCompensate("x"))),
            reply("completion", 6),
            id="completion-has-no-compensation",
        ),
        # while going forward a stale success is just a duplicate
        pytest.param(lambda: awaiting("shipment"), reply("order", 1), id="forward"),
        # after completion everything succeeded: nothing to undo
        pytest.param(all_forward_done, reply("shipment", 4), id="completed"),
    ],
)
def test_late_success_that_needs_no_compensation(make_state: Maker, msg: Reply) -> None:
    state = make_state()
    d = step(state, msg, now=LATER)
    assert_ignored(state, d, "ignored")


# ---------------------------------------------------------------------------------------------
# Operator actions


@pytest.mark.parametrize(("name", "plan"), EXHAUSTED)
def test_force_compensate_from_every_forward_step(name: str, plan: tuple[str, ...]) -> None:
    state = awaiting(name)
    d = step(state, ForceCompensate("customer called"), now=LATER)
    comp = state_of(d)
    assert d.outcome == "applied"
    assert d.note == "operator: customer called"
    assert comp.failure_reason == "operator: customer called"
    assert comp.status == "COMPENSATING"
    assert comp.seq == state.seq + 1
    assert (only(d).step, *comp.compensation_plan) == plan
    final, sent = drain_compensations(comp)
    assert (only(d).step, *sent) == plan
    assert final.status == "COMPENSATED"


def test_forward_reply_after_force_compensate_is_late() -> None:
    state = awaiting("shipment")
    fence = state.seq
    comp = state_of(step(state, ForceCompensate("x")))
    d = step(comp, reply("shipment", fence))
    assert d.outcome == "ignored"
    assert d.state == comp
    assert only(d).step == "cancel_shipment"


@pytest.mark.parametrize(
    ("make_state", "note"),
    [
        (lambda: state_of(answer(awaiting("inventory"), ok=False)), "already compensating"),
        (all_forward_done, "already COMPLETED"),
        (
            lambda: drain_compensations(state_of(answer(awaiting("inventory"), ok=False)))[0],
            "already COMPENSATED",
        ),
    ],
    ids=["compensating", "completed", "compensated"],
)
def test_force_compensate_is_ignored_when_compensating_or_terminal(
    make_state: Maker, note: str
) -> None:
    state = make_state()
    assert_ignored(state, step(state, ForceCompensate("x")), note)


@pytest.mark.parametrize("name", FORWARD_NAMES)
def test_resume_resends_the_awaited_forward_step(name: str) -> None:
    state = awaiting(name)
    d = step(state, Resume(), now=LATER)
    nxt = state_of(d)
    cmd = only(d)
    assert d.note == f"operator re-sent {name}"
    assert (nxt.seq, nxt.attempt, nxt.status) == (state.seq, 2, state.status)
    wait = POLICY.retriable_timeout(2) if name == "completion" else POLICY.step_timeout
    assert nxt.deadline == LATER + wait
    assert (cmd.step, cmd.fence, cmd.attempt) == (name, state.seq, 2)
    assert cmd.idempotency_key == idempotency_key(SAGA_ID, name)
    assert cmd.message_id == command_id(SAGA_ID, name, state.seq, 2)


def test_resume_resends_the_awaited_compensation() -> None:
    comp = state_of(answer(awaiting("inventory"), ok=False))
    d = step(comp, Resume(), now=LATER)
    cmd = only(d)
    assert (cmd.step, cmd.attempt, cmd.fence) == ("void_authorization", 2, comp.seq)
    assert state_of(d).deadline == LATER + POLICY.compensation_timeout


@pytest.mark.parametrize(
    "make_state",
    [
        all_forward_done,
        lambda: drain_compensations(state_of(answer(awaiting("inventory"), ok=False)))[0],
    ],
    ids=["completed", "compensated"],
)
def test_resume_of_a_finished_saga_is_ignored(make_state: Maker) -> None:
    state = make_state()
    assert_ignored(state, step(state, Resume()), f"nothing to resume in {state.status}")


def test_resume_after_refund_failure_retries_the_refund_then_the_rest() -> None:
    state = state_of(step(awaiting("completion"), ForceCompensate("customer cancelled")))
    manual = state_of(answer(state, ok=False))
    assert manual.status == "FAILED_NEEDS_MANUAL"

    d = step(manual, Resume(), now=LATER)
    resumed = state_of(d)
    assert d.note == "operator resumed compensation"
    assert d.transition == ("FAILED_NEEDS_MANUAL", "COMPENSATING")
    assert only(d).step == "refund_payment"
    assert resumed.seq == manual.seq + 1
    final, sent = drain_compensations(resumed)
    assert sent == ["cancel_shipment", "release_inventory", "cancel_order"]
    assert final.status == "COMPENSATED"


def test_resume_after_compensation_timeouts_skips_what_is_already_compensated() -> None:
    comp = state_of(answer(awaiting("capture"), ok=False))
    assert comp.awaiting == "cancel_shipment"
    comp = state_of(answer(comp))
    assert comp.awaiting == "release_inventory"
    manual, _ = timed_out(comp, POLICY.max_compensation_attempts)
    assert manual.status == "FAILED_NEEDS_MANUAL"

    d = step(manual, Resume(), now=LATER)
    final, sent = drain_compensations(state_of(d))
    assert [only(d).step, *sent] == ["release_inventory", "void_authorization", "cancel_order"]
    assert final.compensated == (
        "cancel_shipment",
        "release_inventory",
        "void_authorization",
        "cancel_order",
    )
    assert final.status == "COMPENSATED"


def test_resume_keeps_the_unknown_steps_compensation() -> None:
    # an authorization whose outcome was unknown when compensation began stays in the plan
    state = awaiting("authorization")
    state, d = timed_out(state, POLICY.max_step_attempts)
    assert only(d).step == "payment_status"
    state, d = timed_out(state, POLICY.max_step_attempts)  # the query times out too
    assert only(d).step == "void_authorization"  # authorization outcome unknown: void it
    manual, _ = timed_out(state_of(d), POLICY.max_compensation_attempts)
    assert manual.status == "FAILED_NEEDS_MANUAL" and manual.compensating

    d = step(manual, Resume(), now=LATER)
    assert only(d).step == "void_authorization"


def test_resume_keeps_the_unknown_shipment_cancellation() -> None:
    state, _ = _shipment_given_up()
    assert state.awaiting == "cancel_shipment"
    manual, _ = timed_out(state, POLICY.max_compensation_attempts)
    assert manual.status == "FAILED_NEEDS_MANUAL"
    final, _ = drain_compensations(state_of(step(manual, Resume())))
    assert final.status == "COMPENSATED"
    assert "cancel_shipment" in final.compensated


def test_resume_after_expire_compensates_the_in_flight_step() -> None:
    state = awaiting("shipment")
    forced = only(step(state, ForceCompensate("x"))).step
    assert forced == "cancel_shipment"
    manual = state_of(step(state, Expire("alive too long")))
    d = step(manual, Resume())
    assert only(d).step == forced


@pytest.mark.parametrize("name", BEFORE_PIVOT)
def test_expire_stops_a_live_saga_for_a_human(name: str) -> None:
    state = awaiting(name)
    d = step(state, Expire("alive for 2 days"), now=LATER)
    final = state_of(d)
    assert d.commands == ()
    assert d.transition == (state.status, "FAILED_NEEDS_MANUAL")
    assert final.status == "FAILED_NEEDS_MANUAL"
    assert final.awaiting is None and final.deadline is None
    assert final.failure_reason == "alive for 2 days"


def test_expire_of_a_terminal_saga_is_ignored() -> None:
    state = all_forward_done()
    assert_ignored(state, step(state, Expire("old")), "already COMPLETED")


# ---------------------------------------------------------------------------------------------
# Determinism

DETERMINISM_CASES = [
    pytest.param(lambda: None, Start(CHECKOUT, START_ID), id="start"),
    pytest.param(lambda: awaiting("inventory"), reply("inventory", 3), id="success"),
    pytest.param(lambda: awaiting("shipment"), reply("shipment", 4, ok=False), id="failure"),
    pytest.param(lambda: awaiting("capture"), Timeout(5), id="timeout-resend"),
    pytest.param(lambda: timed_out(awaiting("capture"), 2)[0], Timeout(5), id="timeout-compensate"),
    pytest.param(lambda: _shipment_given_up()[0], reply("shipment", 4), id="late-success"),
    pytest.param(lambda: awaiting("shipment"), ForceCompensate("x"), id="force"),
    pytest.param(lambda: awaiting("shipment"), Resume(), id="resume"),
]


@pytest.mark.parametrize(("make_state", "msg"), DETERMINISM_CASES)
def test_deciding_twice_gives_identical_commands(
    make_state: Callable[[], SagaState | None], msg: Input
) -> None:
    a = decide(V1, make_state(), msg, now=LATER, policy=POLICY)
    b = decide(V1, make_state(), msg, now=LATER, policy=POLICY)
    assert a == b
    assert a.commands, "every case here emits a command"
    for cmd in a.commands:
        assert cmd.message_id.version == 5  # derived, not random


def test_command_ids_depend_on_the_saga_step_fence_and_attempt() -> None:
    base = command_id(SAGA_ID, "order", 1, 1)
    # in the process manager's own namespace, not the saga id (which anyone can compute)
    assert base == uuid.uuid5(COMMAND_NAMESPACE, f"{SAGA_ID}:1:order:1")
    others = {
        command_id(SAGA_ID, "order", 1, 2),
        command_id(SAGA_ID, "order", 2, 1),
        command_id(SAGA_ID, "cancel_order", 1, 1),
        command_id(saga_id_for_order("ord-2"), "order", 1, 1),
    }
    assert base not in others and len(others) == 4


def test_two_runs_of_the_same_story_emit_the_same_ids() -> None:
    def story() -> list[uuid.UUID]:
        ids: list[uuid.UUID] = []
        d = started()
        ids += [c.message_id for c in d.commands]
        state = state_of(d)
        for _ in range(3):
            d = answer(state)
            ids += [c.message_id for c in d.commands]
            state = state_of(d)
        d = answer(state, ok=False)  # shipment fails
        ids += [c.message_id for c in d.commands]
        final, _ = drain_compensations(state_of(d))
        assert final.status == "COMPENSATED"
        return ids

    first = story()
    assert first == story()
    assert len(set(first)) == len(first)


def test_decide_uses_the_given_clock_only() -> None:
    state = awaiting("shipment")
    a = step(state, Timeout(state.seq), now=NOW)
    b = step(state, Timeout(state.seq), now=LATER)
    assert state_of(a).deadline == NOW + POLICY.step_timeout
    assert state_of(b).deadline == LATER + POLICY.step_timeout
    assert a.commands == b.commands  # the clock never leaks into ids


def test_replies_are_typed_by_the_real_models() -> None:
    # the builders used throughout this module produce the awaited types
    for spec in FORWARD:
        assert type(success_body(spec.name)) in spec.success
    assert isinstance(success_body("order"), OrderCreated)
    assert isinstance(success_body("authorization"), PaymentAuthorized)
    assert isinstance(success_body("inventory"), InventoryReserved)
    assert isinstance(success_body("shipment"), ShipmentCreated)
    assert isinstance(success_body("capture"), PaymentCaptured)
    assert isinstance(success_body("completion"), OrderCompleted)
    assert isinstance(success_body("release_inventory"), InventoryReleased)


# -- reconciling a payment step whose outcome is unknown ---------------------------------------


def _asking_status(name: str) -> SagaState:
    state = awaiting(name)
    state, d = timed_out(state, POLICY.max_step_attempts)
    cmd = only(d)
    assert cmd.step == "payment_status"
    assert cmd.body.TYPE == "payment.GetPaymentStatus.v1"
    assert state.reconciling == name
    assert state.status is awaiting(name).status  # still pending, not compensating
    return state


def _status_reply(state: SagaState, status: str) -> Reply:
    return Reply(
        PaymentStatusReported(order_id=state.order_id, status=status),  # type: ignore[arg-type]
        fence=state.seq,
        message_id=uuid.uuid4(),
        token=state.token_for(state.seq),
    )


@pytest.mark.parametrize(
    ("name", "status", "next_step"),
    [
        ("authorization", "authorized", "inventory"),
        ("authorization", "captured", "inventory"),
        ("capture", "captured", "completion"),
    ],
)
def test_payment_status_that_shows_the_step_happened_moves_forward(
    name: str, status: str, next_step: str
) -> None:
    state = _asking_status(name)
    d = step(state, _status_reply(state, status))
    after = state_of(d)
    assert name in after.completed
    assert only(d).step == next_step
    assert after.reconciling is None
    assert after.compensation_plan == ()


@pytest.mark.parametrize(
    ("name", "status", "plan"),
    [
        ("authorization", "none", ("cancel_order",)),
        ("authorization", "declined", ("cancel_order",)),
        (
            "capture",
            "authorized",
            ("cancel_shipment", "release_inventory", "void_authorization", "cancel_order"),
        ),
    ],
)
def test_payment_status_that_shows_nothing_happened_compensates_without_the_unknown_step(
    name: str, status: str, plan: tuple[str, ...]
) -> None:
    state = _asking_status(name)
    d = step(state, _status_reply(state, status))
    comp = state_of(d)
    assert comp.status == "COMPENSATING"
    assert comp.unknown_step is None
    assert (only(d).step, *comp.compensation_plan) == plan
    assert status in (comp.failure_reason or "")


def test_stale_payment_status_is_ignored() -> None:
    state = _asking_status("authorization")
    stale = Reply(
        PaymentStatusReported(order_id=state.order_id, status="authorized"),
        fence=state.seq - 1,
        message_id=uuid.uuid4(),
        token=state.token_for(state.seq - 1),
    )
    d = step(state, stale)
    assert d.outcome == "ignored"
    assert state_of(d) == state


def test_force_compensate_while_reconciling_treats_the_payment_step_as_unknown() -> None:
    state = _asking_status("authorization")
    d = step(state, ForceCompensate("x"))
    assert (only(d).step, *state_of(d).compensation_plan) == ("void_authorization", "cancel_order")


# ---------------------------------------------------------------------------------------------
# Reply tokens (issue 9): a reply is applied only if it echoes its dispatch's token


def _with_token(r: Reply, token: str | None) -> Reply:
    return Reply(r.body, fence=r.fence, message_id=r.message_id, token=token)


@pytest.mark.parametrize(
    "token",
    [None, "", "0" * 32, reply_token("guess", SAGA_ID, 2)],
    ids=["missing", "empty", "zeros", "other-nonce"],
)
def test_a_reply_without_its_dispatchs_token_is_rejected_and_never_applied(
    token: str | None,
) -> None:
    state = awaiting("authorization")
    forged = _with_token(reply("authorization", state.seq), token)
    d = step(state, forged)
    assert d.outcome == "rejected"
    assert d.state == state and d.commands == ()
    assert "reply token" in d.note
    # the genuine reply still applies afterwards
    assert state_of(answer(state)).awaiting == "inventory"


def test_a_reply_for_a_fence_never_dispatched_is_rejected() -> None:
    state = awaiting("inventory")
    d = step(state, reply("inventory", state.seq + 1))
    assert d.outcome == "rejected" and d.state == state and d.commands == ()


def test_another_dispatchs_token_does_not_open_this_one() -> None:
    state = awaiting("inventory")
    earlier = state.token_for(state.seq - 1)
    assert earlier is not None and earlier != state.token_for(state.seq)
    d = step(state, _with_token(reply("inventory", state.seq), earlier))
    assert d.outcome == "rejected" and d.state == state


def test_every_dispatch_gets_its_own_token_and_a_re_send_keeps_it() -> None:
    state = awaiting("inventory")
    tokens = dict(state.tokens)
    assert sorted(tokens) == list(range(1, state.seq + 1))
    assert len(set(tokens.values())) == len(tokens)
    d = step(state, Timeout(state.seq), now=NOW + POLICY.step_timeout)
    resent = only(d)
    assert resent.attempt == 2 and resent.reply_token == tokens[state.seq]
    assert state_of(d).tokens == state.tokens


def test_the_nonce_makes_tokens_unpredictable() -> None:
    msg = Start(CHECKOUT, START_ID)
    a = decide(V1, None, msg, now=NOW, policy=POLICY, nonce="a" * 32)
    b = decide(V1, None, msg, now=NOW, policy=POLICY, nonce="b" * 32)
    assert only(a).reply_token != only(b).reply_token
    assert only(a).message_id == only(b).message_id  # ids stay derived and stable
    # and the token is deterministic for a given nonce: deciding twice decides the same
    assert decide(V1, None, msg, now=NOW, policy=POLICY, nonce="a" * 32) == a


def test_a_saga_started_before_tokens_existed_accepts_its_tokenless_replies() -> None:
    before = awaiting("authorization")
    # loaded from a row saved before tokens: every fence so far was dispatched without one
    state = replace(before, tokens=(), untokened_below=before.seq + 1)
    d = step(state, _with_token(reply("authorization", state.seq), None))
    after = state_of(d)
    assert d.outcome == "applied" and after.awaiting == "inventory"
    # its next dispatch has a token, and from then on replies must carry one
    assert after.token_for(after.seq) is not None
    assert step(after, _with_token(reply("inventory", after.seq), None)).outcome == "rejected"


# ---------------------------------------------------------------------------------------------
# Step kinds (issue 10): past the pivot a saga only moves forward


def test_the_definition_declares_one_pivot_then_only_retriable_steps() -> None:
    kinds = [s.kind for s in FORWARD]
    assert kinds == ["compensatable"] * 4 + ["pivot", "retriable"]
    assert V1.pivot == "capture"

    def kinds_only(*steps: object) -> Definition:
        return Definition(
            name="checkout",
            version=99,
            start=V1.start,
            business_key=V1.business_key,
            steps=steps,  # type: ignore[arg-type]
            compensations=V1.compensations,
            queries=V1.queries,
        )

    with pytest.raises(DefinitionError, match="compensatable, then the pivot, then retriable"):
        kinds_only(FORWARD[5], FORWARD[4], FORWARD[0])  # retriable before compensatable
    with pytest.raises(DefinitionError, match="without a pivot"):
        kinds_only(FORWARD[0], FORWARD[5])  # retriable without a pivot
    assert issubclass(DefinitionError, ValueError)


def test_a_late_completion_is_re_sent_with_backoff_and_never_compensated() -> None:
    state = awaiting("completion")
    waits = []
    sent_at = NOW
    for attempt in range(2, POLICY.max_retriable_attempts + 1):
        assert state.deadline is not None
        waits.append(state.deadline - sent_at)
        sent_at = state.deadline
        d = step(state, Timeout(state.seq), now=sent_at)
        cmd = only(d)
        assert (cmd.step, cmd.attempt, cmd.fence) == ("completion", attempt, state.seq)
        assert cmd.idempotency_key == idempotency_key(SAGA_ID, "completion")
        assert cmd.reply_token == state.token_for(state.seq)
        state = state_of(d)
        assert state.status == "COMPLETING"
    # the waits double from the step timeout up to the cap
    assert waits[:3] == [POLICY.step_timeout, 2 * POLICY.step_timeout, 4 * POLICY.step_timeout]
    assert max(waits) == POLICY.retriable_max_delay
    d = step(state, Timeout(state.seq), now=sent_at)
    manual = state_of(d)
    assert d.commands == ()
    assert manual.status == "FAILED_NEEDS_MANUAL"
    assert "not compensated" in (manual.failure_reason or "")
    assert manual.compensation_plan == () and not manual.compensating


def test_the_late_completion_after_a_human_was_called_still_completes() -> None:
    state = awaiting("completion")
    state, _ = timed_out(state, POLICY.max_retriable_attempts)
    assert state.status == "FAILED_NEEDS_MANUAL" and state.stalled == "completion"
    d = answer_stalled(state)
    assert d.outcome == "applied" and d.commands == ()
    assert d.transition == ("FAILED_NEEDS_MANUAL", "COMPLETED")
    assert state_of(d).completed == FORWARD_NAMES


def answer_stalled(state: SagaState) -> Decision:
    assert state.stalled is not None
    return step(state, reply(state.stalled, state.seq))


def test_resume_past_the_pivot_sends_the_remaining_step_again() -> None:
    state, _ = timed_out(awaiting("completion"), POLICY.max_retriable_attempts)
    d = step(state, Resume(), now=LATER)
    cmd = only(d)
    resumed = state_of(d)
    assert d.transition == ("FAILED_NEEDS_MANUAL", "COMPLETING")
    assert (cmd.step, cmd.fence) == ("completion", state.seq + 1)
    assert cmd.idempotency_key == idempotency_key(SAGA_ID, "completion")
    assert resumed.failure_reason is None and resumed.stalled is None
    assert state_of(answer(resumed)).status == "COMPLETED"


def test_a_compensation_reply_just_after_the_saga_needs_a_human_is_applied() -> None:
    comp = state_of(answer(awaiting("inventory"), ok=False))
    assert comp.awaiting == "void_authorization"
    manual, _ = timed_out(comp, POLICY.max_compensation_attempts)
    assert manual.status == "FAILED_NEEDS_MANUAL" and manual.stalled == "void_authorization"
    d = answer_stalled(manual)
    after = state_of(d)
    assert d.outcome == "applied"
    assert after.compensated == ("void_authorization",)
    assert only(d).step == "cancel_order" and after.status == "COMPENSATING"
    final, _ = drain_compensations(after)
    assert final.status == "COMPENSATED"


def test_a_stale_reply_does_not_wake_a_saga_that_needs_a_human() -> None:
    comp = state_of(answer(awaiting("inventory"), ok=False))
    manual, _ = timed_out(comp, POLICY.max_compensation_attempts)
    d = step(manual, reply("void_authorization", manual.seq - 1))
    assert d.state == manual and d.outcome == "ignored"


def test_the_pivot_failing_compensates_what_came_before_it() -> None:
    d = answer(awaiting("capture"), ok=False)
    comp = state_of(d)
    assert comp.status == "COMPENSATING"
    assert (only(d).step, *comp.compensation_plan) == (
        "cancel_shipment",
        "release_inventory",
        "void_authorization",
        "cancel_order",
    )


def test_a_new_saga_never_accepts_a_tokenless_reply() -> None:
    state = awaiting("authorization")
    assert state.untokened_below == 0
    bare = _with_token(reply("authorization", state.seq), None)
    assert step(replace(state, tokens=()), bare).outcome == "rejected"


# ---------------------------------------------------------------------------------------------
# The pivot's outcome unknown (review of issue 10): never refunded without an operator


def _asking_capture_status() -> SagaState:
    state, d = timed_out(awaiting("capture"), POLICY.max_step_attempts)
    assert only(d).step == "payment_status" and state.reconciling == "capture"
    return state


def _status(state: SagaState, status: str) -> Reply:
    return Reply(
        PaymentStatusReported(order_id=state.order_id, status=status),  # type: ignore[arg-type]
        fence=state.seq,
        message_id=uuid.uuid4(),
        token=state.token_for(state.seq),
    )


def test_an_unanswered_capture_status_query_calls_a_human_and_refunds_nothing() -> None:
    state = _asking_capture_status()
    manual, d = timed_out(state, POLICY.max_step_attempts)
    assert d.commands == ()
    assert manual.status == "FAILED_NEEDS_MANUAL" and not manual.compensating
    assert "not compensated" in (manual.failure_reason or "")
    # the late answer still counts: captured, so the saga goes on to completion
    d = step(manual, _status(manual, "captured"))
    assert only(d).step == "completion" and state_of(d).status == "COMPLETING"


def test_the_capture_status_not_captured_after_a_human_was_called_compensates() -> None:
    manual, _ = timed_out(_asking_capture_status(), POLICY.max_step_attempts)
    d = step(manual, _status(manual, "authorized"))
    comp = state_of(d)
    assert comp.status == "COMPENSATING"
    assert "refund_payment" not in (only(d).step, *comp.compensation_plan)


def test_a_refunded_capture_calls_a_human_instead_of_completing() -> None:
    state = _asking_capture_status()
    d = step(state, _status(state, "refunded"))
    assert d.commands == () and state_of(d).status == "FAILED_NEEDS_MANUAL"


def test_expire_at_the_capture_then_a_late_capture_goes_on_and_refunds_nothing() -> None:
    state = awaiting("capture")
    manual = state_of(step(state, Expire("ttl")))
    assert manual.status == "FAILED_NEEDS_MANUAL" and manual.stalled == "capture"
    d = step(manual, reply("capture", manual.seq))
    assert only(d).step == "completion"
    assert "capture" in state_of(d).completed


def test_resume_of_a_saga_stopped_at_the_capture_asks_the_payment_first() -> None:
    manual = state_of(step(awaiting("capture"), Expire("ttl")))
    d = step(manual, Resume(), now=LATER)
    assert only(d).step == "payment_status"
    asking = state_of(d)
    assert asking.reconciling == "capture" and asking.status == "PENDING_CAPTURE"
    d = step(asking, _status(asking, "captured"))
    assert only(d).step == "completion"


def test_a_late_capture_with_a_stale_fence_on_a_stopped_saga_refunds_nothing() -> None:
    state = awaiting("capture")
    capture_fence = state.seq
    asking, _ = timed_out(state, POLICY.max_step_attempts)  # now asking the status
    manual = state_of(step(asking, Expire("ttl")))
    d = step(manual, reply("capture", capture_fence))
    assert d.commands == () and d.state == manual


def test_expire_past_the_pivot_lets_the_re_sends_go_on() -> None:
    state = awaiting("completion")
    d = step(state, Expire("alive too long"))
    assert d.outcome == "ignored" and d.state == state


def test_a_late_success_on_a_saga_stopped_for_a_human_undoes_nothing() -> None:
    state = awaiting("authorization")
    manual = state_of(step(state, Expire("ttl")))
    assert manual.status == "FAILED_NEEDS_MANUAL" and not manual.compensating
    d = step(manual, reply("authorization", state.seq))
    assert d.commands == () and d.state == manual  # the human decides: resume asks payment


def test_a_late_status_answer_does_not_revive_a_saga_stopped_before_the_pivot() -> None:
    asking, _ = timed_out(awaiting("authorization"), POLICY.max_step_attempts)
    assert asking.reconciling == "authorization"
    manual = state_of(step(asking, Expire("ttl")))
    assert manual.stalled is None
    d = step(manual, _status(manual, "authorized"))
    assert d.commands == () and d.state == manual
