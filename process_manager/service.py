"""The process manager service: the I/O shell around the pure saga core.

Per message, in the consumer's one transaction: the inbox row is already claimed; load the saga
with its version, decide, save (optimistic concurrency: a conflict is retried by the consumer),
append a history row, write the commands to the outbox. A background loop fires due deadlines
the same way, claiming saga rows with ``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from opentelemetry import trace
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from messaging import telemetry
from messaging.consumer import Context
from messaging.db import driver
from messaging.errors import PermanentError, StartRefused
from messaging.metrics import metrics
from messaging.outbox import OutgoingMessage
from messaging.retention import RetentionRule
from messaging.service import ServiceContext, ServiceDefinition
from messaging.settings import Settings
from messaging.topology import command_route
from process_manager import definitions, store
from process_manager.engine import (
    TERMINAL,
    Command,
    Decision,
    Definition,
    Expire,
    Input,
    InvalidTransition,
    Phase,
    Policy,
    Reply,
    SagaState,
    Start,
    Timeout,
    decide,
)
from schemas.base import Message
from schemas.envelope import Envelope
from schemas.registry import REGISTRY

log = structlog.get_logger("sagabus.process_manager")

SERVICE = "process-manager"
#: statuses of the steps after the pivot (the sweeper leaves them alone)
RETRIABLE_STATUSES = sorted({s for d in definitions.ALL for s in d.retriable_statuses})
_TERMINAL_PHASES = [p.value for p in TERMINAL]
_UNCLAIM = "DELETE FROM process_manager.inbox WHERE message_id = $1 AND message_type = $2"


def policy_from(settings: Settings) -> Policy:
    return Policy(
        step_timeout=timedelta(seconds=settings.step_timeout_s),
        max_step_attempts=settings.max_step_attempts,
        compensation_timeout=timedelta(seconds=settings.compensation_timeout_s),
        max_compensation_attempts=settings.max_compensation_attempts,
        max_retriable_attempts=settings.max_retriable_attempts,
        retriable_max_delay=timedelta(seconds=settings.retriable_max_delay_s),
    )


def outgoing(
    cmd: Command,
    state: SagaState,
    *,
    correlation_id: uuid.UUID,
    causation_id: uuid.UUID | None,
    now: datetime,
) -> OutgoingMessage:
    carrier = telemetry.inject()
    exchange, key = command_route(cmd.participant, cmd.body.TYPE)
    env = Envelope(
        message_id=cmd.message_id,
        type=cmd.body.TYPE,
        saga_id=state.saga_id,
        correlation_id=correlation_id,
        causation_id=causation_id,
        idempotency_key=cmd.idempotency_key,
        step=cmd.step,
        attempt=cmd.attempt,
        fence=cmd.fence,
        reply_token=cmd.reply_token,
        occurred_at=now,
        traceparent=carrier.get("traceparent"),
        tracestate=carrier.get("tracestate"),
    )
    return OutgoingMessage(env, cmd.body, exchange, key)


_OUTCOME = {
    Phase.COMPLETED: "completed",
    Phase.COMPENSATED: "compensated",
    Phase.FAILED_NEEDS_MANUAL: "needs_manual",
}


def _count(decision: Decision, before_state: SagaState | None, now: datetime) -> None:
    """Metrics from the decision's event kind (never from its note)."""
    m = metrics().saga
    state = decision.state
    if decision.outcome == "rejected":
        metrics().rejected_security.labels(SERVICE, "bad_reply_token").inc()
        return
    if decision.outcome == "ignored" or state is None:
        m.ignored.inc()
        return
    if before_state is None:
        m.started.inc()
        return
    timed_out = decision.event in ("resent", "timed_out", "reconcile_asked") and (
        before_state.awaiting is not None and decision.step == before_state.awaiting
    )
    if before_state.awaiting and before_state.sent_at and not timed_out:
        settled = before_state.awaiting != state.awaiting or before_state.seq != state.seq
        if settled:
            m.step_latency.labels(before_state.awaiting).observe(
                max(0.0, (now - before_state.sent_at).total_seconds())
            )
    if timed_out and before_state.awaiting:
        m.timeouts.labels(before_state.awaiting).inc()
    if state.phase is Phase.COMPENSATING and before_state.phase is not Phase.COMPENSATING:
        m.compensations.inc()
    if state.phase in _OUTCOME and before_state.phase not in _OUTCOME:
        outcome = _OUTCOME[state.phase]
        m.finished.labels(outcome).inc()
        if state.started_at is not None:
            m.duration.labels(outcome).observe(max(0.0, (now - state.started_at).total_seconds()))


def _observe(decision: Decision, state: SagaState) -> None:
    span = trace.get_current_span()
    before, after = decision.transition
    span.set_attribute("sagabus.saga.id", str(state.saga_id))
    span.set_attribute("sagabus.saga.outcome", decision.outcome)
    if before != after:
        span.set_attribute("sagabus.saga.transition", f"{before}->{after}")
    for cmd in decision.commands:
        span.add_event("command_decided", {"sagabus.saga.step": cmd.step, "attempt": cmd.attempt})
    if decision.outcome == "rejected":
        log.warning(
            "message_rejected_security",
            reason="bad reply token",
            saga_id=str(state.saga_id),
            note=decision.note,
        )
        return
    log.info(
        "saga_transitioned" if decision.outcome == "applied" else "saga_message_ignored",
        saga_id=str(state.saga_id),
        from_status=str(before) if before else None,
        to_status=str(after) if after else None,
        note=decision.note,
        commands=[c.body.TYPE for c in decision.commands],
    )


def _refusal(
    d: Definition, body: Message, existing: store.Loaded | None, prerequisite: str | None
) -> str | None:
    """Why a start is refused before any saga runs (None: admitted)."""
    key = d.business_key(body)
    if existing is not None and d.once and existing.state.phase in TERMINAL:
        if existing.state.status in d.end_statuses:
            return f"{d.name} for {key} already ran: it ended {existing.state.status}"
        return (
            f"{d.name} for {key} already ran and ended {existing.state.status}; "
            f"one {d.name} saga per key"
        )
    rule = d.requires
    if existing is None and rule is not None and prerequisite not in rule.statuses:
        return rule.refusal.format(
            key=rule.key(body),
            saga=rule.saga,
            statuses="/".join(sorted(rule.statuses)),
            found=prerequisite or "absent",
        )
    return None


async def _prerequisite(conn: AsyncConnection, d: Definition, body: Message) -> str | None:
    """The status of the saga ``d.requires`` names, or None when there is none."""
    rule = d.requires
    if rule is None:
        return None
    t = store.sagas
    return (
        await conn.execute(
            select(t.c.status).where(
                t.c.saga_type == rule.saga, t.c.business_key == rule.key(body)
            )
        )
    ).scalar()


def make_handlers(policy: Policy, pins: dict[str, int] | None = None) -> dict[str, object]:
    def starter(name: str) -> Any:
        async def on_start(ctx: Context) -> None:
            env = ctx.envelope
            body = ctx.incoming.body
            d = definitions.current(name, pins)
            assert isinstance(body, d.start)
            saga_id = d.saga_id(body)
            # only a saga with an admission rule looks before it inserts; any other finds an
            # existing saga by its insert conflicting (one round trip less per start)
            admits = d.once or d.requires is not None
            existing = await store.load(ctx.conn, saga_id) if admits else None
            refused = _refusal(d, body, existing, await _prerequisite(ctx.conn, d, body))
            if refused is not None:
                await store.record(
                    ctx.conn,
                    saga_id,
                    Decision(
                        existing.state if existing else None,
                        outcome="rejected",
                        note=f"refused: {refused}",
                        event="rejected",
                    ),
                    seq=existing.state.seq if existing else 0,
                    message_id=env.message_id,
                    message_type=env.type,
                )
                log.warning("saga_start_refused", saga_id=str(saga_id), reason=refused)
                ctx.reject_after_commit(PermanentError(f"refused: {refused}"))
                return
            decision = decide(
                d,
                None,
                Start(body, env.message_id),
                now=ctx.now,
                policy=policy,
                nonce=secrets.token_hex(16),
            )
            assert decision.state is not None
            state = decision.state
            inserted = existing is None and await store.insert_new(
                ctx.conn,
                state,
                correlation_id=env.correlation_id,
                traceparent=telemetry.inject().get("traceparent"),
                now=ctx.now,
                business_key=d.business_key(body),
            )
            if not inserted:
                # A saga exists for this key: the body stored first runs. The same body again
                # is a duplicate (noted, dropped); a different one is a conflict (noted, and
                # dead-lettered after this transaction commits): never silently dropped.
                existing = existing or await store.load(ctx.conn, saga_id)
                same = existing is not None and existing.state.start == body
                start_name = type(body).__name__
                note = (
                    f"duplicate {start_name}: a {d.name} saga exists for this key"
                    if same
                    else f"conflict: a {start_name} for this key with a different body; "
                    "the body stored first runs"
                )
                await store.record(
                    ctx.conn,
                    saga_id,
                    Decision(
                        existing.state if existing else None,
                        outcome="ignored" if same else "rejected",
                        note=note,
                        event="ignored" if same else "rejected",
                    ),
                    seq=existing.state.seq if existing else 0,
                    message_id=env.message_id,
                    message_type=env.type,
                )
                key = d.business_key(body)
                if same:
                    log.info("saga_start_duplicate", saga_id=str(saga_id), business_key=key)
                else:
                    log.warning("saga_start_conflict", saga_id=str(saga_id), business_key=key)
                    what = "order" if key == state.order_id else d.name
                    ctx.reject_after_commit(
                        PermanentError(
                            f"conflict: {what} {key} already has a saga started with a different "
                            "body; the body stored first runs"
                        )
                    )
                return
            await store.record(
                ctx.conn,
                state.saga_id,
                decision,
                seq=state.seq,
                message_id=env.message_id,
                message_type=env.type,
            )
            ctx.outgoing.extend(
                outgoing(
                    c,
                    state,
                    correlation_id=env.correlation_id,
                    causation_id=env.message_id,
                    now=ctx.now,
                )
                for c in decision.commands
            )
            _observe(decision, state)
            _count(decision, None, ctx.now)

        return on_start

    async def on_reply(ctx: Context) -> None:
        env = ctx.envelope
        loaded = await store.load(ctx.conn, env.saga_id)
        if loaded is None:
            raise PermanentError(f"{env.type} for unknown saga {env.saga_id}")
        try:
            decision = decide(
                store.definition_of(loaded.state.ref),
                loaded.state,
                Reply(
                    ctx.incoming.body,
                    fence=env.fence,
                    message_id=env.message_id,
                    token=env.reply_token,
                ),
                now=ctx.now,
                policy=policy,
                nonce=secrets.token_hex(16),
            )
        except InvalidTransition as e:
            raise PermanentError(str(e)) from None
        if decision.outcome == "rejected":
            # not applied, and not remembered as processed either: a forged copy carrying a
            # genuine reply's message id must not make the genuine reply drop as a duplicate
            await (await driver(ctx.conn)).execute(_UNCLAIM, env.message_id, env.type)
        await _apply(
            ctx.conn,
            loaded,
            decision,
            ctx.outgoing,
            message_id=env.message_id,
            message_type=env.type,
            causation_id=env.message_id,
            now=ctx.now,
        )

    handlers: dict[str, object] = {
        d.start.TYPE: starter(d.name) for d in (definitions.current(n) for n in definitions.NAMES)
    }
    for type_name, model in REGISTRY.items():
        if model.KIND in ("reply", "fact"):
            handlers[type_name] = on_reply
    return handlers


async def _apply(
    conn: AsyncConnection,
    loaded: store.Loaded,
    decision: Decision,
    out: list[OutgoingMessage],
    *,
    message_id: uuid.UUID | None,
    message_type: str,
    causation_id: uuid.UUID | None,
    now: datetime,
) -> None:
    state = decision.state or loaded.state
    changed = decision.state is not None and decision.state != loaded.state
    if decision.state is not None and changed:
        # the history row goes with the state change, in the same statement
        await store.save(
            conn,
            loaded,
            decision.state,
            now,
            decision=decision,
            message_id=message_id,
            message_type=message_type,
        )
        before = loaded.state.phase
        manual = Phase.FAILED_NEEDS_MANUAL
        if state.phase is manual and before is not manual:
            await store.open_case(conn, state, now)
            log.warning(
                "saga_needs_manual", saga_id=str(state.saga_id), reason=state.failure_reason
            )
        elif before is manual and state.phase is not manual:
            await store.resolve_case(conn, state.saga_id, f"{decision.note} -> {state.status}", now)
    if not changed:
        await store.record(
            conn,
            state.saga_id,
            decision,
            seq=state.seq,
            message_id=message_id,
            message_type=message_type,
        )
    out.extend(
        outgoing(c, state, correlation_id=loaded.correlation_id, causation_id=causation_id, now=now)
        for c in decision.commands
    )
    _observe(decision, state)
    _count(decision, loaded.state, now)


async def fire_due_timeouts(sctx: ServiceContext, policy: Policy, *, limit: int = 50) -> int:
    """Apply ``Timeout`` to every saga whose deadline passed. Safe with several instances."""
    now = datetime.now(UTC)
    t = store.sagas
    fired = 0
    async with sctx.engine.begin() as conn:
        rows = (
            await conn.execute(
                select(t.c.saga_id)
                .where(t.c.deadline_at <= now, t.c.phase.not_in(_TERMINAL_PHASES))
                .order_by(t.c.deadline_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        ).all()
        out: list[OutgoingMessage] = []
        for (saga_id,) in rows:
            try:
                loaded = await store.load(conn, saga_id)
            except store.UnloadableSaga as e:
                await store.quarantine(conn, e, now)
                log.error("saga_unloadable", saga_id=str(saga_id), error=str(e))
                continue
            assert loaded is not None
            parent = telemetry.extract({"traceparent": loaded.traceparent or ""})
            with sctx.tracer.start_as_current_span(
                "saga timeout",
                context=parent,
                kind=trace.SpanKind.INTERNAL,
                attributes={
                    "sagabus.saga.id": str(saga_id),
                    "sagabus.saga.step": loaded.state.awaiting or "",
                },
            ):
                decision = decide(
                    store.definition_of(loaded.state.ref),
                    loaded.state,
                    Timeout(loaded.state.seq),
                    now=now,
                    policy=policy,
                    nonce=secrets.token_hex(16),
                )
                await _apply(
                    conn,
                    loaded,
                    decision,
                    out,
                    message_id=None,
                    message_type="sagabus.Timeout",
                    causation_id=None,
                    now=now,
                )
            fired += 1
        written = await sctx.outbox.write(conn, out, notify=False)
    if written:
        sctx.outbox.committed(written)
    return fired


async def sweep_expired(
    sctx: ServiceContext, policy: Policy, ttl: timedelta, *, limit: int = 100
) -> int:
    """Move sagas alive beyond their time-to-live to FAILED_NEEDS_MANUAL (with a case)."""
    now = datetime.now(UTC)
    t = store.sagas
    async with sctx.engine.begin() as conn:
        rows = (
            await conn.execute(
                select(t.c.saga_id)
                .where(
                    t.c.started_at < now - ttl,
                    # past the pivot the retriable step is re-sent on its own schedule, and
                    # calls a human when that runs out: not the time-to-live's business
                    t.c.phase.not_in(_TERMINAL_PHASES),
                    t.c.status.not_in(RETRIABLE_STATUSES),
                )
                .order_by(t.c.started_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        ).all()
        out: list[OutgoingMessage] = []
        for (saga_id,) in rows:
            try:
                loaded = await store.load(conn, saga_id)
            except store.UnloadableSaga as e:
                await store.quarantine(conn, e, now)
                log.error("saga_unloadable", saga_id=str(saga_id), error=str(e))
                continue
            assert loaded is not None
            reason = f"saga exceeded its time-to-live of {ttl} in {loaded.state.status}"
            decision = decide(
                store.definition_of(loaded.state.ref),
                loaded.state,
                Expire(reason),
                now=now,
                policy=policy,
                nonce=secrets.token_hex(16),
            )
            await _apply(
                conn,
                loaded,
                decision,
                out,
                message_id=None,
                message_type="sagabus.Expired",
                causation_id=None,
                now=now,
            )
        await sctx.outbox.write(conn, out)
    if rows:
        metrics().saga.swept.inc(len(rows))
        log.warning("stuck_sagas_swept", count=len(rows))
    return len(rows)


async def operator_action(
    engine: Any, settings: Settings, saga_id: uuid.UUID, action: Input
) -> Decision | None:
    """Apply an operator's Resume or ForceCompensate in one transaction, like any message."""
    from messaging.outbox import Outbox

    d = definition(settings)
    outbox = Outbox(d.outbox, d.schema)
    now = datetime.now(UTC)
    policy = policy_from(settings)
    async with engine.begin() as conn:
        loaded = await store.load(conn, saga_id, lock=True)
        if loaded is None:
            return None
        decision = decide(
            store.definition_of(loaded.state.ref),
            loaded.state,
            action,
            now=now,
            policy=policy,
            nonce=secrets.token_hex(16),
        )
        out: list[OutgoingMessage] = []
        await _apply(
            conn,
            loaded,
            decision,
            out,
            message_id=None,
            message_type=f"operator.{type(action).__name__}",
            causation_id=None,
            now=now,
        )
        await outbox.write(conn, out)
    return decision


async def refuse_unknown_versions(engine: Any) -> None:
    """Refuse to start when the database holds live sagas of a definition version this build
    does not have: they could be neither continued nor compensated."""
    async with engine.connect() as conn:
        live = await store.live_by_definition(conn)
    missing = {ref: n for ref, n in live.items() if not _registered(ref)}
    if missing:
        listed = ", ".join(f"{n} live saga(s) on {ref}" for ref, n in sorted(missing.items()))
        raise StartRefused(
            f"the database holds {listed}, a version this process manager does not have: "
            "deploy a build that still registers it (process_manager/definitions) until they end"
        )


def _registered(ref: str) -> bool:
    try:
        definitions.get(*definitions.parse_ref(ref))
    except (ValueError, LookupError):
        return False
    return True


def definition(settings: Settings) -> ServiceDefinition:
    policy = policy_from(settings)
    try:
        pins = definitions.parse_pins(settings.saga_versions)
    except (ValueError, LookupError) as e:
        raise ValueError(f"SAGABUS_SAGA_VERSIONS: {e}") from None
    ttl = timedelta(seconds=settings.saga_ttl_s)

    async def timeouts(sctx: ServiceContext) -> None:
        while not sctx.stop.is_set():
            fired = await fire_due_timeouts(sctx, policy)
            if fired == 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(sctx.stop.wait(), settings.timeout_poll_s)

    async def sweeper(sctx: ServiceContext) -> None:
        while not sctx.stop.is_set():
            await sweep_expired(sctx, policy, ttl)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(sctx.stop.wait(), settings.sweeper_interval_s)

    # Finished sagas (a FAILED_NEEDS_MANUAL one only once its case is closed), then the history
    # and the closed cases of sagas that are gone. A saga row is a guard: it makes a second
    # StartCheckout for its order start nothing. Terminal sagas are not written to any more, so
    # ``updated_at`` is when they finished (and the ``sagas_status`` index covers it).
    retained = (
        RetentionRule(
            store.sagas,
            "updated_at",
            "saga_retention_s",
            "phase IN ('COMPLETED', 'COMPENSATED') OR (phase = 'FAILED_NEEDS_MANUAL' AND NOT"
            " EXISTS (SELECT 1 FROM process_manager.manual_cases c WHERE c.saga_id ="
            " sagas.saga_id AND c.resolved_at IS NULL))",
        ),
        RetentionRule(
            store.history,
            "at",
            "saga_retention_s",
            "NOT EXISTS (SELECT 1 FROM process_manager.sagas s WHERE s.saga_id = history.saga_id)",
            guard=False,
        ),
        RetentionRule(
            store.manual_cases,
            "resolved_at",
            "saga_retention_s",
            "NOT EXISTS (SELECT 1 FROM process_manager.sagas s"
            " WHERE s.saga_id = manual_cases.saga_id)",
            guard=False,
        ),
    )
    return ServiceDefinition(
        name=SERVICE,
        schema=store.SCHEMA,
        metadata=store.metadata,
        handlers=make_handlers(policy, pins),  # type: ignore[arg-type]
        background=(timeouts, sweeper),
        retained=retained,
        upgrade=store.upgrade,
        preflight=refuse_unknown_versions,
    )
