"""Every registered definition, every version, explored exhaustively (``engine.check``), and
each property of the check shown able to fail on a deliberately broken engine."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

import pytest

from process_manager.definitions import ALL, checkout, returns
from process_manager.engine import core
from process_manager.engine.check import (
    CHECK_POLICY,
    NOW,
    PROPERTIES,
    Bounds,
    Decide,
    Report,
    build_sample,
    check,
    compensation_matches,
    table,
)
from process_manager.engine.core import (
    Command,
    Decision,
    Expire,
    Input,
    Phase,
    Reply,
    Resume,
    SagaState,
    Timeout,
)
from process_manager.engine.definition import Definition, Policy
from schemas.base import Message
from schemas.inventory import RestockItems
from schemas.payment import PaymentStatusReported

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("d", ALL, ids=lambda d: d.ref)
def test_every_definition_has_no_violation(
    d: Definition, ci_summary: list[str], record_property: Callable[[str, object], None]
) -> None:
    report = check(d, clock=time.perf_counter)
    line = report.summary()
    print(line)
    ci_summary.append(line)
    record_property("exhaustive_check", line)
    assert report.ok, "\n\n".join(str(v) for v in report.violations)
    # every reachable state under the bounds (operator inputs per trace aside) was explored
    assert report.bound_reached is None, line
    # the exploration reached what it claims to check
    assert {"COMPLETED", "COMPENSATED", "FAILED_NEEDS_MANUAL"} <= set(report.phases)
    for seen in (
        "rejected:rejected",
        "ignored:late_success_undone",
        "applied:reconciled",
        "applied:operator_resume",
        "applied:operator_compensate",
    ):
        assert report.events.get(seen), (seen, report.events)
    if d.paths:
        assert report.events.get("applied:branched")
    if any(c.fallback for c in d.compensations):
        assert report.events.get("applied:compensation_refused")


def test_bounds_are_reported() -> None:
    assert check(returns.V1, bounds=Bounds(max_depth=3)).bound_reached == "depth 3"
    small = check(returns.V1, bounds=Bounds(max_states=50))
    assert small.states == 50 and small.bound_reached == "50 states"
    assert "bound reached: 50 states" in small.summary()


def test_the_table_names_each_definition() -> None:
    reports = [check(returns.V1, bounds=Bounds(max_operator=0))]
    text = table(reports)
    assert text.splitlines()[0].split()[:3] == ["definition", "states", "transitions"]
    assert "returns.v1" in text and "none" in text


def test_sample_bodies_are_valid_models() -> None:
    for d in ALL:
        start = build_sample(d.start)
        d.start.model_validate(start.model_dump())
        for kind in d.reply_types:
            body = build_sample(kind, start)
            kind.model_validate(body.model_dump())
            assert getattr(body, "order_id", start.order_id) == start.order_id


def test_a_refused_rung_may_be_followed_by_its_fallback() -> None:
    d = checkout.V2
    plan = ("refund_payment", "cancel_shipment", "cancel_order")
    assert compensation_matches(d, plan, plan)
    assert compensation_matches(d, plan, ("refund_payment", "issue_credit_note", *plan[1:]))
    assert not compensation_matches(d, plan, plan[:-1])
    assert not compensation_matches(d, plan, (plan[1], plan[0], plan[2]))
    assert not compensation_matches(d, plan, ("issue_credit_note", *plan[1:]))


# ---------------------------------------------------------------------------------------------
# Each property able to fail: a broken engine, and the check reports that exact violation


def _wrap(change: Callable[..., Decision | None]) -> Decide:
    """The engine's decide, except where ``change`` returns a decision of its own."""

    def decide(
        d: Definition,
        state: SagaState | None,
        message: Input,
        *,
        now: datetime,
        policy: Policy | None = None,
        nonce: str = "",
    ) -> Decision:
        dec = core.decide(d, state, message, now=now, policy=policy, nonce=nonce)
        assert state is not None
        changed = change(d, state, message, dec, now=now, policy=policy, nonce=nonce)
        return dec if changed is None else changed

    return decide


def _only(report: Report, prop: str) -> str:
    assert [v.prop for v in report.violations] == [prop], "\n".join(map(str, report.violations))
    return str(report.violations[0])


def test_a_plan_that_skips_a_step_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = core.compensation_plan
    monkeypatch.setattr(
        core, "compensation_plan", lambda d, done, unknown=None: plan(d, done, unknown)[:-1]
    )
    report = check(returns.V1, bounds=Bounds(max_operator=1))
    _only(report, "compensation")
    # the shortest trace: the operator compensates the first step while it is in flight
    assert report.violations[0].trace == ("Start StartReturn", "ForceCompensate")
    assert "expected ['cancel_return']" in report.violations[0].message


def test_a_plan_in_the_wrong_order_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = core.compensation_plan
    monkeypatch.setattr(
        core,
        "compensation_plan",
        lambda d, done, unknown=None: tuple(reversed(plan(d, done, unknown))),
    )
    report = check(returns.V1, bounds=Bounds(max_operator=0))
    _only(report, "compensation")
    assert report.violations[0].trace == (
        "Start StartReturn",
        "reply OrderReturnPending @1",
        "reply PickupBooked @2",
        "reply PaymentRefundFailed @3",
        "reply OrderReturnCancelled @4",
        "reply PickupCancelled @5",
    )
    assert (
        "compensated ['cancel_return', 'cancel_pickup'], expected ['cancel_pickup', "
        "'cancel_return']" in report.violations[0].message
    )


def _compensate_past_pivot(
    d: Definition, state: SagaState, message: Input, dec: Decision, **_: object
) -> Decision | None:
    after = dec.state
    if after is None or d.pivot not in after.completed or not dec.commands:
        return None
    spec = d.step("cancel_pickup")
    extra = Command(
        message_id=core.command_id(after.saga_id, spec.name, after.seq, 1),
        participant=spec.participant,
        step=spec.name,
        attempt=1,
        fence=after.seq,
        idempotency_key=core.idempotency_key(after.saga_id, spec.name),
        body=spec.build(after.start),
        reply_token=after.token_for(after.seq) or "",
    )
    return replace(dec, commands=(*dec.commands, extra))


def test_a_compensation_after_the_pivot_is_reported() -> None:
    report = check(returns.V1, bounds=Bounds(max_operator=0), decide=_wrap(_compensate_past_pivot))
    text = _only(report, "pivot")
    assert report.violations[0].trace[-1] == "reply PaymentRefunded @3"
    assert "cancel_pickup sent past the pivot" in text


def _expire_reopens(
    d: Definition, state: SagaState, message: Input, dec: Decision, **_: object
) -> Decision | None:
    if state.phase is Phase.COMPLETED and isinstance(message, Expire):
        return Decision(
            replace(state, phase=Phase.FAILED_NEEDS_MANUAL, status="FAILED_NEEDS_MANUAL"),
            event="needs_manual",
        )
    return None


def _timeout_resumes(
    d: Definition, state: SagaState, message: Input, dec: Decision, **kw: object
) -> Decision | None:
    if state.phase is Phase.FAILED_NEEDS_MANUAL and isinstance(message, Timeout):
        return core.decide(d, state, Resume(), **kw)  # type: ignore[arg-type]
    return None


def test_a_completed_saga_that_changes_is_reported() -> None:
    report = check(returns.V1, bounds=Bounds(max_operator=1), decide=_wrap(_expire_reopens))
    text = _only(report, "absorbing")
    trace = report.violations[0].trace
    # the five replies of the happy path, then the sweeper's expiry
    assert len(trace) == 7 and trace[-1] == "Expire"
    assert "a COMPLETED saga changed" in text


def test_a_manual_case_that_a_timeout_changes_is_reported() -> None:
    # (a timeout that resumes is an operator input the operator bound does not count: the
    # space has no end, so the state bound stops it)
    report = check(
        returns.V1, bounds=Bounds(max_operator=1, max_states=2_000), decide=_wrap(_timeout_resumes)
    )
    text = _only(report, "absorbing")
    assert report.violations[0].trace[-1].startswith("Timeout")
    assert "neither an operator's Resume" in text


def _ids_from_the_clock(
    d: Definition, state: SagaState, message: Input, dec: Decision, *, now: datetime, **_: object
) -> Decision | None:
    cmds = tuple(
        replace(c, message_id=uuid.uuid5(c.message_id, now.isoformat())) for c in dec.commands
    )
    return replace(dec, commands=cmds)


def test_command_ids_that_depend_on_the_clock_are_reported() -> None:
    report = check(returns.V1, bounds=Bounds(max_operator=0), decide=_wrap(_ids_from_the_clock))
    _only(report, "stable_ids")
    assert report.violations[0].trace == ("Start StartReturn", "reply OrderReturnPending @1")


def _compensation_never_times_out(
    d: Definition, state: SagaState, message: Input, dec: Decision, **_: object
) -> Decision | None:
    if isinstance(message, Timeout) and state.phase is Phase.COMPENSATING:
        return Decision(state, outcome="ignored", note="broken: waits for ever")
    return None


def test_a_saga_that_time_cannot_end_is_reported() -> None:
    report = check(
        returns.V1, bounds=Bounds(max_operator=1), decide=_wrap(_compensation_never_times_out)
    )
    # (a COMPENSATING saga that ignores its timeout is also a stuck one: only `time` fails)
    text = _only(report, "time")
    # from the start, time alone fails the first step and compensates: and there it stays
    assert report.violations[0].trace == ("Start StartReturn", "Timeout of the current fence")
    assert "stuck in COMPENSATING after 2 timeouts" in text


def _foreign_command(
    d: Definition, state: SagaState, message: Input, dec: Decision, **_: object
) -> Decision | None:
    after = dec.state
    if after is None or not dec.commands:
        return None
    foreign = replace(
        dec.commands[0],
        step="restock",
        participant="inventory",
        body=RestockItems(order_id=after.order_id),
    )
    return replace(dec, commands=(*dec.commands, foreign))


def _old_fence(
    d: Definition, state: SagaState, message: Input, dec: Decision, **_: object
) -> Decision | None:
    if dec.state is None or dec.state.seq < 2:
        return None
    return replace(dec, commands=tuple(replace(c, fence=c.fence - 1) for c in dec.commands))


@pytest.mark.parametrize(
    ("broken", "says"),
    [
        (_foreign_command, "'restock', which checkout.v1 does not have"),
        (_old_fence, "carries fence 1, the state's is 2"),
    ],
    ids=["step of another definition", "stale fence"],
)
def test_a_command_that_is_not_the_definitions_is_reported(
    broken: Callable[..., Decision | None], says: str
) -> None:
    report = check(checkout.V1, bounds=Bounds(max_operator=0), decide=_wrap(broken))
    text = _only(report, "own_commands")
    assert says in text
    assert report.violations[0].trace == ("Start StartCheckout", "reply OrderCreated @1")


def _tokens_optional(
    d: Definition, state: SagaState, message: Input, dec: Decision, **kw: object
) -> Decision | None:
    if isinstance(message, Reply) and message.token != state.token_for(message.fence):
        trusted = replace(message, token=state.token_for(message.fence))
        return core.decide(d, state, trusted, **kw)  # type: ignore[arg-type]
    return None


def test_a_reply_without_its_token_that_applies_is_reported() -> None:
    report = check(returns.V1, bounds=Bounds(max_operator=0), decide=_wrap(_tokens_optional))
    text = _only(report, "token")
    assert report.violations[0].trace[0] == "Start StartReturn"
    assert report.violations[0].trace[1].startswith("forged OrderReturnPending @1")
    assert "changed the state" in text


def test_every_property_has_a_failing_case() -> None:
    shown = {"compensation", "pivot", "absorbing", "stable_ids", "time", "own_commands", "token"}
    assert shown == set(PROPERTIES)


def _answered_query_stays_stalled(
    d: Definition, state: SagaState, message: Input, dec: Decision, **_: object
) -> Decision | None:
    """The engine before the check found it: a manual case opened by a status query's answer
    kept the query as the stalled step, so any other answer to it reopened the case."""
    after = dec.state
    if (
        isinstance(message, Reply)
        and after is not None
        and after.phase is Phase.FAILED_NEEDS_MANUAL
        and state.phase is not Phase.FAILED_NEEDS_MANUAL
        and state.awaiting is not None
        and d.query(state.awaiting) is not None
    ):
        return replace(dec, state=replace(after, stalled=state.awaiting))
    return None


def test_a_manual_case_reopened_by_a_second_answer_is_reported() -> None:
    report = check(
        returns.V1, bounds=Bounds(max_operator=0), decide=_wrap(_answered_query_stays_stalled)
    )
    text = _only(report, "absorbing")
    assert report.violations[0].trace == (
        "Start StartReturn",
        "reply OrderReturnPending @1",
        "reply PickupBooked @2",
        "Timeout @3",
        "Timeout @3",
        "reply PaymentStatusReported[credited] @4",
        "reply PaymentStatusReported[none] @4",
    )
    assert "another answer to that query" in text


def test_a_refunded_capture_stays_a_manual_case_whatever_else_the_query_answers() -> None:
    """Found by the exhaustive check: "refunded" called a human, then a second answer to the
    same status query (a re-send's, with older news: "captured") completed the order, or
    ("none") compensated it."""
    d = checkout.V1
    start = build_sample(d.start)
    first = core.start(d, core.Start(start, uuid.uuid4()), now=NOW, policy=CHECK_POLICY)
    state = first.state
    assert state is not None

    def step(message: Input) -> Decision:
        assert state is not None
        return core.decide(d, state, message, now=NOW, policy=CHECK_POLICY)

    def answer(body: Message) -> Reply:
        assert state is not None
        return Reply(body, state.seq, uuid.uuid4(), state.token_for(state.seq))

    for s in d.steps[:4]:
        state = step(answer(build_sample(s.success[0], start))).state
        assert state is not None
    while state.awaiting != "payment_status":
        state = step(Timeout(state.seq)).state
        assert state is not None
    manual = step(answer(PaymentStatusReported(order_id=start.order_id, status="refunded")))
    state = manual.state
    assert state is not None and state.phase is Phase.FAILED_NEEDS_MANUAL
    for status in ("captured", "none", "refunded"):
        again = step(answer(PaymentStatusReported(order_id=start.order_id, status=status)))
        assert again.state == state and again.commands == ()
    resumed = step(Resume())
    assert [c.step for c in resumed.commands] == ["payment_status"]
