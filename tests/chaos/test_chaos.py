"""Chaos: one run of at least 500 sagas mixing every scenario while the services, running as
separate OS processes, are killed with SIGKILL and restarted, RabbitMQ and PostgreSQL are
restarted under them, about 10 % of messages are delivered twice (some late, out of order) and
about 1 % of the traffic is poison. Afterwards PostgreSQL and the CLI must show every saga
terminal with the outcome its scenario expects, no double charge, no oversold unit, nothing
left dangling, every poison message dead-lettered with its reason and no outbox row unsent.

Every service runs as its own broker user and database role (provisioned for the run), with the
sender check on: a consumer believes a message only from the user that owns its type. Sagas are
started as ``client``, copies are published as their original sender, and the CLI runs as the
operator.

Seeded: ``CHAOS_SEED=<seed> pytest -m chaos`` replays the same plan, poison and fault schedule
(the interleaving with the processes' own timing is, of course, never the same twice).
``CHAOS_SAGAS`` changes the number of sagas (at least 500 in CI).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import signal
import sys
import time
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import topology
from messaging.db import make_engine
from messaging.settings import Settings
from participants.inventory import service as inventory
from process_manager.principals import Principals
from process_manager.saga import TERMINAL
from tests.chaos import conftest as chaos_conftest
from tests.chaos.harness import (
    EXPECTED,
    POISON_KINDS,
    SCENARIOS,
    SERVICES,
    BrokerProbe,
    Duplicator,
    Fleet,
    Plan,
    Poison,
    Publisher,
    amqp_user,
    clean_env,
    make_plan,
    pg_ctlcluster,
    pg_ready,
    poison,
    rabbitmqctl,
    restore_infrastructure,
    start_message,
)
from tests.support import env_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]

N_SAGAS = int(os.environ.get("CHAOS_SAGAS", "500"))
#: sagas published but not yet terminal, at most
WINDOW = 60
#: share of the services' messages delivered a second time (40 % of those copies late)
DUPLICATE_RATE = 0.10
#: poison per message of real traffic (a saga is about 13 messages: commands, replies, facts)
POISON_RATE = 0.01
MESSAGES_PER_SAGA = 13
TERMINAL_STATES = tuple(s.value for s in TERMINAL)
OUTBOX_SCHEMAS = (
    "process_manager",
    "orders",
    "payment",
    "inventory",
    "shipping",
    "notification",
    "analytics",
)


def service_envs(who: Principals) -> dict[str, dict[str, str]]:
    """Each service process's environment: its own broker user and database role, the
    topology left to the admin (the fixture declared it; the users may configure nothing)."""
    envs = {}
    for name in SERVICES:
        cred = who.services[name]
        assert cred.database_url is not None, f"{name} has no database role"
        envs[name] = clean_env(
            os.environ,
            {
                **service_settings(),
                "SAGABUS_AMQP_URL": cred.amqp_url,
                "SAGABUS_DATABASE_URL": cred.database_url,
                "SAGABUS_DECLARE_TOPOLOGY": "false",
            },
        )
    return envs


def service_settings() -> dict[str, str]:
    """What every service process runs with, besides its URLs. Retries span a database
    restart; step timeouts are a safety net (they re-send, and only give up after a minute),
    not the normal path."""
    return {
        "SAGABUS_LOG_FORMAT": "json",
        "SAGABUS_LOG_LEVEL": "info",
        # small pools (PostgreSQL is shared). Twice the pool exceeds the prefetch: once needed
        # because the carrier borrowed a second connection from shipping's pool; it has its own
        # pool now, and these values were kept (not re-run with others)
        "SAGABUS_DB_POOL_SIZE": "4",
        "SAGABUS_PREFETCH": "6",
        "SAGABUS_RETRY_DELAYS_MS": "[200,400,800,1600]",
        "SAGABUS_MAX_ATTEMPTS": "12",
        "SAGABUS_SHIPPING_MAX_ATTEMPTS": "3",
        "SAGABUS_STEP_TIMEOUT_S": "15",
        "SAGABUS_MAX_STEP_ATTEMPTS": "4",
        "SAGABUS_COMPENSATION_TIMEOUT_S": "15",
        "SAGABUS_MAX_COMPENSATION_ATTEMPTS": "6",
        "SAGABUS_TIMEOUT_POLL_S": "0.25",
        "SAGABUS_OUTBOX_POLL_S": "0.5",
        "SAGABUS_SWEEPER_INTERVAL_S": "3600",
        # the carrier books and loses the answer for a fifth of the bookings, at random; it
        # never fails at random: before the carrier budget counted carrier failures only, the
        # retries caused by the database restart spent it too, so a random failure could make a
        # success saga give up (the "carrier unavailable" scenario fails it on purpose, postal
        # code 99999). A random failure rate could now be turned on; not yet tried.
        "SAGABUS_CARRIER_LOSE_RESPONSE_RATE": "0.2",
        "SAGABUS_CARRIER_FAILURE_RATE": "0",
    }


async def poll(
    probe: Callable[[], Awaitable[Any]], *, timeout: float, what: str, interval: float = 0.2
) -> Any:
    """Poll until ``probe`` returns something truthy; errors count as 'not yet' (the database or
    the broker may be restarting)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = await probe()
        except Exception as e:
            last = f"{type(e).__name__}: {e}"
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval)


async def value(v: Any) -> Any:
    return v


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar_one()


async def fetch(engine: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


# -- the run --------------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str  # kill | rabbitmq | postgres
    service: str  # the service killed (for rabbitmq/postgres: killed and restarted during it)
    down_s: float
    in_flight: int = 0
    took_s: float = 0.0


@dataclass
class Run:
    plan: Plan
    faults: list[Fault]
    poisons: list[Poison]
    published: int = 0
    poison_sent: int = 0
    faults_done: int = 0
    terminal: int = 0
    timeline: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def note(self, what: str) -> None:
        line = f"{time.monotonic() - self.started:6.1f}s  {what}"
        self.timeline.append(line)
        print(line, flush=True)

    def allowed(self) -> int:
        """Sagas that may be published by now: an equal share before every fault, so every
        fault lands on sagas in flight; everything once the faults are done."""
        n = len(self.plan.sagas)
        if self.faults_done >= len(self.faults):
            return n
        return n * (self.faults_done + 1) // (len(self.faults) + 1)


def fault_schedule(rng: random.Random) -> list[Fault]:
    participants = ["order", "payment", "inventory", "shipping", "notification", "analytics"]
    rng.shuffle(participants)
    kills = [Fault("kill", p, rng.uniform(0.5, 2.5)) for p in [*participants, "dead-letters"]]
    faults = [Fault("kill", "process-manager", rng.uniform(0.5, 2.5)), *kills]
    # the broker and the database go down in the middle of it all, and a service is killed and
    # started again while each is down (it must wait for them, not give up)
    faults.insert(3, Fault("rabbitmq", rng.choice(participants), rng.uniform(2.0, 4.0)))
    faults.insert(7, Fault("postgres", "process-manager", rng.uniform(2.0, 4.0)))
    faults.append(Fault("kill", "process-manager", rng.uniform(0.5, 2.5)))
    return faults


async def track_terminal(run: Run, engine: AsyncEngine, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            run.terminal = int(
                await scalar(
                    engine,
                    "SELECT count(*) FROM process_manager.sagas "
                    "WHERE order_id LIKE :p AND status = ANY(:t)",
                    p=run.plan.prefix + "%",
                    t=list(TERMINAL_STATES),
                )
            )
        except Exception:
            pass  # the database is restarting: keep the last count
        await asyncio.sleep(0.5)


async def publish_all(run: Run, publishers: dict[str, Publisher]) -> None:
    """Starts as ``client``; each poison message as the principal it names."""
    publisher = publishers["client"]
    n = len(run.plan.sagas)

    async def room(i: int) -> bool:
        return i < run.allowed() and i - run.terminal < WINDOW

    for i, planned in enumerate(run.plan.sagas):
        # load shaping, not synchronisation: hold back until this saga's share is due and the
        # window has room
        await poll(
            functools.partial(room, i),
            timeout=300,
            interval=0.05,
            what=f"room to publish saga {i}",
        )
        await publisher.publish(
            topology.COMMANDS_EXCHANGE, topology.START_ROUTING_KEY, start_message(planned)
        )
        run.published += 1
        while run.poison_sent < len(run.poisons) * (i + 1) // n:
            p = run.poisons[run.poison_sent]
            await publishers[p.sender].publish(p.exchange, p.routing_key, p.message)
            run.poison_sent += 1
    run.note(f"published {run.published} sagas and {run.poison_sent} poison messages")


async def inject_faults(run: Run, fleet: Fleet, probe: BrokerProbe, rng: random.Random) -> None:
    for k, fault in enumerate(run.faults):
        await poll(
            lambda: value(run.published >= run.allowed()),
            timeout=180,
            what=f"the sagas due before fault {k + 1}",
        )
        await asyncio.sleep(rng.uniform(0.2, 1.0))  # spacing: let them get under way
        fault.in_flight = run.published - run.terminal
        started = time.monotonic()
        if fault.kind == "kill":
            await kill_and_restart(run, fleet, probe, fault)
        elif fault.kind == "rabbitmq":
            await restart_rabbitmq(run, fleet, probe, fault)
        else:
            await restart_postgres(run, fleet, probe, fault)
        fault.took_s = time.monotonic() - started
        run.faults_done += 1


async def kill_and_restart(run: Run, fleet: Fleet, probe: BrokerProbe, fault: Fault) -> None:
    name = fault.service
    fleet.kill9(name)
    run.note(f"kill -9 {name} ({fault.in_flight} sagas in flight)")
    await poll(lambda: probe.gone(name), timeout=30, what=f"the broker to drop {name}'s consumers")
    await asyncio.sleep(fault.down_s)  # it stays down while its work piles up
    fleet.restart(name)
    await poll(lambda: probe.serving(name), timeout=90, what=f"{name} consuming again")
    run.note(f"{name} restarted and consuming")


async def restart_rabbitmq(run: Run, fleet: Fleet, probe: BrokerProbe, fault: Fault) -> None:
    run.note(f"rabbitmqctl stop_app ({fault.in_flight} sagas in flight)")
    await asyncio.to_thread(rabbitmqctl, "stop_app")
    fleet.kill9(fault.service)
    fleet.restart(fault.service)
    run.note(f"kill -9 {fault.service} and start it while the broker is down")
    await asyncio.sleep(fault.down_s)
    await asyncio.to_thread(rabbitmqctl, "start_app")
    await asyncio.to_thread(rabbitmqctl, "await_startup", timeout=180)
    run.note("rabbitmqctl start_app: broker back")
    for name in SERVICES:
        await poll(functools.partial(probe.serving, name), timeout=90, what=f"{name} reconnected")
    run.note("every service consuming again")


async def restart_postgres(run: Run, fleet: Fleet, probe: BrokerProbe, fault: Fault) -> None:
    run.note(f"PostgreSQL stop ({fault.in_flight} sagas in flight)")
    await asyncio.to_thread(pg_ctlcluster, "stop")
    fleet.kill9(fault.service)
    fleet.restart(fault.service)
    run.note(f"kill -9 {fault.service} and start it while the database is down")
    await asyncio.sleep(fault.down_s)
    await asyncio.to_thread(pg_ctlcluster, "start")
    await poll(lambda: asyncio.to_thread(pg_ready), timeout=60, what="PostgreSQL accepting")
    run.note("PostgreSQL back")
    await poll(lambda: probe.serving(fault.service), timeout=90, what=f"{fault.service} consuming")
    run.note(f"{fault.service} consuming again")


async def sagabus(who: Principals, *args: str) -> Any:
    """The CLI as an operator runs it (the operator's broker user and database role), against
    this run's vhost and database; parsed JSON."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "process_manager.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env_for(who.operator_amqp_url, who.operator_database_url, os.environ),
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, f"sagabus {' '.join(args)}: {proc.returncode} {err.decode()}"
    return json.loads(out)


# -- the test -------------------------------------------------------------------------------------


async def test_sagas_survive_kills_restarts_duplicates_and_poison(
    chaos_settings: Settings,
    chaos_principals: Principals,
    chaos_seed: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    s = chaos_settings
    who = chaos_principals
    seed = chaos_seed
    rng = random.Random(seed)
    plan = make_plan(N_SAGAS, random.Random(f"{seed}:plan"))
    poison_rng = random.Random(f"{seed}:poison")
    n_poison = max(len(POISON_KINDS), round(POISON_RATE * N_SAGAS * MESSAGES_PER_SAGA))
    # forged replies name real sagas whose payment is declined: believed, one would complete
    victims = [pl.order_id for pl in plan.sagas if pl.scenario == "payment declined"]
    poisons = [
        poison(POISON_KINDS[i % len(POISON_KINDS)], poison_rng, victims=victims)
        for i in range(n_poison)
    ]
    poison_rng.shuffle(poisons)
    faults = fault_schedule(random.Random(f"{seed}:faults"))
    log_dir = tmp_path_factory.mktemp("chaos-logs")
    run = Run(plan, faults, poisons)
    run.note(
        f"chaos seed {seed} (rerun: CHAOS_SEED={seed} pytest -m chaos), run {plan.run}, "
        f"{len(plan.sagas)} sagas, {len(poisons)} poison, {len(faults)} faults; logs in {log_dir}"
    )

    engine = make_engine(s)
    async with engine.begin() as conn:
        await inventory.seed(conn, plan.stock)
    fleet = Fleet(service_envs(who), log_dir)
    # the admin (the fixture's user) only watches the broker and taps the exchanges
    probe = BrokerProbe(s.amqp_url)
    urls = {
        **{name: cred.amqp_url for name, cred in who.services.items()},
        "client": who.client_amqp_url,
        "operator": who.operator_amqp_url,
    }
    duplicator = Duplicator(
        s.amqp_url,
        {amqp_user(url): url for url in urls.values()},
        random.Random(f"{seed}:duplicates"),
        rate=DUPLICATE_RATE,
    )
    publishers = {
        name: Publisher(urls[name]) for name in sorted({"client", *(p.sender for p in poisons)})
    }
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    # SIGTERM (a CI job cancelled) still runs the clean-up below: RabbitMQ and PostgreSQL must
    # not be left stopped on a shared machine
    loop = asyncio.get_running_loop()
    this = asyncio.current_task()
    assert this is not None
    loop.add_signal_handler(signal.SIGTERM, this.cancel)
    try:
        await duplicator.start()
        for pub in publishers.values():
            await pub.start()
        fleet.start_all()
        tasks.append(asyncio.create_task(fleet.watch(stop)))
        for name in SERVICES:
            await poll(
                functools.partial(probe.serving, name), timeout=120, what=f"{name} consuming"
            )
        run.note("all eight services consuming")
        tasks.append(asyncio.create_task(track_terminal(run, engine, stop)))

        publishing = asyncio.create_task(publish_all(run, publishers))
        tasks.append(publishing)
        await inject_faults(run, fleet, probe, rng)
        run.note(f"all {len(faults)} faults done")
        await publishing
        t_published = time.monotonic()

        try:
            await poll(
                lambda: value(run.terminal >= len(plan.sagas)),
                timeout=180,
                interval=0.5,
                what="every saga terminal",
            )
        except AssertionError:
            stuck = await fetch(
                engine,
                "SELECT order_id, status, state->>'awaiting' AS awaiting, updated_at "
                "FROM process_manager.sagas WHERE order_id LIKE :p AND NOT status = ANY(:t) "
                "ORDER BY updated_at LIMIT 10",
                p=plan.prefix + "%",
                t=list(TERMINAL_STATES),
            )
            raise AssertionError(
                f"seed {seed}: only {run.terminal} of {len(plan.sagas)} sagas terminal after "
                f"180s; oldest stuck: {[tuple(r) for r in stuck]}; unexpected exits: "
                f"{fleet.unexpected}; logs: {log_dir}"
            ) from None
        run.note(f"every saga terminal, {time.monotonic() - t_published:.1f}s after the last start")
        await poll(lambda: unsent(engine, zero=True), timeout=60, what="every outbox row sent")
        poison_ids = {p.message_id for p in poisons}
        await poll(
            lambda: collected(engine, poison_ids), timeout=60, what="every poison dead letter"
        )
        await duplicator.stop()
        await poll(lambda: broker_idle(probe), timeout=60, what="every queue drained")
        run.note("outboxes drained, poison collected, queues empty")
        report = await check(run, engine, who, fleet, duplicator)
        run.note("checked PostgreSQL and the CLI")
        elapsed = time.monotonic() - run.started
        text_report = render(run, report, fleet, duplicator, publishers, seed, elapsed)
        chaos_conftest.SUMMARIES.append(text_report)
        print(text_report, flush=True)
        problems = {k: v for k, v in report["violations"].items() if v}
        assert not problems, (
            f"chaos run (seed {seed}) broke invariants: {json.dumps(problems, indent=1)[:4000]}"
            f"\nlogs: {log_dir}"
        )
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.to_thread(restore_infrastructure)
        await asyncio.to_thread(fleet.stop_all)
        await duplicator.stop()
        for pub in publishers.values():
            await pub.close()
        await probe.close()
        await engine.dispose()


async def unsent(engine: AsyncEngine, *, zero: bool = False) -> Any:
    counts = {}
    for schema in OUTBOX_SCHEMAS:
        counts[schema] = int(
            await scalar(engine, f"SELECT count(*) FROM {schema}.outbox WHERE sent_at IS NULL")
        )
    return sum(counts.values()) == 0 if zero else counts


async def broker_idle(probe: BrokerProbe) -> bool:
    """No message left in any work, delay or dead-letter queue."""
    for spec in topology.QUEUES.values():
        for q in (
            spec.name,
            spec.dlq,
            *(spec.retry_queue(t) for t in range(1, topology.RETRY_TIERS + 1)),
        ):
            if await probe.depth(q) != 0:
                return False
    return True


async def collected(engine: AsyncEngine, ids: set[str]) -> bool:
    found = await fetch(
        engine,
        "SELECT DISTINCT message_id FROM dead_letters.dead_letters WHERE message_id = ANY(:ids)",
        ids=list(ids),
    )
    return len(found) == len(ids)


# -- the checks -----------------------------------------------------------------------------------


async def check(
    run: Run, engine: AsyncEngine, who: Principals, fleet: Fleet, dup: Duplicator
) -> dict[str, Any]:
    plan = run.plan
    p = plan.prefix + "%"
    by_order = plan.by_order()
    v: dict[str, Any] = {}

    status = {
        r.order_id: r.status
        for r in await fetch(
            engine,
            "SELECT order_id, status FROM process_manager.sagas WHERE order_id LIKE :p",
            p=p,
        )
    }
    outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    for planned in plan.sagas:
        outcomes[planned.scenario][status.get(planned.order_id, "MISSING")] += 1
    v["sagas not terminal or missing"] = [
        o for o in by_order if status.get(o) not in TERMINAL_STATES
    ]
    v["sagas nobody started"] = sorted(set(status) - set(by_order))
    v["unexpected outcomes"] = [
        f"{o} ({pl.scenario}): {status.get(o)}"
        for o, pl in by_order.items()
        if pl.scenario != "last unit race" and status.get(o) != EXPECTED[pl.scenario]
    ]
    races: dict[str, list[str]] = defaultdict(list)
    for o, pl in by_order.items():
        if pl.scenario == "last unit race":
            races[pl.command.items[0].sku].append(status.get(o, "MISSING"))
    v["races not won exactly once"] = [
        f"{sku}: {sorted(got)}"
        for sku, got in races.items()
        if sorted(got) != ["COMPENSATED", "COMPLETED"]
    ]
    completed = {o for o, st in status.items() if st == "COMPLETED"}

    # payment: the ledger is the truth about money
    ledger: dict[str, Counter[str]] = defaultdict(Counter)
    captured: dict[str, int] = {}
    for r in await fetch(
        engine,
        "SELECT order_id, kind, count(*) AS n, sum(amount_minor) AS amount "
        "FROM payment.ledger WHERE order_id LIKE :p GROUP BY order_id, kind",
        p=p,
    ):
        ledger[r.order_id][r.kind] = r.n
        if r.kind == "capture":
            captured[r.order_id] = int(r.amount)
    v["double charges (more than one capture or refund)"] = [
        o for o, k in ledger.items() if k["capture"] > 1 or k["refund"] > 1
    ]
    v["captures of sagas not COMPLETED"] = [o for o in captured if status.get(o) != "COMPLETED"]
    v["COMPLETED sagas without exactly their amount captured once"] = [
        o
        for o in completed
        if ledger[o]["capture"] != 1 or captured.get(o) != by_order[o].command.amount_minor
    ]
    payments = await fetch(
        engine, "SELECT order_id, status FROM payment.payments WHERE order_id LIKE :p", p=p
    )
    v["authorizations left dangling"] = [r.order_id for r in payments if r.status == "AUTHORIZED"]

    # inventory: nothing oversold, every unit accounted for
    stock = {
        r.sku: r.available
        for r in await fetch(
            engine,
            "SELECT sku, available FROM inventory.stock WHERE sku LIKE :s",
            s=f"CHAOS-{plan.run}-%",
        )
    }
    sold: Counter[str] = Counter()
    for o in completed:
        for item in by_order[o].command.items:
            sold[item.sku] += item.quantity
    v["oversold SKUs (negative stock)"] = [sku for sku, a in stock.items() if a < 0]
    v["SKUs whose stock is not initial minus units sold"] = [
        f"{sku}: {stock.get(sku)} != {initial} - {sold[sku]}"
        for sku, initial in plan.stock.items()
        if stock.get(sku) != initial - sold[sku]
    ]
    reservations = {
        r.order_id: r.status
        for r in await fetch(
            engine,
            "SELECT order_id, status FROM inventory.reservations WHERE order_id LIKE :p",
            p=p,
        )
    }
    v["reservations left dangling"] = [
        o for o, st in reservations.items() if st == "RESERVED" and o not in completed
    ]
    v["COMPLETED sagas without their reservation"] = [
        o for o in completed if reservations.get(o) != "RESERVED"
    ]

    # shipping: one booking per completed saga, none kept for the others
    bookings: dict[str, Counter[str]] = defaultdict(Counter)
    for r in await fetch(
        engine,
        "SELECT order_id, status FROM shipping.carrier_bookings WHERE order_id LIKE :p",
        p=p,
    ):
        bookings[r.order_id][r.status] += 1
    v["carrier bookings left dangling"] = [
        o for o, b in bookings.items() if b["BOOKED"] and o not in completed
    ]
    v["COMPLETED sagas without exactly one booking"] = [
        o for o in completed if bookings[o]["BOOKED"] != 1
    ]

    # orders, and the choreographed consumers of their facts: each fact counted once
    orders = {
        r.order_id: r.status
        for r in await fetch(
            engine, "SELECT order_id, status FROM orders.orders WHERE order_id LIKE :p", p=p
        )
    }
    v["orders whose status disagrees with their saga"] = [
        o
        for o, st in status.items()
        if orders.get(o) != {"COMPLETED": "COMPLETED", "COMPENSATED": "CANCELLED"}.get(st)
    ]
    notes = await fetch(
        engine,
        "SELECT order_id, template, count(*) AS n FROM notification.notifications "
        "WHERE order_id LIKE :p GROUP BY order_id, template",
        p=p,
    )
    sent: dict[str, list[str]] = defaultdict(list)
    for r in notes:
        sent[r.order_id] += [r.template] * r.n
    v["customers not notified exactly once"] = [
        o
        for o, st in status.items()
        if sent.get(o)
        != [{"COMPLETED": "order_confirmed", "COMPENSATED": "order_cancelled"}.get(st)]
    ]
    analytics = {
        r.outcome: (r.count, r.amount_minor)
        for r in await fetch(engine, "SELECT outcome, count, amount_minor FROM analytics.outcomes")
    }
    analytics_completed = analytics.get("completed", (0, 0))
    analytics_other = sum(c for k, (c, _) in analytics.items() if k != "completed")
    compensated = sum(1 for st in status.values() if st == "COMPENSATED")
    v["analytics counts off (facts counted twice or lost)"] = (
        []
        if analytics_completed == (len(completed), sum(captured.values()))
        and analytics_other == compensated
        else [f"analytics {analytics} vs {len(completed)} completed, {compensated} compensated"]
    )
    v["manual cases opened"] = [
        str(r.saga_id)
        for r in await fetch(engine, "SELECT saga_id FROM process_manager.manual_cases")
    ]

    # dead letters: every poison message, with its reason; nothing legitimate refused
    dls = await fetch(
        engine,
        "SELECT message_id, queue, error_class, error_message, failure_kind "
        "FROM dead_letters.dead_letters",
    )
    by_id: dict[str, list[Any]] = defaultdict(list)
    for r in dls:
        by_id[r.message_id].append(r)
    v["poison not dead-lettered with its reason"] = [
        f"{pz.kind} {pz.message_id}: "
        f"{[(r.queue, r.failure_kind, r.error_class, r.error_message) for r in by_id.get(pz.message_id, [])]}"
        for pz in run.poisons
        if not any(
            r.queue == pz.queue
            and r.error_class == pz.error_class
            and r.failure_kind == pz.failure_kind
            and pz.reason in r.error_message
            for r in by_id.get(pz.message_id, [])
        )
    ]
    poison_ids = {pz.message_id for pz in run.poisons}
    others = [r for r in dls if r.message_id not in poison_ids]
    v["legitimate messages refused as permanent errors"] = [
        f"{r.queue}: {r.error_message[:200]}" for r in others if r.failure_kind == "permanent"
    ]
    # the services' own messages, and the copies of them (same user_id, same route), must all
    # pass the route and sender checks
    v["legitimate messages refused as security events"] = [
        f"{r.queue}: {r.error_message[:200]}" for r in others if r.failure_kind == "security"
    ]

    # the trust boundary was on: every service under its own provisioned user checks senders
    # (it logs sender_check_off when it does not), and stamps its messages with its user_id
    v["services that ran with the sender check off"] = sorted(
        {
            f"{e.get('service')} as {e.get('broker_user')}"
            for e in fleet.events()
            if e.get("event") == "sender_check_off"
        }
    )
    v["services that never started"] = [
        name
        for name in SERVICES
        if name != "dead-letters"
        and not any(e.get("event") == "service_started" for e in fleet.events(name))
    ]
    # and each touched PostgreSQL only as its own role (the pools are open while they run)
    roles = {
        name: urllib.parse.unquote(urllib.parse.urlsplit(cred.database_url or "").username or "")
        for name, cred in who.services.items()
    }
    connected = {
        r.usename
        for r in await fetch(
            engine,
            "SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = current_database() "
            "AND usename IS NOT NULL",
        )
    }
    admin = await scalar(engine, "SELECT current_user")
    operator = urllib.parse.unquote(urllib.parse.urlsplit(who.operator_database_url).username or "")
    v["services not connected to PostgreSQL as their own role"] = [
        f"{name} ({role})" for name, role in roles.items() if role not in connected
    ]
    v["other users connected to the run's database"] = sorted(
        connected - set(roles.values()) - {admin, operator}
    )
    v["messages copied without a known sender (user_id)"] = [
        f"{n} x {type_} from {user!r}"
        for (user, type_), n in sorted(dup.unknown_sender.items(), key=str)
    ]
    v["outbox rows unsent"] = {k: n for k, n in (await unsent(engine)).items() if n}
    v["services that died by themselves"] = [
        f"{u.service}#{u.incarnation} exit {u.code}: {u.tail[-600:]}" for u in fleet.unexpected
    ]

    # the CLI, as an operator would look (the processes run side by side)
    samples = [
        next(pl for pl in plan.sagas if pl.scenario == scenario)
        for scenario in EXPECTED
        if any(pl.scenario == scenario for pl in plan.sagas)
    ]
    stuck, listed, *shown = await asyncio.gather(
        sagabus(who, "list", "--stuck", "--json", "--limit", "10000"),
        sagabus(who, "dlq", "list", "--status", "any", "--limit", "100000", "--json"),
        *(sagabus(who, "status", pl.order_id, "--json") for pl in samples),
    )
    v["CLI: sagabus list --stuck"] = [r["order_id"] for r in stuck if r["order_id"] in by_order]
    v["CLI: sagabus status disagrees"] = [
        f"{pl.order_id}: CLI {st['state']}, database {status.get(pl.order_id)}"
        for pl, st in zip(samples, shown, strict=True)
        if st["state"] != status.get(pl.order_id) or not st["terminal"] or not st["history"]
    ]
    cli_ids = {r["message_id"] for r in listed if r["error_class"] and r["error_message"]}
    v["CLI: poison missing from sagabus dlq list"] = sorted(poison_ids - cli_ids)

    return {
        "violations": v,
        "outcomes": outcomes,
        "captured_minor": sum(captured.values()),
        "refunds": sum(k["refund"] for k in ledger.values()),
        "voids": sum(k["void"] for k in ledger.values()),
        "other_dead_letters": Counter(
            f"{r.failure_kind} {r.error_class} on {r.queue}" for r in others
        ),
        "security_dead_letters": sum(1 for r in dls if r.failure_kind == "security"),
        "dead_letters": len(dls),
    }


def render(
    run: Run,
    report: dict[str, Any],
    fleet: Fleet,
    dup: Duplicator,
    publishers: dict[str, Publisher],
    seed: int,
    elapsed: float,
) -> str:
    out: list[str] = []
    w = out.append
    n = len(run.plan.sagas)
    w(f"seed {seed}, run {run.plan.run}: {n} sagas in {elapsed:.0f}s wall time")
    w("")
    w(f"{'scenario':<22}{'sagas':>6}  {'expected':<32}got")
    for sc in SCENARIOS:
        got = report["outcomes"].get(sc.name, Counter())
        w(
            f"{sc.name:<22}{sum(got.values()):>6}  {sc.expected:<32}"
            + ", ".join(f"{c} {k}" for k, c in sorted(got.items()))
        )
    w("")
    events = Counter(e.get("event") for e in fleet.events())
    lost = [e for e in fleet.events("shipping") if e.get("event") == "carrier_outcome_resolved"]
    traffic = max(dup.originals, 1)
    w(
        f"traffic: {dup.originals} messages published by the services; {dup.copied} delivered "
        f"twice ({100 * dup.copied / traffic:.1f} %), {dup.late} of those late (out of order), "
        f"{dup.lost} copies not made during the broker restart, "
        f"{sum(dup.unknown_sender.values())} not made for want of a known sender"
    )
    w(
        "senders (broker-validated user_id of the originals): "
        + ", ".join(f"{u} {c}" for u, c in sorted(dup.by_sender.items(), key=str))
    )
    w(
        f"inboxes dropped {events['duplicate_ignored']} duplicates (copies and redeliveries); "
        f"{len(run.poisons)} poison messages ({100 * len(run.poisons) / traffic:.1f} %) "
        f"of {len(POISON_KINDS)} kinds: "
        + ", ".join(f"{k} {c}" for k, c in sorted(Counter(p.kind for p in run.poisons).items()))
    )
    w(
        "poison expected as: "
        + ", ".join(
            f"{kind} {n}"
            for kind, n in sorted(Counter(p.failure_kind for p in run.poisons).items())
        )
        + f"; {events['message_rejected_security']} message_rejected_security events logged"
    )
    w(
        f"carrier lost {len({e.get('saga_id') for e in lost})} answers, resolved by lookup; "
        f"{events['message_retry_scheduled']} delayed retries, "
        f"{events['outbox_relay_failed']} relay failures ridden out, "
        f"{events['service_start_waiting']} start-ups that waited for the broker or database, "
        f"{sum(p.retries for p in publishers.values())} client publish retries"
    )
    w(
        f"money: {report['captured_minor'] / 100:.2f} EUR captured, "
        f"{report['voids']} voids, {report['refunds']} refunds"
    )
    others = report["other_dead_letters"]
    w(
        f"dead letters: {report['dead_letters']} stored, {len(run.poisons)} of them poison, "
        f"{report['security_dead_letters']} security"
        + (f"; others: {dict(others)}" if others else "")
    )
    w("")
    w("faults:")
    for f in run.faults:
        what = {
            "kill": f"kill -9 {f.service}, down {f.down_s:.1f}s, restart",
            "rabbitmq": f"RabbitMQ stop_app/start_app, down {f.down_s:.1f}s "
            f"(+ kill -9 and start {f.service} meanwhile)",
            "postgres": f"PostgreSQL stop/start, down {f.down_s:.1f}s "
            f"(+ kill -9 and start {f.service} meanwhile)",
        }[f.kind]
        w(f"  {what:<78} {f.in_flight:>3} in flight, recovered in {f.took_s:.1f}s")
    kills = sum(p.kills for p in fleet.procs.values())
    restarts = sum(p.restarts for p in fleet.procs.values())
    w(
        f"  {kills} kill -9, {restarts} process restarts, 1 broker restart, 1 database restart; "
        f"{len(fleet.unexpected)} processes died by themselves"
    )
    w("")
    w("timeline:")
    out.extend(f"  {line}" for line in run.timeline)
    w("")
    w("invariants (violations):")
    for k, val in report["violations"].items():
        w(f"  {k:<62}{len(val)}")
    return "\n".join(out)
