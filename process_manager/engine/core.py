"""The saga engine: one pure function that runs any definition.

Nothing here does I/O, reads a clock, draws random numbers or logs. The caller passes ``now``
and a ``nonce``; command ids are derived from the saga id, the step, the fence and the attempt,
so deciding the same thing twice emits the same ids and participants can deduplicate.

The engine knows steps, kinds (compensatable, pivot, retriable), timeouts, fences and reply
tokens; it never names a business type. A saga's state records the definition (type and
version) it started on, and the shell hands ``decide`` that definition on every message, so a
deploy never changes a saga in flight.

- When a forward step fails (a refusal reply, or every attempt unanswered and no status query
  says it happened), the completed steps are compensated in reverse order. A step whose outcome
  is unknown is compensated too: compensations are idempotent and no-ops when there was nothing
  to undo.
- A refused compensation tries its fallback (the next rung of the ladder), then calls a human.
- A reply that names an alternative path (``branches``) completes its step and takes that path.
- Fencing: every dispatch increments ``seq`` and the command carries it. A reply whose fence or
  type does not match what the saga awaits is recorded as ignored and never applied.
- Reply tokens: every dispatch carries a token derived from the caller's nonce, kept per fence.
  A reply must echo the token of the dispatch its fence names, or it is rejected (a security
  event): the fence orders replies, the token proves they answer a dispatch.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Literal

from process_manager.engine.definition import Definition, Policy, Step
from schemas.base import Message


class Phase(enum.StrEnum):
    """Where a saga is, as the engine sees it (users see the definition's status)."""

    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    FAILED_NEEDS_MANUAL = "FAILED_NEEDS_MANUAL"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Phase.COMPLETED, Phase.COMPENSATED, Phase.FAILED_NEEDS_MANUAL})
#: the status users see in these phases, whatever the definition
COMPENSATING = "COMPENSATING"
COMPENSATED = "COMPENSATED"
NEEDS_MANUAL = "FAILED_NEEDS_MANUAL"


@dataclass(frozen=True)
class SagaState:
    saga_id: uuid.UUID
    #: the definition it runs on, for its whole life
    saga_type: str
    version: int
    #: the message that started it
    start: Message
    #: what users see (from the definition: PENDING_PAYMENT, COMPENSATING, RETURNED ...)
    status: str
    phase: Phase
    #: fencing number: incremented on every new dispatch (not on a re-send of the same step)
    seq: int
    #: forward steps that succeeded, in order
    completed: tuple[str, ...] = ()
    #: the forward steps this saga runs, in order (the main path, or the path it branched to)
    route: tuple[str, ...] = ()
    #: the path it is on: "main", or the alternative path a reply took it to
    path: str = "main"
    #: the step currently awaited (a forward step, a compensation or a query), if any
    awaiting: str | None = None
    attempt: int = 0
    deadline: datetime | None = None
    #: when the awaited step was last sent
    sent_at: datetime | None = None
    #: compensations still to run after the awaited one, in order
    compensation_plan: tuple[str, ...] = ()
    #: compensations that finished (a fallback that settled counts for the rung it replaced)
    compensated: tuple[str, ...] = ()
    #: compensations that were refused and replaced by their fallback (never sent again: the
    #: next rung may already have paid)
    refused: tuple[str, ...] = ()
    failure_reason: str | None = None
    #: a forward step whose outcome was unknown when compensation began (its effect may exist)
    unknown_step: str | None = None
    #: the forward step whose outcome a status query is establishing, while one is awaited
    reconciling: str | None = None
    started_at: datetime | None = None
    #: (fence, reply token) of every dispatch so far
    tokens: tuple[tuple[int, str], ...] = ()
    #: compensation began (on a failure, or because an operator asked)
    compensating: bool = False
    #: the step that was awaited when the saga stopped for a human: its late reply still counts
    stalled: str | None = None
    #: fences below this were dispatched before reply tokens existed: believed without one
    untokened_below: int = 0

    def token_for(self, fence: int) -> str | None:
        for seq, token in self.tokens:
            if seq == fence:
                return token
        return None

    @property
    def ref(self) -> str:
        return f"{self.saga_type}.v{self.version}"

    @property
    def order_id(self) -> str:
        return str(getattr(self.start, "order_id", ""))


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Start:
    command: Message
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
    """An operator asks to re-send the awaited step now (same idempotency key), or to go on
    with a saga stopped for a human."""


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


#: what happened, for metrics, stats and the history (never parsed from the note)
Event = Literal[
    "started",
    "step_succeeded",
    "step_failed",
    "branched",
    "resent",
    "timed_out",
    "reconcile_asked",
    "reconciled",
    "compensation_done",
    "compensation_refused",
    "needs_manual",
    "operator_compensate",
    "operator_resume",
    "ignored",
    "rejected",
    "late_success_undone",
]


@dataclass(frozen=True)
class Decision:
    state: SagaState | None
    commands: tuple[Command, ...] = ()
    #: rejected: a reply that does not carry its dispatch's token (a security event)
    outcome: Literal["applied", "ignored", "rejected"] = "applied"
    #: a short description for the history (why ignored, what happened)
    note: str = ""
    #: for metrics and logs: which status change happened
    transition: tuple[str | None, str | None] = field(default=(None, None))
    #: the structured kind of what happened, and the step it concerns
    event: Event = "ignored"
    step: str | None = None


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


@dataclass(frozen=True)
class _Run:
    """What every helper needs: the definition, the policy, the clock and the nonce."""

    d: Definition
    policy: Policy
    now: datetime
    nonce: str

    def timeout(self, spec: Step, attempt: int) -> timedelta:
        d, p = self.d, self.policy
        if d.compensation(spec.name) is not None:
            return spec.timeout or p.compensation_timeout
        if spec.kind == "retriable" and d.forward(spec.name) is not None:
            return p.retriable_timeout(attempt, spec.timeout)
        return spec.timeout or p.step_timeout

    def attempts(self, spec: Step) -> int:
        if spec.attempts is not None:
            return spec.attempts
        if self.d.compensation(spec.name) is not None:
            return self.policy.max_compensation_attempts
        if spec.kind == "retriable" and self.d.forward(spec.name) is not None:
            return self.policy.max_retriable_attempts
        return self.policy.max_step_attempts


def past_pivot(d: Definition, state: SagaState) -> bool:
    """The point of no return was passed (the pivot succeeded, or a branch was taken): the saga
    only moves forward, unless an operator makes it go back."""
    return state.path != "main" or (d.pivot is not None and d.pivot in state.completed)


def _running(state: SagaState, d: Definition, step: str) -> SagaState:
    spec = d.forward(step)
    assert spec is not None
    return replace(state, phase=Phase.RUNNING, status=spec.status)


def _dispatch(
    run: _Run, state: SagaState, step: str, *, new_seq: bool
) -> tuple[SagaState, Command]:
    d = run.d
    spec = d.step(step)
    seq = state.seq + 1 if new_seq else state.seq
    attempt = 1 if new_seq else state.attempt + 1
    token = state.token_for(seq)
    if token is None:  # a new dispatch (or a re-send of one made before tokens existed)
        token = reply_token(run.nonce, state.saga_id, seq)
        state = replace(state, tokens=(*state.tokens, (seq, token)))
    new_state = replace(
        state,
        seq=seq,
        awaiting=step,
        attempt=attempt,
        deadline=run.now + run.timeout(spec, attempt),
        sent_at=run.now,
    )
    if d.forward(step) is not None:
        new_state = _running(new_state, d, step)
    elif d.compensation(step) is not None:
        new_state = replace(new_state, phase=Phase.COMPENSATING, status=COMPENSATING)
    cmd = Command(
        message_id=command_id(state.saga_id, step, seq, attempt),
        participant=spec.participant,
        step=step,
        attempt=attempt,
        fence=seq,
        idempotency_key=idempotency_key(state.saga_id, step),
        body=spec.build(state.start),
        reply_token=token,
    )
    return new_state, cmd


def compensation_plan(
    d: Definition, completed: tuple[str, ...], unknown: str | None = None
) -> tuple[str, ...]:
    """Compensations for ``completed`` (and a step whose outcome is unknown), newest first,
    leaving out those a completed step supersedes."""
    steps = list(completed)
    if unknown is not None and unknown not in steps:
        steps.append(unknown)
    superseded = {c for name in steps for c in _spec(d, name).supersedes}
    plan: list[str] = []
    for name in reversed(steps):
        comp = _spec(d, name).compensation
        if comp is None or comp in superseded:
            continue
        plan.append(comp)
    return tuple(plan)


def _spec(d: Definition, name: str) -> Step:
    spec = d.forward(name)
    if spec is None:
        raise KeyError(f"{d.ref} has no forward step {name!r}")
    return spec


def _begin_compensation(
    run: _Run, state: SagaState, reason: str, *, unknown: str | None
) -> tuple[SagaState, tuple[Command, ...]]:
    plan = compensation_plan(run.d, state.completed, unknown)
    state = replace(
        state,
        failure_reason=reason,
        compensation_plan=plan,
        compensated=(),
        unknown_step=unknown,
        compensating=True,
        stalled=None,
        reconciling=None,
    )
    return _next_compensation(run, state)


def _next_compensation(run: _Run, state: SagaState) -> tuple[SagaState, tuple[Command, ...]]:
    if not state.compensation_plan:
        return (
            replace(
                state,
                phase=Phase.COMPENSATED,
                status=COMPENSATED,
                awaiting=None,
                deadline=None,
                attempt=0,
            ),
            (),
        )
    step, rest = state.compensation_plan[0], state.compensation_plan[1:]
    state = replace(state, compensation_plan=rest)
    state, cmd = _dispatch(run, state, step, new_seq=True)
    return state, (cmd,)


def _end_status(d: Definition, state: SagaState) -> str:
    return d.completed_status if state.path == "main" else d.path(state.path).end_status


def _next_forward(run: _Run, state: SagaState) -> tuple[SagaState, tuple[Command, ...]]:
    done = len(state.completed)
    if done >= len(state.route):
        return (
            replace(
                state,
                phase=Phase.COMPLETED,
                status=_end_status(run.d, state),
                awaiting=None,
                deadline=None,
                attempt=0,
            ),
            (),
        )
    state, cmd = _dispatch(run, state, state.route[done], new_seq=True)
    return state, (cmd,)


def start(
    d: Definition, message: Start, *, now: datetime, policy: Policy | None = None, nonce: str = ""
) -> Decision:
    run = _Run(d, policy or d.policy, now, nonce)
    if not isinstance(message.command, d.start):
        raise InvalidTransition(
            f"{type(message.command).__name__} does not start a {d.ref} saga ({d.start.__name__})"
        )
    first = d.steps[0]
    state = SagaState(
        saga_id=d.saga_id(message.command),
        saga_type=d.name,
        version=d.version,
        start=message.command,
        status=first.status,
        phase=Phase.RUNNING,
        seq=0,
        route=tuple(s.name for s in d.steps),
        started_at=now,
    )
    state, cmds = _next_forward(run, state)
    return Decision(
        state, cmds, note="started", transition=(None, state.status), event="started"
    )


def decide(
    d: Definition,
    state: SagaState | None,
    message: Input,
    *,
    now: datetime,
    policy: Policy | None = None,
    nonce: str = "",
) -> Decision:
    """Decide what ``message`` does to ``state`` under definition ``d``. Pure: same inputs,
    same decision.

    ``policy`` overrides the definition's (the shell passes the deployment's settings);
    ``nonce`` makes the reply tokens of any new dispatch unguessable: the caller draws it from
    a secure random source (``secrets.token_hex``) for each call."""
    if isinstance(message, Start):
        if state is not None:
            return Decision(state, outcome="ignored", note="duplicate start", event="ignored")
        return start(d, message, now=now, policy=policy, nonce=nonce)
    if state is None:
        raise InvalidTransition(f"{type(message).__name__} for a saga that does not exist")
    if (state.saga_type, state.version) != (d.name, d.version):
        raise InvalidTransition(
            f"saga {state.saga_id} runs on {state.ref}, not {d.ref}: a saga keeps its version"
        )
    run = _Run(d, policy or d.policy, now, nonce)
    before = state.status
    if isinstance(message, Reply):
        dec = _on_reply(run, state, message)
    elif isinstance(message, Timeout):
        dec = _on_timeout(run, state, message)
    elif isinstance(message, ForceCompensate):
        dec = _on_force_compensate(run, state, message)
    elif isinstance(message, Expire):
        if state.phase.terminal:
            dec = Decision(state, outcome="ignored", note=f"already {state.status}")
        elif past_pivot(d, state) and not state.compensating and state.awaiting is not None:
            # after the point of no return the retriable step is re-sent on its own schedule,
            # and calls a human when those run out: the time-to-live does not cut it short
            dec = Decision(
                state, outcome="ignored", note="past the pivot: re-sends go on, not expired"
            )
        else:
            dec = _needs_manual(run, state, message.reason)
    elif isinstance(message, Resume):
        dec = _on_resume(run, state)
    else:
        # never a guess: a look-alike of another module (a ForceCompensate that is not the
        # engine's) must not be taken for a Resume
        raise InvalidTransition(f"{type(message).__name__} is not an input of the engine")
    after = dec.state.status if dec.state is not None else None
    return replace(dec, transition=(before, after))


def _ignored(state: SagaState, note: str) -> Decision:
    return Decision(state, outcome="ignored", note=note, event="ignored")


def _on_reply(run: _Run, state: SagaState, reply: Reply) -> Decision:
    d = run.d
    body = reply.body
    kind = type(body)
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
            event="rejected",
        )

    if (
        state.phase is Phase.FAILED_NEEDS_MANUAL
        and state.stalled is not None
        and reply.fence == state.seq
        and kind in d.step(state.stalled).replies
    ):
        # the reply of the step in flight when the saga stopped for a human, just late: apply it
        # as if it had come in time (it closes the manual case if it finishes the saga)
        stalled = d.step(state.stalled)
        asked = state.unknown_step
        asked_spec = d.forward(asked) if asked else None
        if d.query(stalled.name) is not None and asked_spec is not None and asked_spec.reconcile:
            # the status query of a step: its answer settles that step after all
            state = _running(
                replace(state, awaiting=stalled.name, reconciling=asked, unknown_step=None,
                        stalled=None),
                d,
                asked,  # type: ignore[arg-type]
            )
        elif d.forward(stalled.name) is not None:
            state = _running(
                replace(state, awaiting=stalled.name, stalled=None, unknown_step=None),
                d,
                stalled.name,
            )
        else:
            state = replace(
                state,
                awaiting=stalled.name,
                stalled=None,
                phase=Phase.COMPENSATING,
                status=COMPENSATING,
            )

    awaited = d.step(state.awaiting) if state.awaiting else None
    if awaited is None or reply.fence != state.seq or kind not in awaited.replies:
        return _not_awaited(run, state, reply, awaited)

    if d.query(awaited.name) is not None:
        return _on_reconciled(run, state, awaited.report(body))
    forward = d.forward(awaited.name) is not None
    if forward and kind in awaited.branches:
        target = d.path(awaited.branches[kind])
        completed = (*state.completed, awaited.name)
        state = replace(
            state,
            completed=completed,
            path=target.name,
            route=(*completed, *(s.name for s in target.steps)),
        )
        state, cmds = _next_forward(run, state)
        return Decision(
            state,
            cmds,
            note=f"{awaited.name}: {name}, took path {target.name}",
            event="branched",
            step=awaited.name,
        )
    if forward and kind in awaited.success:
        state = replace(state, completed=(*state.completed, awaited.name))
        state, cmds = _next_forward(run, state)
        return Decision(
            state, cmds, note=f"{awaited.name} succeeded", event="step_succeeded",
            step=awaited.name,
        )
    if forward and awaited.kind == "retriable":
        return _needs_manual(
            run,
            state,
            f"{awaited.name} failed past the point of no return: {name}" + _reason_suffix(body),
        )
    if forward:
        reason = f"{awaited.name} failed: {name}" + _reason_suffix(body)
        state, cmds = _begin_compensation(run, state, reason, unknown=None)
        return Decision(state, cmds, note=reason, event="step_failed", step=awaited.name)
    # a compensation settled
    if kind in awaited.success:
        state = replace(state, compensated=(*state.compensated, *_rungs(d, awaited.name, state)))
        state, cmds = _next_compensation(run, state)
        return Decision(
            state, cmds, note=f"{awaited.name} done", event="compensation_done",
            step=awaited.name,
        )
    reason = f"{awaited.name} failed: {name}" + _reason_suffix(body)
    if awaited.fallback is not None:
        # the next rung of the ladder, before anyone is paged
        fallback = awaited.fallback
        state = replace(
            state,
            compensation_plan=(fallback, *state.compensation_plan),
            refused=(*state.refused, awaited.name),
        )
        state, cmds = _next_compensation(run, state)
        return Decision(
            state,
            cmds,
            note=f"{reason}: trying {fallback}",
            event="compensation_refused",
            step=awaited.name,
        )
    return _needs_manual(run, state, reason)


def _lowest_rung(d: Definition, name: str, refused: tuple[str, ...]) -> str:
    """The rung of ``name``'s ladder to try: below every rung already refused."""
    while name in refused:
        nxt = d.step(name).fallback
        if nxt is None:
            return name
        name = nxt
    return name


def _rungs(d: Definition, name: str, state: SagaState) -> tuple[str, ...]:
    """``name`` settled: it, and the rungs above it that were refused on the way to it."""
    above = [c.name for c in d.compensations if c.fallback == name]
    out: tuple[str, ...] = (name,)
    while above:
        rung = above[0]
        if rung in state.compensated:
            break
        out = (rung, *out)
        above = [c.name for c in d.compensations if c.fallback == rung]
    return out


def _not_awaited(
    run: _Run, state: SagaState, reply: Reply, awaited: Step | None
) -> Decision:
    """Not for the step we wait on. A late *success* of a forward step that we are undoing, or
    have undone, left an effect that must be compensated again; never revive the saga."""
    d = run.d
    kind = type(reply.body)
    name = kind.__name__
    late_step = _forward_step_succeeded_by(d, kind)
    if (
        late_step is not None
        and late_step not in state.completed
        and state.phase in (Phase.COMPENSATING, Phase.COMPENSATED, Phase.FAILED_NEEDS_MANUAL)
        # only a saga that is undoing its work undoes a late success: one stopped for a
        # human without compensating leaves it to the human (resume asks, or goes on)
        and state.compensating
    ):
        comp = _spec(d, late_step).compensation
        if comp is not None:
            spec = d.step(comp)
            cmd = Command(
                message_id=uuid.uuid5(
                    COMMAND_NAMESPACE, f"{state.saga_id}:late:{comp}:{reply.message_id}"
                ),
                participant=spec.participant,
                step=comp,
                attempt=1,
                fence=reply.fence,
                idempotency_key=idempotency_key(state.saga_id, comp),
                body=spec.build(state.start),
                reply_token=state.token_for(reply.fence) or "",
            )
            return Decision(
                state,
                (cmd,),
                outcome="ignored",
                note=f"late {name} (fence {reply.fence}) after compensation: sent {comp}",
                event="late_success_undone",
                step=late_step,
            )
    why = (
        "saga is not waiting for a reply"
        if awaited is None
        else f"stale fence {reply.fence} (current {state.seq})"
        if reply.fence != state.seq
        else f"unexpected {name} while awaiting {awaited.name}"
    )
    return _ignored(state, f"{name} ignored: {why}")


def _on_reconciled(run: _Run, state: SagaState, status: str) -> Decision:
    step = state.reconciling
    assert step is not None
    spec = _spec(run.d, step)
    assert spec.reconcile is not None
    if status in spec.reconcile.needs_human:
        dec = _needs_manual(run, state, f"{step} outcome unclear: {spec.participant} reports "
                            f"{status}")
        # the query was answered, not left in flight: another answer to it (a re-send's, with
        # older news) must not close the human's case; Resume asks again
        assert dec.state is not None
        return replace(dec, state=replace(dec.state, stalled=None))
    state = replace(state, reconciling=None)
    if status in spec.reconcile.happened:
        state = replace(state, completed=(*state.completed, step))
        state, cmds = _next_forward(run, state)
        return Decision(
            state, cmds, note=f"{step} reconciled: {spec.participant} {status}",
            event="reconciled", step=step,
        )
    # Definitely did not happen: compensate what did, nothing unknown is left.
    reason = f"{step} timed out; {spec.participant} reports {status}"
    state, cmds = _begin_compensation(run, state, reason, unknown=None)
    return Decision(state, cmds, note=reason, event="reconciled", step=step)


def _reason_suffix(body: Message) -> str:
    reason = getattr(body, "reason", None)
    return f" ({reason})" if reason else ""


def _forward_step_succeeded_by(d: Definition, kind: type[Message]) -> str | None:
    for spec in d.forward_steps:
        if kind in spec.success or kind in spec.branches:
            return spec.name
    return None


def _needs_manual(run: _Run, state: SagaState, reason: str) -> Decision:
    d = run.d
    stalled = state.awaiting
    counts = _late_reply_counts(d, stalled, state.reconciling)
    in_flight = state.reconciling if stalled and d.query(stalled) else stalled
    if in_flight is not None and d.forward(in_flight) and state.unknown_step is None:
        # stopped while a forward step was in flight: remember it, its effect may exist
        state = replace(state, unknown_step=in_flight, reconciling=None)
    reason = (
        f"{state.failure_reason}; then {reason}"
        if state.failure_reason and state.failure_reason != reason
        else reason
    )
    state = replace(
        state,
        phase=Phase.FAILED_NEEDS_MANUAL,
        status=NEEDS_MANUAL,
        awaiting=None,
        deadline=None,
        failure_reason=reason,
        stalled=stalled if counts else None,
    )
    return Decision(state, note=f"needs manual: {reason}", event="needs_manual", step=stalled)


def _late_reply_counts(d: Definition, step: str | None, reconciling: str | None) -> bool:
    """A reply to this step that arrives after the saga stopped for a human is still applied:
    a compensation (its effect is done either way), the pivot or its status query (whether the
    point of no return was passed: nobody should have to guess), or a step after the pivot (it
    cannot fail). A step before the pivot is not: the saga stays stopped for the human."""
    if step is None:
        return False
    if d.query(step) is not None:
        return reconciling is not None and reconciling == d.pivot
    if d.compensation(step) is not None:
        return True
    spec = d.forward(step)
    return spec is not None and spec.kind in ("pivot", "retriable")


def _on_timeout(run: _Run, state: SagaState, timeout: Timeout) -> Decision:
    d = run.d
    if state.awaiting is None or timeout.seq != state.seq:
        return _ignored(state, f"stale timeout for fence {timeout.seq}")
    step = state.awaiting
    spec = d.step(step)
    forward = d.forward(step) is not None
    query = d.query(step) is not None
    limit = run.attempts(spec)
    if forward and spec.kind == "retriable":
        # after the point of no return: late, never failed; re-send, then call a human
        if state.attempt < limit:
            state, cmd = _dispatch(run, state, step, new_seq=False)
            return Decision(
                state,
                (cmd,),
                note=f"{step} timed out: re-sent as attempt {state.attempt} (past the pivot)",
                event="resent",
                step=step,
            )
        return _timed_out(
            _needs_manual(
                run,
                state,
                f"{step} unanswered after {state.attempt} attempts, past the point of no "
                "return: not compensated",
            )
        )
    if state.attempt < limit:
        # The outcome is unknown, not failed: send the same command again, same key.
        state, cmd = _dispatch(run, state, step, new_seq=False)
        return Decision(
            state,
            (cmd,),
            note=f"{step} timed out: re-sent as attempt {state.attempt}",
            event="resent",
            step=step,
        )
    if forward and spec.reconcile is not None:
        # Unknown, not failed: ask the participant what happened before undoing anything.
        note = (
            f"{step} timed out after {state.attempt} attempts: asking {spec.participant} status"
        )
        state = replace(state, reconciling=step)
        state, cmd = _dispatch(run, state, spec.reconcile.query, new_seq=True)
        return Decision(state, (cmd,), note=note, event="reconcile_asked", step=step)
    if query and state.reconciling is not None and state.reconciling == d.pivot:
        # whether the point of no return was passed is unknown: neither undo nor go on
        return _timed_out(
            _needs_manual(
                run,
                state,
                f"{d.pivot} outcome unknown: the status query went unanswered after "
                f"{state.attempt} attempts; not compensated",
            )
        )
    if forward or query:
        unknown = state.reconciling if query else step
        assert unknown is not None
        reason = (
            f"{unknown} timed out and so did the status query"
            if query
            else f"{unknown} timed out after {state.attempt} attempts"
        )
        state = replace(state, reconciling=None)
        state, cmds = _begin_compensation(run, state, reason, unknown=unknown)
        return Decision(state, cmds, note=reason, event="timed_out", step=step)
    return _timed_out(
        _needs_manual(run, state, f"{step} timed out after {state.attempt} attempts")
    )


def _timed_out(dec: Decision) -> Decision:
    """A decision made because a step's time ran out (for metrics: a timeout, not a failure)."""
    return replace(dec, event="timed_out")


def _on_force_compensate(run: _Run, state: SagaState, msg: ForceCompensate) -> Decision:
    if state.phase.terminal:
        return _ignored(state, f"already {state.status}")
    if state.phase is Phase.COMPENSATING:
        return _ignored(state, "already compensating")
    reason = f"operator: {msg.reason}"
    awaiting = state.awaiting
    unknown = state.reconciling if awaiting and run.d.query(awaiting) else awaiting
    state = replace(state, reconciling=None)
    state, cmds = _begin_compensation(run, state, reason, unknown=unknown)
    return Decision(state, cmds, note=reason, event="operator_compensate")


def _on_resume(run: _Run, state: SagaState) -> Decision:
    d = run.d
    if state.phase is Phase.FAILED_NEEDS_MANUAL and past_pivot(d, state) and not state.compensating:
        # Stopped after the point of no return: the operator fixed the cause, go on forward
        # (a new dispatch of the same step, with the same idempotency key).
        state = replace(state, stalled=None, unknown_step=None, failure_reason=None)
        state, cmds = _next_forward(run, state)
        step = cmds[0].step if cmds else "nothing"
        return Decision(
            state, cmds, note=f"operator resumed past the pivot: sent {step}",
            event="operator_resume",
        )
    unknown = d.forward(state.unknown_step) if state.unknown_step else None
    if (
        state.phase is Phase.FAILED_NEEDS_MANUAL
        and not state.compensating
        and unknown is not None
        and unknown.reconcile is not None
    ):
        # Stopped while a step's outcome was unknown: ask before undoing anything (it may have
        # happened, and then the saga goes on; if not, it compensates).
        asked = unknown.name
        state = _running(
            replace(state, reconciling=asked, unknown_step=None, stalled=None), d, asked
        )
        state, cmd = _dispatch(run, state, unknown.reconcile.query, new_seq=True)
        return Decision(
            state,
            (cmd,),
            note=f"operator resumed: asking {unknown.participant} status for {asked}",
            event="operator_resume",
        )
    if state.phase is Phase.FAILED_NEEDS_MANUAL:
        # An operator fixed the cause: retry compensating from where it stopped.
        state = replace(state, stalled=None, compensating=True)
        plan = compensation_plan(d, state.completed, state.unknown_step)
        remaining = tuple(
            _lowest_rung(d, s, state.refused) for s in plan if s not in state.compensated
        )
        state = replace(state, compensation_plan=remaining)
        state, cmds = _next_compensation(run, state)
        return Decision(
            state, cmds, note="operator resumed compensation", event="operator_resume"
        )
    if state.phase.terminal or state.awaiting is None:
        return _ignored(state, f"nothing to resume in {state.status}")
    state, cmd = _dispatch(run, state, state.awaiting, new_seq=False)
    return Decision(
        state, (cmd,), note=f"operator re-sent {state.awaiting}", event="operator_resume"
    )
