"""``sagabus demo``: every service in one process against the machine's RabbitMQ and PostgreSQL,
N sagas mixing every scenario, and a table of outcomes against the expected ones."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.db import ensure_database, make_engine
from messaging.service import Runtime
from messaging.settings import Settings
from participants.inventory import service as inventory
from participants.payment import service as payment
from participants.shipping.carrier import UNAVAILABLE_POSTAL_CODE, UNDELIVERABLE_POSTAL_CODE
from process_manager import bootstrap, ops, principals, store
from schemas.checkout import StartCheckout
from schemas.common import LineItem, ShippingAddress

ADDRESS = ShippingAddress(line1="1 Demo Street", city="Utrecht", postal_code="3511AA", country="NL")


@dataclass(frozen=True)
class Scenario:
    name: str
    expected: str
    weight: int


SCENARIOS = (
    Scenario("success", "COMPLETED", 55),
    Scenario("payment declined", "COMPENSATED", 15),
    Scenario("out of stock", "COMPENSATED", 13),
    Scenario("shipping rejected", "COMPENSATED", 7),
    Scenario("carrier unavailable", "COMPENSATED", 6),
    Scenario("last unit race", "1 COMPLETED + 1 COMPENSATED", 4),
)


def plan(n: int, seed: int) -> list[str]:
    """Which scenario each saga plays; races come in pairs."""
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < n:
        s = rng.choices(SCENARIOS, weights=[s.weight for s in SCENARIOS])[0]
        if s.name == "last unit race":
            if n - len(names) >= 2:
                names += [s.name, s.name]
            continue
        names.append(s.name)
    return names


def build(run: str, i: int, scenario: str, race_no: int) -> StartCheckout:
    sku = f"DEMO-{run}-STD"
    token = "tok_visa"
    address = ADDRESS
    if scenario == "payment declined":
        token = "tok_decline"
    elif scenario == "out of stock":
        sku = f"DEMO-{run}-NONE"
    elif scenario == "shipping rejected":
        address = ADDRESS.model_copy(update={"postal_code": UNDELIVERABLE_POSTAL_CODE})
    elif scenario == "carrier unavailable":
        address = ADDRESS.model_copy(update={"postal_code": UNAVAILABLE_POSTAL_CODE})
    elif scenario == "last unit race":
        sku = f"DEMO-{run}-LAST-{race_no}"
    return StartCheckout(
        order_id=f"demo-{run}-{i:05d}",
        customer_id=f"cus_{i % 97:03d}",
        currency="EUR",
        items=(LineItem(sku=sku, quantity=1, unit_price_minor=1999),),
        payment_token=token,
        shipping_address=address,
    )


def demo_settings(base: Settings) -> Settings:
    # Short delays so that the retry-then-fail scenarios finish in seconds; everything else as
    # configured. Durability is untouched.
    return base.model_copy(
        update={
            "retry_delays_ms": (100, 200, 400, 800),
            "shipping_max_attempts": 3,
        }
    )


async def invariants(engine: AsyncEngine, prefix: str) -> dict[str, int]:
    like = prefix + "%"
    q = {
        # more than one capture (or refund) for one order: a double charge
        "double_charges": "SELECT count(*) FROM (SELECT order_id FROM payment.ledger "
        "WHERE order_id LIKE :p AND kind IN ('capture','refund') GROUP BY order_id, kind "
        "HAVING count(*) > 1) x",
        "negative_stock": "SELECT count(*) FROM inventory.stock WHERE available < 0",
        "captured_not_completed": "SELECT count(*) FROM payment.payments p JOIN "
        "process_manager.sagas s ON s.order_id = p.order_id WHERE p.order_id LIKE :p "
        "AND p.status = 'CAPTURED' AND s.status <> 'COMPLETED'",
        "dangling_authorizations": "SELECT count(*) FROM payment.payments p JOIN "
        "process_manager.sagas s ON s.order_id = p.order_id WHERE p.order_id LIKE :p "
        "AND p.status = 'AUTHORIZED' AND s.status IN ('COMPLETED','COMPENSATED')",
        "dangling_reservations": "SELECT count(*) FROM inventory.reservations r JOIN "
        "process_manager.sagas s ON s.order_id = r.order_id WHERE r.order_id LIKE :p "
        "AND r.status = 'RESERVED' AND s.status = 'COMPENSATED'",
        "unsent_outbox_rows": "SELECT "
        "(SELECT count(*) FROM process_manager.outbox WHERE sent_at IS NULL)"
        " + (SELECT count(*) FROM orders.outbox WHERE sent_at IS NULL)"
        " + (SELECT count(*) FROM payment.outbox WHERE sent_at IS NULL)"
        " + (SELECT count(*) FROM inventory.outbox WHERE sent_at IS NULL)"
        " + (SELECT count(*) FROM shipping.outbox WHERE sent_at IS NULL)",
    }
    out = {}
    async with engine.connect() as conn:
        for name, sql in q.items():
            out[name] = int((await conn.execute(text(sql), {"p": like})).scalar_one())
    return out


async def run_demo(
    base: Settings,
    n: int,
    console: Console,
    *,
    seed: int | None = None,
    timeout_s: float | None = None,
    single_user: bool = False,
    admin_url: str | None = None,
) -> bool:
    settings = demo_settings(base)
    await ensure_database(settings)
    run = secrets.token_hex(3)
    seed = seed if seed is not None else int(time.time())
    prefix = f"demo-{run}-"
    names = plan(n, seed)
    races = 0
    starts: list[tuple[str, StartCheckout]] = []
    for i, name in enumerate(names):
        if name == "last unit race":
            races += 1
        starts.append((name, build(run, i, name, (races + 1) // 2)))
    engine = make_engine(settings)
    client_url = settings.amqp_url
    credentials = None
    if not single_user:
        # each service as its own broker user and database role, as in production: the
        # consumers believe a reply only from the user that owns its type
        who = await principals.provision_all(
            settings, admin_url=admin_url or principals.DEFAULT_ADMIN_URL
        )
        credentials, client_url = who.services, who.client_amqp_url
    runtime = Runtime(
        bootstrap.definitions(settings),
        settings,
        engine=engine,
        dead_letters=True,
        credentials=credentials,
    )
    console.print(f"[bold]sagabus demo[/] run [cyan]{run}[/], {n} sagas, seed {seed}")
    console.print(
        "every service runs as the one user of SAGABUS_AMQP_URL and SAGABUS_DATABASE_URL"
        if single_user
        else "every service runs as its own broker user (sagabus-demo-<service>) and database "
        "role (sagabus_demo_<service>); sagas are started as sagabus-demo-client"
    )
    await runtime.start()
    try:
        async with engine.begin() as conn:
            levels = {f"DEMO-{run}-STD": n * 2, f"DEMO-{run}-NONE": 0}
            levels.update({f"DEMO-{run}-LAST-{k}": 1 for k in range(1, races // 2 + 1)})
            await inventory.seed(conn, levels)
        started = time.monotonic()
        await ops.publish_starts(client_url, [ops.start_message(c) for _, c in starts])
        deadline = started + (timeout_s if timeout_s is not None else 60 + n * 0.5)
        with Progress(
            TextColumn("sagas terminal"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            task = progress.add_task("sagas", total=n)
            while True:
                counts = await ops.counts_by_status(engine, prefix)
                done = sum(
                    counts.get(s, 0) for s in ("COMPLETED", "COMPENSATED", "FAILED_NEEDS_MANUAL")
                )
                progress.update(task, completed=done)
                if done >= n or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
        elapsed = time.monotonic() - started
        # let the relays flush the last facts before checking invariants
        await asyncio.sleep(0.5)
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(store.sagas.c.order_id, store.sagas.c.status).where(
                        store.sagas.c.order_id.startswith(prefix)
                    )
                )
            ).all()
            charged = (
                await conn.execute(
                    select(func.coalesce(func.sum(payment.ledger.c.amount_minor), 0)).where(
                        payment.ledger.c.order_id.startswith(prefix),
                        payment.ledger.c.kind == "capture",
                    )
                )
            ).scalar_one()
        status_of = {r.order_id: r.status for r in rows}
        by_scenario: dict[str, Counter[str]] = {}
        for name, cmd in starts:
            by_scenario.setdefault(name, Counter())[status_of.get(cmd.order_id, "MISSING")] += 1
        table = Table(title=f"Outcomes ({elapsed:.1f} s, {n / elapsed:.1f} sagas/s)")
        for col in ("scenario", "sagas", "expected", "got", "ok"):
            table.add_column(col)
        all_ok = True
        for s in SCENARIOS:
            got = by_scenario.get(s.name)
            if not got:
                continue
            total = sum(got.values())
            if s.name == "last unit race":
                ok = got["COMPLETED"] == total // 2 and got["COMPENSATED"] == total // 2
                expected = f"{total // 2} COMPLETED + {total // 2} COMPENSATED"
            else:
                ok = got[s.expected] == total
                expected = f"{total} {s.expected}"
            all_ok &= ok
            table.add_row(
                s.name,
                str(total),
                expected,
                ", ".join(f"{v} {k}" for k, v in sorted(got.items())),
                "[green]yes[/]" if ok else "[red]NO[/]",
            )
        console.print(table)
        inv = await invariants(engine, prefix)
        inv_table = Table(title="Invariants")
        inv_table.add_column("check")
        inv_table.add_column("count")
        for k, v in inv.items():
            inv_table.add_row(k.replace("_", " "), f"[green]{v}[/]" if v == 0 else f"[red]{v}[/]")
            all_ok &= v == 0
        console.print(inv_table)
        console.print(
            f"captured {charged / 100:.2f} EUR across "
            f"{by_scenario.get('success', Counter())['COMPLETED']} "
            f"successful checkouts"
        )
        console.print("[bold green]demo passed[/]" if all_ok else "[bold red]demo FAILED[/]")
        return all_ok
    finally:
        await runtime.stop()
        await engine.dispose()
