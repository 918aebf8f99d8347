"""Chaos: one run of at least 500 checkouts mixing every scenario of the demo (checkout v2:
fraud screening rejects, backorder allowed) and the returns of the orders whose scenario
returns them, while the services, running as separate OS processes, are killed with SIGKILL
and restarted, RabbitMQ and PostgreSQL are restarted under them, each participant in turn (risk
too) is stalled (SIGSTOP past its step timeout, then SIGCONT; the order service while sagas are
past the capture), about 10 % of messages are delivered twice (some late, out of order) and
about 1 % of the traffic is poison. A return is started, as ``client`` like the checkouts, as
soon as its order's checkout is terminal, so returns run while the faults go on. Afterwards
PostgreSQL and the CLI must show every checkout and every return terminal with the outcome its
scenario expects (a return of an order that did not complete refused: no saga, a dead letter
saying so), no double charge, no oversold unit, money given back only for a returned order
(exactly what was captured) or what was never captured, stock put back exactly once per return,
every order's status agreeing with its sagas', every customer told one outcome (the right one,
and once that the order was returned), nothing left dangling, every poison message
dead-lettered with its reason, no legitimate message refused, and no outbox row unsent; and at
least one completion re-sent during an order stall, its saga completed and nothing refunded.

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
import contextlib
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
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import topology
from messaging.db import make_engine
from messaging.provision.principals import Principals
from messaging.settings import Settings
from participants.inventory import service as inventory
from process_manager import bootstrap, definitions
from process_manager.engine import TERMINAL
from tests.chaos import conftest as chaos_conftest
from tests.chaos import invariants
from tests.chaos.harness import (
    EXPECTED,
    POISON_KINDS,
    REFUSED,
    SCENARIOS,
    SERVICES,
    BrokerProbe,
    Duplicator,
    Fleet,
    Plan,
    PlannedReturn,
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
#: the engine's terminal phases (each definition names its own statuses: BACKORDERED, RETURNED)
TERMINAL_PHASES = tuple(p.value for p in TERMINAL)
#: the definitions new sagas start on, so the ones this run runs
CHECKOUT = definitions.current("checkout")
RETURNS = definitions.current("returns")
RETURNS_ROUTING_KEY = topology.start_routing_key(RETURNS.name)
#: the process manager's step timeout in the run: short, so that a stall of a few seconds
#: outlasts it (the forward steps keep a minute of re-sends: 12 x 5 s, as 4 x 15 s before)
STEP_TIMEOUT_S = 5.0
MAX_STEP_ATTEMPTS = 12
#: after the capture: waits of 5 s, then 10 s (the cap), 12 sends: about two minutes before a
#: human is called, inside the run's wait for every saga to be terminal
RETRIABLE_MAX_DELAY_S = 10.0
MAX_RETRIABLE_ATTEMPTS = 12
#: the participants stalled in turn (SIGSTOP past the step timeout, then SIGCONT)
STALLED = ("order", "payment", "inventory", "shipping", "risk")
#: the forward steps each participant answers in either saga, alternative paths included (their
#: timeouts are what a stall must trip)
FORWARD = tuple(
    step
    for d in (CHECKOUT, RETURNS)
    for step in (*d.steps, *(s for path in d.paths for s in path.steps))
)
RETURNS_STEPS = tuple(s.name for s in RETURNS.steps)
STEPS_OF = {
    name: tuple(dict.fromkeys(s.name for s in FORWARD if s.participant == name)) for name in STALLED
}
#: the step a stall must have seen re-sent, at least, before it ends: after the pivot for the
#: order service, any of its own for the others
MUST_RESEND = {**STEPS_OF, "order": ("completion",)}
#: a stall lasts until such a re-send, at most this long (well inside the broker's 60 s
#: heartbeat timeout: a stall, not a lost connection)
STALL_MAX_S = 6 * STEP_TIMEOUT_S
#: the saga states from which the next message to the order service is the completion
BEFORE_COMPLETION = ("PENDING_SHIPMENT", "PENDING_CAPTURE", "COMPLETING")
OUTBOX_SCHEMAS = tuple(bootstrap.schema(s) for s in topology.SERVICES)


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
    not the normal path, except during a stall, which outlasts them on purpose."""
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
        "SAGABUS_STEP_TIMEOUT_S": str(STEP_TIMEOUT_S),
        "SAGABUS_MAX_STEP_ATTEMPTS": str(MAX_STEP_ATTEMPTS),
        "SAGABUS_RETRIABLE_MAX_DELAY_S": str(RETRIABLE_MAX_DELAY_S),
        "SAGABUS_MAX_RETRIABLE_ATTEMPTS": str(MAX_RETRIABLE_ATTEMPTS),
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
    kind: str  # kill | rabbitmq | postgres | stall
    service: str  # the service killed (for rabbitmq/postgres: killed and restarted during it)
    down_s: float  # for a stall: the least it lasts
    in_flight: int = 0
    #: returns started and not yet terminal when the fault began
    returns_in_flight: int = 0
    took_s: float = 0.0
    #: a stall: when the process was stopped and continued (wall clock, as the database's)
    stopped_at: datetime | None = None
    continued_at: datetime | None = None
    #: a stall: sagas past the capture (or on their way to it) when the order service stopped
    before_completion: int = 0
    #: a stall: the run's sagas per state when the process was stopped
    states: dict[str, int] = field(default_factory=dict)

    @property
    def stalled_s(self) -> float:
        if self.stopped_at is None or self.continued_at is None:
            return 0.0
        return (self.continued_at - self.stopped_at).total_seconds()


@dataclass
class Run:
    plan: Plan
    faults: list[Fault]
    poisons: list[Poison]
    published: int = 0
    poison_sent: int = 0
    faults_done: int = 0
    #: faults after which the next share of sagas may be published: a stall releases it as
    #: soon as its process is stopped, so new sagas run into the stalled participant
    released: int = 0
    #: checkouts terminal (their order ids: a return is started only once its checkout is)
    terminal: int = 0
    settled: set[str] = field(default_factory=set)
    #: returns published (their starts), of them those meant to start a saga, and returns
    #: sagas terminal
    returns_published: int = 0
    return_sagas_published: int = 0
    returns_terminal: int = 0
    #: returns are started in batches, when a fault asks (so that each fault lands on returns
    #: in flight), and freely once the faults are done: batches asked for and published
    return_batches: int = 0
    return_batches_done: int = 0
    returns_open: bool = False
    returns_all_published: bool = False
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
        if self.released >= len(self.faults):
            return n
        return n * (self.released + 1) // (len(self.faults) + 1)


def fault_schedule(rng: random.Random) -> list[Fault]:
    participants = [s for s in topology.SERVICES if s != bootstrap.PROCESS_MANAGER]
    rng.shuffle(participants)
    kills = [Fault("kill", p, rng.uniform(0.5, 2.5)) for p in [*participants, "dead-letters"]]
    faults = [Fault("kill", "process-manager", rng.uniform(0.5, 2.5)), *kills]
    # the broker and the database go down in the middle of it all, and a service is killed and
    # started again while each is down (it must wait for them, not give up)
    faults.insert(3, Fault("rabbitmq", rng.choice(participants), rng.uniform(2.0, 4.0)))
    faults.insert(7, Fault("postgres", "process-manager", rng.uniform(2.0, 4.0)))
    faults.append(Fault("kill", "process-manager", rng.uniform(0.5, 2.5)))
    # each participant stalls once, past its step timeout, between the other faults
    stalled = list(STALLED)
    rng.shuffle(stalled)
    for k, name in enumerate(stalled):
        stall = Fault("stall", name, STEP_TIMEOUT_S + rng.uniform(2.0, 4.0))
        faults.insert(2 + 4 * k, stall)
    return faults


async def track_terminal(run: Run, engine: AsyncEngine, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            rows = await fetch(
                engine,
                "SELECT order_id, saga_type FROM process_manager.sagas "
                "WHERE starts_with(order_id, :p) AND phase = ANY(:t)",
                p=run.plan.prefix,
                t=list(TERMINAL_PHASES),
            )
        except Exception:
            pass  # the database is restarting: keep the last counts
        else:
            run.settled = {r.order_id for r in rows if r.saga_type == CHECKOUT.name}
            run.terminal = len(run.settled)
            run.returns_terminal = sum(1 for r in rows if r.saga_type == RETURNS.name)
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


async def publish_returns(run: Run, publisher: Publisher) -> None:
    """Each planned return as ``client`` on ``returns.start`` once its order's checkout is
    terminal: in a batch when a fault asks for one (``release_returns``), and as soon as it is
    due once the faults are done. The returns run alongside the later checkouts, through the
    faults."""
    waiting: list[PlannedReturn] = list(run.plan.returns)
    while waiting:
        batch = run.return_batches
        if batch > run.return_batches_done or run.returns_open:
            for r in [r for r in waiting if r.order_id in run.settled]:
                await publisher.publish(
                    topology.COMMANDS_EXCHANGE, RETURNS_ROUTING_KEY, start_message(r)
                )
                run.returns_published += 1
                run.return_sagas_published += r.expected != REFUSED
                waiting.remove(r)
            run.return_batches_done = batch
        await asyncio.sleep(0.05)
    run.returns_all_published = True
    run.note(f"published {run.returns_published} returns")


async def release_returns(run: Run) -> None:
    """Start the returns due by now (their checkout terminal), and wait until they are
    published."""
    run.return_batches += 1
    batch = run.return_batches
    await poll(
        lambda: value(run.returns_all_published or run.return_batches_done >= batch),
        timeout=60,
        interval=0.05,
        what="the returns due published",
    )


async def inject_faults(
    run: Run, fleet: Fleet, probe: BrokerProbe, rng: random.Random, engine: AsyncEngine
) -> None:
    for k, fault in enumerate(run.faults):
        await poll(
            lambda: value(run.published >= run.allowed()),
            timeout=180,
            what=f"the sagas due before fault {k + 1}",
        )
        if fault.kind != "stall":  # a stall starts its returns once its process is stopped
            await release_returns(run)
        await asyncio.sleep(rng.uniform(0.2, 1.0))  # spacing: let them get under way
        fault.in_flight = run.published - run.terminal
        fault.returns_in_flight = run.return_sagas_published - run.returns_terminal
        started = time.monotonic()
        if fault.kind == "kill":
            await kill_and_restart(run, fleet, probe, fault)
        elif fault.kind == "stall":
            await stall(run, fleet, probe, fault, engine)
        elif fault.kind == "rabbitmq":
            await restart_rabbitmq(run, fleet, probe, fault)
        else:
            await restart_postgres(run, fleet, probe, fault)
        fault.took_s = time.monotonic() - started
        run.faults_done += 1
        run.released = max(run.released, run.faults_done)
    run.returns_open = True


async def kill_and_restart(run: Run, fleet: Fleet, probe: BrokerProbe, fault: Fault) -> None:
    name = fault.service
    fleet.kill9(name)
    run.note(
        f"kill -9 {name} ({fault.in_flight} sagas, {fault.returns_in_flight} returns in flight)"
    )
    await poll(lambda: probe.gone(name), timeout=30, what=f"the broker to drop {name}'s consumers")
    await asyncio.sleep(fault.down_s)  # it stays down while its work piles up
    fleet.restart(name)
    await poll(lambda: probe.serving(name), timeout=90, what=f"{name} consuming again")
    run.note(f"{name} restarted and consuming")


async def count_states(engine: AsyncEngine, prefix: str, states: tuple[str, ...]) -> int:
    return int(
        await scalar(
            engine,
            "SELECT count(*) FROM process_manager.sagas "
            "WHERE starts_with(order_id, :p) AND status = ANY(:s)",
            p=prefix,
            s=list(states),
        )
    )


async def stall(
    run: Run, fleet: Fleet, probe: BrokerProbe, fault: Fault, engine: AsyncEngine
) -> None:
    """SIGSTOP a participant for longer than the step timeout, then SIGCONT it. The broker
    still sees its consumers; only the process manager's timeouts notice.

    The next share of sagas is released as soon as the process is stopped, so that new sagas
    run into it. The order service is stopped only once sagas are on their way past the capture
    (shipment, capture or completion pending: the next thing they ask of it is the completion).
    A stall lasts until the process manager has re-sent one of the stalled participant's steps
    (for the order service: the completion) during it, at most ``STALL_MAX_S``: the run then
    holds sagas that timed out on it, and for the order service sagas past the pivot that
    timed out, which must still end completed, with nothing refunded."""
    name = fault.service
    prefix = run.plan.prefix
    if name == "order":
        fault.before_completion = await poll(
            lambda: count_states(engine, prefix, BEFORE_COMPLETION),
            timeout=120,
            interval=0.05,
            what="a saga past the shipment or the capture to stall the order service under",
        )
    fleet.sigstop(name)
    fault.stopped_at = datetime.now(UTC)
    run.released += 1
    # the returns due start now, and run into the stalled participant (order: their first
    # step; shipping: the pickup; payment: the refund; inventory: the restock)
    await release_returns(run)
    fault.returns_in_flight = run.return_sagas_published - run.returns_terminal
    with contextlib.suppress(Exception):  # figures only
        fault.states = {
            r.status: r.n
            for r in await fetch(
                engine,
                "SELECT status, count(*) AS n FROM process_manager.sagas "
                "WHERE starts_with(order_id, :p) AND NOT phase = ANY(:t) GROUP BY status",
                p=prefix,
                t=list(TERMINAL_PHASES),
            )
        }
    run.note(
        f"SIGSTOP {name} ({fault.in_flight} sagas, {fault.returns_in_flight} returns in flight"
        + (f", {fault.before_completion} on their way past the capture" if name == "order" else "")
        + ")"
    )
    try:
        await asyncio.sleep(fault.down_s)
        stopped_at = fault.stopped_at

        async def resent() -> bool:
            window = [(stopped_at, datetime.now(UTC))]
            return bool(await invariants.resent_during(engine, prefix, window, MUST_RESEND[name]))

        # bounded: if none comes, the check after the run reports it
        elapsed = (datetime.now(UTC) - stopped_at).total_seconds()
        try:
            await poll(
                resent,
                timeout=max(STALL_MAX_S - elapsed, 0),
                interval=0.25,
                what=f"{'/'.join(MUST_RESEND[name])} re-sent during the stall of {name}",
            )
        except AssertionError as e:
            run.note(f"stall: {e}")
    finally:
        fleet.sigcont(name)
        fault.continued_at = datetime.now(UTC)
    run.note(f"SIGCONT {name} after {fault.stalled_s:.1f}s stopped")
    await poll(lambda: probe.serving(name), timeout=90, what=f"{name} consuming after the stall")


async def restart_rabbitmq(run: Run, fleet: Fleet, probe: BrokerProbe, fault: Fault) -> None:
    run.note(
        f"rabbitmqctl stop_app ({fault.in_flight} sagas, {fault.returns_in_flight} returns "
        "in flight)"
    )
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
    run.note(
        f"PostgreSQL stop ({fault.in_flight} sagas, {fault.returns_in_flight} returns in flight)"
    )
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
        "cli",
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
        f"{len(plan.sagas)} sagas, {len(plan.returns)} returns, {len(poisons)} poison, "
        f"{len(faults)} faults; logs in {log_dir}"
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
        returning = asyncio.create_task(publish_returns(run, publishers["client"]))
        tasks.append(returning)
        await inject_faults(run, fleet, probe, rng, engine)
        run.note(
            f"all {len(faults)} faults done; {run.returns_published} of {len(plan.returns)} "
            "returns started by then"
        )
        await publishing
        t_published = time.monotonic()
        return_sagas = sum(1 for r in plan.returns if r.expected != REFUSED)

        async def stuck_report(what: str) -> AssertionError:
            stuck = await fetch(
                engine,
                "SELECT order_id, saga_type, status, state->>'awaiting' AS awaiting, updated_at "
                "FROM process_manager.sagas WHERE starts_with(order_id, :p) "
                "AND NOT phase = ANY(:t) ORDER BY updated_at LIMIT 10",
                p=plan.prefix,
                t=list(TERMINAL_PHASES),
            )
            return AssertionError(
                f"seed {seed}: {what}; oldest stuck: {[tuple(r) for r in stuck]}; unexpected "
                f"exits: {fleet.unexpected}; logs: {log_dir}"
            )

        try:
            await poll(
                lambda: value(run.terminal >= len(plan.sagas)),
                timeout=180,
                interval=0.5,
                what="every saga terminal",
            )
        except AssertionError:
            raise await stuck_report(
                f"only {run.terminal} of {len(plan.sagas)} sagas terminal after 180s"
            ) from None
        run.note(f"every saga terminal, {time.monotonic() - t_published:.1f}s after the last start")
        await asyncio.wait_for(returning, 60)
        try:
            await poll(
                lambda: value(run.returns_terminal >= return_sagas),
                timeout=180,
                interval=0.5,
                what="every return terminal",
            )
        except AssertionError:
            raise await stuck_report(
                f"only {run.returns_terminal} of {return_sagas} returns terminal after 180s"
            ) from None
        run.note(
            f"every return terminal, {time.monotonic() - t_published:.1f}s after the last "
            "checkout's start"
        )
        await poll(lambda: unsent(engine, zero=True), timeout=60, what="every outbox row sent")
        poison_ids = {p.message_id for p in poisons}
        refused_ids = {r.message_id for r in plan.returns if r.expected == REFUSED}
        await poll(
            lambda: collected(engine, poison_ids | refused_ids),
            timeout=60,
            what="every poison dead letter and every refused return's",
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


async def timeouts_resent(
    engine: AsyncEngine, prefix: str, window: tuple[datetime, datetime] | None = None
) -> dict[str, int]:
    """Step timeouts that re-sent a command (history notes), per step, within ``window``."""
    start, end = window or (datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC))
    return {
        r.step: r.n
        for r in await fetch(
            engine,
            "SELECT split_part(h.note, ' ', 1) AS step, count(*) AS n "
            "FROM process_manager.history h JOIN process_manager.sagas s USING (saga_id) "
            "WHERE starts_with(s.order_id, :p) AND h.note LIKE '% timed out: re-sent as attempt %' "
            "AND h.at BETWEEN :start AND :end GROUP BY 1 ORDER BY 1",
            p=prefix,
            start=start,
            end=end,
        )
    }


def order_stall_windows(run: Run) -> list[tuple[datetime, datetime]]:
    return [
        (f.stopped_at, f.continued_at)
        for f in run.faults
        if f.kind == "stall"
        and f.service == "order"
        and f.stopped_at is not None
        and f.continued_at is not None
    ]


async def unsent(engine: AsyncEngine, *, zero: bool = False) -> Any:
    counts = await invariants.unsent_outbox_rows(engine, OUTBOX_SCHEMAS)
    return not counts if zero else counts


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
    returns_of = {r.order_id: r for r in plan.returns}
    v: dict[str, Any] = {}

    rows = await fetch(
        engine,
        "SELECT order_id, saga_type, status, phase FROM process_manager.sagas "
        "WHERE starts_with(order_id, :p)",
        p=plan.prefix,
    )
    status = {r.order_id: r.status for r in rows if r.saga_type == CHECKOUT.name}
    returned_as = {r.order_id: r.status for r in rows if r.saga_type == RETURNS.name}
    outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    for planned in plan.sagas:
        outcomes[planned.scenario][status.get(planned.order_id, "MISSING")] += 1
    v["sagas not terminal or missing"] = [
        f"{r.saga_type} {r.order_id}: {r.status}" for r in rows if r.phase not in TERMINAL_PHASES
    ] + [o for o in by_order if o not in status]
    v["sagas of other types"] = sorted(
        f"{r.saga_type} {r.order_id}"
        for r in rows
        if r.saga_type not in (CHECKOUT.name, RETURNS.name)
    )
    v["sagas nobody started"] = sorted(set(status) - set(by_order))

    # returns: each ended as its scenario says; a refused one has no saga and a dead letter
    return_outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    for r in plan.returns:
        got = returned_as.get(r.order_id, REFUSED if r.expected == REFUSED else "MISSING")
        return_outcomes[r.scenario][got] += 1
    v["returns nobody started"] = sorted(set(returned_as) - set(returns_of))
    v["unexpected return outcomes"] = [
        f"{r.order_id} ({r.scenario}): expected {r.expected}, got {returned_as.get(r.order_id)}"
        for r in plan.returns
        if r.expected != REFUSED and returned_as.get(r.order_id) != r.expected
    ]
    v[
        "returns of orders not completed not refused with a dead letter"
    ] = await invariants.refused_returns_not_refused(
        engine,
        plan.prefix,
        {r.order_id: r.message_id for r in plan.returns if r.expected == REFUSED},
    )
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
    returned = {o for o, st in returned_as.items() if st == "RETURNED"}
    backordered = {o for o, st in status.items() if st == "BACKORDERED"}

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
    v["double charges (more than one capture, refund or credit note)"] = [
        o for o, k in ledger.items() if k["capture"] > 1 or k["refund"] + k["credit_note"] > 1
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
    v["oversold SKUs (negative stock)"] = [sku for sku, a in stock.items() if a < 0]
    v[
        "SKUs whose stock is not initial minus units kept (each return restocked once)"
    ] = await invariants.stock_not_restocked_once(
        engine,
        plan.prefix,
        plan.stock,
        {o: [(i.sku, i.quantity) for i in pl.command.items] for o, pl in by_order.items()},
    )
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
    v["COMPLETED sagas without their reservation (restocked if returned)"] = [
        f"{o}: {reservations.get(o)}"
        for o in completed
        if reservations.get(o) != ("RESTOCKED" if o in returned else "RESERVED")
    ]
    backorders = {
        r.order_id: r.status
        for r in await fetch(
            engine,
            "SELECT order_id, status FROM inventory.backorders WHERE starts_with(order_id, :p)",
            p=plan.prefix,
        )
    }
    v["BACKORDERED sagas without an open backorder"] = [
        f"{o}: {backorders.get(o)}" for o in backordered if backorders.get(o) != "OPEN"
    ]

    # shipping: one booking per completed saga, none kept for the others; one pickup per
    # returned order, none kept for a return compensated (the carrier's key names which)
    bookings: dict[str, Counter[str]] = defaultdict(Counter)
    pickups: dict[str, Counter[str]] = defaultdict(Counter)
    for r in await fetch(
        engine,
        "SELECT order_id, idempotency_key, status FROM shipping.carrier_bookings "
        "WHERE order_id LIKE :p",
        p=p,
    ):
        (pickups if r.idempotency_key.endswith(":pickup") else bookings)[r.order_id][r.status] += 1
    v["carrier bookings left dangling"] = [
        o for o, b in bookings.items() if b["BOOKED"] and o not in completed
    ]
    v["COMPLETED sagas without exactly one booking"] = [
        o for o in completed if bookings[o]["BOOKED"] != 1
    ]
    v["pickups booked for orders not returned, or not exactly one for a returned one"] = [
        f"{o}: {dict(pickups[o])}, return {returned_as.get(o)}"
        for o in sorted(set(pickups) | returned)
        if pickups[o]["BOOKED"] != (1 if o in returned else 0)
    ]

    # orders, and the choreographed consumers of their facts: each fact counted once
    agreement = await invariants.order_status_agreement(engine, plan.prefix)
    v["orders whose status disagrees with their saga"] = agreement.disagree
    told = await invariants.customers_not_told_one_right_outcome(engine, plan.prefix)
    v["customers not told exactly one outcome, the right one"] = told
    v[
        "refunds, voids or credit notes of COMPLETED sagas not returned"
    ] = await invariants.money_back_on_completed(engine, plan.prefix)
    v[
        "refunds or credit notes without a RETURNED return (or an operator)"
    ] = await invariants.refunds_without_a_return(engine, plan.prefix)
    v[
        "RETURNED returns not refunded exactly the capture"
    ] = await invariants.returns_refunded_wrong_amount(engine, plan.prefix)

    # the stalls: each participant stopped past the step timeout, and the order stall caught
    # sagas past the pivot, which timed out, were re-sent their completion, and completed
    v["participants not stalled past the step timeout"] = [
        name
        for name in STALLED
        if not any(
            f.kind == "stall" and f.service == name and f.stalled_s > STEP_TIMEOUT_S
            for f in run.faults
        )
    ]
    resent_per_stall = [
        await timeouts_resent(engine, plan.prefix, (f.stopped_at, f.continued_at))
        if f.stopped_at is not None and f.continued_at is not None
        else {}
        for f in run.faults
    ]
    v["stalls during which none of the returns' steps timed out (none of any stall)"] = (
        []
        if any(set(got) & set(RETURNS_STEPS) for got in resent_per_stall)
        else [f"re-sent while stopped: {resent_per_stall}"]
    )
    v["stalls during which none of the participant's steps timed out"] = [
        f"{f.service}: re-sent while stopped {got}"
        for f, got in zip(run.faults, resent_per_stall, strict=True)
        if f.kind == "stall" and not set(got) & set(MUST_RESEND[f.service])
    ]
    order_stalls = order_stall_windows(run)
    resent = await invariants.resent_during(engine, plan.prefix, order_stalls)
    unclean = await invariants.stalled_completions_not_clean(engine, plan.prefix, order_stalls)
    v["order stall: completions re-sent during it not completed cleanly"] = unclean
    analytics = {
        r.outcome: (r.count, r.amount_minor)
        for r in await fetch(engine, "SELECT outcome, count, amount_minor FROM analytics.outcomes")
    }
    compensated = sum(1 for st in status.values() if st == "COMPENSATED")
    # each fact counted once: completed (its capture), backordered and returned (the order's
    # amount), and every other outcome a cancellation
    expected_analytics = {
        "completed": (len(completed), sum(captured.get(o, 0) for o in completed)),
        "backordered": (
            len(backordered),
            sum(by_order[o].command.amount_minor for o in backordered),
        ),
        "returned": (len(returned), sum(captured.get(o, 0) for o in returned)),
    }
    analytics_cancelled = sum(c for k, (c, _) in analytics.items() if k not in expected_analytics)
    v["analytics counts off (facts counted twice or lost)"] = (
        []
        if all(analytics.get(k, (0, 0)) == want for k, want in expected_analytics.items())
        and analytics_cancelled == compensated
        else [f"analytics {analytics} vs {expected_analytics}, {compensated} compensated"]
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
    refused_ids = {r.message_id for r in plan.returns if r.expected == REFUSED}
    others = [r for r in dls if r.message_id not in poison_ids]
    v["legitimate messages refused as permanent errors"] = await invariants.refused_legitimate(
        engine, poison_ids | refused_ids, "permanent"
    )
    # the services' own messages, and the copies of them (same user_id, same route), must all
    # pass the route and sender checks; the returns' starts too
    v["legitimate messages refused as security events"] = await invariants.refused_legitimate(
        engine, poison_ids, "security"
    )

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
    v["outbox rows unsent"] = await unsent(engine)
    v["services that died by themselves"] = [
        f"{u.service}#{u.incarnation} exit {u.code}: {u.tail[-600:]}" for u in fleet.unexpected
    ]

    # the CLI, as an operator would look (the processes run side by side)
    samples = [
        next(pl for pl in plan.sagas if pl.scenario == scenario)
        for scenario in EXPECTED
        if any(pl.scenario == scenario for pl in plan.sagas)
    ]
    return_samples = [
        next(r for r in plan.returns if r.expected == expected)
        for expected in sorted({r.expected for r in plan.returns} - {REFUSED})
    ]
    stuck, listed, *shown = await asyncio.gather(
        sagabus(who, "list", "--stuck", "--json", "--limit", "10000"),
        sagabus(who, "dlq", "list", "--status", "any", "--limit", "100000", "--json"),
        *(sagabus(who, "status", pl.order_id, "--json") for pl in samples),
        *(
            sagabus(who, "status", r.order_id, "--saga-type", RETURNS.name, "--json")
            for r in return_samples
        ),
    )
    v["CLI: sagabus list --stuck"] = [
        f"{r.get('saga_type')} {r['order_id']}" for r in stuck if r["order_id"] in by_order
    ]
    expected_cli = [(pl.order_id, status.get(pl.order_id)) for pl in samples] + [
        (r.order_id, returned_as.get(r.order_id)) for r in return_samples
    ]
    v["CLI: sagabus status disagrees"] = [
        f"{o}: CLI {st['state']}, database {db_status}"
        for (o, db_status), st in zip(expected_cli, shown, strict=True)
        if st["state"] != db_status or not st["terminal"] or not st["history"]
    ]
    cli_ids = {r["message_id"] for r in listed if r["error_class"] and r["error_message"]}
    v["CLI: poison missing from sagabus dlq list"] = sorted(poison_ids - cli_ids)

    resent_per_step = await timeouts_resent(engine, plan.prefix)
    return {
        "violations": v,
        "manual_orders": agreement.manual,
        "resent_per_step": resent_per_step,
        "resent_per_stall": resent_per_stall,
        "resent_in_order_stall": resent,
        "outcomes": outcomes,
        "return_outcomes": return_outcomes,
        "captured_minor": sum(captured.values()),
        "refunded_minor": sum(
            int(r.amount)
            for r in await fetch(
                engine,
                "SELECT coalesce(sum(amount_minor), 0) AS amount FROM payment.ledger "
                "WHERE order_id LIKE :p AND kind = 'refund'",
                p=p,
            )
        ),
        "refunds": sum(k["refund"] for k in ledger.values()),
        "credit_notes": sum(k["credit_note"] for k in ledger.values()),
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
    n_returns = len(run.plan.returns)
    w(
        f"seed {seed}, run {run.plan.run}: {n} sagas and {n_returns} returns in {elapsed:.0f}s "
        "wall time"
    )
    w("")
    w(f"{'scenario':<34}{'sagas':>6}  {'expected':<30}got")
    for sc in SCENARIOS:
        got = report["outcomes"].get(sc.name, Counter())
        w(
            f"{sc.name:<34}{sum(got.values()):>6}  {sc.expected:<30}"
            + ", ".join(f"{c} {k}" for k, c in sorted(got.items()))
        )
    w("")
    w(f"{'returned after':<34}{'returns':>7}  {'expected':<29}got")
    for sc in SCENARIOS:
        if sc.returned is None:
            continue
        got = report["return_outcomes"].get(sc.name, Counter())
        w(
            f"{sc.name:<34}{sum(got.values()):>7}  {sc.returned:<29}"
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
        f"{report['voids']} voids, {report['refunds']} refunds "
        f"({report['refunded_minor'] / 100:.2f} EUR), {report['credit_notes']} credit notes"
    )
    others = report["other_dead_letters"]
    w(
        f"dead letters: {report['dead_letters']} stored, {len(run.poisons)} of them poison, "
        f"{report['security_dead_letters']} security"
        + (f"; others: {dict(others)}" if others else "")
    )
    w("")
    w("faults:")
    for f, stalled in zip(run.faults, report["resent_per_stall"], strict=True):
        what = {
            "kill": f"kill -9 {f.service}, down {f.down_s:.1f}s, restart",
            "rabbitmq": f"RabbitMQ stop_app/start_app, down {f.down_s:.1f}s "
            f"(+ kill -9 and start {f.service} meanwhile)",
            "postgres": f"PostgreSQL stop/start, down {f.down_s:.1f}s "
            f"(+ kill -9 and start {f.service} meanwhile)",
            "stall": f"SIGSTOP {f.service}, stopped {f.stalled_s:.1f}s "
            f"(step timeout {STEP_TIMEOUT_S:.0f}s), SIGCONT"
            + (f"; {f.before_completion} past shipment/capture" if f.service == "order" else ""),
        }[f.kind]
        w(
            f"  {what:<78} {f.in_flight:>3} in flight (+{f.returns_in_flight} returns), "
            f"recovered in {f.took_s:.1f}s"
        )
        if f.kind == "stall":
            w(
                "      sagas when stopped: "
                + ", ".join(f"{k} {n}" for k, n in sorted(f.states.items()))
                + "; timeouts re-sent while stopped: "
                + (", ".join(f"{k} {n}" for k, n in stalled.items()) or "none")
            )
    kills = sum(p.kills for p in fleet.procs.values())
    restarts = sum(p.restarts for p in fleet.procs.values())
    stalls = sum(p.stalls for p in fleet.procs.values())
    w(
        f"  {kills} kill -9, {restarts} process restarts, {stalls} stalls, 1 broker restart, "
        f"1 database restart; {len(fleet.unexpected)} processes died by themselves"
    )
    resent = report["resent_in_order_stall"]
    w(
        f"  order stall: {len(resent)} sagas had their completion re-sent while it was stopped; "
        f"they ended {dict(Counter(resent.values()))}"
    )
    w(
        "  step timeouts that re-sent a command, per step: "
        + ", ".join(f"{k} {n}" for k, n in sorted(report["resent_per_step"].items()))
    )
    if report["manual_orders"]:
        w(f"  FAILED_NEEDS_MANUAL sagas and their orders: {report['manual_orders']}")
    w("")
    w("timeline:")
    out.extend(f"  {line}" for line in run.timeline)
    w("")
    w("invariants (violations):")
    for k, val in report["violations"].items():
        w(f"  {k:<80}{len(val)}")
    return "\n".join(out)
