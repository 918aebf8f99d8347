"""An exhaustive check of a saga definition: every interleaving, up to a bound.

The engine is pure, so a definition can be explored the way a TLA+ model checker explores a
spec: breadth first from the start, every input the world can deliver, each saga state
explored once. From every state the check delivers

- the right reply at the current fence, each reply type the awaited step accepts (success,
  failure, branch; a status query's reply once for every status it can report);
- every reply of the step dispatched at each earlier fence, with that fence's real token (a
  late reply after its timeout, or a duplicate of one already delivered: reply message ids are
  derived from fence and body, so a duplicate is the same message again);
- the awaited step's replies with an earlier fence and that fence's real token (stale fence);
- ``Timeout`` of the current fence and of the previous one, ``ForceCompensate``, ``Resume``
  and ``Expire``;
- and, never explored further, the right reply without its token, with a made-up token, and
  with another dispatch's token (forged).

and checks on every transition and every state:

``absorbing``
    COMPLETED and COMPENSATED never change. FAILED_NEEDS_MANUAL changes only by an operator's
    Resume, or by the late reply of the step that was in flight when it stopped (``stalled``:
    the engine applies it as if it had come in time), never by another answer to a status query
    whose answer stopped it. Timeouts, Expire and ForceCompensate never change a terminal
    saga.
``compensation``
    A saga that ends COMPENSATED compensated exactly its completed steps (and the step whose
    outcome was unknown), newest first, leaving out compensations a completed step supersedes;
    a rung may be followed by the fallbacks that replaced it when it was refused.
``pivot``
    No compensation is sent for a saga past its pivot (the pivot completed, or a branch was
    taken) unless an operator's ForceCompensate is in its history.
``stable_ids``
    Deciding the same input on the same state again, at another time, gives the same commands
    (same message ids, bodies, tokens) and the same state up to the clock.
``time``
    From every state, time alone (Timeout of the current fence, again and again) reaches
    COMPLETED, COMPENSATED or FAILED_NEEDS_MANUAL within a bound derived from the definition.
``own_commands``
    Every command names a step of this definition, its participant and its body type, and
    carries the state's fence (a late success's undo carries the late reply's fence instead)
    and that fence's token.
``token``
    A reply without the right token changes nothing, sends nothing, and is rejected.

Each violation comes with the shortest input trace that reaches it (breadth first). Nothing
here reads a clock or does I/O: ``clock`` is handed in by the caller that wants timings
(``python -m process_manager.engine.check``).
"""

from __future__ import annotations

import enum
import types
import typing
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, TypeAdapter, ValidationError

from process_manager.engine import core
from process_manager.engine.core import (
    TERMINAL,
    Decision,
    Expire,
    ForceCompensate,
    Input,
    Phase,
    Reply,
    Resume,
    SagaState,
    Start,
    Timeout,
)
from process_manager.engine.definition import Definition, Policy, Step
from schemas.base import Message

#: small bounds keep the state space finite and small; every kind of bound is still reached
CHECK_POLICY = Policy(max_step_attempts=2, max_compensation_attempts=2, max_retriable_attempts=2)
#: the clock of the exploration (decide never compares it, so one instant is enough)
NOW = datetime(2030, 1, 1, tzinfo=UTC)
#: the other instant, at which every decision is made again (stable_ids)
LATER = NOW + timedelta(hours=1)
NONCE = "exhaustive-check"
#: every reply's message id is derived from what it is, so a duplicate is the same message
REPLY_NAMESPACE = uuid.UUID("0d9b2c64-55a1-4c4e-8f0a-6f1e2b7c3d21")
FORGED_TOKEN = "0" * 32

PROPERTIES = ("absorbing", "compensation", "pivot", "stable_ids", "time", "own_commands", "token")


class Decide(Protocol):
    def __call__(
        self,
        d: Definition,
        state: SagaState | None,
        message: Input,
        *,
        now: datetime,
        policy: Policy | None = None,
        nonce: str = "",
    ) -> Decision: ...


@dataclass(frozen=True)
class Bounds:
    #: inputs from the start; states deeper than this are not explored
    max_depth: int = 40
    #: distinct states per definition
    max_states: int = 200_000
    #: operator inputs (ForceCompensate, Resume, Expire) per trace: an operator can resume a
    #: saga for ever, each time with a new fence, so without this bound there is no end
    max_operator: int = 2


@dataclass(frozen=True)
class Violation:
    prop: str
    message: str
    #: the shortest input trace that shows it, from the start
    trace: tuple[str, ...]

    def __str__(self) -> str:
        steps = "\n".join(f"  {i:>2}. {t}" for i, t in enumerate(self.trace))
        return f"[{self.prop}] {self.message}\n{steps}"


@dataclass(frozen=True)
class Report:
    ref: str
    states: int
    transitions: int
    max_depth: int
    seconds: float
    #: why the exploration stopped short (None: every reachable state was explored)
    bound_reached: str | None
    #: the first (shortest) violation of each property
    violations: tuple[Violation, ...]
    #: how many transitions or states violated each property
    counts: Mapping[str, int] = field(default_factory=dict)
    #: coverage: "<outcome>:<event>" -> transitions, and phase -> states
    events: Mapping[str, int] = field(default_factory=dict)
    phases: Mapping[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        bound = f", bound reached: {self.bound_reached}" if self.bound_reached else ""
        found = (
            ", no violations"
            if self.ok
            else ", violations: " + ", ".join(f"{p}={n}" for p, n in sorted(self.counts.items()))
        )
        return (
            f"exhaustive check: {self.ref} {self.states} states, {self.transitions} "
            f"transitions, max depth {self.max_depth}, {self.seconds:.2f} s{bound}{found}"
        )


# ---------------------------------------------------------------------------------------------
# Sample bodies, built from the pydantic models


_STRINGS = ("x1", "EUR", "NL", "sample")
_INTS = (1, 0, 100)


def _candidates(annotation: Any) -> Iterator[Any]:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        yield from _candidates(args[0])
    elif origin is Literal:
        yield from args
    elif origin in (typing.Union, types.UnionType):
        for a in args:
            if a is type(None):
                yield None
            else:
                yield from _candidates(a)
    elif origin in (tuple, list, frozenset, set):
        inner = args[0] if args else str
        for one in _candidates(inner):
            yield origin((one,)) if origin is not list else [one]
            break
        yield origin() if origin is not list else []
    elif origin is dict or annotation is dict:
        yield {}
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield build_sample(annotation)
    elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        yield from annotation
    elif annotation is bool:
        yield False
    elif annotation is int:
        yield from _INTS
    elif annotation is float:
        yield 1.0
    elif annotation is str:
        yield from _STRINGS
    else:
        yield None


def _field_value(model: type[BaseModel], name: str, like: BaseModel | None) -> Any:
    info = model.model_fields[name]
    ann: Any = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
    adapter: TypeAdapter[Any] = TypeAdapter(ann)
    tries: list[Any] = []
    if like is not None and name in type(like).model_fields:
        tries.append(getattr(like, name))
    if not info.is_required():
        tries.append(info.get_default(call_default_factory=True))
    tries.extend(_candidates(info.annotation))
    for value in tries:
        try:
            return adapter.validate_python(value, strict=False)
        except ValidationError:
            continue
    return tries[0] if tries else None


def build_sample(model: type[BaseModel], like: BaseModel | None = None) -> Any:
    """One instance of ``model``: fields ``like`` also has are copied from it (the saga's start
    message, so a reply names the saga's order), the rest are defaults or the first simple value
    the field's own validation accepts. Falls back to an unvalidated instance."""
    values = {n: _field_value(model, n, like) for n in model.model_fields}
    try:
        return model.model_validate(values)
    except ValidationError:
        return model.model_construct(**values)


def _literal_fields(model: type[BaseModel]) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if typing.get_origin(ann) is Literal and len(typing.get_args(ann)) > 1:
            out[name] = typing.get_args(ann)
    return out


class Samples:
    """Sample reply bodies per reply type: one, or (for a status query's reply) one for every
    value of each of its ``Literal`` fields, since the status it reports decides what happens.
    ``table`` overrides the generic builder for the types it names."""

    def __init__(
        self,
        d: Definition,
        start: Message,
        table: Mapping[type[Message], Sequence[Message]] | None = None,
    ) -> None:
        self._d = d
        self._start = start
        self._table = dict(table or {})
        self._cache: dict[str, tuple[Reply, ...]] = {}
        self._bodies: dict[tuple[type[Message], bool], tuple[Message, ...]] = {}

    def bodies(self, kind: type[Message], vary: bool) -> tuple[Message, ...]:
        key = (kind, vary)
        if key not in self._bodies:
            if kind in self._table:
                found = tuple(self._table[kind])
            else:
                base = build_sample(kind, self._start)
                found = (base,)
                if vary:
                    found = (
                        tuple(
                            base.model_copy(update={name: v})
                            for name, values in _literal_fields(kind).items()
                            for v in values
                        )
                        or found
                    )
            self._bodies[key] = found
        return self._bodies[key]

    def for_step(self, step: Step) -> tuple[Message, ...]:
        vary = self._d.query(step.name) is not None
        return tuple(b for kind in step.replies for b in self.bodies(kind, vary))


def _body_label(body: Message) -> str:
    name = type(body).__name__
    status = getattr(body, "status", None)
    return f"{name}[{status}]" if isinstance(status, str) else name


def _reply(body: Message, fence: int, token: str | None) -> Reply:
    """The reply ``body`` at ``fence``; its message id is derived from what it is, so a
    duplicate is the same message again."""
    mid = uuid.uuid5(REPLY_NAMESPACE, f"{fence}:{body.TYPE}:{body.model_dump_json()}")
    return Reply(body=body, fence=fence, message_id=mid, token=token)


# ---------------------------------------------------------------------------------------------
# The exploration


@dataclass(frozen=True)
class _Node:
    state: SagaState
    #: the step each fence dispatched (index fence - 1)
    sent: tuple[str, ...]
    #: an operator's ForceCompensate was applied on the way here
    forced: bool
    #: operator inputs (ForceCompensate, Resume, Expire) on the way here
    operator: int
    #: it stopped for a human because a status query's answer said so (not because it went
    #: unanswered): no other answer to that query is "late"
    answered: bool
    #: replies delivered on the way here (for the trace's labels only)
    delivered: frozenset[Reply]
    depth: int
    parent: int
    label: str


#: the state without the clock (and without the free-text failure reason, which no decision
#: reads): two states equal in these fields behave alike
_BEHAVIOUR = tuple(
    f.name
    for f in fields(SagaState)
    if f.name not in {"deadline", "sent_at", "started_at", "failure_reason"}
)


def _canonical(state: SagaState) -> tuple[Any, ...]:
    return tuple(getattr(state, name) for name in _BEHAVIOUR)


def _key(node: _Node) -> tuple[Any, ...]:
    return (_canonical(node.state), node.sent, node.forced, node.operator, node.answered)


def _past_pivot(d: Definition, state: SagaState) -> bool:
    return state.path != "main" or (d.pivot is not None and d.pivot in state.completed)


def _attempts(d: Definition, p: Policy, spec: Step) -> int:
    if spec.attempts is not None:
        return spec.attempts
    if d.compensation(spec.name) is not None:
        return p.max_compensation_attempts
    if spec.kind == "retriable" and d.forward(spec.name) is not None:
        return p.max_retriable_attempts
    return p.max_step_attempts


def time_bound(d: Definition, p: Policy) -> int:
    """More timeouts than any run of time alone can take: every forward step's sends and its
    status query's, every compensation's sends, plus one."""
    total = 1
    for s in d.forward_steps:
        total += _attempts(d, p, s)
        if s.reconcile is not None:
            total += _attempts(d, p, d.step(s.reconcile.query))
    for c in d.compensations:
        total += _attempts(d, p, c)
    return total


def expected_compensation(d: Definition, state: SagaState) -> tuple[str, ...]:
    """What a saga that compensated should have compensated, derived from the definition (not
    from the engine): its completed steps and its unknown one, newest first, each's
    compensation unless a completed step supersedes it."""
    steps = list(state.completed)
    if state.unknown_step is not None and state.unknown_step not in steps:
        steps.append(state.unknown_step)
    specs = [d.forward(n) for n in steps]
    superseded = {c for s in specs if s is not None for c in s.supersedes}
    out: list[str] = []
    for s in reversed(specs):
        if s is not None and s.compensation is not None and s.compensation not in superseded:
            out.append(s.compensation)
    return tuple(out)


def _ladder(d: Definition, name: str) -> list[str]:
    out = [name]
    spec = d.compensation(name)
    while spec is not None and spec.fallback is not None and spec.fallback not in out:
        out.append(spec.fallback)
        spec = d.compensation(spec.fallback)
    return out


def compensation_matches(d: Definition, expected: Sequence[str], actual: Sequence[str]) -> bool:
    """``actual`` is ``expected`` in order, each rung possibly followed by the fallbacks that
    replaced it (a refused refund, then the credit note that settled)."""
    i = 0
    for j, comp in enumerate(expected):
        if i >= len(actual) or actual[i] != comp:
            return False
        i += 1
        nxt = expected[j + 1] if j + 1 < len(expected) else None
        for rung in _ladder(d, comp)[1:]:
            if i < len(actual) and actual[i] == rung and rung != nxt:
                i += 1
            else:
                break
    return i == len(actual)


class _Checker:
    def __init__(
        self,
        d: Definition,
        policy: Policy,
        bounds: Bounds,
        decide: Decide,
        start: Message | None,
        samples: Mapping[type[Message], Sequence[Message]] | None,
    ) -> None:
        self.d = d
        self.policy = policy
        self.bounds = bounds
        self.decide = decide
        self.start = start if start is not None else build_sample(d.start)
        self.samples = Samples(d, self.start, samples)
        self.nodes: list[_Node] = []
        self.index: dict[tuple[Any, ...], int] = {}
        self.violations: dict[str, Violation] = {}
        self.counts: dict[str, int] = {}
        self.transitions = 0
        self.bound: str | None = None
        self.time_limit = time_bound(d, policy)
        self.time_memo: dict[tuple[Any, ...], int] = {}
        self.own_steps = {s.name: s for s in (*d.forward_steps, *d.compensations, *d.queries)}
        self._body_types: dict[str, type[Message]] = {}
        #: (sample index, fence, token) -> the reply (the samples live as long as the checker)
        self._replies: dict[tuple[int, int, str | None], Reply] = {}
        self.events: dict[str, int] = {}
        self.phases: dict[str, int] = {}

    def reply(self, body: Message, fence: int, token: str | None) -> Reply:
        key = (id(body), fence, token)
        found = self._replies.get(key)
        if found is None:
            found = self._replies[key] = _reply(body, fence, token)
        return found

    # -- traces and violations -------------------------------------------------------------

    def trace(self, at: int, *more: str) -> tuple[str, ...]:
        labels: list[str] = []
        while at >= 0:
            labels.append(self.nodes[at].label)
            at = self.nodes[at].parent
        return (*reversed(labels), *more)

    def violate(self, prop: str, message: str, at: int, *more: str) -> None:
        self.counts[prop] = self.counts.get(prop, 0) + 1
        if prop not in self.violations:
            self.violations[prop] = Violation(prop, message, self.trace(at, *more))

    # -- inputs ----------------------------------------------------------------------------

    def inputs(self, node: _Node) -> list[tuple[str, Input, bool]]:
        """(label, input, forged) for every input the world can deliver in ``node``."""
        d, s = self.d, node.state
        out: list[tuple[str, Input, bool]] = []
        seen: set[Input] = set()

        def add(label: str, message: Input, forged: bool = False) -> None:
            if message not in seen:
                seen.add(message)
                out.append((label, message, forged))

        def reply(kind: str, body: Message, fence: int) -> None:
            r = self.reply(body, fence, s.token_for(fence))
            if r in node.delivered:
                kind = "duplicate"
            add(f"{kind} {_body_label(body)} @{fence}", r)

        awaited = d.step(s.awaiting) if s.awaiting is not None else None
        if awaited is not None:
            for body in self.samples.for_step(awaited):
                reply("reply", body, s.seq)
        for fence in range(min(s.seq, len(node.sent)), 0, -1):
            step = d.step(node.sent[fence - 1])
            for body in self.samples.for_step(step):
                reply("late" if fence < s.seq else "reply", body, fence)
        if awaited is not None:
            for fence in range(s.seq - 1, 0, -1):
                for body in self.samples.for_step(awaited):
                    reply("stale", body, fence)
        add(f"Timeout @{s.seq}", Timeout(s.seq))
        if s.seq > 1:
            add(f"Timeout @{s.seq - 1} (stale)", Timeout(s.seq - 1))
        if node.operator < self.bounds.max_operator:
            add("ForceCompensate", ForceCompensate("exhaustive check"))
            add("Resume", Resume())
            add("Expire", Expire("exhaustive check"))
        # forged: the replies of the current fence's step without the token of their dispatch
        current = awaited
        if current is None and 1 <= s.seq <= len(node.sent):
            current = d.step(node.sent[s.seq - 1])
        if current is not None:
            other = s.token_for(s.seq - 1) if s.seq > 1 else None
            for body in self.samples.for_step(current):
                name = _body_label(body)
                add(f"forged {name} @{s.seq} (no token)", self.reply(body, s.seq, None), True)
                add(
                    f"forged {name} @{s.seq} (made-up token)",
                    self.reply(body, s.seq, FORGED_TOKEN),
                    True,
                )
                if other is not None:
                    add(
                        f"forged {name} @{s.seq} (token of fence {s.seq - 1})",
                        self.reply(body, s.seq, other),
                        True,
                    )
        return out

    # -- one transition --------------------------------------------------------------------

    def advance(
        self, node: _Node, at: int, label: str, message: Input, dec: Decision, forced_now: bool
    ) -> _Node:
        assert dec.state is not None
        sent = list(node.sent)
        for cmd in dec.commands:
            if cmd.fence == len(sent) + 1:
                sent.append(cmd.step)
        delivered = node.delivered | {message} if isinstance(message, Reply) else node.delivered
        before, after = node.state, dec.state
        if after.phase is not Phase.FAILED_NEEDS_MANUAL:
            answered = False
        elif before.phase is Phase.FAILED_NEEDS_MANUAL:
            answered = node.answered
        else:
            answered = (
                isinstance(message, Reply)
                and before.awaiting is not None
                and self.d.query(before.awaiting) is not None
                and message.fence == before.seq
            )
        return _Node(
            state=dec.state,
            sent=tuple(sent),
            forced=node.forced or forced_now,
            operator=node.operator + isinstance(message, ForceCompensate | Resume | Expire),
            answered=answered,
            delivered=delivered,
            depth=node.depth + 1,
            parent=at,
            label=label,
        )

    def body_type(self, step: Step) -> type[Message]:
        if step.name not in self._body_types:
            self._body_types[step.name] = type(step.build(self.start))
        return self._body_types[step.name]

    def check_commands(
        self, at: int, label: str, before: SagaState, message: Input, dec: Decision, forced: bool
    ) -> None:
        d = self.d
        after = dec.state
        assert after is not None
        late_undo = dec.event == "late_success_undone" and isinstance(message, Reply)
        for cmd in dec.commands:
            spec = self.own_steps.get(cmd.step)
            if spec is None or spec is not d.step(cmd.step):
                self.violate(
                    "own_commands",
                    f"command for step {cmd.step!r}, which {d.ref} does not have",
                    at,
                    label,
                )
                continue
            if cmd.participant != spec.participant or type(cmd.body) is not self.body_type(spec):
                self.violate(
                    "own_commands",
                    f"command {cmd.step} to {cmd.participant} with "
                    f"{type(cmd.body).__name__}: {d.ref} sends "
                    f"{self.body_type(spec).__name__} to {spec.participant}",
                    at,
                    label,
                )
            fence = message.fence if late_undo and isinstance(message, Reply) else after.seq
            if cmd.fence != fence:
                self.violate(
                    "own_commands",
                    f"command {cmd.step} carries fence {cmd.fence}, the state's is {after.seq}",
                    at,
                    label,
                )
            elif cmd.reply_token != after.token_for(cmd.fence):
                self.violate(
                    "own_commands",
                    f"command {cmd.step} carries a token that is not fence {cmd.fence}'s",
                    at,
                    label,
                )
            if (
                d.compensation(cmd.step) is not None
                and (_past_pivot(d, before) or _past_pivot(d, after))
                and not forced
            ):
                self.violate(
                    "pivot",
                    f"compensation {cmd.step} sent past the pivot, and no operator asked for it",
                    at,
                    label,
                )

    def check_transition(
        self,
        at: int,
        label: str,
        node: _Node,
        message: Input,
        dec: Decision,
        again: Decision,
        forged: bool,
    ) -> None:
        d, before, after = self.d, node.state, dec.state
        assert after is not None and again.state is not None
        if (
            again.commands != dec.commands
            or _canonical(again.state) != _canonical(after)
            or again.outcome != dec.outcome
        ):
            self.violate(
                "stable_ids",
                "deciding the same input on the same state again gave "
                "other commands or another state: "
                f"{[c.message_id for c in dec.commands]} then "
                f"{[c.message_id for c in again.commands]}",
                at,
                label,
            )
        if forged:
            if after != before or dec.commands or dec.outcome != "rejected":
                self.violate(
                    "token",
                    f"a reply without its dispatch's token was "
                    f"{dec.outcome} ({dec.note}), sent {len(dec.commands)} command(s) "
                    f"and {'changed' if after != before else 'kept'} the state",
                    at,
                    label,
                )
            return
        if before.phase in (Phase.COMPLETED, Phase.COMPENSATED) and after != before:
            self.violate(
                "absorbing",
                f"a {before.phase} saga changed ({before.status} -> {after.status}) on {label}",
                at,
                label,
            )
        elif before.phase is Phase.FAILED_NEEDS_MANUAL and after != before:
            stalled_reply = (
                isinstance(message, Reply)
                and before.stalled is not None
                and message.fence == before.seq
                and type(message.body) in d.step(before.stalled).replies
            )
            if stalled_reply and node.answered:
                self.violate(
                    "absorbing",
                    f"a FAILED_NEEDS_MANUAL saga that a status query's answer stopped changed "
                    f"({before.status} -> {after.status}) on another answer to that query "
                    f"({label})",
                    at,
                    label,
                )
            elif not (isinstance(message, Resume) or stalled_reply):
                self.violate(
                    "absorbing",
                    f"a FAILED_NEEDS_MANUAL saga changed ({before.status} "
                    f"-> {after.status}) on {label}, neither an operator's Resume nor "
                    "the stalled step's late reply",
                    at,
                    label,
                )
        forced = node.forced or (isinstance(message, ForceCompensate) and dec.outcome == "applied")
        self.check_commands(at, label, before, message, dec, forced)

    def check_state(self, at: int) -> None:
        d, node = self.d, self.nodes[at]
        s = node.state
        if s.phase is Phase.COMPENSATED:
            want = expected_compensation(d, s)
            if not compensation_matches(d, want, s.compensated):
                self.violate(
                    "compensation",
                    f"compensated {list(s.compensated)}, expected "
                    f"{list(want)} (completed {list(s.completed)}, unknown "
                    f"{s.unknown_step})",
                    at,
                )
        if self.time_to_rest(node) > self.time_limit:
            self.violate("time", self.time_story(node), at, "Timeout of the current fence")

    def time_story(self, node: _Node) -> str:
        """Where time alone leaves the saga (for a violation's message)."""
        s = node.state
        for n in range(self.time_limit + 1):
            dec = self.decide(self.d, s, Timeout(s.seq), now=NOW, policy=self.policy, nonce=NONCE)
            if dec.state is None or dec.state == s:
                return f"time alone does not end the saga: stuck in {s.status} after {n} timeouts"
            s = dec.state
        return (
            f"time alone does not end the saga within {self.time_limit} timeouts (it is "
            f"{s.status} then)"
        )

    def time_to_rest(self, node: _Node) -> int:
        """Timeouts of the current fence until the saga is terminal (or past the bound)."""
        never = self.time_limit + 1
        chain: list[tuple[Any, ...]] = []
        cur = node
        result = never
        for _ in range(self.time_limit + 1):
            key = _key(cur)
            if key in self.time_memo:
                result = self.time_memo[key]
                break
            if cur.state.phase in TERMINAL:
                result = 0
                break
            chain.append(key)
            dec = self.decide(
                self.d, cur.state, Timeout(cur.state.seq), now=NOW, policy=self.policy, nonce=NONCE
            )
            if dec.state is None or dec.state == cur.state:
                break  # stuck: time does nothing here
            cur = self.advance(cur, -1, "", Timeout(cur.state.seq), dec, False)
        for back, key in enumerate(reversed(chain), start=1):
            self.time_memo[key] = min(result + back, never) if result < never else never
        return self.time_memo.get(_key(node), result)

    # -- the search ------------------------------------------------------------------------

    def add(self, node: _Node) -> int | None:
        key = _key(node)
        if key in self.index:
            return None
        if len(self.nodes) >= self.bounds.max_states:
            self.bound = f"{self.bounds.max_states} states"
            return None
        self.index[key] = len(self.nodes)
        phase = str(node.state.phase)
        self.phases[phase] = self.phases.get(phase, 0) + 1
        self.nodes.append(node)
        self.check_state(len(self.nodes) - 1)
        return len(self.nodes) - 1

    def run(self) -> None:
        d = self.d
        begin = Start(self.start, uuid.uuid5(REPLY_NAMESPACE, "start"))
        first = core.start(d, begin, now=NOW, policy=self.policy, nonce=NONCE)
        assert first.state is not None
        root = _Node(
            first.state, (), False, 0, False, frozenset(), 0, -1, f"Start {d.start.__name__}"
        )
        root = replace(root, sent=tuple(c.step for c in first.commands))
        at = self.add(root)
        assert at is not None
        self.check_commands(at, "", first.state, begin, first, False)
        queue = deque([at])
        while queue:
            at = queue.popleft()
            node = self.nodes[at]
            if node.depth >= self.bounds.max_depth:
                if self.bound is None:
                    self.bound = f"depth {self.bounds.max_depth}"
                continue
            for label, message, forged in self.inputs(node):
                dec = self.decide(d, node.state, message, now=NOW, policy=self.policy, nonce=NONCE)
                again = self.decide(
                    d, node.state, message, now=LATER, policy=self.policy, nonce=NONCE
                )
                self.transitions += 1
                what = f"{dec.outcome}:{dec.event}"
                self.events[what] = self.events.get(what, 0) + 1
                self.check_transition(at, label, node, message, dec, again, forged)
                if forged or dec.state is None or dec.state == node.state:
                    continue
                forced = isinstance(message, ForceCompensate) and dec.outcome == "applied"
                nxt = self.add(self.advance(node, at, label, message, dec, forced))
                if nxt is not None:
                    queue.append(nxt)


def check(
    d: Definition,
    *,
    policy: Policy = CHECK_POLICY,
    bounds: Bounds = Bounds(),
    decide: Decide = core.decide,
    start: Message | None = None,
    samples: Mapping[type[Message], Sequence[Message]] | None = None,
    clock: Callable[[], float] | None = None,
) -> Report:
    """Explore every interleaving of ``d`` up to ``bounds`` and check the properties.

    ``decide`` is the engine's unless a test hands in a broken one; ``start`` and ``samples``
    override the bodies built from the pydantic models; ``clock`` (seconds, for example
    ``time.perf_counter``) only times the run."""
    t0 = clock() if clock else 0.0
    c = _Checker(d, policy, bounds, decide, start, samples)
    c.run()
    order = {p: i for i, p in enumerate(PROPERTIES)}
    return Report(
        ref=d.ref,
        states=len(c.nodes),
        transitions=c.transitions,
        max_depth=max((n.depth for n in c.nodes), default=0),
        seconds=(clock() - t0) if clock else 0.0,
        bound_reached=c.bound,
        violations=tuple(sorted(c.violations.values(), key=lambda v: order.get(v.prop, 99))),
        counts=dict(c.counts),
        events=dict(sorted(c.events.items())),
        phases=dict(sorted(c.phases.items())),
    )


def check_all(definitions: Iterable[Definition], **kwargs: Any) -> tuple[Report, ...]:
    return tuple(check(d, **kwargs) for d in definitions)


def table(reports: Sequence[Report]) -> str:
    """The reports as a text table."""
    head = ("definition", "states", "transitions", "max depth", "seconds", "bound", "violations")
    rows = [
        (
            r.ref,
            str(r.states),
            str(r.transitions),
            str(r.max_depth),
            f"{r.seconds:.2f}",
            r.bound_reached or "-",
            ", ".join(f"{p}={n}" for p, n in sorted(r.counts.items())) or "none",
        )
        for r in reports
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    lines = [
        "  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
        for row in (head, *rows)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - python -m process_manager.engine.check
    from process_manager.engine.check_cli import main

    raise SystemExit(main())
