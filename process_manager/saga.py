"""The checkout saga as a pure state machine.

Nothing here does I/O, reads a clock, draws random numbers or logs. The caller passes ``now``;
command ids are derived from the saga id, the step sequence and the attempt, so deciding the same
thing twice emits the same ids and participants can deduplicate.

Forward steps, in order::

    order -> authorization -> inventory -> shipment -> capture -> completion

Each forward step that leaves an effect has a compensation. When a step fails (a business
refusal such as ``PaymentDeclined``, or its retries are exhausted with the outcome unknown), the
completed steps are compensated in reverse order. A step whose outcome is unknown is compensated
too: its compensation is idempotent and a no-op when there was nothing to undo.

Fencing: every dispatch increments ``seq`` and the command carries it. A reply whose fence or type
does not match what the saga awaits is recorded as ignored and never applied.

Reply tokens: every dispatch also carries a token that nobody outside the process manager can
know (derived from a random ``nonce`` the caller passes, as it passes ``now``), kept in the state
for each fence. A reply must echo the token of the dispatch its fence names, or it is recorded as
rejected and never applied: the fence orders replies, the token proves they answer a dispatch.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Literal

from schemas.base import Message
from schemas.checkout import StartCheckout, saga_id_for_order
from schemas.inventory import (
    InventoryReleased,
    InventoryReserved,
    InventoryUnavailable,
    ReleaseInventory,
    ReserveInventory,
)
from schemas.order import (
    CancelOrder,
    CompleteOrder,
    CreateOrder,
    OrderCancelled,
    OrderCompleted,
    OrderCreated,
)
from schemas.payment import (
    AuthorizationVoided,
    AuthorizePayment,
    CapturePayment,
    GetPaymentStatus,
    PaymentAuthorized,
    PaymentCaptured,
    PaymentCaptureFailed,
    PaymentDeclined,
    PaymentRefunded,
    PaymentRefundFailed,
    PaymentStatusReported,
    RefundPayment,
    VoidAuthorization,
)
from schemas.shipping import (
    CancelShipment,
    CreateShipment,
    ShipmentCancelled,
    ShipmentCreated,
    ShipmentFailed,
)

DEFINITION_VERSION = "checkout.v1"


class SagaStatus(enum.StrEnum):
    PENDING_ORDER = "PENDING_ORDER"
    PENDING_PAYMENT = "PENDING_PAYMENT"
    PENDING_INVENTORY = "PENDING_INVENTORY"
    PENDING_SHIPMENT = "PENDING_SHIPMENT"
    PENDING_CAPTURE = "PENDING_CAPTURE"
    COMPLETING = "COMPLETING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    FAILED_NEEDS_MANUAL = "FAILED_NEEDS_MANUAL"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED_NEEDS_MANUAL})


#: what a forward step's failure may lead to
#: - compensatable: it has an undo; a failure (or an unknown outcome) compensates what was done
#: - pivot: the point of no return (capture); if it fails nothing of it is left to undo, and
#:   once it succeeded the saga only moves forward
#: - retriable: after the pivot; it cannot fail, only be late: a timeout re-sends it with the
#:   same idempotency key and a growing delay, up to a long limit, then a human is called
StepKind = Literal["compensatable", "pivot", "retriable"]


@dataclass(frozen=True)
class StepSpec:
    """One step of the definition: the command it sends and the replies that settle it."""

    name: str
    participant: str
    build: Callable[[StartCheckout], Message]
    success: tuple[type[Message], ...]
    failure: tuple[type[Message], ...] = ()
    compensation: str | None = None
    #: status while this step is awaited (forward steps only)
    status: SagaStatus = SagaStatus.COMPENSATING
    kind: StepKind = "compensatable"


FORWARD: tuple[StepSpec, ...] = (
    StepSpec(
        "order",
        "order",
        lambda c: CreateOrder(
            order_id=c.order_id,
            customer_id=c.customer_id,
            amount_minor=c.amount_minor,
            currency=c.currency,
        ),
        success=(OrderCreated,),
        compensation="cancel_order",
        status=SagaStatus.PENDING_ORDER,
    ),
    StepSpec(
        "authorization",
        "payment",
        lambda c: AuthorizePayment(
            order_id=c.order_id,
            amount_minor=c.amount_minor,
            currency=c.currency,
            payment_token=c.payment_token,
        ),
        success=(PaymentAuthorized,),
        failure=(PaymentDeclined,),
        compensation="void_authorization",
        status=SagaStatus.PENDING_PAYMENT,
    ),
    StepSpec(
        "inventory",
        "inventory",
        lambda c: ReserveInventory(order_id=c.order_id, items=c.items),
        success=(InventoryReserved,),
        failure=(InventoryUnavailable,),
        compensation="release_inventory",
        status=SagaStatus.PENDING_INVENTORY,
    ),
    StepSpec(
        "shipment",
        "shipping",
        lambda c: CreateShipment(
            order_id=c.order_id, items=c.items, shipping_address=c.shipping_address
        ),
        success=(ShipmentCreated,),
        failure=(ShipmentFailed,),
        compensation="cancel_shipment",
        status=SagaStatus.PENDING_SHIPMENT,
    ),
    StepSpec(
        "capture",
        "payment",
        lambda c: CapturePayment(
            order_id=c.order_id, amount_minor=c.amount_minor, currency=c.currency
        ),
        success=(PaymentCaptured,),
        failure=(PaymentCaptureFailed,),
        # only an operator's `sagabus compensate` ever refunds a captured payment
        compensation="refund_payment",
        status=SagaStatus.PENDING_CAPTURE,
        kind="pivot",
    ),
    StepSpec(
        "completion",
        "order",
        lambda c: CompleteOrder(order_id=c.order_id),
        success=(OrderCompleted,),
        status=SagaStatus.COMPLETING,
        kind="retriable",
    ),
)


def _check_kinds(steps: tuple[StepSpec, ...]) -> str | None:
    """Compensatable steps, then at most one pivot, then retriable steps only; the name of
    the pivot (None: the saga can always compensate)."""
    pivots = [s.name for s in steps if s.kind == "pivot"]
    if len(pivots) > 1:
        raise ValueError(f"more than one pivot step: {pivots}")
    order = {"compensatable": 0, "pivot": 1, "retriable": 2}
    ranks = [order[s.kind] for s in steps]
    if ranks != sorted(ranks):
        raise ValueError("steps must be compensatable, then the pivot, then retriable")
    for s in steps:
        if s.kind == "retriable" and s.failure:
            raise ValueError(f"retriable step {s.name} cannot fail, yet declares failures")
        if s.kind == "retriable" and not pivots:
            raise ValueError(f"retriable step {s.name} without a pivot before it")
    return pivots[0] if pivots else None


#: the point of no return: once it succeeded, only the operator can make the saga go back
PIVOT: str | None = _check_kinds(FORWARD)

COMPENSATIONS: dict[str, StepSpec] = {
    s.name: s
    for s in (
        StepSpec(
            "cancel_order",
            "order",
            lambda c: CancelOrder(order_id=c.order_id, reason="checkout_compensated"),
            success=(OrderCancelled,),
        ),
        StepSpec(
            "void_authorization",
            "payment",
            lambda c: VoidAuthorization(order_id=c.order_id),
            success=(AuthorizationVoided,),
        ),
        StepSpec(
            "release_inventory",
            "inventory",
            lambda c: ReleaseInventory(order_id=c.order_id),
            success=(InventoryReleased,),
        ),
        StepSpec(
            "cancel_shipment",
            "shipping",
            lambda c: CancelShipment(order_id=c.order_id),
            success=(ShipmentCancelled,),
        ),
        StepSpec(
            "refund_payment",
            "payment",
            lambda c: RefundPayment(
                order_id=c.order_id, amount_minor=c.amount_minor, currency=c.currency
            ),
            success=(PaymentRefunded,),
            failure=(PaymentRefundFailed,),
        ),
    )
}

#: Before giving up on a payment step whose outcome is unknown, ask the payment service.
RECONCILE = StepSpec(
    "payment_status",
    "payment",
    lambda c: GetPaymentStatus(order_id=c.order_id),
    success=(PaymentStatusReported,),
)
#: forward steps reconciled by a status query, and the reported statuses that mean "it happened"
RECONCILED: dict[str, frozenset[str]] = {
    "authorization": frozenset({"authorized", "captured", "refunded"}),
    "capture": frozenset({"captured"}),
}
#: reported statuses that mean a human must look: the capture was made and then undone
#: outside this saga (it must neither complete nor refund again)
RECONCILE_NEEDS_HUMAN: dict[str, frozenset[str]] = {"capture": frozenset({"refunded"})}

FORWARD_BY_NAME: dict[str, StepSpec] = {s.name: s for s in FORWARD}
STEPS: dict[str, StepSpec] = {**FORWARD_BY_NAME, **COMPENSATIONS, RECONCILE.name: RECONCILE}
#: which forward step a compensation undoes (for late-success handling)
COMPENSATION_OF: dict[str, str] = {s.compensation: s.name for s in FORWARD if s.compensation}


@dataclass(frozen=True)
class Policy:
    """Timeouts and bounds. Part of the definition, passed in so tests can vary them."""

    step_timeout: timedelta = timedelta(seconds=30)
    #: sends of one forward step (first send included) before its outcome counts as failed
    max_step_attempts: int = 3
    compensation_timeout: timedelta = timedelta(seconds=30)
    #: sends of one compensation before the saga needs a human
    max_compensation_attempts: int = 5
    #: sends of a retriable step (after the pivot) before the saga needs a human; each wait is
    #: twice the last (from step_timeout), at most retriable_max_delay
    max_retriable_attempts: int = 20
    retriable_max_delay: timedelta = timedelta(minutes=10)

    def retriable_timeout(self, attempt: int) -> timedelta:
        """The wait after sending a retriable step for the ``attempt``-th time."""
        return min(
            self.step_timeout * (1 << min(max(attempt, 1) - 1, 30)), self.retriable_max_delay
        )


@dataclass(frozen=True)
class SagaState:
    saga_id: uuid.UUID
    checkout: StartCheckout
    status: SagaStatus
    #: fencing number: incremented on every new dispatch (not on a re-send of the same step)
    seq: int
    #: forward steps that succeeded, in order
    completed: tuple[str, ...] = ()
    #: the step currently awaited (a forward step or a compensation), if any
    awaiting: str | None = None
    attempt: int = 0
    deadline: datetime | None = None
    #: compensations still to run after the awaited one, in order
    compensation_plan: tuple[str, ...] = ()
    #: compensations that finished
    compensated: tuple[str, ...] = ()
    failure_reason: str | None = None
    #: a forward step whose outcome was unknown when compensation began (its effect may exist)
    unknown_step: str | None = None
    #: the forward step whose outcome a status query is establishing, while one is awaited
    reconciling: str | None = None
    started_at: datetime | None = None
    definition_version: str = DEFINITION_VERSION
    #: (fence, reply token) of every dispatch so far
    tokens: tuple[tuple[int, str], ...] = ()
    #: compensation began (on a failure, or because an operator asked)
    compensating: bool = False
    #: the step that was awaited when the saga stopped for a human: its late reply still counts
    stalled: str | None = None
    #: fences below this were dispatched before reply tokens existed (a saga in flight at the
    #: upgrade): their replies carry no token and are believed without one
    untokened_below: int = 0

    def token_for(self, fence: int) -> str | None:
        for seq, token in self.tokens:
            if seq == fence:
                return token
        return None

    @property
    def order_id(self) -> str:
        return self.checkout.order_id


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Start:
    command: StartCheckout
    message_id: uuid.UUID


@dataclass(frozen=True)
class Reply:
    body: Message
    fence: int
    message_id: uuid.UUID
    #: the reply token it echoes (None: it echoed none)
    token: str | None = None


@dataclass(frozen=True)
class Timeout:
    """The deadline for the awaited step passed. ``seq`` is the fence the deadline was set for."""

    seq: int


@dataclass(frozen=True)
class ForceCompensate:
    """An operator asks to compensate a saga that is not terminal."""

    reason: str


@dataclass(frozen=True)
class Resume:
    """An operator asks to re-send the awaited step now (same idempotency key)."""


@dataclass(frozen=True)
class Expire:
    """The sweeper found the saga alive beyond its time-to-live: stop and call a human."""

    reason: str


Input = Start | Reply | Timeout | ForceCompensate | Resume | Expire


# ---------------------------------------------------------------------------------------------
# Outputs


@dataclass(frozen=True)
class Command:
    message_id: uuid.UUID
    participant: str
    step: str
    attempt: int
    fence: int
    idempotency_key: str
    body: Message
    #: the token its reply must echo
    reply_token: str = ""


@dataclass(frozen=True)
class Decision:
    state: SagaState | None
    commands: tuple[Command, ...] = ()
    #: rejected: a reply that does not carry its dispatch's token (a security event)
    outcome: Literal["applied", "ignored", "rejected"] = "applied"
    #: a short, stable description for the history (why ignored, what happened)
    note: str = ""
    #: for metrics and logs: which transition happened
    transition: tuple[str | None, str | None] = field(default=(None, None))


class InvalidTransition(Exception):
    """A message that can never apply to this saga (for example a reply for a saga that does not
    exist). The runner dead-letters it with this reason."""


# ---------------------------------------------------------------------------------------------


#: the namespace of the ids the process manager derives; inboxes key messages by id and type,
#: so no id an outside client chooses can stand for one of these
COMMAND_NAMESPACE = uuid.UUID("5a6f1d2e-8c1b-4f7e-9b0a-3c2d1e0f9a8b")


def command_id(saga_id: uuid.UUID, step: str, seq: int, attempt: int) -> uuid.UUID:
    return uuid.uuid5(COMMAND_NAMESPACE, f"{saga_id}:{seq}:{step}:{attempt}")


def reply_token(nonce: str, saga_id: uuid.UUID, fence: int) -> str:
    """The token of dispatch ``fence``: as unguessable as ``nonce``, which the caller draws
    from a secure random source for every decision (an empty nonce is for tests only)."""
    return hashlib.sha256(f"{nonce}:{saga_id}:{fence}".encode()).hexdigest()[:32]


def idempotency_key(saga_id: uuid.UUID, step: str) -> str:
    return f"{saga_id}:{step}"


def _dispatch(
    state: SagaState, step: str, *, now: datetime, policy: Policy, new_seq: bool, nonce: str
) -> tuple[SagaState, Command]:
    spec = STEPS[step]
    seq = state.seq + 1 if new_seq else state.seq
    attempt = 1 if new_seq else state.attempt + 1
    token = state.token_for(seq)
    if token is None:  # a new dispatch (or a re-send of one made before tokens existed)
        token = reply_token(nonce, state.saga_id, seq)
        state = replace(state, tokens=(*state.tokens, (seq, token)))
    forward = step in FORWARD_BY_NAME
    query = step == RECONCILE.name
    timeout = policy.step_timeout if forward or query else policy.compensation_timeout
    if forward and spec.kind == "retriable":
        timeout = policy.retriable_timeout(attempt)
    new_state = replace(
        state,
        seq=seq,
        awaiting=step,
        attempt=attempt,
        deadline=now + timeout,
        status=spec.status if forward else state.status if query else SagaStatus.COMPENSATING,
    )
    cmd = Command(
        message_id=command_id(state.saga_id, step, seq, attempt),
        participant=spec.participant,
        step=step,
        attempt=attempt,
        fence=seq,
        idempotency_key=idempotency_key(state.saga_id, step),
        body=spec.build(state.checkout),
        reply_token=token,
    )
    return new_state, cmd


def compensation_plan(completed: tuple[str, ...], unknown: str | None = None) -> tuple[str, ...]:
    """Compensations for ``completed`` (and a step whose outcome is unknown), newest first.

    Payment ladder: a captured payment is refunded, and then there is no authorization to void.
    """
    steps = list(completed)
    if unknown is not None and unknown not in steps:
        steps.append(unknown)
    plan: list[str] = []
    for name in reversed(steps):
        comp = FORWARD_BY_NAME[name].compensation
        if comp is None:
            continue
        if comp == "void_authorization" and "capture" in steps:
            # the refund settles the payment either way: it voids what was never captured
            continue
        plan.append(comp)
    return tuple(plan)


def _begin_compensation(
    state: SagaState,
    reason: str,
    *,
    unknown: str | None,
    now: datetime,
    policy: Policy,
    nonce: str,
) -> tuple[SagaState, tuple[Command, ...]]:
    plan = compensation_plan(state.completed, unknown)
    state = replace(
        state,
        failure_reason=reason,
        compensation_plan=plan,
        compensated=(),
        unknown_step=unknown,
        compensating=True,
        stalled=None,
    )
    return _next_compensation(state, now=now, policy=policy, nonce=nonce)


def _next_compensation(
    state: SagaState, *, now: datetime, policy: Policy, nonce: str
) -> tuple[SagaState, tuple[Command, ...]]:
    if not state.compensation_plan:
        return (
            replace(state, status=SagaStatus.COMPENSATED, awaiting=None, deadline=None, attempt=0),
            (),
        )
    step, rest = state.compensation_plan[0], state.compensation_plan[1:]
    state = replace(state, compensation_plan=rest)
    state, cmd = _dispatch(state, step, now=now, policy=policy, new_seq=True, nonce=nonce)
    return state, (cmd,)


def _next_forward(
    state: SagaState, *, now: datetime, policy: Policy, nonce: str
) -> tuple[SagaState, tuple[Command, ...]]:
    done = len(state.completed)
    if done == len(FORWARD):
        return (
            replace(state, status=SagaStatus.COMPLETED, awaiting=None, deadline=None, attempt=0),
            (),
        )
    state, cmd = _dispatch(
        state, FORWARD[done].name, now=now, policy=policy, new_seq=True, nonce=nonce
    )
    return state, (cmd,)


def start(message: Start, *, now: datetime, policy: Policy, nonce: str = "") -> Decision:
    cmd = message.command
    state = SagaState(
        saga_id=saga_id_for_order(cmd.order_id),
        checkout=cmd,
        status=SagaStatus.PENDING_ORDER,
        seq=0,
        started_at=now,
    )
    state, cmds = _next_forward(state, now=now, policy=policy, nonce=nonce)
    return Decision(state, cmds, note="started", transition=(None, state.status))


def decide(
    state: SagaState | None, message: Input, *, now: datetime, policy: Policy, nonce: str = ""
) -> Decision:
    """Decide what ``message`` does to ``state``. Pure: same inputs, same decision.

    ``nonce`` makes the reply tokens of any new dispatch unguessable: the caller draws it from a
    secure random source (``secrets.token_hex``) for each call."""
    if isinstance(message, Start):
        if state is not None:
            return Decision(state, outcome="ignored", note="duplicate StartCheckout")
        return start(message, now=now, policy=policy, nonce=nonce)
    if state is None:
        raise InvalidTransition(f"{type(message).__name__} for a saga that does not exist")
    before = state.status
    if isinstance(message, Reply):
        d = _on_reply(state, message, now=now, policy=policy, nonce=nonce)
    elif isinstance(message, Timeout):
        d = _on_timeout(state, message, now=now, policy=policy, nonce=nonce)
    elif isinstance(message, ForceCompensate):
        d = _on_force_compensate(state, message, now=now, policy=policy, nonce=nonce)
    elif isinstance(message, Expire):
        if state.status.terminal:
            d = Decision(state, outcome="ignored", note=f"already {state.status}")
        elif past_pivot(state) and not state.compensating and state.awaiting is not None:
            # after the point of no return the retriable step is re-sent on its own schedule,
            # and calls a human when those run out: the time-to-live does not cut it short
            d = Decision(
                state, outcome="ignored", note="past the pivot: re-sends go on, not expired"
            )
        else:
            d = _needs_manual(state, message.reason)
    else:
        d = _on_resume(state, now=now, policy=policy, nonce=nonce)
    after = d.state.status if d.state is not None else None
    return replace(d, transition=(before, after))


def _on_reply(
    state: SagaState, reply: Reply, *, now: datetime, policy: Policy, nonce: str
) -> Decision:
    body = reply.body
    kind = type(body)
    awaited = STEPS[state.awaiting] if state.awaiting else None
    name = kind.__name__

    expected = state.token_for(reply.fence)
    if expected is None and reply.token is None and reply.fence < state.untokened_below:
        pass  # dispatched before reply tokens existed (the saga was in flight at the upgrade)
    elif expected is None or reply.token is None or not hmac.compare_digest(expected, reply.token):
        return Decision(
            state,
            outcome="rejected",
            note=f"{name} rejected: its reply token does not match the dispatch of fence "
            f"{reply.fence}",
        )

    if (
        state.status is SagaStatus.FAILED_NEEDS_MANUAL
        and state.stalled is not None
        and reply.fence == state.seq
        and kind in STEPS[state.stalled].success + STEPS[state.stalled].failure
    ):
        # the reply of the step in flight when the saga stopped for a human, just late: apply it
        # as if it had come in time (it closes the manual case if it finishes the saga)
        stalled = STEPS[state.stalled]
        if stalled is RECONCILE and state.unknown_step in RECONCILED:
            # the status query of a payment step: its answer settles that step after all
            asked = state.unknown_step
            state = replace(
                state,
                awaiting=RECONCILE.name,
                reconciling=asked,
                unknown_step=None,
                status=FORWARD_BY_NAME[asked].status,
                stalled=None,
            )
        else:
            resumed = stalled.status if stalled.name in FORWARD_BY_NAME else SagaStatus.COMPENSATING
            unknown = None if stalled.name in FORWARD_BY_NAME else state.unknown_step
            state = replace(
                state, awaiting=stalled.name, status=resumed, stalled=None, unknown_step=unknown
            )
        awaited = STEPS[state.awaiting or stalled.name]

    if awaited is None or reply.fence != state.seq or kind not in awaited.success + awaited.failure:
        # Not for the step we wait on. A late *success* of a forward step that we are undoing, or
        # have undone, left an effect that must be compensated again; never revive the saga.
        late_step = _forward_step_succeeded_by(kind)
        if (
            late_step is not None
            and late_step not in state.completed
            and (state.status is SagaStatus.COMPENSATING or state.status.terminal)
            and state.status is not SagaStatus.COMPLETED
            # only a saga that is undoing its work undoes a late success: one stopped for a
            # human without compensating leaves it to the human (resume asks, or goes on)
            and state.compensating
        ):
            comp = FORWARD_BY_NAME[late_step].compensation
            if comp is not None:
                spec = COMPENSATIONS[comp]
                cmd = Command(
                    message_id=uuid.uuid5(
                        COMMAND_NAMESPACE, f"{state.saga_id}:late:{comp}:{reply.message_id}"
                    ),
                    participant=spec.participant,
                    step=comp,
                    attempt=1,
                    fence=reply.fence,
                    idempotency_key=idempotency_key(state.saga_id, comp),
                    body=spec.build(state.checkout),
                    reply_token=state.token_for(reply.fence) or "",
                )
                return Decision(
                    state,
                    (cmd,),
                    outcome="ignored",
                    note=f"late {name} (fence {reply.fence}) after compensation: sent {comp}",
                )
        why = (
            "saga is not waiting for a reply"
            if awaited is None
            else f"stale fence {reply.fence} (current {state.seq})"
            if reply.fence != state.seq
            else f"unexpected {name} while awaiting {awaited.name}"
        )
        return Decision(state, outcome="ignored", note=f"{name} ignored: {why}")

    if awaited is RECONCILE:
        assert isinstance(body, PaymentStatusReported)
        return _on_reconciled(state, body.status, now=now, policy=policy, nonce=nonce)
    forward = awaited.name in FORWARD_BY_NAME
    if forward and kind in awaited.success:
        state = replace(state, completed=(*state.completed, awaited.name))
        state, cmds = _next_forward(state, now=now, policy=policy, nonce=nonce)
        return Decision(state, cmds, note=f"{awaited.name} succeeded")
    if forward and awaited.kind == "retriable":
        return _needs_manual(
            state,
            f"{awaited.name} failed past the point of no return: {name}" + _reason_suffix(body),
        )
    if forward:
        reason = f"{awaited.name} failed: {name}" + _reason_suffix(body)
        state, cmds = _begin_compensation(
            state, reason, unknown=None, now=now, policy=policy, nonce=nonce
        )
        return Decision(state, cmds, note=reason)
    # a compensation settled
    if kind in awaited.success:
        state = replace(state, compensated=(*state.compensated, awaited.name))
        state, cmds = _next_compensation(state, now=now, policy=policy, nonce=nonce)
        return Decision(state, cmds, note=f"{awaited.name} done")
    reason = f"{awaited.name} failed: {name}" + _reason_suffix(body)
    return _needs_manual(state, reason)


def _on_reconciled(
    state: SagaState, status: str, *, now: datetime, policy: Policy, nonce: str
) -> Decision:
    step = state.reconciling
    assert step is not None
    if status in RECONCILE_NEEDS_HUMAN.get(step, frozenset()):
        return _needs_manual(state, f"{step} outcome unclear: payment reports {status}")
    state = replace(state, reconciling=None)
    if status in RECONCILED[step]:
        state = replace(state, completed=(*state.completed, step))
        state, cmds = _next_forward(state, now=now, policy=policy, nonce=nonce)
        return Decision(state, cmds, note=f"{step} reconciled: payment {status}")
    # Definitely did not happen: compensate what did, nothing unknown is left.
    reason = f"{step} timed out; payment reports {status}"
    state, cmds = _begin_compensation(
        state, reason, unknown=None, now=now, policy=policy, nonce=nonce
    )
    return Decision(state, cmds, note=reason)


def _reason_suffix(body: Message) -> str:
    reason = getattr(body, "reason", None)
    return f" ({reason})" if reason else ""


def _forward_step_succeeded_by(kind: type[Message]) -> str | None:
    for spec in FORWARD:
        if kind in spec.success:
            return spec.name
    return None


def _needs_manual(state: SagaState, reason: str) -> Decision:
    stalled = state.awaiting
    counts = _late_reply_counts(stalled, state.reconciling)
    in_flight = state.reconciling if state.awaiting == RECONCILE.name else state.awaiting
    if in_flight in FORWARD_BY_NAME and state.unknown_step is None:
        # stopped while a forward step was in flight: remember it, its effect may exist
        state = replace(state, unknown_step=in_flight, reconciling=None)
    reason = (
        f"{state.failure_reason}; then {reason}"
        if state.failure_reason and state.failure_reason != reason
        else reason
    )
    state = replace(
        state,
        status=SagaStatus.FAILED_NEEDS_MANUAL,
        awaiting=None,
        deadline=None,
        failure_reason=reason,
        stalled=stalled if counts else None,
    )
    return Decision(state, note=f"needs manual: {reason}")


def _late_reply_counts(step: str | None, reconciling: str | None) -> bool:
    """A reply to this step that arrives after the saga stopped for a human is still applied:
    a compensation (its effect is done either way), the pivot or its status query (whether the
    point of no return was passed: nobody should have to guess), or a step after the pivot (it
    cannot fail). A step before the pivot is not: the saga stays stopped for the human."""
    if step is None:
        return False
    if step == RECONCILE.name:
        return reconciling is not None and reconciling == PIVOT
    return step in COMPENSATIONS or (
        step in FORWARD_BY_NAME and FORWARD_BY_NAME[step].kind in ("pivot", "retriable")
    )


def past_pivot(state: SagaState) -> bool:
    """The point of no return was passed: the saga only moves forward (unless an operator)."""
    return PIVOT is not None and PIVOT in state.completed


def _on_timeout(
    state: SagaState, timeout: Timeout, *, now: datetime, policy: Policy, nonce: str
) -> Decision:
    if state.awaiting is None or timeout.seq != state.seq:
        return Decision(state, outcome="ignored", note=f"stale timeout for fence {timeout.seq}")
    step = state.awaiting
    forward = step in FORWARD_BY_NAME
    query = step == RECONCILE.name
    if forward and FORWARD_BY_NAME[step].kind == "retriable":
        # after the point of no return: late, never failed; re-send, then call a human
        if state.attempt < policy.max_retriable_attempts:
            state, cmd = _dispatch(state, step, now=now, policy=policy, new_seq=False, nonce=nonce)
            return Decision(
                state,
                (cmd,),
                note=f"{step} timed out: re-sent as attempt {state.attempt} (past the pivot)",
            )
        return _needs_manual(
            state,
            f"{step} unanswered after {state.attempt} attempts, past the point of no return: "
            "not compensated",
        )
    limit = policy.max_step_attempts if forward or query else policy.max_compensation_attempts
    if state.attempt < limit:
        # The outcome is unknown, not failed: send the same command again, same key.
        state, cmd = _dispatch(state, step, now=now, policy=policy, new_seq=False, nonce=nonce)
        return Decision(state, (cmd,), note=f"{step} timed out: re-sent as attempt {state.attempt}")
    if forward and step in RECONCILED:
        # Unknown, not failed: ask the payment service what happened before undoing anything.
        note = f"{step} timed out after {state.attempt} attempts: asking payment status"
        state = replace(state, reconciling=step)
        state, cmd = _dispatch(
            state, RECONCILE.name, now=now, policy=policy, new_seq=True, nonce=nonce
        )
        return Decision(state, (cmd,), note=note)
    if step == RECONCILE.name and state.reconciling == PIVOT:
        # whether the point of no return was passed is unknown: neither refund nor go on
        return _needs_manual(
            state,
            f"{PIVOT} outcome unknown: the payment status query went unanswered after "
            f"{state.attempt} attempts; not compensated",
        )
    if forward or step == RECONCILE.name:
        unknown = state.reconciling if step == RECONCILE.name else step
        assert unknown is not None
        reason = (
            f"{unknown} timed out and so did the payment status query"
            if step == RECONCILE.name
            else f"{unknown} timed out after {state.attempt} attempts"
        )
        state = replace(state, reconciling=None)
        state, cmds = _begin_compensation(
            state, reason, unknown=unknown, now=now, policy=policy, nonce=nonce
        )
        return Decision(state, cmds, note=reason)
    return _needs_manual(state, f"{step} timed out after {state.attempt} attempts")


def _on_force_compensate(
    state: SagaState, msg: ForceCompensate, *, now: datetime, policy: Policy, nonce: str
) -> Decision:
    if state.status.terminal:
        return Decision(state, outcome="ignored", note=f"already {state.status}")
    if state.status is SagaStatus.COMPENSATING:
        return Decision(state, outcome="ignored", note="already compensating")
    reason = f"operator: {msg.reason}"
    unknown = state.reconciling if state.awaiting == RECONCILE.name else state.awaiting
    state = replace(state, reconciling=None)
    state, cmds = _begin_compensation(
        state, reason, unknown=unknown, now=now, policy=policy, nonce=nonce
    )
    return Decision(state, cmds, note=reason)


def _on_resume(state: SagaState, *, now: datetime, policy: Policy, nonce: str) -> Decision:
    if (
        state.status is SagaStatus.FAILED_NEEDS_MANUAL
        and past_pivot(state)
        and not (state.compensating)
    ):
        # Stopped after the point of no return: the operator fixed the cause, go on forward
        # (a new dispatch of the same step, with the same idempotency key).
        state = replace(state, stalled=None, unknown_step=None, failure_reason=None)
        state, cmds = _next_forward(state, now=now, policy=policy, nonce=nonce)
        step = cmds[0].step if cmds else "nothing"
        return Decision(state, cmds, note=f"operator resumed past the pivot: sent {step}")
    if (
        state.status is SagaStatus.FAILED_NEEDS_MANUAL
        and not state.compensating
        and state.unknown_step in RECONCILED
    ):
        # Stopped while a payment step's outcome was unknown: ask before undoing anything (it
        # may have captured, and then the saga goes on; if not, it compensates).
        asked = state.unknown_step
        assert asked is not None
        state = replace(
            state,
            reconciling=asked,
            unknown_step=None,
            stalled=None,
            status=FORWARD_BY_NAME[asked].status,
        )
        state, cmd = _dispatch(
            state, RECONCILE.name, now=now, policy=policy, new_seq=True, nonce=nonce
        )
        return Decision(state, (cmd,), note=f"operator resumed: asking payment status for {asked}")
    if state.status is SagaStatus.FAILED_NEEDS_MANUAL:
        # An operator fixed the cause: retry compensating from where it stopped.
        state = replace(state, stalled=None, compensating=True)
        plan = compensation_plan(state.completed, state.unknown_step)
        remaining = tuple(s for s in plan if s not in state.compensated)
        state = replace(state, compensation_plan=remaining)
        state, cmds = _next_compensation(state, now=now, policy=policy, nonce=nonce)
        return Decision(state, cmds, note="operator resumed compensation")
    if state.status.terminal or state.awaiting is None:
        return Decision(state, outcome="ignored", note=f"nothing to resume in {state.status}")
    state, cmd = _dispatch(
        state, state.awaiting, now=now, policy=policy, new_seq=False, nonce=nonce
    )
    return Decision(state, (cmd,), note=f"operator re-sent {state.awaiting}")
