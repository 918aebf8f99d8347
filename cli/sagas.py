"""Sagas: start one, look at them (``status``, ``list``, ``cases``, ``stats``), and the operator's
two actions on one (``resume``, ``compensate``).
"""

from __future__ import annotations

import os
import re
import uuid
from datetime import timedelta
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from cli.base import (
    Duration,
    Failed,
    emit_json,
    run_async,
    settings,
    with_engine,
)


def _parse_item(value: str) -> Any:
    from schemas.common import LineItem

    parts = value.split(":")
    if len(parts) not in (2, 3):
        raise click.BadParameter(f"{value!r}: expected SKU:QTY or SKU:QTY:UNIT_PRICE_MINOR")
    from pydantic import ValidationError

    from messaging.codec import summarize

    try:
        qty = int(parts[1])
        price = int(parts[2]) if len(parts) == 3 else 1000
    except ValueError:
        raise click.BadParameter(f"{value!r}: quantity and price must be whole numbers") from None
    try:
        return LineItem(sku=parts[0], quantity=qty, unit_price_minor=price)
    except ValidationError as e:
        raise click.BadParameter(f"{value!r}: {summarize(e)}") from None


@click.command()
@click.option("--order-id", default=None, help="Order id (default: a new one).")
@click.option("--customer", "customer_id", default="cus_demo", show_default=True)
@click.option(
    "--item", "items", multiple=True, required=True, help="SKU:QTY[:UNIT_PRICE_MINOR], repeatable."
)
@click.option("--currency", default="EUR", show_default=True)
@click.option(
    "--token",
    "payment_token",
    default="tok_visa",
    show_default=True,
    help="Payment token; tok_decline and tok_insufficient_funds decline.",
)
@click.option(
    "--postal-code",
    default="3511AA",
    show_default=True,
    help="00000 is undeliverable; 99999 makes the carrier unavailable.",
)
@click.option(
    "--backorder",
    "allow_backorder",
    is_flag=True,
    help="Allow a backorder when stock is short (checkout v2) instead of compensating.",
)
@click.option("--message-id", default=None, help="AMQP message id (default: random).")
@click.option("--traceparent", default=None, help="W3C traceparent to continue.")
@click.option("--json", "as_json", is_flag=True, help="Print the saga id as JSON.")
def start(
    order_id: str | None,
    customer_id: str,
    items: tuple[str, ...],
    currency: str,
    payment_token: str,
    postal_code: str,
    allow_backorder: bool,
    message_id: str | None,
    traceparent: str | None,
    as_json: bool,
) -> None:
    """Publish a StartCheckout command, as any AMQP client would."""
    from pydantic import ValidationError

    from messaging.codec import summarize
    from process_manager import ops
    from schemas.checkout import StartCheckout, saga_id_for_order
    from schemas.common import ShippingAddress

    s = settings()
    if traceparent and not re.match(
        r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$", traceparent
    ):
        raise click.BadParameter(
            "not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)", param_hint="--traceparent"
        )
    mid = None
    if message_id:
        try:
            mid = uuid.UUID(message_id)
        except ValueError:
            raise click.BadParameter("not a UUID", param_hint="--message-id") from None
    try:
        cmd = StartCheckout(
            order_id=order_id or f"ord-{uuid.uuid4().hex[:12]}",
            customer_id=customer_id,
            currency=currency,
            items=tuple(_parse_item(i) for i in items),
            payment_token=payment_token,
            shipping_address=ShippingAddress(
                line1="1 Main Street", city="Utrecht", postal_code=postal_code, country="NL"
            ),
            allow_backorder=allow_backorder,
        )
    except ValidationError as e:
        raise click.UsageError(summarize(e)) from None
    run_async(
        lambda: ops.publish_starts(
            s.amqp_url, [ops.start_message(cmd, message_id=mid, traceparent=traceparent)]
        )
    )
    saga_id = str(saga_id_for_order(cmd.order_id))
    if as_json:
        emit_json({"saga_id": saga_id, "order_id": cmd.order_id})
    else:
        click.echo(f"started saga {saga_id} for order {cmd.order_id}")


def _statuses() -> list[str]:
    """Every status a registered definition shows users, engine statuses last."""
    from process_manager import definitions

    found: dict[str, None] = {}
    for d in definitions.ALL:
        for status in (*d.running_statuses, *d.end_statuses):
            found.setdefault(status, None)
    for status in ("COMPENSATING", "COMPENSATED", "FAILED_NEEDS_MANUAL"):
        found.setdefault(status, None)
    return list(found)


def _saga_types() -> list[str]:
    from process_manager import definitions

    return list(definitions.NAMES)


@click.command()
@click.argument("saga")
@click.option(
    "--saga-type",
    type=click.Choice(_saga_types()),
    default="checkout",
    show_default=True,
    help="Which saga of an order id (a saga id needs none).",
)
@click.option("--json", "as_json", is_flag=True)
def status(saga: str, saga_type: str, as_json: bool) -> None:
    """State, current step, history and outcome of a saga (by saga id, or by order id and
    saga type)."""
    from process_manager import ops

    data = with_engine(lambda e: ops.saga_status(e, saga, saga_type=saga_type))
    if data is None:
        raise Failed(f"no saga {saga!r}")
    if as_json:
        emit_json(data)
        return
    console = Console()
    console.print(
        f"{data['saga_type']} saga [cyan]{data['saga_id']}[/] ({data['definition_version']}) "
        f"order {data['order_id']}: "
        f"[bold]{data['state']}[/] (step {data['current_step'] or '-'}, "
        f"attempt {data['attempt']}, fence {data['seq']})"
    )
    if data["failure_reason"]:
        console.print(f"reason: {data['failure_reason']}")
    if data["trace_id"]:
        jaeger = os.environ.get("SAGABUS_JAEGER_URL", "http://localhost:16686")
        console.print(f"trace {data['trace_id']}: {jaeger}/trace/{data['trace_id']}")
    table = Table("at", "seq", "message", "transition", "outcome", "note")
    for h in data["history"]:
        table.add_row(
            h["at"][11:23],
            str(h["seq"]),
            h["message_type"],
            f"{h['from'] or ''} -> {h['to'] or ''}",
            h["outcome"],
            h["note"],
        )
    console.print(table)


@click.command("list")
@click.option("--state", type=click.Choice(_statuses()))
@click.option(
    "--saga-type", type=click.Choice(_saga_types()), default=None, help="Only this saga type."
)
@click.option("--older-than", type=Duration(), default=None, help="Not updated for this long.")
@click.option(
    "--stuck",
    is_flag=True,
    help="Only stuck sagas: past their step deadline, alive beyond SAGABUS_SAGA_TTL_S, or "
    "FAILED_NEEDS_MANUAL (swept or out of compensation attempts).",
)
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def list_cmd(
    state: str | None,
    saga_type: str | None,
    older_than: timedelta | None,
    stuck: bool,
    limit: int,
    as_json: bool,
) -> None:
    """List sagas, newest first."""
    from process_manager import ops

    rows = with_engine(
        lambda e: ops.list_sagas(
            e,
            state=state,
            saga_type=saga_type,
            older_than=older_than,
            stuck=stuck,
            ttl_s=settings().saga_ttl_s,
            limit=limit,
        )
    )
    if as_json:
        emit_json(rows)
        return
    table = Table("saga", "order", "state", "step", "updated", "reason")
    for r in rows:
        table.add_row(
            r["saga_id"],
            r["order_id"],
            r["state"],
            r["current_step"] or "-",
            r["updated_at"][:19],
            (r["failure_reason"] or "")[:60],
        )
    Console().print(table)


def _saga_id(value: str) -> uuid.UUID:
    from schemas.checkout import saga_id_for_order

    try:
        return uuid.UUID(value)
    except ValueError:
        return saga_id_for_order(value)


def _operator(saga: str, action: Any) -> None:
    from process_manager.service import operator_action
    from process_manager.store import UnloadableSaga

    s = settings()
    try:
        decision = with_engine(lambda e: operator_action(e, s, _saga_id(saga), action))
    except UnloadableSaga as e:
        raise Failed(f"{e}; its row must be repaired by hand (see its manual case)") from None
    if decision is None:
        raise Failed(f"no saga {saga!r}")
    if decision.outcome == "ignored":
        raise Failed(f"nothing done: {decision.note}")
    assert decision.state is not None
    click.echo(
        f"saga {decision.state.saga_id}: {decision.note}; now {decision.state.status}"
        + (
            f", sent {', '.join(c.body.TYPE for c in decision.commands)}"
            if decision.commands
            else ""
        )
    )


@click.command()
@click.option("--json", "as_json", is_flag=True)
def stats(as_json: bool) -> None:
    """Saga outcomes, compensation rate, time to complete, step latencies, retries and dead
    letters, stuck sagas and outbox lag, summarised from the database."""
    from process_manager import stats as stats_mod

    s = settings()
    data = with_engine(lambda e: stats_mod.collect(e, s))
    if as_json:
        emit_json(data)
    else:
        stats_mod.render(data, Console())


@click.command()
@click.argument("saga")
def resume(saga: str) -> None:
    """Re-send a stuck saga's awaited step (same idempotency key), or retry the compensation of a
    saga that needs manual attention. The process manager's relay publishes the command."""
    from process_manager.engine import Resume

    _operator(saga, Resume())


@click.command()
@click.argument("saga")
@click.option("--reason", default="forced by operator", show_default=True)
def compensate(saga: str, reason: str) -> None:
    """Force a saga that is not terminal to compensate what it has done."""
    from process_manager.engine import ForceCompensate

    _operator(saga, ForceCompensate(reason))


@click.command()
@click.option("--all", "show_all", is_flag=True, help="Include resolved cases.")
@click.option("--json", "as_json", is_flag=True)
def cases(show_all: bool, as_json: bool) -> None:
    """Manual cases: sagas that could not finish or compensate on their own."""
    from sqlalchemy import select

    from process_manager import store

    async def go(engine: Any) -> list[dict[str, Any]]:
        t = store.manual_cases
        stmt = select(t).order_by(t.c.opened_at.desc())
        if not show_all:
            stmt = stmt.where(t.c.resolved_at.is_(None))
        async with engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        return [
            {
                "saga_id": str(r.saga_id),
                "order_id": r.order_id,
                "reason": r.reason,
                "opened_at": r.opened_at.isoformat(),
                "resolved_at": r.resolved_at.isoformat() if r.resolved_at else None,
                "resolution": r.resolution,
            }
            for r in rows
        ]

    rows = with_engine(go)
    if as_json:
        emit_json(rows)
        return
    table = Table("saga", "order", "opened", "reason", "resolved")
    for r in rows:
        table.add_row(
            r["saga_id"],
            r["order_id"],
            r["opened_at"][:19],
            r["reason"],
            (r["resolved_at"] or "")[:19],
        )
    Console().print(table)


@click.command("return")
@click.argument("order_id")
@click.option("--reason", default=None, help="Why the customer returns it (free text).")
@click.option("--message-id", default=None, help="AMQP message id (default: random).")
@click.option("--json", "as_json", is_flag=True, help="Print the saga id as JSON.")
def return_cmd(order_id: str, reason: str | None, message_id: str | None, as_json: bool) -> None:
    """Publish a StartReturn for a completed order, as any AMQP client would (routing key
    returns.start). Prints the returns saga's id; a refused return (the order is not completed,
    or was already returned) ends in the dead-letter store with its reason."""
    from pydantic import ValidationError

    from messaging.codec import summarize
    from messaging.topology import start_routing_key
    from process_manager import ops
    from schemas.base import saga_id_for
    from schemas.returns import StartReturn

    s = settings()
    mid = None
    if message_id:
        try:
            mid = uuid.UUID(message_id)
        except ValueError:
            raise click.BadParameter("not a UUID", param_hint="--message-id") from None
    try:
        cmd = StartReturn(order_id=order_id, reason=reason)
    except ValidationError as e:
        raise click.UsageError(summarize(e)) from None
    run_async(
        lambda: ops.publish_starts(
            s.amqp_url,
            [ops.start_message(cmd, message_id=mid)],
            routing_key=start_routing_key("returns"),
        )
    )
    saga_id = str(saga_id_for("returns", cmd.order_id))
    if as_json:
        emit_json({"saga_id": saga_id, "order_id": cmd.order_id, "saga_type": "returns"})
    else:
        click.echo(f"started return saga {saga_id} for order {cmd.order_id}")


@click.command()
@click.option("--json", "as_json", is_flag=True)
def definitions(as_json: bool) -> None:
    """Every registered saga definition and version, its steps, and its live sagas."""
    from process_manager import definitions as registry
    from process_manager import store

    async def counts(engine: Any) -> dict[str, dict[str, int]]:
        async with engine.connect() as conn:
            return await store.count_by_definition(conn)

    by_ref = with_engine(counts)
    pins = registry.parse_pins(settings().saga_versions)
    rows = []
    for d in registry.ALL:
        phases = by_ref.get(d.ref, {})
        row = d.describe()
        row["current"] = registry.current(d.name, pins) is d
        row["live"] = sum(n for p, n in phases.items() if p in store.LIVE_PHASES)
        row["by_phase"] = phases
        rows.append(row)
    unknown = sorted(set(by_ref) - {d.ref for d in registry.ALL})
    if as_json:
        emit_json(rows)
        return
    console = Console()
    table = Table("definition", "current", "start", "steps", "live", "finished")
    for row in rows:
        steps = " > ".join(
            f"{st['name']}{'*' if st['kind'] == 'pivot' else ''}" for st in row["steps"]
        )
        for path in row["paths"]:
            steps += f"\n  or {path['name']}: " + " > ".join(x["name"] for x in path["steps"])
        finished = sum(n for p, n in row["by_phase"].items() if p not in store.LIVE_PHASES)
        table.add_row(
            row["ref"],
            "yes" if row["current"] else "",
            row["start_routing_key"],
            steps,
            str(row["live"]),
            str(finished),
        )
    console.print(table)
    console.print("* the pivot: after it, a saga only moves forward")
    for ref in unknown:
        console.print(f"[red]sagas on {ref}, which this build does not register[/]")
