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


@click.command()
@click.argument("saga")
@click.option("--json", "as_json", is_flag=True)
def status(saga: str, as_json: bool) -> None:
    """State, current step, history and outcome of a saga (by saga id or order id)."""
    from process_manager import ops

    data = with_engine(lambda e: ops.saga_status(e, saga))
    if data is None:
        raise Failed(f"no saga {saga!r}")
    if as_json:
        emit_json(data)
        return
    console = Console()
    console.print(
        f"saga [cyan]{data['saga_id']}[/] order {data['order_id']}: "
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
@click.option(
    "--state",
    type=click.Choice(
        [
            "PENDING_ORDER",
            "PENDING_PAYMENT",
            "PENDING_INVENTORY",
            "PENDING_SHIPMENT",
            "PENDING_CAPTURE",
            "COMPLETING",
            "COMPENSATING",
            "COMPLETED",
            "COMPENSATED",
            "FAILED_NEEDS_MANUAL",
        ]
    ),
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
    state: str | None, older_than: timedelta | None, stuck: bool, limit: int, as_json: bool
) -> None:
    """List sagas, newest first."""
    from process_manager import ops

    rows = with_engine(
        lambda e: ops.list_sagas(
            e,
            state=state,
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
    from process_manager.saga import Resume

    _operator(saga, Resume())


@click.command()
@click.argument("saga")
@click.option("--reason", default="forced by operator", show_default=True)
def compensate(saga: str, reason: str) -> None:
    """Force a saga that is not terminal to compensate what it has done."""
    from process_manager.saga import ForceCompensate

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
