"""The ``sagabus`` command line.

Bad arguments and unreachable services end in one line on stderr and a non-zero exit:
2 for usage errors, 3 for an unreachable broker or database, 1 for a failed operation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from messaging.db import SchemaNotProvisioned
from messaging.management import ManagementError
from messaging.service import DEAD_LETTERS
from messaging.settings import Settings
from messaging.topology import SERVICES

T = TypeVar("T")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class Unreachable(click.ClickException):
    exit_code = EXIT_UNREACHABLE


class Failed(click.ClickException):
    exit_code = EXIT_FAILED


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")


def parse_duration(value: str) -> timedelta:
    m = _DURATION.match(value.strip())
    if not m:
        raise click.BadParameter(f"{value!r} is not a duration like 30s, 5m, 2h or 1d")
    n, unit = float(m.group(1)), m.group(2)
    return timedelta(
        milliseconds=n if unit == "ms" else 0,
        seconds=n if unit == "s" else 0,
        minutes=n if unit == "m" else 0,
        hours=n if unit == "h" else 0,
        days=n if unit == "d" else 0,
    )


class Duration(click.ParamType):  # type: ignore[type-arg,unused-ignore]
    name = "duration"

    def convert(self, value: Any, param: Any, ctx: Any) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(value)
        except click.BadParameter as e:
            self.fail(e.message, param, ctx)


def settings() -> Settings:
    try:
        return Settings()
    except Exception as e:  # pydantic validation of SAGABUS_* variables
        raise click.UsageError(f"invalid SAGABUS_* configuration: {e}".splitlines()[0]) from None


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return asyncio.run(fn())  # type: ignore[arg-type]
    except (OSError, ConnectionError) as e:
        raise Unreachable(_describe_unreachable(e)) from None
    except SchemaNotProvisioned as e:
        # an upgrade the administrator has not applied yet: one line, exit 1, no traceback
        raise click.ClickException(str(e).splitlines()[0]) from None
    except Exception as e:
        name = type(e).__module__ + "." + type(e).__name__
        if any(k in name for k in ("aiormq", "pamqp", "asyncpg", "sqlalchemy")) and _is_connect(e):
            raise Unreachable(_describe_unreachable(e)) from None
        raise


def _is_connect(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(
        k in text
        for k in (
            "connect",
            "refused",
            "does not exist",
            "authentication",
            "access_refused",
            "vhost",
            "unreachable",
        )
    )


def _describe_unreachable(e: BaseException) -> str:
    s = Settings()
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    target = (
        "RabbitMQ" if "amqp" in f"{type(e).__module__} {msg}".lower() else "PostgreSQL or RabbitMQ"
    )
    return (
        f"cannot reach {target} ({msg}); check SAGABUS_AMQP_URL={_redact(s.amqp_url)} and "
        f"SAGABUS_DATABASE_URL={_redact(s.database_url)}"
    )


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):([^@]+)@", r"//\1:***@", url)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sagabus")
def cli() -> None:
    """sagabus: the checkout saga on RabbitMQ and PostgreSQL."""


@cli.command()
def migrate() -> None:
    """Create the database, every service schema and the broker topology (idempotent)."""
    s = settings()

    async def go() -> None:
        from messaging import topology
        from messaging.db import ensure_database, make_engine
        from messaging.service import migrate as migrate_schemas
        from process_manager import bootstrap

        created = await ensure_database(s)
        engine = make_engine(s)
        try:
            await migrate_schemas(bootstrap.definitions(s), engine)
        finally:
            await engine.dispose()
        await topology.declare_all(s)
        click.echo(("created database; " if created else "") + "schemas and topology are in place")

    run_async(go)


#: ``all``, every service of the topology, and the dead-letter collector
SERVICE_CHOICES = ["all", *SERVICES, DEAD_LETTERS]


@cli.command()
@click.argument("services", nargs=-1, required=True, type=click.Choice(SERVICE_CHOICES))
def run(services: tuple[str, ...]) -> None:
    """Run services until SIGINT/SIGTERM: `all`, or one or more service names."""
    from messaging import telemetry

    s = settings()
    collect = "all" in services or "dead-letters" in services
    names = (
        None if "all" in services else [n for n in dict.fromkeys(services) if n != "dead-letters"]
    )
    if names is not None and len(services) == 1:
        os.environ.setdefault("SAGABUS_SINGLE_SERVICE", "1")
    telemetry.set_instance(s.service_instance)
    telemetry.configure_logging(s.log_format, s.log_level)

    async def go() -> None:
        from messaging.service import credentials_from_env, start_when_reachable
        from process_manager import bootstrap

        defs = bootstrap.definitions(s, names) if names is None or names else []
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # PostgreSQL or RabbitMQ restarting, or not up yet: wait for them rather than exit
        hosted = [d.name for d in defs] + (["dead-letters"] if collect else [])
        # several services in one process: each still as its own broker user and database
        # role when `sagabus provision --output` lines are in the environment
        credentials = credentials_from_env(hosted, os.environ) if len(hosted) > 1 else {}
        runtime = await start_when_reachable(
            defs, s, dead_letters=collect, stop=stop, credentials=credentials
        )
        if runtime is None:
            return
        sampler = None
        if s.metrics_port:
            from messaging.metrics import metrics

            m = metrics()
            m.watch(runtime)
            m.serve(s.metrics_port)
            sampler = asyncio.create_task(m.sample_outboxes(runtime))
        try:
            await stop.wait()
        finally:
            await runtime.stop()
            if sampler is not None:
                sampler.cancel()
            telemetry.shutdown_tracing()

    run_async(go)


@cli.command()
@click.argument("service", required=False, type=click.Choice(SERVICE_CHOICES))
def health(service: str | None) -> None:
    """Exit 0 when the database and the broker answer (used by container health checks)."""
    s = settings()

    async def go() -> None:
        import aio_pika
        import asyncpg

        conn = await asyncpg.connect(s.asyncpg_url, timeout=5)
        await conn.fetchval("SELECT 1")
        await conn.close()
        amqp = await aio_pika.connect(s.amqp_url, timeout=5)
        await amqp.close()
        click.echo("ok")

    run_async(go)


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


@cli.command()
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


def _with_engine(fn: Callable[[Any], Awaitable[T]]) -> T:
    s = settings()

    async def go() -> T:
        from messaging.db import make_engine

        engine = make_engine(s)
        try:
            return await fn(engine)
        finally:
            await engine.dispose()

    return run_async(go)


@cli.command()
@click.argument("saga")
@click.option("--json", "as_json", is_flag=True)
def status(saga: str, as_json: bool) -> None:
    """State, current step, history and outcome of a saga (by saga id or order id)."""
    from process_manager import ops

    data = _with_engine(lambda e: ops.saga_status(e, saga))
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


@cli.command("list")
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

    rows = _with_engine(
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


@cli.group()
def inventory() -> None:
    """Stock levels."""


@inventory.command("seed")
@click.argument("levels", nargs=-1, required=True)
@click.option("--add", is_flag=True, help="Add to the current level instead of setting it.")
def inventory_seed(levels: tuple[str, ...], add: bool) -> None:
    """Set stock: SKU=QTY ..."""
    from schemas.common import LineItem

    parsed: dict[str, int] = {}
    for lv in levels:
        sku, sep, qty = lv.partition("=")
        if not sep or not qty.isdigit():
            raise click.BadParameter(f"{lv!r}: expected SKU=QTY with QTY a whole number >= 0")
        try:
            LineItem(sku=sku, quantity=1, unit_price_minor=0)
        except Exception:
            raise click.BadParameter(f"{sku!r} is not a valid SKU") from None
        parsed[sku] = int(qty)

    async def go(engine: Any) -> None:
        from messaging.service import migrate as migrate_schemas
        from participants.inventory import service as inv

        await migrate_schemas([inv.definition(settings())], engine)
        async with engine.begin() as conn:
            await inv.seed(conn, parsed, add=add)

    _with_engine(go)
    click.echo(
        f"stock {'increased' if add else 'set'}: "
        + ", ".join(f"{k}={v}" for k, v in parsed.items())
    )


@inventory.command("show")
@click.option("--json", "as_json", is_flag=True)
def inventory_show(as_json: bool) -> None:
    """Show stock levels."""
    from sqlalchemy import select

    from participants.inventory import service as inv

    async def go(engine: Any) -> list[dict[str, Any]]:
        async with engine.connect() as conn:
            rows = (await conn.execute(select(inv.stock).order_by(inv.stock.c.sku))).all()
        return [{"sku": r.sku, "available": r.available} for r in rows]

    rows = _with_engine(go)
    if as_json:
        emit_json(rows)
    else:
        for r in rows:
            click.echo(f"{r['sku']}\t{r['available']}")


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
        decision = _with_engine(lambda e: operator_action(e, s, _saga_id(saga), action))
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


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def stats(as_json: bool) -> None:
    """Saga outcomes, compensation rate, time to complete, step latencies, retries and dead
    letters, stuck sagas and outbox lag, summarised from the database."""
    from process_manager import stats as stats_mod

    s = settings()
    data = _with_engine(lambda e: stats_mod.collect(e, s))
    if as_json:
        emit_json(data)
    else:
        stats_mod.render(data, Console())


@cli.command()
@click.argument("saga")
def resume(saga: str) -> None:
    """Re-send a stuck saga's awaited step (same idempotency key), or retry the compensation of a
    saga that needs manual attention. The process manager's relay publishes the command."""
    from process_manager.saga import Resume

    _operator(saga, Resume())


@cli.command()
@click.argument("saga")
@click.option("--reason", default="forced by operator", show_default=True)
def compensate(saga: str, reason: str) -> None:
    """Force a saga that is not terminal to compensate what it has done."""
    from process_manager.saga import ForceCompensate

    _operator(saga, ForceCompensate(reason))


@cli.command()
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

    rows = _with_engine(go)
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


# -- dead letters ---------------------------------------------------------------------------


@cli.group()
def dlq() -> None:
    """Inspect, group, replay and purge dead letters (collected into PostgreSQL)."""


def _filters(
    ids: tuple[str, ...] = (),
    queue: str | None = None,
    type_: str | None = None,
    saga: str | None = None,
    error: str | None = None,
    since: timedelta | None = None,
    group: str | None = None,
    status: str | None = "open",
) -> Any:
    from messaging.deadletters import Filters

    parsed = []
    for i in ids:
        try:
            parsed.append(uuid.UUID(i))
        except ValueError:
            raise click.BadParameter(f"{i!r} is not a dead-letter id (a UUID)") from None
    return Filters(
        ids=tuple(parsed),
        queue=queue,
        message_type=type_,
        saga_id=saga,
        error=error,
        since=since,
        group=group,
        status=status,
    )


def _filter_options(fn: Any) -> Any:
    for opt in reversed(
        [
            click.option("--queue", help="Work queue the message failed on, e.g. sagabus.payment."),
            click.option("--type", "type_", help="Message type, e.g. payment.AuthorizePayment.v1."),
            click.option("--saga", help="Saga id."),
            click.option("--error", help="Text in the error class or message."),
            click.option("--since", type=Duration(), help="Failed within this long, e.g. 1h."),
        ]
    ):
        fn = opt(fn)
    return fn


def _dlq_engine_call(fn: Callable[[Any], Awaitable[T]]) -> T:
    async def go(engine: Any) -> T:
        from messaging import deadletters
        from messaging.db import create_schema

        await create_schema(engine, deadletters.SCHEMA, deadletters.metadata)
        return await fn(engine)

    return _with_engine(go)


@dlq.command("list")
@click.argument("ids", nargs=-1)
@_filter_options
@click.option(
    "--status",
    type=click.Choice(["open", "replayed", "purged", "any"]),
    default="open",
    show_default=True,
)
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def dlq_list(
    ids: tuple[str, ...],
    queue: str | None,
    type_: str | None,
    saga: str | None,
    error: str | None,
    since: timedelta | None,
    status: str,
    limit: int,
    as_json: bool,
) -> None:
    """List dead letters, newest first."""
    from messaging import deadletters

    f = _filters(ids, queue, type_, saga, error, since, None, None if status == "any" else status)
    rows = _dlq_engine_call(lambda e: deadletters.list_dead_letters(e, f, limit))
    if as_json:
        emit_json(rows)
        return
    table = Table("id", "failed", "queue", "type", "error", "group", "status")
    for r in rows:
        table.add_row(
            r["id"],
            r["failed_at"][:19],
            r["queue"],
            r["message_type"] or "-",
            f"{r['error_class']}: {r['error_message']}"[:70],
            r["group"],
            r["status"],
        )
    Console().print(table)


@dlq.command("show")
@click.argument("dead_letter_id")
@click.option("--json", "as_json", is_flag=True)
def dlq_show(dead_letter_id: str, as_json: bool) -> None:
    """Body, headers, reason and trace id of one dead letter."""
    from messaging import deadletters

    f = _filters((dead_letter_id,))
    row = _dlq_engine_call(lambda e: deadletters.show(e, f.ids[0]))
    if row is None:
        raise Failed(f"no dead letter {dead_letter_id}")
    emit_json(row) if as_json else Console().print_json(json.dumps(row, default=str))


@dlq.command("groups")
@_filter_options
@click.option("--json", "as_json", is_flag=True)
def dlq_groups(
    queue: str | None,
    type_: str | None,
    saga: str | None,
    error: str | None,
    since: timedelta | None,
    as_json: bool,
) -> None:
    """Open dead letters grouped by failure fingerprint (error class, normalised message, queue,
    type)."""
    from messaging import deadletters

    f = _filters((), queue, type_, saga, error, since)
    rows = _dlq_engine_call(lambda e: deadletters.groups(e, f))
    if as_json:
        emit_json(rows)
        return
    table = Table("group", "count", "queue", "type", "error", "last failed")
    for r in rows:
        table.add_row(
            r["group"],
            str(r["count"]),
            r["queue"],
            r["message_type"] or "-",
            f"{r['error_class']}: {r['example']}"[:70],
            r["last_failed_at"][:19],
        )
    Console().print(table)


@dlq.command("replay")
@click.argument("ids", nargs=-1)
@_filter_options
@click.option("--group", help="Failure group (see `sagabus dlq groups`).")
@click.option("--dry-run", is_flag=True, help="Show what would be replayed.")
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=1000, show_default=True)
@click.option(
    "--rate", type=click.FloatRange(min=0.01), default=None, help="At most this many per second."
)
@click.option(
    "--force",
    is_flag=True,
    help="Also replay dead letters older than the shortest retention window (inbox, "
    "participants, sagas), whose late copy nothing may absorb any more.",
)
@click.option("--json", "as_json", is_flag=True)
def dlq_replay(
    ids: tuple[str, ...],
    queue: str | None,
    type_: str | None,
    saga: str | None,
    error: str | None,
    since: timedelta | None,
    group: str | None,
    dry_run: bool,
    limit: int,
    rate: float | None,
    force: bool,
    as_json: bool,
) -> None:
    """Republish dead letters to the queue that failed them, with their original message id.

    Dead letters older than the shortest retention window are left alone unless --force: the
    ids and tombstones that would make their late copy harmless may have been pruned."""
    from messaging import deadletters, telemetry
    from messaging.publisher import Publisher

    f = _filters(ids, queue, type_, saga, error, since, group)
    if not f.any():
        raise click.UsageError("name dead-letter ids, a --group, or at least one filter")
    s = settings()
    window = None if force else deadletters.replay_window(s)
    if window is not None:
        f = dataclasses.replace(f, failed_within=window)
    too_old = 0

    async def go(engine: Any) -> list[dict[str, Any]]:
        import aio_pika

        nonlocal too_old
        if window is not None:
            too_old = await deadletters.count_too_old(
                engine, dataclasses.replace(f, failed_within=None), window
            )

        if dry_run:
            return await deadletters.replay(engine, None, f, limit=limit, dry_run=True)  # type: ignore[arg-type]
        connection = await aio_pika.connect_robust(s.amqp_url)
        async with connection:
            publisher = await Publisher.open(connection)
            try:
                return await deadletters.replay(engine, publisher, f, limit=limit, rate=rate)
            finally:
                telemetry.shutdown_tracing()

    rows = _dlq_engine_call(go)
    if as_json:
        emit_json(
            {"dry_run": dry_run, "count": len(rows), "too_old": too_old, "dead_letters": rows}
        )
    else:
        verb = "would replay" if dry_run else "replayed"
        click.echo(f"{verb} {len(rows)} dead letter(s)")
        for r in rows:
            click.echo(f"  {r['id']}  {r['queue']}  {r['message_type']}")
    if too_old:
        click.echo(
            f"left {too_old} dead letter(s) that failed more than {window} ago: nothing may "
            "absorb their late copy any more (--force replays them anyway)",
            err=True,
        )


@dlq.command("purge")
@click.argument("ids", nargs=-1)
@_filter_options
@click.option("--group", help="Failure group.")
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=100_000, show_default=True)
@click.option("--yes", is_flag=True, help="Confirm: archive the matching open dead letters.")
def dlq_purge(
    ids: tuple[str, ...],
    queue: str | None,
    type_: str | None,
    saga: str | None,
    error: str | None,
    since: timedelta | None,
    group: str | None,
    limit: int,
    yes: bool,
) -> None:
    """Archive dead letters (status purged; rows are kept, never destroyed)."""
    from messaging import deadletters

    f = _filters(ids, queue, type_, saga, error, since, group)
    if not f.any():
        raise click.UsageError("name dead-letter ids, a --group, or at least one filter")
    if not yes:
        raise click.UsageError("purge needs --yes")
    n = _dlq_engine_call(lambda e: deadletters.purge(e, f, limit=limit))
    click.echo(f"archived {n} dead letter(s)")


# -- personal data --------------------------------------------------------------------------


@cli.command()
@click.option("--customer", help="Customer id: every order of theirs.")
@click.option("--order", "order_id", help="One order id.")
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
@click.option("--json", "as_json", is_flag=True)
def erase(customer: str | None, order_id: str | None, dry_run: bool, as_json: bool) -> None:
    """Redact a customer's (or an order's) payment token, address and customer id wherever
    they are stored: sagas, participants' tables, sent outbox rows, dead letters. Orders whose
    saga is still running are skipped (run again once they finish)."""
    from process_manager import bootstrap
    from process_manager.erase import erase as do_erase

    if (customer is None) == (order_id is None):
        raise click.UsageError("name exactly one of --customer or --order")
    if (customer or order_id or "").strip() == "":
        raise click.UsageError("the id must not be empty")
    s = settings()
    report = _with_engine(
        lambda e: do_erase(
            e, bootstrap.definitions(s), customer=customer, order=order_id, dry_run=dry_run
        )
    )
    subject = f"customer {customer}" if customer is not None else f"order {order_id}"
    if not report.found:
        raise Failed(f"nothing stored for {subject}")
    if as_json:
        emit_json(report.as_json())
    else:
        verb = "would redact" if dry_run else "redacted"
        click.echo(
            f"{verb} {sum(report.touched.values())} row(s) for {subject}"
            f" ({len(report.orders)} order(s))"
        )
        if report.touched:
            table = Table("table", "rows")
            for name, n in sorted(report.touched.items()):
                table.add_row(name, str(n))
            Console().print(table)
        for skipped in report.skipped:
            click.echo(
                f"skipped order {skipped['order_id']}: {skipped['why']} ({skipped['status']});"
                " run again once it has finished"
            )
        if report.unsent_outbox:
            click.echo(f"left {report.unsent_outbox} unsent outbox row(s) as they are")
    if report.skipped and not report.orders:
        sys.exit(EXIT_FAILED)


@cli.command()
@click.option("--sagas", type=click.IntRange(1, 100_000), default=200, show_default=True)
@click.option("--seed", type=int, default=None, help="Scenario mix seed (default: time).")
@click.option("--verbose", is_flag=True, help="Show the services' logs.")
@click.option(
    "--single-user",
    is_flag=True,
    help="Run every service as the one user of SAGABUS_AMQP_URL and SAGABUS_DATABASE_URL "
    "instead of provisioning a broker user and a database role per service.",
)
@click.option(
    "--admin-url",
    default="http://guest:guest@127.0.0.1:15672",
    show_default=True,
    envvar="SAGABUS_RABBITMQ_ADMIN_URL",
    show_envvar=True,
    help="RabbitMQ management API with an administrator's credentials, to provision the "
    "services' users.",
)
def demo(sagas: int, seed: int | None, verbose: bool, single_user: bool, admin_url: str) -> None:
    """Run every service, start N sagas of every scenario, check every outcome.

    Each service runs as its own broker user and database role (provisioned afresh, with
    new passwords, every run) unless --single-user."""
    from messaging import telemetry
    from messaging.management import Management
    from process_manager.demo import run_demo

    try:
        Management(admin_url)
    except ValueError as e:
        raise click.UsageError(f"--admin-url {e}") from None
    s = settings()
    telemetry.configure_logging(
        "console" if verbose else s.log_format, s.log_level if verbose else "error"
    )
    ok = run_async(
        lambda: run_demo(
            s, sagas, Console(), seed=seed, single_user=single_user, admin_url=admin_url
        )
    )
    if not ok:
        sys.exit(EXIT_FAILED)


@cli.command()
@click.option("--sagas", type=click.IntRange(1, 10_000_000), default=2000, show_default=True)
@click.option(
    "--window",
    type=click.IntRange(1, 100_000),
    default=200,
    show_default=True,
    help="At most this many sagas in flight.",
)
@click.option("--pm-instances", type=click.IntRange(1, 2), default=1, show_default=True)
@click.option(
    "--warmup",
    type=click.IntRange(0, 1_000_000),
    default=None,
    help="Sagas run before measuring (default: a tenth of --sagas, at most 500).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--skip-floor", is_flag=True, help="Measure sagabus only.")
@click.option(
    "--peers/--no-peers",
    default=None,
    help="Also run the peer saga engines of benchmarks.peers (default: when it imports).",
)
@click.option(
    "--peer-sagas",
    type=click.IntRange(1, 1_000_000),
    default=None,
    help="Sagas each peer runs (default: --sagas); a slow peer can be measured on fewer.",
)
@click.option(
    "--sample-s",
    type=click.FloatRange(0.05, 3600),
    default=None,
    help="RSS sampling interval (default: 1 s, or 5 s from 20,000 sagas).",
)
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep each process's stderr here (default: discarded).",
)
@click.option("--keep", is_flag=True, help="Keep the bench database and vhosts.")
def bench(
    sagas: int,
    window: int,
    pm_instances: int,
    warmup: int | None,
    as_json: bool,
    skip_floor: bool,
    peers: bool | None,
    peer_sagas: int | None,
    sample_s: float | None,
    log_dir: Path | None,
    keep: bool,
) -> None:
    """Throughput, latency, CPU and memory of N successful sagas, against the floor."""
    import secrets

    from benchmarks import bench as b

    base = settings()
    with_peers = b.resolve_peers(peers)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    opts = b.Options(
        sagas=sagas,
        window=window,
        pm_instances=pm_instances,
        warmup=warmup if warmup is not None else min(500, sagas // 10),
        peers=with_peers,
        sample_s=sample_s or (5.0 if sagas >= 20_000 else 1.0),
        log_dir=log_dir,
        keep=keep,
    )
    run = secrets.token_hex(3)
    machine = b.Machine()
    facts = b.machine_facts()

    def progress(line: str) -> None:
        if not as_json:
            click.echo(line, err=True)

    try:
        result = run_async(
            lambda: b.run(
                base,
                opts,
                run=run,
                machine=machine,
                facts=facts,
                skip_floor=skip_floor,
                peer_sagas=peer_sagas,
                progress=progress,
            )
        )
    except asyncio.CancelledError:
        click.echo(f"sagabus bench {run}: interrupted; its processes and scratch removed", err=True)
        raise SystemExit(143) from None
    if as_json:
        click.echo(json.dumps(result, default=str))
    else:
        b.print_human(result)
    if not b.succeeded(result):
        raise Failed(
            f"{result['sagabus']['completed']}/{sagas} sagas COMPLETED "
            f"({result['sagabus'].get('failures')})"
        )


def _register_commands() -> None:
    """Commands that live in their own modules."""
    from messaging.provision import broker

    cli.add_command(broker.command)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    import logging

    # Client libraries log connection failures themselves; the CLI reports them in one line.
    # `run` and `demo` configure logging for the services they host.
    from messaging import telemetry

    telemetry.configure_logging("auto", "warning")  # to stderr; stdout stays for results
    for noisy in ("aiormq", "aio_pika", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    try:
        cli.main(args=argv, prog_name="sagabus", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("sagabus: aborted", err=True)
        sys.exit(130)
    except ManagementError as e:
        # the broker's management API (provisioning for `demo`), in one line
        click.echo(f"sagabus: error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        msg = e.format_message().replace("\n", " ")
        if isinstance(e, click.UsageError) and e.ctx is not None and e.ctx.command_path:
            msg = f"{e.ctx.command_path}: {msg}"
        click.echo(f"sagabus: error: {msg}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
