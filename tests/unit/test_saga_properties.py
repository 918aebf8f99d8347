"""Properties of the saga over generated interleavings of replies, duplicates, late replies and
timeouts. A small driver plays the participants; the invariants are checked after every step."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from process_manager.engine import (
    Command,
    Decision,
    Expire,
    Input,
    Phase,
    Reply,
    Resume,
    SagaState,
    Timeout,
    command_id,
    compensation_plan,
    decide,
    idempotency_key,
    past_pivot,
)
from tests.unit.sagakit import (
    COMPENSATION_OF,
    COMPENSATIONS,
    FORWARD,
    FORWARD_NAMES,
    NOW,
    POLICY,
    V1,
    has_failure,
    reply,
    started,
)

pytestmark = pytest.mark.unit

FORWARD_BY_NAME = {s.name: s for s in FORWARD}
PIVOT = V1.pivot
RECONCILE_QUERY = "payment_status"
FORWARD_STATUS = {s.name: s.status for s in FORWARD}
ALL_STEPS = (*FORWARD_NAMES, *COMPENSATIONS)
#: more steps than any run needs: 6 forward + 5 compensations, each re-sent a few times
DRAIN_BOUND = (len(FORWARD) + len(COMPENSATIONS)) * (POLICY.max_compensation_attempts + 1)

ACTIONS = (
    "reply_ok",
    "reply_fail",
    "duplicate",
    "stale",
    "timeout_current",
    "timeout_old",
    "stray",
)
#: an operator's resume and the sweeper's expiry, for the money property below
OPERATOR_ACTIONS = (*ACTIONS, "expire", "resume")


@dataclass
class World:
    """The driver's memory of what happened: what the saga sent, what it was told."""

    state: SagaState
    sent: list[Command] = field(default_factory=list)
    delivered: list[Reply] = field(default_factory=list)
    #: the full compensation plan, fixed when compensation began
    plan: tuple[str, ...] | None = None
    #: first sends of planned compensations, in order
    compensations_sent: list[str] = field(default_factory=list)
    #: applied sends per (step, fence)
    sends: dict[tuple[str, int], int] = field(default_factory=dict)
    copies: int = 0

    def record(self, d: Decision) -> None:
        self.sent.extend(d.commands)
        if d.outcome != "applied":
            return
        for c in d.commands:
            key = (c.step, c.fence)
            self.sends[key] = self.sends.get(key, 0) + 1


def _index_undone(comp: str) -> int:
    return FORWARD_NAMES.index(COMPENSATION_OF[comp])


def check(world: World, prev: SagaState, msg: Input, d: Decision) -> None:
    """Every invariant that must hold after any single decision."""
    assert d.state is not None
    new = d.state

    # pure and deterministic
    assert decide(V1, prev, msg, now=NOW, policy=POLICY) == d

    # money goes back (a refund, a void) only from a saga that is undoing its work: never from
    # one moving forward, nor from one stopped for a human that has not begun compensating
    for c in d.commands:
        if c.step in ("refund_payment", "void_authorization"):
            assert new.compensating or prev.compensating, (prev, msg, d)

    # past the point of no return (the capture) a saga only moves forward: no interleaving of
    # replies, duplicates, stale replies and timeouts refunds, voids or undoes anything (only an
    # operator's ForceCompensate may, and the driver never sends one)
    if past_pivot(V1, prev):
        assert not any(c.step in COMPENSATIONS for c in d.commands), d
        assert d.state is not None
        assert d.state.status not in ("COMPENSATING", "COMPENSATED"), d
        assert not d.state.compensating
    assert d.transition == (prev.status, new.status)

    # fencing only moves forward; completed steps only grow, in definition order
    assert new.seq >= prev.seq
    assert new.completed[: len(prev.completed)] == prev.completed
    assert new.completed == FORWARD_NAMES[: len(new.completed)]
    # compensated steps only grow
    assert new.compensated[: len(prev.compensated)] == prev.compensated

    # the phase and the status users see agree (v1 ends with the engine's own names)
    if new.phase is Phase.RUNNING:
        assert new.status in V1.running_statuses
    else:
        assert new.status == new.phase.value

    # a live saga always waits for something, with a deadline; a finished one for nothing
    if new.phase.terminal:
        assert new.awaiting is None and new.deadline is None
    else:
        assert new.awaiting is not None and new.deadline is not None

    if prev.phase.terminal and (
        prev.status != "FAILED_NEEDS_MANUAL"
        or not (
            isinstance(msg, Resume)
            or (isinstance(msg, Reply) and prev.stalled is not None and msg.fence == prev.seq)
        )
    ):
        # nothing takes a saga out of a terminal state, except, for one stopped for a human,
        # an operator's resume or the late reply of the step it stopped on
        assert new == prev
        assert d.outcome in ("ignored", "rejected")
        assert all(c.step in COMPENSATIONS for c in d.commands)

    if d.outcome == "rejected":
        # a reply without its dispatch's token: recorded, never applied, nothing sent
        assert isinstance(msg, Reply)
        assert msg.token != prev.token_for(msg.fence)
        assert new == prev and d.commands == ()
        return

    if d.outcome == "ignored":
        assert new == prev
        # a success we gave up on left an effect: it must be undone, every time it shows up
        late_step = (
            next((s.name for s in FORWARD if type(msg.body) in s.success), None)
            if isinstance(msg, Reply)
            else None
        )
        must_undo = (
            late_step is not None
            and FORWARD_BY_NAME[late_step].compensation is not None
            and late_step not in prev.completed
            and prev.status in ("COMPENSATING", "COMPENSATED", "FAILED_NEEDS_MANUAL")
        )
        assert [c.step for c in d.commands] == (
            [FORWARD_BY_NAME[late_step].compensation] if must_undo and late_step else []
        )
        for c in d.commands:  # only the undoing of a late success
            assert isinstance(msg, Reply)
            late = COMPENSATION_OF[c.step]
            assert type(msg.body) in FORWARD_BY_NAME[late].success
            assert late not in prev.completed
            assert prev.status in ("COMPENSATING", "COMPENSATED", "FAILED_NEEDS_MANUAL")
            assert (c.attempt, c.fence) == (1, msg.fence)
            assert c.idempotency_key == idempotency_key(prev.saga_id, c.step)
        return

    # applied: at most one command, and it is exactly what the saga now awaits
    assert len(d.commands) <= 1
    for c in d.commands:
        assert c.step == new.awaiting
        assert (c.fence, c.attempt) == (new.seq, new.attempt)
        assert c.message_id == command_id(new.saga_id, c.step, c.fence, c.attempt)
        assert c.idempotency_key == idempotency_key(new.saga_id, c.step)
        if c.step in FORWARD_BY_NAME:
            assert world.plan is None, "forward command after compensation began"
            assert new.status is FORWARD_STATUS[c.step]
            assert c.step == FORWARD_NAMES[len(new.completed)]
        elif c.step == "payment_status":
            # a payment step timed out: it is reconciled by a status query, still pending
            assert world.plan is None
            assert new.status is prev.status
            assert new.reconciling in ("authorization", "capture")
        else:
            assert new.status == "COMPENSATING"
        limit = (
            POLICY.max_retriable_attempts
            if c.step in FORWARD_BY_NAME and FORWARD_BY_NAME[c.step].kind == "retriable"
            else POLICY.max_step_attempts
            if c.step in FORWARD_BY_NAME or c.step == "payment_status"
            else POLICY.max_compensation_attempts
        )
        assert world.sends.get((c.step, c.fence), 0) < limit

    # compensation begins: the plan is the reverse of the completed steps (+ the unknown one)
    if new.status == "COMPENSATING" and prev.status != "COMPENSATING":
        assert not prev.phase.terminal
        assert world.plan is None
        (first,) = d.commands
        plan = (first.step, *new.compensation_plan)
        unknown = (
            (prev.reconciling if prev.awaiting == "payment_status" else prev.awaiting)
            if isinstance(msg, Timeout)
            else None
        )
        assert plan == compensation_plan(V1, new.completed, unknown)
        undone = [_index_undone(s) for s in plan]
        assert undone == sorted(undone, reverse=True), "compensations not in reverse order"
        assert len(set(undone)) == len(undone)
        needed = set(compensation_plan(V1, new.completed, new.unknown_step))
        assert needed <= set(plan)
        if "capture" in new.completed:  # payment ladder
            assert "refund_payment" in plan and "void_authorization" not in plan
        world.plan = plan

    for c in d.commands:
        if c.step in COMPENSATIONS:
            assert world.plan is not None
            if c.attempt == 1:
                world.compensations_sent.append(c.step)
                n = len(world.compensations_sent)
                assert tuple(world.compensations_sent) == world.plan[:n]
            else:
                assert c.step == world.compensations_sent[-1]

    if new.status == "COMPLETED":
        assert new.completed == FORWARD_NAMES
        assert world.plan is None
        assert new.compensated == ()
        # forward steps, and the status query that settled a payment step's unknown outcome:
        # never a compensation
        assert all(
            c.step in FORWARD_BY_NAME or c.step == RECONCILE_QUERY
            for c in (*world.sent, *d.commands)
        )

    if new.status == "COMPENSATED":
        assert world.plan is not None
        assert new.compensated == world.plan
        assert set(compensation_plan(V1, new.completed, new.unknown_step)) <= set(new.compensated)
        if "capture" in new.completed:
            assert "void_authorization" not in new.compensated
            assert "refund_payment" in new.compensated

    if new.status == "FAILED_NEEDS_MANUAL":
        # a human is called while undoing, after the point of no return, or when whether it
        # was passed is unknown (the capture's status query unanswered): never otherwise
        assert (
            prev.status == "COMPENSATING"
            or past_pivot(V1, prev)
            or (prev.awaiting == "payment_status" and prev.reconciling == PIVOT)
        ), (prev, msg)
        assert new.failure_reason


def apply(world: World, msg: Input) -> Decision:
    prev = world.state
    d = decide(V1, prev, msg, now=NOW, policy=POLICY)
    check(world, prev, msg, d)
    world.record(d)
    if isinstance(msg, Reply):
        world.delivered.append(msg)
    assert d.state is not None
    world.state = d.state
    return d


def begin() -> World:
    d = started()
    assert d.state is not None
    world = World(d.state)
    world.record(d)
    return world


def choose(data: st.DataObject, world: World, action: str) -> Input | None:
    """Turn an action name into a message, or None when it does not apply right now."""
    state = world.state
    if action in ("reply_ok", "reply_fail"):
        if state.awaiting is None:
            return None
        ok = action == "reply_ok" or not has_failure(state.awaiting)
        world.copies += 1
        return reply(state.awaiting, state.seq, ok=ok, copy=world.copies)
    if action == "duplicate":
        if not world.delivered:
            return None
        return data.draw(st.sampled_from(world.delivered), label="duplicate")
    if action == "stale":
        old = [c for c in world.sent if c.fence < state.seq]
        if not old:
            return None
        c = data.draw(st.sampled_from(old), label="stale of")
        ok = data.draw(st.booleans(), label="stale ok") or not has_failure(c.step)
        world.copies += 1
        return reply(c.step, c.fence, ok=ok, copy=world.copies)
    if action == "timeout_current":
        return Timeout(state.seq)
    if action == "timeout_old":
        return Timeout(data.draw(st.integers(0, state.seq - 1), label="old seq"))
    if action == "expire":
        return Expire("alive too long")
    if action == "resume":
        return Resume()
    # stray: any reply type, any fence near the current one
    name = data.draw(st.sampled_from(ALL_STEPS), label="stray step")
    ok = data.draw(st.booleans(), label="stray ok") or not has_failure(name)
    fence = data.draw(st.integers(0, state.seq + 1), label="stray fence")
    world.copies += 1
    return reply(name, fence, ok=ok, copy=world.copies)


def drain(world: World) -> None:
    """Keep delivering correct successful replies: the saga must finish, in bounded steps."""
    for _ in range(DRAIN_BOUND):
        if world.state.phase.terminal:
            return
        assert world.state.awaiting is not None
        world.copies += 1
        apply(world, reply(world.state.awaiting, world.state.seq, copy=world.copies))
    raise AssertionError(f"not terminal after {DRAIN_BOUND} correct replies: {world.state}")


@settings(max_examples=200, deadline=None)
@given(data=st.data(), actions=st.lists(st.sampled_from(ACTIONS), max_size=40))
def test_invariants_hold_over_any_interleaving(data: st.DataObject, actions: list[str]) -> None:
    world = begin()
    for action in actions:
        msg = choose(data, world, action)
        if msg is not None:
            apply(world, msg)
    drain(world)
    assert world.state.status in ("COMPLETED", "COMPENSATED", "FAILED_NEEDS_MANUAL")
    # once terminal, nothing in the driver's repertoire moves it; the one documented exception:
    # a saga stopped for a human while a compensation (or a step past the pivot) was in flight
    # still applies that step's late reply, as if it had come in time
    final = world.state
    for action in ACTIONS:
        msg = choose(data, world, action)
        if msg is not None:
            apply(world, msg)
    if final.phase is Phase.FAILED_NEEDS_MANUAL and final.stalled is not None:
        if world.state != final:
            assert world.state.stalled is None
            assert world.state.phase is not Phase.COMPLETED or final.compensating is False
    else:
        assert world.state == final


NOISE = ("duplicate", "stale", "timeout_old", "reply_ok")


@settings(max_examples=200, deadline=None)
@given(data=st.data(), actions=st.lists(st.sampled_from(NOISE), max_size=40))
def test_noise_never_changes_a_successful_checkout(data: st.DataObject, actions: list[str]) -> None:
    """Duplicates, stale replies and old timeouts are ignored: with only successes delivered,
    the saga completes and sends exactly the commands of the clean run."""
    clean = begin()
    drain(clean)
    assert clean.state.status == "COMPLETED"

    world = begin()
    for action in actions:
        msg = choose(data, world, action)
        if msg is not None:
            apply(world, msg)
    drain(world)
    assert world.state.status == "COMPLETED"
    assert world.sent == clean.sent
    assert world.state.completed == FORWARD_NAMES


@settings(max_examples=200, deadline=None)
@given(
    failing=st.sampled_from([s.name for s in FORWARD if s.kind != "retriable"]),
    timeouts=st.integers(0, POLICY.max_step_attempts + 2),
    business_failure=st.booleans(),
)
def test_any_failure_point_ends_compensated_in_reverse_order(
    failing: str, timeouts: int, business_failure: bool
) -> None:
    """Drive to ``failing``, let it time out ``timeouts`` times, then fail it (by its business
    failure if it has one, or by running out of attempts) and check the whole compensation."""
    world = begin()
    while world.state.awaiting != failing:
        apply(world, reply(world.state.awaiting or "", world.state.seq))
    done = world.state.completed
    for _ in range(min(timeouts, POLICY.max_step_attempts - 1)):
        apply(world, Timeout(world.state.seq))
    if business_failure and has_failure(failing):
        apply(world, reply(failing, world.state.seq, ok=False))
        expected = compensation_plan(V1, done)
    elif failing == PIVOT:
        # the pivot's outcome stays unknown (its status query unanswered too): a human is
        # called, and nothing is compensated (it may have captured)
        while not world.state.phase.terminal:
            apply(world, Timeout(world.state.seq))
        assert world.state.status == "FAILED_NEEDS_MANUAL"
        assert not any(c.step in COMPENSATIONS for c in world.sent)
        return
    else:
        while world.state.status != "COMPENSATING":
            apply(world, Timeout(world.state.seq))
        expected = compensation_plan(V1, done, failing)
    drain(world)
    assert world.state.status == "COMPENSATED"
    assert world.state.compensated == expected
    assert [c.step for c in world.sent if c.step in COMPENSATIONS and c.attempt == 1] == list(
        expected
    )


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    actions=st.lists(
        st.sampled_from(("timeout_current", "timeout_old", "duplicate", "stale", "stray")),
        max_size=60,
    ),
)
def test_past_the_pivot_nothing_is_ever_undone(data: st.DataObject, actions: list[str]) -> None:
    """Drive to just after the capture, then only late, repeated, stale and stray messages and
    timeouts (as many as the retriable limit and more): the saga completes or calls a human,
    and no compensation (refund, void, release, cancel) is ever sent."""
    world = begin()
    while not past_pivot(V1, world.state):
        apply(world, reply(world.state.awaiting or "", world.state.seq))
    assert PIVOT == "capture" and world.state.awaiting == "completion"
    for action in actions:
        msg = choose(data, world, action)
        if msg is not None:
            apply(world, msg)
    if not world.state.phase.terminal:
        drain(world)
    assert world.state.status in ("COMPLETED", "FAILED_NEEDS_MANUAL")
    assert not any(c.step in COMPENSATIONS for c in world.sent)
    if world.state.status == "FAILED_NEEDS_MANUAL":
        # the late answer still finishes it (and the operator's case with it)
        world.copies += 1
        apply(world, reply("completion", world.state.seq, copy=world.copies))
        assert world.state.status == "COMPLETED"


@settings(max_examples=300, deadline=None)
@given(data=st.data(), actions=st.lists(st.sampled_from(OPERATOR_ACTIONS), max_size=50))
def test_expiry_and_resume_never_give_money_back_unless_compensating(
    data: st.DataObject, actions: list[str]
) -> None:
    """With the sweeper's expiry and an operator's resume mixed into any interleaving of replies,
    duplicates, stale and stray replies and timeouts: a refund or a void is only ever sent by a
    saga that is undoing its work, and a capture the saga knew of is never refunded (only an
    operator's ForceCompensate, which this driver never sends, may)."""
    world = begin()
    captured_known = False
    for action in actions:
        msg = choose(data, world, action)
        if msg is None:
            continue
        prev = world.state
        d = decide(V1, prev, msg, now=NOW, policy=POLICY)
        assert decide(V1, prev, msg, now=NOW, policy=POLICY) == d  # pure
        assert d.state is not None
        for c in d.commands:
            if c.step in ("refund_payment", "void_authorization"):
                assert d.state.compensating or prev.compensating, (prev, msg, d)
            assert not (captured_known and c.step == "refund_payment"), (prev, msg, d)
        captured_known = captured_known or past_pivot(V1, d.state)
        world.record(d)
        if isinstance(msg, Reply):
            world.delivered.append(msg)
        world.state = d.state
