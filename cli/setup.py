"""Setting a deployment up and running it: ``migrate``, ``run``, ``health``, stock
(``inventory seed``/``show``) and personal data (``erase``). ``provision`` is ``cli.provision``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from cli.base import (
    EXIT_FAILED,
    Failed,
    emit_json,
    run_async,
    settings,
    with_engine,
)
from messaging.service import DEAD_LETTERS
from messaging.topology import SERVICES

#: ``all``, every service of the topology, and the dead-letter collector
SERVICE_CHOICES = ["all", *SERVICES, DEAD_LETTERS]


@click.command()
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


@click.command()
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


@click.command()
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


@click.group()
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

    with_engine(go)
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

    rows = with_engine(go)
    if as_json:
        emit_json(rows)
    else:
        for r in rows:
            click.echo(f"{r['sku']}\t{r['available']}")


@click.command()
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
    report = with_engine(
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
