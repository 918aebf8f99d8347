"""``sagabus demo``: every service in one process against the machine's RabbitMQ and PostgreSQL,
N sagas mixing every scenario, and a table of outcomes against the expected ones."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
import uuid
from collections import Counter
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.db import ensure_database, make_engine
from messaging.provision import principals
from messaging.service import Runtime
from messaging.settings import Settings
from messaging.topology import start_routing_key
from participants.inventory import service as inventory
from participants.payment import service as payment
from participants.shipping.carrier import UNAVAILABLE_POSTAL_CODE, UNDELIVERABLE_POSTAL_CODE
from process_manager import bootstrap, ops, store
from schemas.checkout import StartCheckout
from schemas.common import LineItem, ShippingAddress
from schemas.returns import StartReturn

ADDRESS = ShippingAddress(line1="1 Demo Street", city="Utrecht", postal_code="3511AA", country="NL")


@dataclass(frozen=True)
class Scenario:
    name: str
    expected: str
    weight: int
    #: what its return does, if the demo returns the order afterwards: the returns saga's
    #: final status, or "refused" (no saga: the start is dead-lettered with its reason)
    returned: str | None = None


SCENARIOS = (
    Scenario("success", "COMPLETED", 40),
    Scenario("success, then returned", "COMPLETED", 8, returned="RETURNED"),
    Scenario("success, pickup fails on return", "COMPLETED", 3, returned="COMPENSATED"),
    Scenario("payment declined", "COMPENSATED", 10, returned="refused"),
    Scenario("fraud screening rejects", "COMPENSATED", 6),
    Scenario("out of stock", "COMPENSATED", 10),
    Scenario("out of stock, backorder allowed", "BACKORDERED", 6),
    Scenario("shipping rejected", "COMPENSATED", 7),
    Scenario("carrier unavailable", "COMPENSATED", 6),
    Scenario("last unit race", "1 COMPLETED + 1 COMPENSATED", 4),
)
BY_NAME = {s.name: s for s in SCENARIOS}
#: a customer on the risk service's block list (its default ``SAGABUS_RISK_BLOCKED_CUSTOMERS``)
BLOCKED_CUSTOMER = "cus_blocked"


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
    customer = f"cus_{i % 97:03d}"
    backorder = False
    if scenario == "payment declined":
        token = "tok_decline"
    elif scenario == "fraud screening rejects":
        customer = BLOCKED_CUSTOMER
    elif scenario == "out of stock":
        sku = f"DEMO-{run}-NONE"
    elif scenario == "out of stock, backorder allowed":
        sku = f"DEMO-{run}-NONE"
        backorder = True
    elif scenario == "success, pickup fails on return":
        address = ADDRESS.model_copy(update={"line1": "No Pickup, 1 Demo Street"})
    elif scenario == "shipping rejected":
        address = ADDRESS.model_copy(update={"postal_code": UNDELIVERABLE_POSTAL_CODE})
    elif scenario == "carrier unavailable":
        address = ADDRESS.model_copy(update={"postal_code": UNAVAILABLE_POSTAL_CODE})
    elif scenario == "last unit race":
        sku = f"DEMO-{run}-LAST-{race_no}"
    return StartCheckout(
        order_id=f"demo-{run}-{i:05d}",
        customer_id=customer,
        currency="EUR",
        items=(LineItem(sku=sku, quantity=1, unit_price_minor=1999),),
        payment_token=token,
        shipping_address=address,
        allow_backorder=backorder,
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
    checkout = "s.saga_type = 'checkout'"
    q = {
        # more than one capture (or refund) for one order: a double charge
        "double_charges": "SELECT count(*) FROM (SELECT order_id FROM payment.ledger "
        "WHERE order_id LIKE :p AND kind IN ('capture','refund') GROUP BY order_id, kind "
        "HAVING count(*) > 1) x",
        "negative_stock": "SELECT count(*) FROM inventory.stock WHERE available < 0",
        "captured_not_completed": "SELECT count(*) FROM payment.payments p JOIN "
        f"process_manager.sagas s ON s.order_id = p.order_id AND {checkout} "
        "WHERE p.order_id LIKE :p AND p.status = 'CAPTURED' AND s.status <> 'COMPLETED'",
        "dangling_authorizations": "SELECT count(*) FROM payment.payments p JOIN "
        f"process_manager.sagas s ON s.order_id = p.order_id AND {checkout} "
        "WHERE p.order_id LIKE :p AND p.status = 'AUTHORIZED' "
        "AND s.phase IN ('COMPLETED','COMPENSATED')",
        "dangling_reservations": "SELECT count(*) FROM inventory.reservations r JOIN "
        f"process_manager.sagas s ON s.order_id = r.order_id AND {checkout} "
        "WHERE r.order_id LIKE :p AND r.status = 'RESERVED' AND s.status = 'COMPENSATED'",
        # a refund for an order whose return did not reach its refund (or that never had one)
        "refunds_without_a_return": "SELECT count(*) FROM payment.ledger l WHERE l.kind = "
        "'refund' AND l.order_id LIKE :p AND NOT EXISTS (SELECT 1 FROM process_manager.sagas s"
        " WHERE s.order_id = l.order_id AND s.saga_type = 'returns' AND s.status = 'RETURNED')",
        # a returned order refunded other than exactly what was captured
        "returns_refunded_wrong_amount": "SELECT count(*) FROM process_manager.sagas s "
        "WHERE s.saga_type = 'returns' AND s.status = 'RETURNED' AND s.order_id LIKE :p AND "
        "(SELECT coalesce(sum(amount_minor), -1) FROM payment.ledger WHERE order_id = "
        "s.order_id AND kind = 'refund') <> (SELECT coalesce(sum(amount_minor), -2) FROM "
        "payment.ledger WHERE order_id = s.order_id AND kind = 'capture')",
        "backorders_holding_stock_or_money": "SELECT count(*) FROM process_manager.sagas s "
        "WHERE s.status = 'BACKORDERED' AND s.order_id LIKE :p AND (EXISTS (SELECT 1 FROM "
        "inventory.reservations r WHERE r.order_id = s.order_id AND r.status = 'RESERVED') OR "
        "EXISTS (SELECT 1 FROM payment.payments p WHERE p.order_id = s.order_id AND p.status "
        "IN ('AUTHORIZED', 'CAPTURED')))",
        "unsent_outbox_rows": "SELECT "
        "(SELECT count(*) FROM process_manager.outbox WHERE sent_at IS NULL)"
        " + (SELECT count(*) FROM orders.outbox WHERE sent_at IS NULL)"
        " + (SELECT count(*) FROM payment.outbox WHERE sent_at IS NULL)"
        " + (SELECT count(*) FROM inventory.outbox WHERE sent_at IS NULL)"
        " + (SELECT count(*) FROM shipping.outbox WHERE sent_at IS NULL)"
        " + (SELECT count(*) FROM risk.outbox WHERE sent_at IS NULL)",
    }
    out = {}
    async with engine.connect() as conn:
        for name, sql in q.items():
            out[name] = int((await conn.execute(text(sql), {"p": like})).scalar_one())
    return out


async def _wait_finished(
    engine: AsyncEngine,
    console: Console,
    prefix: str,
    saga_type: str,
    n: int,
    deadline: float,
    label: str,
) -> None:
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("sagas", total=n)
        while True:
            counts = await ops.counts_by_phase(engine, prefix, saga_type=saga_type)
            done = sum(
                counts.get(s, 0) for s in ("COMPLETED", "COMPENSATED", "FAILED_NEEDS_MANUAL")
            )
            progress.update(task, completed=done)
            if done >= n or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.25)


async def _wait_dead_letters(
    engine: AsyncEngine, message_ids: list[str], deadline: float
) -> dict[str, str]:
    """order id -> the reason of the dead letter of each refused start, once all are stored."""
    found: dict[str, str] = {}
    while True:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT body, error_message FROM dead_letters.dead_letters"
                        " WHERE message_id = ANY(:ids)"
                    ),
                    {"ids": message_ids},
                )
            ).all()
        for r in rows:
            try:
                order_id = json.loads(bytes(r.body))["order_id"]
            except (ValueError, KeyError, TypeError):
                continue
            found[order_id] = r.error_message
        if len(found) >= len(message_ids) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.25)


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
        await _wait_finished(
            engine, console, prefix, "checkout", n, deadline, "checkouts finished"
        )
        elapsed = time.monotonic() - started
        # then the customers return some orders: a second saga on the same participants
        returns = [
            (name, StartReturn(order_id=cmd.order_id, reason="changed my mind"))
            for name, cmd in starts
            if BY_NAME[name].returned is not None
        ]
        return_ids = {r.order_id: uuid.uuid4() for _, r in returns}
        await ops.publish_starts(
            client_url,
            [ops.start_message(r, message_id=return_ids[r.order_id]) for _, r in returns],
            routing_key=start_routing_key("returns"),
        )
        expected_sagas = sum(1 for name, _ in returns if BY_NAME[name].returned != "refused")
        await _wait_finished(
            engine,
            console,
            prefix,
            "returns",
            expected_sagas,
            time.monotonic() + 60 + len(returns) * 0.5,
            "returns finished",
        )
        refused_ids = [
            str(return_ids[r.order_id])
            for name, r in returns
            if BY_NAME[name].returned == "refused"
        ]
        refusals = await _wait_dead_letters(engine, refused_ids, time.monotonic() + 30)
        # let the relays flush the last facts before checking invariants
        await asyncio.sleep(0.5)
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(
                        store.sagas.c.order_id, store.sagas.c.status, store.sagas.c.saga_type
                    ).where(store.sagas.c.order_id.startswith(prefix))
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
        status_of = {r.order_id: r.status for r in rows if r.saga_type == "checkout"}
        return_of = {r.order_id: r.status for r in rows if r.saga_type == "returns"}
        by_scenario: dict[str, Counter[str]] = {}
        returned: dict[str, Counter[str]] = {}
        for name, cmd in starts:
            by_scenario.setdefault(name, Counter())[status_of.get(cmd.order_id, "MISSING")] += 1
            if BY_NAME[name].returned is not None:
                got_return = return_of.get(cmd.order_id)
                if got_return is None:
                    got_return = "refused" if cmd.order_id in refusals else "MISSING"
                returned.setdefault(name, Counter())[got_return] += 1
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
        if returned:
            rtable = Table(title="Returns (a second saga on the same participants)")
            for col in ("returned after", "returns", "expected", "got", "ok"):
                rtable.add_column(col)
            for s in SCENARIOS:
                got = returned.get(s.name)
                if not got or s.returned is None:
                    continue
                total = sum(got.values())
                ok = got[s.returned] == total
                all_ok &= ok
                rtable.add_row(
                    s.name,
                    str(total),
                    f"{total} {s.returned}",
                    ", ".join(f"{v} {k}" for k, v in sorted(got.items())),
                    "[green]yes[/]" if ok else "[red]NO[/]",
                )
            console.print(rtable)
            for order_id, reason in sorted(refusals.items())[:1]:
                console.print(f"a refused return, as its dead letter says: {order_id}: {reason}")
        inv = await invariants(engine, prefix)
        inv_table = Table(title="Invariants")
        inv_table.add_column("check")
        inv_table.add_column("count")
        for k, v in inv.items():
            inv_table.add_row(k.replace("_", " "), f"[green]{v}[/]" if v == 0 else f"[red]{v}[/]")
            all_ok &= v == 0
        console.print(inv_table)
        completed = sum(c["COMPLETED"] for c in by_scenario.values())
        console.print(
            f"captured {charged / 100:.2f} EUR across {completed} completed checkouts; "
            f"{sum(c['RETURNED'] for c in returned.values())} returned and refunded"
        )
        console.print("[bold green]demo passed[/]" if all_ok else "[bold red]demo FAILED[/]")
        return all_ok
    finally:
        await runtime.stop()
        await engine.dispose()
