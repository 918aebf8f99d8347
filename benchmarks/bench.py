"""``sagabus bench``: throughput, latency, CPU and memory of sagabus against its floor.

One run does, against the machine's real RabbitMQ and PostgreSQL:

1. **sagabus**: a fresh database ``sagabus_bench_<id>`` and vhost ``sagabus-bench-<id>``; every
   service as its own OS process (``python -m cli run <service>``, the process
   manager once or twice); S successful checkouts with at most W in flight; every saga must end
   ``COMPLETED``.
2. **floor** (``benchmarks.floor``): the same hops, fan-out, persistent messages,
   quorum queues, confirms and acks with no database, outbox, inbox or state, in the same process
   layout, in a vhost of its own.

Both runs are measured the same way: throughput from the first start sent to the last saga done
(after a warm-up that is not counted), latency per saga from the moment the process manager took
the start to the moment it took the completion, CPU per saga of each service process (psutil),
of the broker (``beam.smp``) and of PostgreSQL (every ``postgres`` process), and the resident
memory of each process sampled over the run. ``ratio`` is sagabus / floor in sagas per second.
The database and vhosts are removed at the end (``--keep`` keeps them).

``run`` is the whole measurement; ``sagabus bench`` (``cli.bench``) parses its options and
prints its result, and this module never imports the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import click

from messaging.management import Management, ManagementError
from messaging.settings import Settings
from messaging.topology import SERVICES

TERMINAL = ("COMPLETED", "COMPENSATED", "FAILED_NEEDS_MANUAL")
PROCESS_MANAGER = "process-manager"
#: every service of the topology but the process manager, each run as its own process
PARTICIPANTS = tuple(s for s in SERVICES if s != PROCESS_MANAGER)
#: SKUs the benchmark spreads its orders over, so they do not all queue on one stock row
SKUS = 64


# -- broker and database set-up ---------------------------------------------------------------


def _mgmt(amqp_url: str) -> Management:
    """The management API of the broker of ``amqp_url``, as its user; the port from
    ``SAGABUS_BENCH_MGMT_PORT`` (default 15672)."""
    port = int(os.environ.get("SAGABUS_BENCH_MGMT_PORT", "15672"))
    return Management.for_amqp_url(amqp_url, port=port)


def _with_vhost(amqp_url: str, vhost: str) -> str:
    parts = urllib.parse.urlsplit(amqp_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(vhost, safe="")))


def _with_database(database_url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(database_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


def create_vhost(amqp_url: str, vhost: str) -> None:
    _mgmt(amqp_url).create_vhost(vhost)


def delete_vhost(amqp_url: str, vhost: str) -> None:
    with contextlib.suppress(ManagementError):
        _mgmt(amqp_url).delete_vhost(vhost)


def consumers(amqp_url: str, vhost: str, queue: str) -> int:
    try:
        info = _mgmt(amqp_url).queue(vhost, queue)
    except ManagementError:
        return 0
    return int((info or {}).get("consumers") or 0)


async def drop_database(settings: Settings, name: str) -> None:
    import asyncpg

    admin = _with_database(settings.asyncpg_url, "postgres")
    for attempt in range(30):  # the database may be restarting just now
        try:
            conn = await asyncpg.connect(admin, timeout=10)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()
            return
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            if attempt == 29:
                raise
            await asyncio.sleep(1)


# -- processes and what they cost -------------------------------------------------------------


def _psutil() -> Any:
    try:
        import psutil
    except ImportError:
        raise click.UsageError("sagabus bench needs psutil: pip install 'sagabus[bench]'") from None
    return psutil


def _cpu(proc: Any) -> float:
    try:
        t = proc.cpu_times()
        return float(t.user + t.system)
    except Exception:  # the process ended
        return 0.0


def _rss(proc: Any) -> int:
    try:
        return int(proc.memory_info().rss)
    except Exception:
        return 0


class Machine:
    """The broker's and the database's processes, found by name in /proc."""

    def __init__(self) -> None:
        self.psutil = _psutil()

    def broker(self) -> list[Any]:
        return [p for p in self.psutil.process_iter(["name"]) if p.info["name"] == "beam.smp"]

    def database(self) -> list[Any]:
        return [p for p in self.psutil.process_iter(["name"]) if p.info["name"] == "postgres"]

    def cpu_by_pid(self, procs: list[Any]) -> dict[int, float]:
        return {p.pid: _cpu(p) for p in procs}


@dataclass
class Service:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    ps: Any = None
    stdout: Any = None


@dataclass
class Phase:
    """What one measured run (sagabus or floor) produced."""

    name: str
    sagas: int = 0
    completed: int = 0
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    rss: dict[str, list[int]] = field(default_factory=dict)
    rss_times: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        n = max(self.sagas, 1)
        python = {k: v for k, v in self.cpu_s.items() if k not in ("broker", "database")}
        out: dict[str, Any] = {
            "sagas": self.sagas,
            "completed": self.completed,
            "elapsed_s": round(self.elapsed_s, 3),
            "sagas_per_s": round(self.sagas / self.elapsed_s, 2) if self.elapsed_s else 0.0,
            "p50_ms": _pct(lat, 50),
            "p95_ms": _pct(lat, 95),
            "p99_ms": _pct(lat, 99),
            "mean_ms": round(statistics.fmean(lat), 2) if lat else None,
            "cpu_ms_per_saga": {
                "broker": round(self.cpu_s.get("broker", 0) * 1000 / n, 3),
                "database": round(self.cpu_s.get("database", 0) * 1000 / n, 3),
                "python": round(sum(python.values()) * 1000 / n, 3),
                "total": round(sum(self.cpu_s.values()) * 1000 / n, 3),
                "python_by_process": {k: round(v * 1000 / n, 3) for k, v in python.items()},
            },
            "rss_mb": {
                k: {
                    "start": _mb(v[0]),
                    "end": _mb(v[-1]),
                    "peak": _mb(max(v)),
                }
                for k, v in self.rss.items()
                if v
            },
        }
        if self.failures:
            out["failures"] = self.failures
        return out

    def timeline(self, points: int = 40) -> dict[str, Any]:
        """RSS over the run, thinned to about ``points`` samples, in MB."""
        if not self.rss_times:
            return {}
        step = max(1, len(self.rss_times) // points)
        idx = list(range(0, len(self.rss_times), step))
        if idx[-1] != len(self.rss_times) - 1:
            idx.append(len(self.rss_times) - 1)
        return {
            "t_s": [round(self.rss_times[i], 1) for i in idx],
            **{k: [_mb(v[i]) for i in idx] for k, v in self.rss.items() if len(v) > max(idx)},
        }


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    k = min(len(values) - 1, max(0, round(p / 100 * len(values) + 0.5) - 1))
    return round(values[k], 2)


def _mb(b: int) -> float:
    return round(b / 1024 / 1024, 1)


class Cluster:
    """Service processes of one phase: start, wait until they consume, measure, stop."""

    def __init__(
        self,
        services: list[Service],
        env: dict[str, str],
        log_dir: Path | None,
        *,
        amqp_url: str,
        vhost: str,
    ) -> None:
        self.services = services
        self.env = env
        self.log_dir = log_dir
        self.amqp_url = amqp_url
        self.vhost = vhost
        self.psutil = _psutil()

    def start(self, *, stdout_pipe: bool = False) -> None:
        for s in self.services:
            err: Any = subprocess.DEVNULL
            if self.log_dir is not None:
                err = open(self.log_dir / f"{s.name}.log", "ab")
            s.proc = subprocess.Popen(
                s.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
            s.ps = self.psutil.Process(s.proc.pid)

    async def wait_consuming(self, expected: dict[str, int], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            missing = {
                q: n
                for q, n in expected.items()
                if await asyncio.to_thread(consumers, self.amqp_url, self.vhost, q) < n
            }
            if not missing:
                return
            dead = [s.name for s in self.services if s.proc and s.proc.poll() is not None]
            if dead:
                raise click.ClickException(f"bench: {', '.join(dead)} exited while starting")
            if time.monotonic() > deadline:
                raise click.ClickException(f"bench: no consumers on {', '.join(missing)}")
            await asyncio.sleep(0.2)

    def cpu(self) -> dict[str, float]:
        return {s.name: _cpu(s.ps) for s in self.services}

    def rss(self) -> dict[str, int]:
        return {s.name: _rss(s.ps) for s in self.services}

    def stop(self) -> None:
        for s in self.services:
            if s.proc is not None and s.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for s in self.services:
            if s.proc is None:
                continue
            try:
                s.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait()


class Meter:
    """CPU deltas of the services, the broker and the database, and RSS samples over time."""

    def __init__(self, cluster: Cluster, machine: Machine, phase: Phase, every_s: float) -> None:
        self.cluster = cluster
        self.machine = machine
        self.phase = phase
        self.every_s = every_s
        self._task: asyncio.Task[None] | None = None

    def _snapshot(self) -> tuple[dict[str, float], dict[int, float], dict[int, float]]:
        return (
            self.cluster.cpu(),
            self.machine.cpu_by_pid(self.machine.broker()),
            self.machine.cpu_by_pid(self.machine.database()),
        )

    async def __aenter__(self) -> Meter:
        self._t0 = time.monotonic()
        self._before = self._snapshot()
        self._task = asyncio.create_task(self._sample())
        return self

    async def _sample(self) -> None:
        while True:
            self._record()
            await asyncio.sleep(self.every_s)

    def _record(self) -> None:
        self.phase.rss_times.append(time.monotonic() - self._t0)
        for name, rss in self.cluster.rss().items():
            self.phase.rss.setdefault(name, []).append(rss)
        self.phase.rss.setdefault("broker", []).append(sum(_rss(p) for p in self.machine.broker()))

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._record()
        services, broker, database = self._snapshot()
        b_services, b_broker, b_database = self._before
        cpu = {k: max(0.0, v - b_services.get(k, 0.0)) for k, v in services.items()}
        cpu["broker"] = sum(max(0.0, v - b_broker.get(pid, 0.0)) for pid, v in broker.items())
        cpu["database"] = sum(max(0.0, v - b_database.get(pid, 0.0)) for pid, v in database.items())
        self.phase.cpu_s = cpu


# -- driving load ------------------------------------------------------------------------------


async def drive(
    n: int,
    window: int,
    send: Callable[[range], Awaitable[None]],
    finished: Callable[[], Awaitable[int]],
    *,
    poll_s: float = 0.05,
    stall_s: float = 120,
) -> float:
    """Start ``n`` sagas keeping at most ``window`` unfinished; return the seconds it took."""
    started = time.monotonic()
    sent = done = 0
    last_progress = started
    while done < n:
        room = min(n - sent, window - (sent - done))
        if room > 0:
            await send(range(sent, sent + room))
            sent += room
        await asyncio.sleep(poll_s)
        now_done = await finished()
        if now_done > done:
            last_progress = time.monotonic()
        done = now_done
        if time.monotonic() - last_progress > stall_s:
            raise click.ClickException(
                f"bench: no saga finished for {stall_s:.0f}s ({done}/{n} done, {sent} sent)"
            )
    return time.monotonic() - started


class Poller:
    """A connection for the bench's own queries that survives a database restart."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: Any = None

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        import asyncpg

        for attempt in range(60):
            try:
                if self.conn is None or self.conn.is_closed():
                    self.conn = await asyncpg.connect(self.url, timeout=10)
                return list(await self.conn.fetch(query, *args))
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                if attempt == 59:
                    raise
                await self.close()
                await asyncio.sleep(1)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close(timeout=2)
        self.conn = None


class Starter:
    """Publishes starts like any client: persistent, confirmed, to ``checkout.start``."""

    def __init__(self, amqp_url: str) -> None:
        self.amqp_url = amqp_url

    async def __aenter__(self) -> Starter:
        from messaging.topology import COMMANDS_EXCHANGE

        self.connection = await aio_pika.connect_robust(self.amqp_url)
        channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        self.exchange = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.connection.close()

    async def send(self, messages: list[aio_pika.Message]) -> None:
        from messaging.topology import START_ROUTING_KEY

        for attempt in range(30):
            try:
                await asyncio.gather(
                    *(self.exchange.publish(m, routing_key=START_ROUTING_KEY) for m in messages)
                )
                return
            except Exception:
                # the broker went away (restarted): the same message ids again, once it is back
                # (a start that did arrive is dropped by the process manager's inbox)
                if attempt == 29:
                    raise
                await asyncio.sleep(1)


def checkout(run: str, tag: str, i: int) -> Any:
    from schemas.checkout import StartCheckout
    from schemas.common import LineItem, ShippingAddress

    return StartCheckout(
        order_id=order_id(run, tag, i),
        customer_id=f"cus_{i % 97:03d}",
        currency="EUR",
        items=(LineItem(sku=f"BENCH-{run}-{i % SKUS:02d}", quantity=1, unit_price_minor=1999),),
        payment_token="tok_visa",
        shipping_address=ShippingAddress(
            line1="1 Bench Street", city="Utrecht", postal_code="3511AA", country="NL"
        ),
    )


def order_id(run: str, tag: str, i: int) -> str:
    return f"bench-{run}-{tag}-{i:07d}"


# -- the two phases ----------------------------------------------------------------------------


@dataclass
class Options:
    sagas: int
    window: int
    pm_instances: int
    warmup: int
    peers: bool
    sample_s: float
    log_dir: Path | None
    keep: bool


def _env(base: Settings, amqp_url: str, database_url: str) -> dict[str, str]:
    env = dict(os.environ)
    # the floor and the peers run checkout v1's six steps: measure sagabus on the same saga
    # (set SAGABUS_SAGA_VERSIONS to measure another version)
    env.setdefault("SAGABUS_SAGA_VERSIONS", "checkout=1")
    env.update(
        SAGABUS_AMQP_URL=amqp_url,
        SAGABUS_DATABASE_URL=database_url,
        SAGABUS_LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    return env


def _run_argv(*services: str) -> list[str]:
    return [sys.executable, "-m", "cli", "run", *services]


def _floor_argv(role: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.floor", role]


def _expected_consumers(pm_instances: int) -> dict[str, int]:
    from messaging.topology import QUEUES

    expected = {QUEUES[PROCESS_MANAGER].name: pm_instances}
    expected.update({QUEUES[p].name: 1 for p in PARTICIPANTS})
    return expected


async def run_sagabus(base: Settings, opts: Options, run: str, machine: Machine) -> Phase:

    from messaging.db import ensure_database, make_engine
    from messaging.service import migrate
    from participants.inventory import service as inventory
    from process_manager import bootstrap, ops

    vhost = f"sagabus-bench-{run}"
    db = f"sagabus_bench_{run}"
    amqp_url = _with_vhost(base.amqp_url, vhost)
    settings = base.model_copy(
        update={"amqp_url": amqp_url, "database_url": _with_database(base.database_url, db)}
    )
    phase = Phase("sagabus", sagas=opts.sagas)
    create_vhost(base.amqp_url, vhost)
    cluster: Cluster | None = None
    engine = None
    try:
        await ensure_database(settings)
        engine = make_engine(settings)
        definitions = bootstrap.definitions(settings)
        await migrate(definitions, engine)
        async with engine.begin() as conn:
            await inventory.seed(
                conn,
                {f"BENCH-{run}-{k:02d}": opts.sagas + opts.warmup for k in range(SKUS)},
            )
        services = [
            Service(f"{PROCESS_MANAGER}-{i + 1}", _run_argv(PROCESS_MANAGER))
            for i in range(opts.pm_instances)
        ]
        services += [Service(p, _run_argv(p)) for p in PARTICIPANTS]
        cluster = Cluster(
            services,
            _env(base, amqp_url, settings.database_url),
            opts.log_dir,
            amqp_url=base.amqp_url,
            vhost=vhost,
        )
        cluster.start()
        await cluster.wait_consuming(_expected_consumers(opts.pm_instances))

        poller = Poller(settings.asyncpg_url)

        async def run_batch(tag: str, n: int, meter: Meter | None) -> float:
            pending: set[int] = set()
            sent_hi = 0

            async def send(idx: range) -> None:
                nonlocal sent_hi
                await starter.send(
                    [ops.start_message(checkout(run, tag, i), message_id=uuid.uuid4()) for i in idx]
                )
                pending.update(idx)
                sent_hi = idx.stop

            async def finished() -> int:
                if pending:
                    rows = await poller.fetch(
                        "SELECT order_id FROM process_manager.sagas "
                        "WHERE order_id >= $1 AND order_id < $2 AND status = ANY($3)",
                        order_id(run, tag, min(pending)),
                        order_id(run, tag, sent_hi),
                        list(TERMINAL),
                    )
                    for r in rows:
                        pending.discard(int(r["order_id"].rsplit("-", 1)[1]))
                return sent_hi - len(pending)

            if meter is None:
                return await drive(n, opts.window, send, finished)
            async with meter:
                return await drive(n, opts.window, send, finished)

        async with Starter(amqp_url) as starter:
            if opts.warmup:
                await run_batch("w", opts.warmup, None)
            meter = Meter(cluster, machine, phase, opts.sample_s)
            phase.elapsed_s = await run_batch("m", opts.sagas, meter)

        rows = await poller.fetch(
            "SELECT status, extract(epoch FROM finished_at - started_at) * 1000 AS ms "
            "FROM process_manager.sagas WHERE order_id LIKE $1",
            f"bench-{run}-m-%",
        )
        phase.latencies_ms = [float(r["ms"]) for r in rows if r["status"] == "COMPLETED"]
        phase.completed = len(phase.latencies_ms)
        for r in rows:
            if r["status"] != "COMPLETED":
                phase.failures[r["status"]] = phase.failures.get(r["status"], 0) + 1
        # every outbox row published (the last facts may still be on their way: 10 s for them)
        deadline = time.monotonic() + 10
        while True:
            unsent = 0
            for d in definitions:
                found = await poller.fetch(
                    f"SELECT count(*) AS n FROM {d.schema}.outbox WHERE sent_at IS NULL"
                )
                unsent += int(found[0]["n"])
            if not unsent or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        if unsent:
            phase.failures["unsent_outbox_rows"] = unsent
        await poller.close()
    finally:
        if cluster is not None:
            cluster.stop()
        if engine is not None:
            await engine.dispose()
        if not opts.keep:
            await drop_database(base, db)
            delete_vhost(base.amqp_url, vhost)
    return phase


async def run_floor(base: Settings, opts: Options, run: str, machine: Machine) -> Phase:
    vhost = f"sagabus-bench-floor-{run}"
    amqp_url = _with_vhost(base.amqp_url, vhost)
    phase = Phase("floor", sagas=opts.sagas)
    create_vhost(base.amqp_url, vhost)
    services = [Service(f"pm-{i + 1}", _floor_argv("pm")) for i in range(opts.pm_instances)]
    services += [Service(p, _floor_argv(p)) for p in PARTICIPANTS]
    env = _env(base, amqp_url, base.database_url)
    cluster = Cluster(services, env, opts.log_dir, amqp_url=base.amqp_url, vhost=vhost)
    done: dict[str, float] = {}
    order: list[str] = []
    readers: list[threading.Thread] = []

    def read(stream: Any) -> None:
        # a thread per process manager: the default executor is too small to park readers in
        for line in iter(stream.readline, b""):
            parts = line.split()
            if parts and parts[0] == b"D":
                done[parts[1].decode()] = float(parts[2])
                order.append(parts[1].decode())

    try:
        cluster.start(stdout_pipe=True)
        for s in cluster.services:
            assert s.proc is not None and s.proc.stdout is not None
            if s.name.startswith("pm-"):
                t = threading.Thread(target=read, args=(s.proc.stdout,), daemon=True)
                t.start()
                readers.append(t)
        await cluster.wait_consuming(_expected_consumers(opts.pm_instances))
        from process_manager import ops

        floor_ns = uuid.NAMESPACE_URL

        async with Starter(amqp_url) as starter:

            async def run_batch(tag: str, n: int) -> tuple[float, list[str]]:
                ids = [str(uuid.uuid5(floor_ns, order_id(run, tag, i))) for i in range(n)]
                wanted = set(ids)
                seen = len(order)
                count = 0

                async def send(idx: range) -> None:
                    await starter.send(
                        [
                            ops.start_message(checkout(run, tag, i), message_id=uuid.uuid4())
                            for i in idx
                        ]
                    )

                async def finished() -> int:
                    nonlocal seen, count
                    upto = len(order)
                    count += sum(1 for k in order[seen:upto] if k in wanted)
                    seen = upto
                    return count

                elapsed = await drive(n, opts.window, send, finished)
                return elapsed, ids

            if opts.warmup:
                await run_batch("w", opts.warmup)
            async with Meter(cluster, machine, phase, opts.sample_s):
                phase.elapsed_s, ids = await run_batch("m", opts.sagas)
        phase.latencies_ms = [done[i] for i in ids if i in done]
        phase.completed = len(phase.latencies_ms)
    finally:
        cluster.stop()
        for t in readers:
            t.join(timeout=5)
        if not opts.keep:
            delete_vhost(base.amqp_url, vhost)
    return phase


# -- reporting ---------------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    psutil = _psutil()
    model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "cpu": model,
        "python": platform.python_version(),
        "load_avg_1m_before": round(os.getloadavg()[0], 2),
    }


def print_human(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    phases = [k for k in ("sagabus", "floor") if k in result]
    t = Table(
        title=f"sagabus bench: {result['sagas']} sagas, window {result['window']}, "
        f"{result['pm_instances']} process manager(s)"
    )
    t.add_column("")
    for p in phases:
        t.add_column(p, justify="right")
    rows = [
        ("sagas/s", "sagas_per_s"),
        ("p50 ms", "p50_ms"),
        ("p95 ms", "p95_ms"),
        ("p99 ms", "p99_ms"),
        ("completed", "completed"),
    ]
    for label, key in rows:
        t.add_row(label, *(str(result[p][key]) for p in phases))
    for part in ("broker", "database", "python", "total"):
        t.add_row(f"CPU ms/saga {part}", *(str(result[p]["cpu_ms_per_saga"][part]) for p in phases))
    for p in phases:
        for name, v in result[p]["cpu_ms_per_saga"]["python_by_process"].items():
            t.add_row(f"  {p} {name} CPU ms/saga", *(str(v) if q == p else "" for q in phases))
    for p in phases:
        for name, v in result[p]["rss_mb"].items():
            t.add_row(
                f"  {p} {name} RSS MB start/end/peak",
                *(f"{v['start']}/{v['end']}/{v['peak']}" if q == p else "" for q in phases),
            )
    console.print(t)
    if "ratio" in result:
        console.print(f"ratio sagabus / floor: [bold]{result['ratio']}[/]")
    for peer in result.get("peers", []):
        if peer.get("error"):
            console.print(f"peer {peer.get('name')}: not measured ({peer['error']})")
        else:
            console.print(
                f"peer {peer.get('name')}: {peer.get('sagas_per_s')} sagas/s, p50 "
                f"{peer.get('p50_ms')} ms, p99 {peer.get('p99_ms')} ms ({peer.get('notes', '')})"
            )


def resolve_peers(peers: bool | None) -> bool:
    """Peers (other saga engines, ``benchmarks.peers``) run when asked, or by default when that
    package imports (it lives beside sagabus in a source checkout, not in the wheel)."""
    if peers is not None:
        return peers
    try:
        import benchmarks.peers  # noqa: F401
    except Exception:
        return False
    return True


async def run_peers(sagas: int, window: int) -> list[dict[str, Any]]:
    """Each available peer engine on the same checkout, the same count and window."""
    try:
        from benchmarks import peers
    except Exception as e:
        return [{"name": "peers", "error": f"benchmarks.peers does not import: {e}"}]
    results: list[dict[str, Any]] = []
    for name in peers.PEERS:
        why = peers.missing(name)
        if why is not None:
            results.append({"name": name, "completed": 0, "error": why})
            continue
        try:
            results.append(await peers.runner(name)(sagas, window))
        except Exception as e:
            results.append({"name": name, "completed": 0, "error": f"{type(e).__name__}: {e}"})
    return results


async def run(
    base: Settings,
    opts: Options,
    *,
    run: str,
    machine: Machine,
    facts: dict[str, Any],
    skip_floor: bool,
    peer_sagas: int | None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """One whole bench run: sagabus, then the floor (unless ``skip_floor``), then the peers
    (if ``opts.peers``). ``progress`` hears a line as each phase begins."""
    # SIGTERM (a CI job cancelled, `timeout`) cancels the run, so that its clean-up still
    # stops the service processes and removes the bench database and vhosts
    this = asyncio.current_task()
    assert this is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, this.cancel)
    say = progress or (lambda _: None)
    result: dict[str, Any] = {
        "run": run,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "sagas": opts.sagas,
        "window": opts.window,
        "warmup": opts.warmup,
        "pm_instances": opts.pm_instances,
        "peers": opts.peers,
        "prefetch": base.prefetch,
        "machine": facts,
    }
    say(f"sagabus bench {run}: sagabus phase ({opts.sagas} sagas)...")
    s = await run_sagabus(base, opts, run, machine)
    result["sagabus"] = s.summary()
    result["sagabus_rss_timeline_mb"] = s.timeline()
    result.update(
        sagas_per_s=result["sagabus"]["sagas_per_s"],
        p50_ms=result["sagabus"]["p50_ms"],
        p95_ms=result["sagabus"]["p95_ms"],
        p99_ms=result["sagabus"]["p99_ms"],
    )
    if not skip_floor:
        say(f"sagabus bench {run}: floor phase ({opts.sagas} sagas)...")
        f = await run_floor(base, opts, run, machine)
        result["floor"] = f.summary()
        result["floor_sagas_per_s"] = result["floor"]["sagas_per_s"]
        result["ratio"] = (
            round(result["sagas_per_s"] / result["floor_sagas_per_s"], 3)
            if result["floor_sagas_per_s"]
            else None
        )
    if opts.peers:
        say(f"sagabus bench {run}: peers...")
        result["peers"] = await run_peers(peer_sagas or opts.sagas, opts.window)
    return result


def succeeded(result: dict[str, Any]) -> bool:
    """Every measured saga COMPLETED, and nothing failed on the way."""
    return result["sagabus"]["completed"] == result["sagas"] and not result["sagabus"].get(
        "failures"
    )
