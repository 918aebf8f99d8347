"""The chaos harness: every service as its own OS process, the faults done to them, a tap that
delivers copies of messages twice and late, poison messages, and the scenario plan.

Nothing here decides whether a run passed; ``test_chaos.py`` asserts on PostgreSQL and the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from messaging import topology
from messaging.service import DEAD_LETTERS
from participants.shipping.carrier import UNAVAILABLE_POSTAL_CODE, UNDELIVERABLE_POSTAL_CODE
from process_manager import demo
from process_manager.demo import Scenario
from schemas.checkout import StartCheckout, saga_id_for_order
from schemas.common import LineItem, ShippingAddress
from schemas.envelope import HeaderNames
from schemas.returns import StartReturn

ROOT = Path(__file__).resolve().parents[2]
#: every service of the topology, and the dead-letter collector: one OS process each
SERVICES = (*topology.SERVICES, DEAD_LETTERS)
TAP_QUEUE = "chaos.tap"
COPY_HEADER = "x-chaos-copy"
POISON_HEADER = "x-chaos-poison"
ADDRESS = ShippingAddress(line1="1 Chaos Lane", city="Utrecht", postal_code="3511AA", country="NL")
#: an address the test carrier cannot collect a return from (its shipment is booked as usual)
NO_PICKUP_ADDRESS = ADDRESS.model_copy(update={"line1": "No Pickup, 1 Chaos Lane"})


def queues_of(service: str) -> tuple[str, ...]:
    """The queues a running ``service`` consumes: how the harness sees that it is up."""
    if service == "dead-letters":
        return tuple(topology.QUEUES[s].dlq for s in topology.SERVICES)
    return (topology.QUEUES[service].name,)


def amqp_user(amqp_url: str) -> str:
    """The broker user an AMQP URL logs in as (RabbitMQ's default ``guest`` when it names none):
    the ``user_id`` RabbitMQ lets a connection of that URL put on a message."""
    name = urllib.parse.urlsplit(amqp_url).username
    return urllib.parse.unquote(name) if name else "guest"


def clean_env(base: Mapping[str, str], settings: Mapping[str, str]) -> dict[str, str]:
    """The parent's environment without any SAGABUS_* or OTEL_* variable, plus ``settings``."""
    env = {k: v for k, v in base.items() if not k.startswith(("SAGABUS_", "OTEL_"))}
    env.update(settings)
    env["OTEL_SDK_DISABLED"] = "true"
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -- processes ---------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the test process dies, so no service outlives
    an interrupted run (Linux only; elsewhere the test's own clean-up has to do)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ServiceProcess:
    """``python -m cli run <name>``; stderr (JSON logs) goes to one file per
    incarnation, so a killed process's last words stay readable."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.env = env
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.incarnation = 0
        self.kills = 0
        self.restarts = 0
        self.stalls = 0
        #: SIGSTOPped and not yet SIGCONTinued: alive, holding its connections, doing nothing
        self.stopped = False
        self._log: Any = None

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        self.incarnation += 1
        if self.incarnation > 1:
            self.restarts += 1
        self._close_log()
        self._log = open(self.log_path(self.incarnation), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "run", self.name],
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def log_path(self, incarnation: int) -> Path:
        return self.log_dir / f"{self.name}.{incarnation}.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill9(self) -> None:
        """SIGKILL: no shutdown code runs, in-flight deliveries and relay batches are cut."""
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} is not running"
        self.sigcont()  # a kill is a kill, not the end of a stall: never left pending on a stop
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.kills += 1
        self._close_log()

    def sigstop(self) -> None:
        """SIGSTOP: the process freezes mid-flight (a stall: a GC pause, a swapped-out host, a
        hung disk). Its broker connection and database sessions stay open and its prefetched
        deliveries stay unacked, so the broker sees it alive; only the process manager's step
        timeouts notice. Signals the process itself, not its session (it has one of its own)."""
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} is not running"
        assert not self.stopped, f"{self.name} is stopped already"
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.stopped = True
        self.stalls += 1

    def sigcont(self) -> None:
        """SIGCONT a stopped process (nothing if it is not stopped)."""
        if self.stopped and self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
        self.stopped = False

    def stop(self) -> None:
        self.sigcont()  # a stopped process would hold SIGTERM pending until the kill
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 8) -> str:
        path = self.log_path(self.incarnation)
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def events(self) -> Iterator[dict[str, Any]]:
        """Every JSON log line of every incarnation."""
        for n in range(1, self.incarnation + 1):
            path = self.log_path(n)
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        yield json.loads(line)


@dataclass
class UnexpectedExit:
    service: str
    incarnation: int
    code: int
    tail: str


class Fleet:
    """The services of one run, each with its own environment (its own broker user and database
    role). ``watch`` notices a process that died without being killed, records it (that is a
    product bug: services must ride out faults) and starts it again so the run can finish and
    report everything it found."""

    def __init__(self, envs: Mapping[str, dict[str, str]], log_dir: Path) -> None:
        self.procs = {name: ServiceProcess(name, envs[name], log_dir) for name in SERVICES}
        self.unexpected: list[UnexpectedExit] = []
        self._down: set[str] = set()

    def __getitem__(self, name: str) -> ServiceProcess:
        return self.procs[name]

    def start_all(self) -> None:
        for p in self.procs.values():
            p.start()

    def kill9(self, name: str) -> None:
        self._down.add(name)
        self.procs[name].kill9()

    def restart(self, name: str) -> None:
        self.procs[name].start()
        self._down.discard(name)

    def sigstop(self, name: str) -> None:
        self.procs[name].sigstop()

    def sigcont(self, name: str) -> None:
        self.procs[name].sigcont()

    def check(self) -> None:
        """A stopped process is not dead: ``poll()`` (``waitpid`` without ``WUNTRACED``) does
        not report a stop, and a stopped process is skipped here all the same."""
        for name, p in self.procs.items():
            if p.stopped:
                continue
            code = p.exit_code()
            if name in self._down or code is None:
                continue
            self.unexpected.append(UnexpectedExit(name, p.incarnation, code, p.tail()))
            p.start()

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)

    def stop_all(self) -> None:
        """SIGTERM to every process at once (a graceful stop), SIGKILL for any that lingers;
        a stopped process is continued first, or it would only die at the SIGKILL."""
        for p in self.procs.values():
            p.sigcont()
            if p.proc is not None and p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            p.stop()

    def events(self, name: str | None = None) -> Iterator[dict[str, Any]]:
        for n, p in self.procs.items():
            if name is None or n == name:
                yield from p.events()


# -- the broker as the harness sees it ----------------------------------------------------------


class BrokerProbe:
    """Consumer counts per queue over a plain connection that is reopened after a fault."""

    def __init__(self, amqp_url: str) -> None:
        self.amqp_url = amqp_url
        self._conn: aio_pika.abc.AbstractConnection | None = None

    async def consumers(self, queue: str) -> int | None:
        """None while the broker cannot say (down, restarting, queue not yet recovered)."""
        try:
            if self._conn is None or self._conn.is_closed:
                self._conn = await asyncio.wait_for(aio_pika.connect(self.amqp_url), 5)
            channel = await asyncio.wait_for(self._conn.channel(), 5)
            try:
                q = await asyncio.wait_for(channel.declare_queue(queue, passive=True), 5)
                return int(q.declaration_result.consumer_count or 0)
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
        except Exception:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await self._conn.close()
            self._conn = None
            return None

    async def depth(self, queue: str) -> int | None:
        """Ready messages in ``queue``; None while the broker cannot say."""
        try:
            if self._conn is None or self._conn.is_closed:
                self._conn = await asyncio.wait_for(aio_pika.connect(self.amqp_url), 5)
            channel = await asyncio.wait_for(self._conn.channel(), 5)
            try:
                q = await asyncio.wait_for(channel.declare_queue(queue, passive=True), 5)
                return int(q.declaration_result.message_count or 0)
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
        except Exception:
            return None

    async def serving(self, service: str) -> bool:
        for q in queues_of(service):
            n = await self.consumers(q)
            if not n:
                return False
        return True

    async def gone(self, service: str) -> bool:
        for q in queues_of(service):
            n = await self.consumers(q)
            if n is None or n > 0:
                return False
        return True

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()


def rabbitmqctl(*args: str, timeout: float = 120) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=timeout)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# -- PostgreSQL as the harness sees it -----------------------------------------------------------


def pg_version() -> str:
    return sorted(os.listdir("/etc/postgresql"))[0]


def pg_ctlcluster(action: str) -> None:
    """Stop or start the cluster. Not an error if it already is in that state (on a shared
    machine another session may have started it again meanwhile)."""
    r = subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", pg_version(), "main", action],
        capture_output=True,
        timeout=120,
    )
    already = b"already running" in r.stdout + r.stderr or b"not running" in r.stdout + r.stderr
    if r.returncode != 0 and not already:
        raise subprocess.CalledProcessError(r.returncode, r.args, r.stdout, r.stderr)


def pg_ready() -> bool:
    r = subprocess.run(
        ["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"], capture_output=True, timeout=30
    )
    return r.returncode == 0


def restore_infrastructure(within: float = 180) -> list[str]:
    """Bring RabbitMQ and PostgreSQL back whatever state a failed or interrupted run left them
    in. A stopped RabbitMQ app closes its AMQP port (the node keeps running); a ``stop_app``
    still under way when this starts (an interrupted fault) is simply outlasted: try again
    until both answer."""
    done: list[str] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        pg, amqp = pg_ready(), port_open(5672)
        if pg and amqp:
            return done
        if not pg:
            with contextlib.suppress(Exception):
                pg_ctlcluster("start")
            done.append("started PostgreSQL")
        if not amqp:
            with contextlib.suppress(Exception):
                rabbitmqctl("start_app", timeout=90)  # returns once the app is up
            done.append("started RabbitMQ")
        time.sleep(1)
    raise RuntimeError(f"RabbitMQ or PostgreSQL still down after {within}s: {done}")


# -- duplicates and late copies ------------------------------------------------------------------


class Duplicator:
    """A tap on the commands, replies and facts exchanges: about ``rate`` of the messages it sees
    are published again, unchanged (same message id, headers, routing key, ``user_id``), to the
    exchange they came from; ``late_share`` of those copies only after a random delay, so they
    arrive after messages published later (out of order). Copies are marked and never copied
    again.

    The tap queue is declared and consumed as the admin (``amqp_url``). A copy keeps its
    original's ``user_id``, which RabbitMQ accepts only over a connection of that user, so each
    copy is published through the connection of its sender (``senders``: user -> AMQP URL). A
    message whose ``user_id`` is none of them (or missing) is not copied, only counted."""

    def __init__(
        self,
        amqp_url: str,
        senders: Mapping[str, str],
        rng: random.Random,
        *,
        rate: float = 0.10,
        late_share: float = 0.4,
    ) -> None:
        self.amqp_url = amqp_url
        self.senders = dict(senders)
        self.rng = rng
        self.rate = rate
        self.late_share = late_share
        self.seen = 0
        #: messages the services published (not copies, not poison)
        self.originals = 0
        self.copied = 0
        self.late = 0
        self.lost = 0
        self.by_type: Counter[str] = Counter()
        #: originals not copied because their user_id is none of ``senders``: (user_id, type)
        self.unknown_sender: Counter[tuple[str | None, str]] = Counter()
        #: originals per broker-validated sender
        self.by_sender: Counter[str | None] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._conn: aio_pika.abc.AbstractRobustConnection | None = None
        #: sender -> its connection and a confirming channel on it
        self._pubs: dict[str, tuple[aio_pika.abc.AbstractRobustConnection, Any]] = {}
        self._exchanges: dict[tuple[str, str], aio_pika.abc.AbstractExchange] = {}

    async def start(self) -> None:
        for user, url in self.senders.items():
            conn = await aio_pika.connect_robust(url)
            self._pubs[user] = (conn, await conn.channel(publisher_confirms=True))
        self._conn = await aio_pika.connect_robust(self.amqp_url)
        channel = await self._conn.channel()
        await channel.set_qos(prefetch_count=500)
        queue = await channel.declare_queue(TAP_QUEUE, durable=True)
        for exchange, key in (
            (topology.COMMANDS_EXCHANGE, "#"),
            (topology.REPLIES_EXCHANGE, "#"),
            (topology.FACTS_EXCHANGE, ""),
        ):
            await queue.bind(exchange, routing_key=key)
        await queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, m: AbstractIncomingMessage) -> None:
        self.seen += 1
        headers = m.headers or {}
        if COPY_HEADER in headers or POISON_HEADER in headers:
            return
        self.originals += 1
        self.by_sender[m.user_id] += 1
        if self.rng.random() >= self.rate:
            return
        if m.user_id not in self._pubs:
            self.unknown_sender[(m.user_id, m.type or "?")] += 1
            return
        delay = self.rng.uniform(0.3, 4.0) if self.rng.random() < self.late_share else 0.0
        task = asyncio.create_task(self._copy(m, delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _copy(self, m: AbstractIncomingMessage, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        headers = dict(m.headers or {})
        headers[COPY_HEADER] = 1
        copy = aio_pika.Message(
            body=m.body,
            headers=headers,
            content_type=m.content_type,
            content_encoding=m.content_encoding,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=m.message_id,
            correlation_id=m.correlation_id,
            timestamp=m.timestamp,
            type=m.type,
            app_id=m.app_id,
            user_id=m.user_id,
        )
        sender = m.user_id or ""
        try:
            exchange = self._exchanges.get((sender, m.exchange or ""))
            if exchange is None:
                _, channel = self._pubs[sender]
                exchange = await channel.get_exchange(m.exchange or "", ensure=False)
                self._exchanges[(sender, m.exchange or "")] = exchange
            # bounded: a publish caught in a connection loss may otherwise never return
            await asyncio.wait_for(exchange.publish(copy, routing_key=m.routing_key or ""), 10)
        except Exception:  # the broker is restarting: this copy is simply not made
            self.lost += 1
            return
        self.copied += 1
        self.late += 1 if delay else 0
        self.by_type[m.type or "?"] += 1

    async def stop(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=15)
        for conn in (self._conn, *(c for c, _ in self._pubs.values())):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self._conn = None
        self._pubs.clear()
        self._exchanges.clear()


# -- poison ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Poison:
    kind: str
    message_id: str
    exchange: str
    routing_key: str
    #: the work queue that must dead-letter it
    queue: str
    #: a phrase its dead-letter reason must contain
    reason: str
    #: the principal it is published as (the one whose route it abuses, or ``client``)
    sender: str
    #: the dead letter's ``failure_kind``: ``permanent`` (refused for what it says) or
    #: ``security`` (refused for the way it came: route or sender)
    failure_kind: str
    message: aio_pika.Message = field(compare=False, repr=False)

    @property
    def error_class(self) -> str:
        """The dead letter's ``error_class``: ``trust.Forbidden`` for a security event."""
        return "Forbidden" if self.failure_kind == "security" else "PermanentError"


def _poison_message(
    body: bytes,
    *,
    type_: str | None,
    message_id: str,
    saga_id: uuid.UUID | None,
    kind: str,
    fence: int = 1,
) -> aio_pika.Message:
    headers: dict[str, Any] = {POISON_HEADER: kind}
    if saga_id is not None:
        headers[HeaderNames.SAGA_ID] = str(saga_id)
        headers[HeaderNames.FENCE] = fence
    return aio_pika.Message(
        body=body,
        headers=headers,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        type=type_,
    )


def poison(kind: str, rng: random.Random, *, victims: Sequence[str] = ()) -> Poison:
    """One malformed message of ``kind``, addressed where a real service will refuse it, and
    published as a provisioned user that may use that route (so the broker lets it through and
    the service has to refuse it). ``victims``: order ids of real sagas a forged reply names."""
    mid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    saga = uuid.UUID(int=rng.getrandbits(128), version=4)
    c, r = topology.COMMANDS_EXCHANGE, topology.REPLIES_EXCHANGE
    q = {s: topology.QUEUES[s].name for s in topology.SERVICES}
    authorized = json.dumps(
        {"order_id": f"ghost-{mid[:8]}", "authorization_id": "auth_x", "amount_minor": 100}
    ).encode()
    pm, fence = "process-manager", 1
    specs: dict[str, tuple[str, str, str, str, str, str, bytes, str | None, uuid.UUID | None]] = {
        # kind: exchange, routing key, queue, sender, failure kind, reason, body, type, saga id
        "bad_json": (
            c, "payment.AuthorizePayment", q["payment"], pm, "permanent", "body is not JSON",
            b'{"order_id": "x", "amount_minor": ', "payment.AuthorizePayment.v1", saga,
        ),
        "unknown_type": (
            c, "inventory.ReserveInventory", q["inventory"], pm, "permanent",
            "unknown message type", b"{}", "inventory.TeleportStock.v1", saga,
        ),
        "schema_invalid": (
            c, "order.CreateOrder", q["order"], pm, "permanent", "invalid order.CreateOrder.v1",
            b'{"order_id": 7, "currency": "euro"}', "order.CreateOrder.v1", saga,
        ),
        "missing_saga_header": (
            c, "shipping.CancelShipment", q["shipping"], pm, "permanent",
            "missing header sagabus-saga-id",
            b'{"order_id": "ghost"}', "shipping.CancelShipment.v1", None,
        ),
        # a reply type on a participant's command route (the process manager's, the only key
        # the broker lets anyone use there): once "no handler for" it; now the route check
        # refuses it before any handler is looked for
        "no_handler": (
            c, "payment.AuthorizePayment", q["payment"], pm, "security", "forbidden route",
            authorized, "payment.PaymentAuthorized.v1", saga,
        ),
        "missing_type": (
            r, "payment.PaymentAuthorized.v1", q["process-manager"], "payment", "permanent",
            "missing AMQP 'type'", authorized, None, saga,
        ),
        "unknown_saga": (
            r, "payment.PaymentAuthorized.v1", q["process-manager"], "payment", "permanent",
            "for unknown saga", authorized, "payment.PaymentAuthorized.v1", saga,
        ),
        "bad_start": (
            c, topology.START_ROUTING_KEY, q["process-manager"], "client", "permanent",
            "invalid checkout.StartCheckout.v1",
            b'{"order_id": "", "items": []}', "checkout.StartCheckout.v1", None,
        ),
        # issue 9's attack: a client forges the payment's reply on the public start route, for
        # a real saga (its saga id, a plausible fence); refused for its route
        "forged_reply": (
            c, topology.START_ROUTING_KEY, q["process-manager"], "client", "security",
            "forbidden route", authorized, "payment.PaymentAuthorized.v1", saga,
        ),
    }  # fmt: skip
    if kind == "forged_reply" and victims:
        order_id = rng.choice(list(victims))
        authorized = json.dumps(
            {"order_id": order_id, "authorization_id": f"auth_{mid[:8]}", "amount_minor": 100}
        ).encode()
        saga, fence = saga_id_for_order(order_id), 2
        specs[kind] = (*specs[kind][:6], authorized, specs[kind][7], saga)
    exchange, key, queue, sender, failure_kind, reason, body, type_, saga_id = specs[kind]
    message = _poison_message(
        body, type_=type_, message_id=mid, saga_id=saga_id, kind=kind, fence=fence
    )
    return Poison(kind, mid, exchange, key, queue, reason, sender, failure_kind, message)


POISON_KINDS = (
    "bad_json",
    "unknown_type",
    "schema_invalid",
    "missing_saga_header",
    "no_handler",
    "missing_type",
    "unknown_saga",
    "bad_start",
    "forged_reply",
)


# -- the scenario plan -----------------------------------------------------------------------------


#: every scenario of the demo (checkout v2: fraud screening, backorder; and the returns of
#: those with ``returned`` set), and one of the chaos run's own. The carrier loses about a fifth
#: of its answers at random: every booking path (pickups too) may hit it
SCENARIOS = (*demo.SCENARIOS, Scenario("capture refused", "COMPENSATED", 6))
EXPECTED = {s.name: s.expected for s in SCENARIOS}
#: what the return of a scenario's order ends as: a returns saga's status, or "refused"
RETURNED = {s.name: s.returned for s in SCENARIOS if s.returned is not None}
REFUSED = "refused"


@dataclass(frozen=True)
class Planned:
    scenario: str
    command: StartCheckout
    message_id: str

    @property
    def order_id(self) -> str:
        return self.command.order_id

    @property
    def saga_id(self) -> uuid.UUID:
        return saga_id_for_order(self.command.order_id)


@dataclass(frozen=True)
class PlannedReturn:
    """The return of a planned checkout's order, started once that checkout is terminal."""

    scenario: str
    command: StartReturn
    message_id: str
    #: the returns saga's final status, or ``REFUSED`` (no saga, a dead letter)
    expected: str

    @property
    def order_id(self) -> str:
        return self.command.order_id


@dataclass
class Plan:
    run: str
    sagas: list[Planned]
    stock: dict[str, int]
    returns: list[PlannedReturn] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"chaos-{self.run}-"

    def by_order(self) -> dict[str, Planned]:
        return {p.order_id: p for p in self.sagas}


def make_plan(n: int, rng: random.Random) -> Plan:
    """``n`` checkouts (races come in pairs) with their stock, and the returns of the orders
    whose scenario returns them. Seeded: same seed, same plan."""
    run = f"{rng.getrandbits(24):06x}"
    std = [f"CHAOS-{run}-STD-{k}" for k in range(5)]
    none_sku = f"CHAOS-{run}-NONE"
    stock: dict[str, int] = {sku: 4 * n for sku in std}
    stock[none_sku] = 0
    names: list[str] = []
    while len(names) < n:
        s = rng.choices(SCENARIOS, weights=[s.weight for s in SCENARIOS])[0]
        if s.name == "last unit race":
            if n - len(names) >= 2:
                names += [s.name, s.name]
            continue
        names.append(s.name)
    sagas: list[Planned] = []
    races = 0
    for i, name in enumerate(names):
        skus = rng.sample(std, rng.choice((1, 1, 2)))
        items = [
            LineItem(sku=sku, quantity=rng.randint(1, 3), unit_price_minor=rng.randint(100, 9999))
            for sku in skus
        ]
        token, address = "tok_visa", ADDRESS
        customer, backorder = f"cus_{i % 89:03d}", False
        if name == "payment declined":
            token = rng.choice(("tok_decline", "tok_insufficient_funds"))
        elif name == "fraud screening rejects":
            customer = demo.BLOCKED_CUSTOMER
        elif name == "out of stock":
            items.append(LineItem(sku=none_sku, quantity=1, unit_price_minor=500))
        elif name == "out of stock, backorder allowed":
            items.append(LineItem(sku=none_sku, quantity=1, unit_price_minor=500))
            backorder = True
        elif name == "success, pickup fails on return":
            address = NO_PICKUP_ADDRESS
        elif name == "shipping rejected":
            address = ADDRESS.model_copy(update={"postal_code": UNDELIVERABLE_POSTAL_CODE})
        elif name == "carrier unavailable":
            address = ADDRESS.model_copy(update={"postal_code": UNAVAILABLE_POSTAL_CODE})
        elif name == "capture refused":
            token = "tok_capture_fails"
        elif name == "last unit race":
            races += 1
            sku = f"CHAOS-{run}-LAST-{(races + 1) // 2}"
            stock[sku] = 1
            items = [LineItem(sku=sku, quantity=1, unit_price_minor=1999)]
        order_id = f"chaos-{run}-{i:04d}"
        cmd = StartCheckout(
            order_id=order_id,
            customer_id=customer,
            currency="EUR",
            items=tuple(items),
            payment_token=token,
            shipping_address=address,
            allow_backorder=backorder,
        )
        mid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        sagas.append(Planned(name, cmd, mid))
    returns = [
        PlannedReturn(
            pl.scenario,
            StartReturn(order_id=pl.order_id, reason="chaos: changed my mind"),
            str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            RETURNED[pl.scenario],
        )
        for pl in sagas
        if pl.scenario in RETURNED
    ]
    return Plan(run, sagas, stock, returns)


def start_message(p: Planned | PlannedReturn) -> aio_pika.Message:
    """A checkout's start, or a return's: what any AMQP client sends (the route is the
    caller's: ``checkout.start`` or ``returns.start``)."""
    return aio_pika.Message(
        body=p.command.model_dump_json().encode(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=p.message_id,
        type=p.command.TYPE,
    )


class Publisher:
    """The test's own client: publishes with confirms, and rides out a broker restart by trying
    again (same message id, so a message the broker did get is dropped by the inbox). Every
    message carries the ``user_id`` of the URL's user, as the services' messages do."""

    def __init__(self, amqp_url: str) -> None:
        self.amqp_url = amqp_url
        self.user = amqp_user(amqp_url)
        self.retries = 0
        self._conn: aio_pika.abc.AbstractRobustConnection | None = None

    async def start(self) -> None:
        self._conn = await aio_pika.connect_robust(self.amqp_url)
        self._channel = await self._conn.channel(publisher_confirms=True, on_return_raises=True)

    async def publish(
        self, exchange: str, routing_key: str, message: aio_pika.Message, *, within: float = 120
    ) -> None:
        deadline = time.monotonic() + within
        message.user_id = self.user
        while True:
            try:
                ex = await asyncio.wait_for(self._channel.get_exchange(exchange, ensure=False), 10)
                await asyncio.wait_for(
                    ex.publish(message, routing_key=routing_key, mandatory=True), 10
                )
                return
            except aio_pika.exceptions.DeliveryError:
                raise  # unroutable: the test addressed it wrongly
            except Exception:
                if time.monotonic() > deadline:
                    raise
                self.retries += 1
                await asyncio.sleep(0.5)

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
