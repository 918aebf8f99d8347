"""A saga definition is data: the engine is handed one and runs it.

A definition names its start message and the business key that derives the saga id, its forward
steps in order (each with its command, the replies that settle it, its compensation and its
kind), its compensations (each possibly with a fallback, the next rung of a compensation ladder),
its status queries (what to ask when a step's replies never came), alternative forward paths,
and the policy (timeouts and bounds). Nothing here does I/O; nothing here names a business type
except through the values a definition module supplies.

Step kinds, checked when a definition is built:

- ``compensatable``: it has an undo (or leaves nothing to undo); a failure, or an outcome still
  unknown after every attempt, compensates what was done.
- ``pivot``: the point of no return (at most one). If it fails, nothing of it is left to undo;
  once it succeeded the saga only moves forward.
- ``retriable``: after the pivot (or on an alternative path). It cannot fail, only be late: a
  timeout re-sends it with the same idempotency key and a growing delay, then calls a human.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from types import MappingProxyType
from typing import Any, Literal

from schemas.base import SAGA_NAMESPACE as SAGA_NAMESPACE
from schemas.base import Message
from schemas.base import saga_id_for as saga_id_for

StepKind = Literal["compensatable", "pivot", "retriable"]



@dataclass(frozen=True)
class Policy:
    """Timeouts and bounds. Part of the definition; the shell may override them from settings."""

    step_timeout: timedelta = timedelta(seconds=30)
    #: sends of one forward step (first send included) before its outcome counts as failed
    max_step_attempts: int = 3
    compensation_timeout: timedelta = timedelta(seconds=30)
    #: sends of one compensation before the saga needs a human
    max_compensation_attempts: int = 5
    #: sends of a retriable step (after the pivot) before the saga needs a human; each wait is
    #: twice the last (from the step's timeout), at most retriable_max_delay
    max_retriable_attempts: int = 20
    retriable_max_delay: timedelta = timedelta(minutes=10)

    def retriable_timeout(self, attempt: int, base: timedelta | None = None) -> timedelta:
        """The wait after sending a retriable step for the ``attempt``-th time."""
        first = base if base is not None else self.step_timeout
        return min(first * (1 << min(max(attempt, 1) - 1, 30)), self.retriable_max_delay)


@dataclass(frozen=True)
class Reconcile:
    """How to establish a step's outcome when every send of it went unanswered: send the status
    query ``query`` and read the status it reports."""

    query: str
    #: reported statuses that mean the step happened (the saga goes on)
    happened: frozenset[str]
    #: reported statuses that mean a human must look (it happened and was undone elsewhere)
    needs_human: frozenset[str] = frozenset()


def _no_report(body: Message) -> str:
    return str(getattr(body, "status", ""))


@dataclass(frozen=True)
class Step:
    """One step: the command it sends and the replies that settle it."""

    name: str
    participant: str
    #: the command, built from the saga's start message
    build: Callable[[Any], Message]
    success: tuple[type[Message], ...]
    failure: tuple[type[Message], ...] = ()
    #: the compensation that undoes this (forward) step
    compensation: str | None = None
    #: the status users see while this forward step is awaited
    status: str = "RUNNING"
    kind: StepKind = "compensatable"
    #: overrides the policy's timeout for this step (the first wait, for a retriable step)
    timeout: timedelta | None = None
    #: overrides the policy's number of sends for this step
    attempts: int | None = None
    #: a reply that takes an alternative forward path instead: reply type -> path name
    branches: Mapping[type[Message], str] = field(default_factory=lambda: MappingProxyType({}))
    #: compensations this step makes unnecessary once it completed (a refund settles the
    #: payment either way, so the authorization's void is not sent)
    supersedes: tuple[str, ...] = ()
    #: a compensation's next rung: what to send when this one is refused
    fallback: str | None = None
    #: a forward step whose outcome a status query can establish
    reconcile: Reconcile | None = None
    #: a status query's reply -> the status it reports
    report: Callable[[Message], str] = _no_report

    @property
    def replies(self) -> tuple[type[Message], ...]:
        return (*self.success, *self.failure, *self.branches)


@dataclass(frozen=True)
class Path:
    """An alternative forward path (for example a backorder instead of a cancel)."""

    name: str
    steps: tuple[Step, ...]
    #: the status users see when the saga completes on this path
    end_status: str


@dataclass(frozen=True)
class StartRule:
    """What must be true before a start is admitted, checked by the shell against its store:
    a saga of type ``saga`` for the key ``key(start)`` that ended in one of ``statuses``."""

    saga: str
    statuses: frozenset[str]
    key: Callable[[Any], str]
    #: what the refusal says (``{key}`` and ``{found}`` are filled in)
    refusal: str = "{key}: requires a {saga} saga in {statuses}, found {found}"


class DefinitionError(ValueError):
    """A definition that the engine cannot run safely."""


@dataclass(frozen=True)
class Definition:
    name: str
    version: int
    #: the message that starts it, published to ``sagabus.commands`` with key ``<name>.start``
    start: type[Message]
    #: the business key: one saga of this type per key
    business_key: Callable[[Any], str]
    steps: tuple[Step, ...]
    compensations: tuple[Step, ...] = ()
    queries: tuple[Step, ...] = ()
    paths: tuple[Path, ...] = ()
    policy: Policy = Policy()
    #: the status users see when the saga completes on its main path
    completed_status: str = "COMPLETED"
    description: str = ""
    #: admission rule checked before the saga is created (None: any valid start)
    requires: StartRule | None = None
    #: a start for a key whose saga already finished is refused (not a duplicate)
    once: bool = False

    def __post_init__(self) -> None:
        _validate(self)

    # -- lookups ----------------------------------------------------------------------------

    @cached_property
    def _tables(self) -> tuple[dict[str, Step], dict[str, Step], dict[str, Step]]:
        return (
            {s.name: s for s in self.forward_steps},
            {s.name: s for s in self.compensations},
            {s.name: s for s in self.queries},
        )

    @property
    def ref(self) -> str:
        """``checkout.v2``: what the store records and operators read."""
        return f"{self.name}.v{self.version}"

    @property
    def forward_steps(self) -> tuple[Step, ...]:
        """Every forward step, the main path's first, then each alternative path's."""
        return (*self.steps, *(s for p in self.paths for s in p.steps))

    def saga_id(self, start: Message) -> uuid.UUID:
        return saga_id_for(self.name, self.business_key(start))

    def forward(self, name: str) -> Step | None:
        return _index(self)[0].get(name)

    def compensation(self, name: str) -> Step | None:
        return _index(self)[1].get(name)

    def query(self, name: str) -> Step | None:
        return _index(self)[2].get(name)

    def step(self, name: str) -> Step:
        for table in _index(self):
            if name in table:
                return table[name]
        raise KeyError(f"{self.ref} has no step {name!r}")

    def path(self, name: str) -> Path:
        for p in self.paths:
            if p.name == name:
                return p
        raise KeyError(f"{self.ref} has no path {name!r}")

    @property
    def pivot(self) -> str | None:
        for s in self.steps:
            if s.kind == "pivot":
                return s.name
        return None

    @property
    def running_statuses(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for s in self.forward_steps:
            seen.setdefault(s.status, None)
        return tuple(seen)

    @property
    def end_statuses(self) -> tuple[str, ...]:
        return (self.completed_status, *(p.end_status for p in self.paths))

    @property
    def retriable_statuses(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.status for s in self.forward_steps if s.kind == "retriable"))

    @property
    def reply_types(self) -> tuple[type[Message], ...]:
        found: dict[type[Message], None] = {}
        for s in (*self.forward_steps, *self.compensations, *self.queries):
            for r in s.replies:
                found.setdefault(r, None)
        return tuple(found)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description (``sagabus definitions --json``)."""

        def one(s: Step) -> dict[str, Any]:
            d: dict[str, Any] = {
                "name": s.name,
                "participant": s.participant,
                "kind": s.kind,
                "status": s.status,
                "success": [r.TYPE for r in s.success],
                "failure": [r.TYPE for r in s.failure],
                "compensation": s.compensation,
            }
            if s.branches:
                d["branches"] = {r.TYPE: p for r, p in s.branches.items()}
            if s.reconcile:
                d["reconcile"] = s.reconcile.query
            return d

        return {
            "name": self.name,
            "version": self.version,
            "ref": self.ref,
            "start_type": self.start.TYPE,
            "start_routing_key": f"{self.name}.start",
            "description": self.description,
            "steps": [one(s) for s in self.steps],
            "paths": [
                {"name": p.name, "end_status": p.end_status, "steps": [one(s) for s in p.steps]}
                for p in self.paths
            ],
            "compensations": [
                {
                    "name": c.name,
                    "participant": c.participant,
                    "success": [r.TYPE for r in c.success],
                    "failure": [r.TYPE for r in c.failure],
                    "fallback": c.fallback,
                }
                for c in self.compensations
            ],
            "pivot": self.pivot,
            "completed_status": self.completed_status,
        }


def _index(d: Definition) -> tuple[dict[str, Step], dict[str, Step], dict[str, Step]]:
    return d._tables


def _validate(d: Definition) -> None:
    def fail(why: str) -> None:
        raise DefinitionError(f"{d.name}.v{d.version}: {why}")

    if not d.name.isidentifier() or d.version < 1:
        fail("a definition needs an identifier name and a version >= 1")
    if not d.steps:
        fail("a definition needs at least one step")
    if not d.start.SAGA_KEY or d.start.TYPE.split(".", 1)[0] != d.name:
        fail(f"its start {d.start.__name__} must be a '{d.name}.' type naming its SAGA_KEY")
    names = [s.name for s in (*d.forward_steps, *d.compensations, *d.queries)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        fail(f"step names must be unique: {dupes}")
    comps = {c.name for c in d.compensations}
    queries = {q.name for q in d.queries}
    paths = {p.name for p in d.paths}
    if "main" in paths:
        fail("'main' names the main path")
    pivots = [s.name for s in d.steps if s.kind == "pivot"]
    if len(pivots) > 1:
        fail(f"more than one pivot step: {pivots}")
    rank = {"compensatable": 0, "pivot": 1, "retriable": 2}
    ranks = [rank[s.kind] for s in d.steps]
    if ranks != sorted(ranks):
        fail("steps must be compensatable, then the pivot, then retriable")
    for s in d.steps:
        if s.kind == "retriable" and not pivots:
            fail(f"retriable step {s.name} without a pivot before it")
    for p in d.paths:
        if not p.steps:
            fail(f"path {p.name} has no steps")
        for s in p.steps:
            if s.kind != "retriable":
                fail(f"step {s.name} of path {p.name} must be retriable: a branch is a point "
                     "of no return for the path it takes")
    for s in d.forward_steps:
        if s.kind == "retriable" and s.failure:
            fail(f"retriable step {s.name} cannot fail, yet declares failures")
        if s.compensation is not None and s.compensation not in comps:
            fail(f"step {s.name}: unknown compensation {s.compensation}")
        for target in s.branches.values():
            if target not in paths:
                fail(f"step {s.name}: unknown path {target}")
        if s.branches and s.kind != "compensatable":
            fail(f"step {s.name}: only a compensatable step may branch")
        for sup in s.supersedes:
            if sup not in comps:
                fail(f"step {s.name}: supersedes unknown compensation {sup}")
        if s.reconcile is not None and s.reconcile.query not in queries:
            fail(f"step {s.name}: unknown status query {s.reconcile.query}")
        if not s.success:
            fail(f"step {s.name} has no success reply")
    for c in d.compensations:
        if c.kind != "compensatable" or c.branches or c.compensation:
            fail(f"compensation {c.name} cannot itself branch or be compensated")
        seen = {c.name}
        nxt = c.fallback
        while nxt is not None:
            if nxt not in comps:
                fail(f"compensation {c.name}: unknown fallback {nxt}")
            if nxt in seen:
                fail(f"compensation {c.name}: fallback cycle through {nxt}")
            seen.add(nxt)
            nxt = next(x for x in d.compensations if x.name == nxt).fallback
    reply_owner: dict[type[Message], str] = {}
    for s in d.forward_steps:
        for r in s.replies:
            if r in reply_owner and reply_owner[r] != s.name:
                fail(f"reply {r.__name__} settles both {reply_owner[r]} and {s.name}")
            reply_owner[r] = s.name
