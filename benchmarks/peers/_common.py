"""What the peers share: the participants' step work, the windowed load driver, the statistics,
and throw-away PostgreSQL databases.

The participants do the same work for every peer. Two flavours:

``memory``
    dicts in the peer's process (the work is trivial; the peer's own durability is all there is).
``postgres``
    one PostgreSQL transaction per command in a database made for the run: an inbox row that
    deduplicates the command (like sagabus's inbox), then the business rows (orders, payments
    and a ledger unique per order and kind, stock and reservations, shipments), like sagabus's
    participants. No outbox and no broker: the peer carries the replies.

Choose with ``participants=`` or the environment variable ``SAGABUS_PEERS_PARTICIPANTS``.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from benchmarks.peers._definition import ALL_COMMANDS, sample_order

ENV_PARTICIPANTS = "SAGABUS_PEERS_PARTICIPANTS"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/sagabus"
#: like sagabus's Settings.db_pool_size (per process)
DB_POOL_SIZE = 10


class Refused(Exception):
    """A participant's business refusal (sagabus's failure replies), e.g. InventoryUnavailable."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


class Participants(Protocol):
    kind: str

    async def handle(self, command: str, order: dict[str, Any]) -> dict[str, Any]:
        """Do ``command`` for ``order``, idempotently. Raise :class:`Refused` on a refusal."""
        ...

    async def journal(self, order_id: str) -> list[str]:
        """Commands handled for ``order_id`` (first delivery of each), in order."""
        ...

    async def stock(self, sku: str, available: int) -> None:
        """Put ``available`` units of ``sku`` on the shelf."""
        ...

    async def stock_many(self, skus: list[str], available: int) -> None: ...

    async def close(self) -> None: ...


def participants_kind(explicit: str | None = None) -> str:
    kind = (explicit or os.environ.get(ENV_PARTICIPANTS) or "memory").strip().lower()
    if kind not in ("memory", "postgres"):
        raise ValueError(f"participants must be 'memory' or 'postgres', not {kind!r}")
    return kind


def _amount(order: dict[str, Any]) -> int:
    return sum(int(i["quantity"]) * int(i["unit_price_minor"]) for i in order["items"])


DECLINING_TOKENS = {"tok_decline": "card_declined", "tok_insufficient_funds": "insufficient_funds"}
REJECTED_POSTAL_CODES = {"00000": "address_rejected"}


# ---------------------------------------------------------------------------------------------
# in memory


@dataclass
class MemoryParticipants:
    kind: str = "memory"
    orders: dict[str, str] = field(default_factory=dict)
    payments: dict[str, str] = field(default_factory=dict)
    ledger: set[tuple[str, str]] = field(default_factory=set)
    available: dict[str, int] = field(default_factory=dict)
    reservations: dict[str, tuple[list[tuple[str, int]], str]] = field(default_factory=dict)
    shipments: dict[str, str] = field(default_factory=dict)
    inbox: dict[str, list[str]] = field(default_factory=dict)

    async def stock(self, sku: str, available: int) -> None:
        self.available[sku] = available

    async def stock_many(self, skus: list[str], available: int) -> None:
        for sku in skus:
            self.available[sku] = available

    async def journal(self, order_id: str) -> list[str]:
        return list(self.inbox.get(order_id, []))

    async def close(self) -> None:
        pass

    async def handle(self, command: str, order: dict[str, Any]) -> dict[str, Any]:
        oid = order["order_id"]
        seen = self.inbox.setdefault(oid, [])
        if command in seen:  # a redelivery: already done (a refusal is final and not replayed)
            return {"duplicate": True}
        seen.append(command)
        handler = getattr(self, f"_{command}")
        result: dict[str, Any] = handler(oid, order)
        return result

    def _post(self, oid: str, kind: str) -> None:
        if (oid, kind) in self.ledger:
            raise RuntimeError(f"ledger already holds a {kind} for order {oid}")
        self.ledger.add((oid, kind))

    def _CreateOrder(self, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        self.orders.setdefault(oid, "CREATED")
        return {"order": self.orders[oid]}

    def _AuthorizePayment(self, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        declined = DECLINING_TOKENS.get(order["payment_token"])
        if oid not in self.payments:
            self.payments[oid] = "DECLINED" if declined else "AUTHORIZED"
            if not declined:
                self._post(oid, "authorize")
        if self.payments[oid] == "DECLINED":
            raise Refused("PaymentDeclined", declined or "declined")
        return {"authorization_id": f"auth_{uuid.uuid5(uuid.NAMESPACE_URL, oid).hex[:16]}"}

    def _ReserveInventory(self, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        wanted = [(i["sku"], int(i["quantity"])) for i in order["items"]]
        if any(self.available.get(sku, 0) < qty for sku, qty in wanted):
            raise Refused("InventoryUnavailable", "out_of_stock")
        for sku, qty in wanted:
            self.available[sku] -= qty
        self.reservations[oid] = (wanted, "RESERVED")
        return {"reserved": len(wanted)}

    def _CreateShipment(self, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        rejected = REJECTED_POSTAL_CODES.get(order["shipping_address"]["postal_code"])
        if rejected:
            raise Refused("ShipmentFailed", rejected)
        self.shipments[oid] = "CREATED"
        return {"shipment_id": f"shp_{oid}"}

    def _CapturePayment(self, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        if self.payments.get(oid) != "AUTHORIZED":
            raise Refused("PaymentCaptureFailed", f"payment is {self.payments.get(oid)}")
        self.payments[oid] = "CAPTURED"
        self._post(oid, "capture")
        return {"captured": _amount(order)}

    def _CompleteOrder(self, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        self.orders[oid] = "COMPLETED"
        return {}

    def _CancelShipment(self, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        if self.shipments.get(oid) == "CREATED":
            self.shipments[oid] = "CANCELLED"
        return {}

    def _ReleaseInventory(self, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        reservation = self.reservations.get(oid)
        if reservation and reservation[1] == "RESERVED":
            for sku, qty in reservation[0]:
                self.available[sku] += qty
            self.reservations[oid] = (reservation[0], "RELEASED")
        return {}

    def _VoidAuthorization(self, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        if self.payments.get(oid) == "AUTHORIZED":
            self.payments[oid] = "VOIDED"
            self._post(oid, "void")
        return {}

    def _RefundPayment(self, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        status = self.payments.get(oid)
        if status == "CAPTURED":
            self.payments[oid] = "REFUNDED"
            self._post(oid, "refund")
        elif status == "AUTHORIZED":  # the refund settles an uncaptured payment too
            self.payments[oid] = "VOIDED"
            self._post(oid, "void")
        return {}

    def _CancelOrder(self, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        if self.orders.get(oid) not in (None, "COMPLETED"):
            self.orders[oid] = "CANCELLED"
        return {}


# ---------------------------------------------------------------------------------------------
# PostgreSQL

SCHEMA_SQL = """
CREATE TABLE inbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id text NOT NULL,
    command text NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (order_id, command)
);
CREATE TABLE orders (
    order_id text PRIMARY KEY, status text NOT NULL, amount_minor bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE payments (
    order_id text PRIMARY KEY, status text NOT NULL, amount_minor bigint NOT NULL,
    authorization_id text, updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE ledger (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id text NOT NULL, kind text NOT NULL, amount_minor bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (order_id, kind)
);
CREATE TABLE stock (sku text PRIMARY KEY, available integer NOT NULL CHECK (available >= 0));
CREATE TABLE reservations (
    order_id text NOT NULL, sku text NOT NULL, quantity integer NOT NULL, status text NOT NULL,
    PRIMARY KEY (order_id, sku)
);
CREATE TABLE shipments (
    order_id text PRIMARY KEY, status text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now()
);
"""


class PostgresParticipants:
    kind = "postgres"

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    @classmethod
    async def create(cls, dsn: str) -> PostgresParticipants:
        import asyncpg

        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=DB_POOL_SIZE)
        async with pool.acquire() as conn:
            await conn.execute(SCHEMA_SQL)
        return cls(pool)

    async def close(self) -> None:
        await self.pool.close()

    async def stock(self, sku: str, available: int) -> None:
        await self.stock_many([sku], available)

    async def stock_many(self, skus: list[str], available: int) -> None:
        async with self.pool.acquire() as conn:
            await conn.executemany(
                "INSERT INTO stock (sku, available) VALUES ($1, $2) "
                "ON CONFLICT (sku) DO UPDATE SET available = EXCLUDED.available",
                [(sku, available) for sku in skus],
            )

    async def journal(self, order_id: str) -> list[str]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT command FROM inbox WHERE order_id = $1 ORDER BY id", order_id
            )
        return [r["command"] for r in rows]

    async def handle(self, command: str, order: dict[str, Any]) -> dict[str, Any]:
        if command not in ALL_COMMANDS:
            raise ValueError(f"unknown command {command}")
        oid = order["order_id"]
        refusal: Refused | None = None
        result: dict[str, Any] = {}
        async with self.pool.acquire() as conn, conn.transaction():
            first = await conn.fetchval(
                "INSERT INTO inbox (order_id, command) VALUES ($1, $2) "
                "ON CONFLICT (order_id, command) DO NOTHING RETURNING id",
                oid,
                command,
            )
            if first is None:
                return {"duplicate": True}
            try:
                result = await getattr(self, f"_{command}")(conn, oid, order)
            except Refused as exc:
                # the refusal is the answer: keep the inbox row and the business rows it wrote
                refusal = exc
        if refusal is not None:
            raise refusal
        return result

    @staticmethod
    async def _post(conn: Any, oid: str, kind: str, amount: int) -> None:
        inserted = await conn.fetchval(
            "INSERT INTO ledger (order_id, kind, amount_minor) VALUES ($1, $2, $3) "
            "ON CONFLICT (order_id, kind) DO NOTHING RETURNING id",
            oid,
            kind,
            amount,
        )
        if inserted is None:
            raise RuntimeError(f"ledger already holds a {kind} for order {oid}")

    async def _CreateOrder(self, conn: Any, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        await conn.execute(
            "INSERT INTO orders (order_id, status, amount_minor) VALUES ($1, 'CREATED', $2) "
            "ON CONFLICT (order_id) DO NOTHING",
            oid,
            _amount(order),
        )
        return {"order": "CREATED"}

    async def _AuthorizePayment(self, conn: Any, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        declined = DECLINING_TOKENS.get(order["payment_token"])
        auth_id = None if declined else f"auth_{uuid.uuid5(uuid.NAMESPACE_URL, oid).hex[:16]}"
        inserted = await conn.fetchval(
            "INSERT INTO payments (order_id, status, amount_minor, authorization_id) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (order_id) DO NOTHING RETURNING status",
            oid,
            "DECLINED" if declined else "AUTHORIZED",
            _amount(order),
            auth_id,
        )
        if inserted == "AUTHORIZED":
            await self._post(conn, oid, "authorize", _amount(order))
        if declined:
            raise Refused("PaymentDeclined", declined)
        return {"authorization_id": auth_id}

    async def _ReserveInventory(self, conn: Any, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        wanted = sorted((i["sku"], int(i["quantity"])) for i in order["items"])
        try:
            async with conn.transaction():  # savepoint: an item out of stock undoes the others
                for sku, qty in wanted:
                    left = await conn.fetchval(
                        "UPDATE stock SET available = available - $2 "
                        "WHERE sku = $1 AND available >= $2 RETURNING available",
                        sku,
                        qty,
                    )
                    if left is None:
                        raise _OutOfStock
                    await conn.execute(
                        "INSERT INTO reservations (order_id, sku, quantity, status) "
                        "VALUES ($1, $2, $3, 'RESERVED')",
                        oid,
                        sku,
                        qty,
                    )
        except _OutOfStock:
            raise Refused("InventoryUnavailable", "out_of_stock") from None
        return {"reserved": len(wanted)}

    async def _CreateShipment(self, conn: Any, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        rejected = REJECTED_POSTAL_CODES.get(order["shipping_address"]["postal_code"])
        if rejected:
            raise Refused("ShipmentFailed", rejected)
        await conn.execute(
            "INSERT INTO shipments (order_id, status) VALUES ($1, 'CREATED') "
            "ON CONFLICT (order_id) DO NOTHING",
            oid,
        )
        return {"shipment_id": f"shp_{oid}"}

    async def _CapturePayment(self, conn: Any, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        amount = await conn.fetchval(
            "UPDATE payments SET status = 'CAPTURED', updated_at = now() "
            "WHERE order_id = $1 AND status = 'AUTHORIZED' RETURNING amount_minor",
            oid,
        )
        if amount is None:
            raise Refused("PaymentCaptureFailed", "payment not authorized")
        await self._post(conn, oid, "capture", amount)
        return {"captured": amount}

    async def _CompleteOrder(self, conn: Any, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        await conn.execute(
            "UPDATE orders SET status = 'COMPLETED', updated_at = now() WHERE order_id = $1", oid
        )
        return {}

    async def _CancelShipment(self, conn: Any, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        await conn.execute(
            "UPDATE shipments SET status = 'CANCELLED', updated_at = now() "
            "WHERE order_id = $1 AND status = 'CREATED'",
            oid,
        )
        return {}

    async def _ReleaseInventory(self, conn: Any, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        await conn.execute(
            "WITH released AS (UPDATE reservations SET status = 'RELEASED' "
            "  WHERE order_id = $1 AND status = 'RESERVED' RETURNING sku, quantity) "
            "UPDATE stock SET available = stock.available + released.quantity "
            "FROM released WHERE stock.sku = released.sku",
            oid,
        )
        return {}

    async def _VoidAuthorization(
        self, conn: Any, oid: str, order: dict[str, Any]
    ) -> dict[str, Any]:
        amount = await conn.fetchval(
            "UPDATE payments SET status = 'VOIDED', updated_at = now() "
            "WHERE order_id = $1 AND status = 'AUTHORIZED' RETURNING amount_minor",
            oid,
        )
        if amount is not None:
            await self._post(conn, oid, "void", amount)
        return {}

    async def _RefundPayment(self, conn: Any, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        row = await conn.fetchrow(
            "UPDATE payments SET status = CASE status WHEN 'CAPTURED' THEN 'REFUNDED' "
            "ELSE 'VOIDED' END, updated_at = now() "
            "WHERE order_id = $1 AND status IN ('CAPTURED', 'AUTHORIZED') "
            "RETURNING status, amount_minor",
            oid,
        )
        if row is not None:
            kind = "refund" if row["status"] == "REFUNDED" else "void"
            await self._post(conn, oid, kind, row["amount_minor"])
        return {}

    async def _CancelOrder(self, conn: Any, oid: str, order: dict[str, Any]) -> dict[str, Any]:
        await conn.execute(
            "UPDATE orders SET status = 'CANCELLED', updated_at = now() "
            "WHERE order_id = $1 AND status <> 'COMPLETED'",
            oid,
        )
        return {}


class _OutOfStock(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# databases


def database_url() -> str:
    """Where to make throw-away databases: the server of ``SAGABUS_DATABASE_URL``."""
    url = os.environ.get("SAGABUS_DATABASE_URL", DEFAULT_DATABASE_URL)
    return url.replace("postgresql+asyncpg://", "postgresql://")


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@asynccontextmanager
async def scratch_database(prefix: str):  # type: ignore[no-untyped-def]
    """Create a database for one run, yield its DSN, drop it afterwards."""
    import asyncpg

    base = database_url()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(_with_database(base, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield _with_database(base, name)
    finally:
        admin = await asyncpg.connect(_with_database(base, "postgres"))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@asynccontextmanager
async def open_participants(kind: str, prefix: str):  # type: ignore[no-untyped-def]
    if kind == "memory":
        p = MemoryParticipants()
        yield p
        return
    async with scratch_database(f"{prefix}_participants") as dsn:
        pg = await PostgresParticipants.create(dsn)
        try:
            yield pg
        finally:
            await pg.close()


# ---------------------------------------------------------------------------------------------
# load and statistics


def workload(run_id: str, n: int, *, prefix: str = "peer") -> list[dict[str, Any]]:
    """``n`` all-success checkouts, each with its own SKU (stock it first)."""
    return [sample_order(f"{prefix}-{run_id}-{i:06d}", f"SKU-{run_id}-{i:06d}") for i in range(n)]


@dataclass
class LoadResult:
    elapsed_s: float
    latencies_ms: list[float]
    outcomes: dict[str, int]
    #: the machine's 1-minute load average before and after (others' work skews the numbers)
    load_before: float | None = None
    load_after: float | None = None
    window: int = 0
    #: CPU milliseconds per saga: this process, and the peer's server process if it has one
    cpu_ms_per_saga: float | None = None
    server_cpu_ms_per_saga: float | None = None


def process_cpu_s(pid: int | None = None) -> float | None:
    """CPU seconds (user + system) used so far by process ``pid`` (default: this one)."""
    if pid is None:
        return time.process_time()
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


async def drive(
    orders: list[dict[str, Any]],
    window: int,
    one: Callable[[dict[str, Any]], Awaitable[str]],
    *,
    server_pid: int | None = None,
) -> LoadResult:
    """Run ``one(order)`` for every order with at most ``window`` in flight. ``one`` returns the
    saga's final status; latency is measured around each call (start -> result)."""
    window = max(1, min(window, len(orders) or 1))
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    queue = iter(orders)

    async def lane() -> None:
        for order in queue:
            t0 = time.perf_counter()
            try:
                status = await one(order)
            except Exception as exc:  # a saga that errored counts, visibly
                status = f"ERROR {type(exc).__name__}: {exc}"[:200]
            latencies.append((time.perf_counter() - t0) * 1000.0)
            outcomes[status] = outcomes.get(status, 0) + 1

    before = _loadavg()
    cpu0, server0 = process_cpu_s(), process_cpu_s(server_pid) if server_pid else None
    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(window)))
    elapsed = time.perf_counter() - t0
    cpu1, server1 = process_cpu_s(), process_cpu_s(server_pid) if server_pid else None
    k = max(1, len(orders))

    def per_saga(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round((b - a) * 1000.0 / k, 1)

    return LoadResult(
        elapsed,
        latencies,
        outcomes,
        before,
        _loadavg(),
        window,
        per_saga(cpu0, cpu1),
        per_saga(server0, server1),
    )


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(name: str, n: int, load: LoadResult, notes: str) -> dict[str, Any]:
    lat = sorted(load.latencies_ms)
    completed = load.outcomes.get("COMPLETED", 0)
    other = {k: v for k, v in load.outcomes.items() if k != "COMPLETED"}
    if other:
        notes = f"{notes} NOT COMPLETED: {other}."
    cpu = f"CPU per saga: {load.cpu_ms_per_saga} ms in the benchmark process"
    if load.server_cpu_ms_per_saga is not None:
        cpu += f" + {load.server_cpu_ms_per_saga} ms in the server process"
    notes = (
        f"{notes} Window {load.window}, {load.elapsed_s:.2f} s timed; {cpu} (PostgreSQL's "
        f"not counted); 1-min load average {load.load_before} before, {load.load_after} "
        f"after, on {os.cpu_count()} CPUs."
    )

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 2)

    return {
        "name": name,
        "sagas": n,
        "completed": completed,
        "sagas_per_s": round(completed / load.elapsed_s, 2) if load.elapsed_s > 0 else None,
        "p50_ms": r(percentile(lat, 50)),
        "p95_ms": r(percentile(lat, 95)),
        "p99_ms": r(percentile(lat, 99)),
        "notes": notes,
    }


EXPECTED_SUCCESS_JOURNAL = [
    "CreateOrder",
    "AuthorizePayment",
    "ReserveInventory",
    "CreateShipment",
    "CapturePayment",
    "CompleteOrder",
]
#: a refusal at ReserveInventory: VoidAuthorization then CancelOrder, nothing else
EXPECTED_INVENTORY_FAILURE_JOURNAL = [
    "CreateOrder",
    "AuthorizePayment",
    "ReserveInventory",
    "VoidAuthorization",
    "CancelOrder",
]


async def self_check(
    participants: Participants,
    one: Callable[[dict[str, Any]], Awaitable[str]],
    run_id: str,
) -> str:
    """One successful saga and one whose ReserveInventory is refused (no stock): check the
    statuses and the order in which the participants saw the commands. Raises on a mismatch."""
    ok = sample_order(f"check-{run_id}-ok", f"SKU-{run_id}-CHECK")
    await participants.stock(f"SKU-{run_id}-CHECK", 5)
    bad = sample_order(f"check-{run_id}-nostock", f"SKU-{run_id}-EMPTY")
    await participants.stock(f"SKU-{run_id}-EMPTY", 0)
    got = {"ok": await one(ok), "nostock": await one(bad)}
    journals = {
        "ok": await participants.journal(ok["order_id"]),
        "nostock": await participants.journal(bad["order_id"]),
    }
    want = {
        "ok": ("COMPLETED", EXPECTED_SUCCESS_JOURNAL),
        "nostock": ("COMPENSATED", EXPECTED_INVENTORY_FAILURE_JOURNAL),
    }
    for key, (status, journal) in want.items():
        if got[key] != status or journals[key] != journal:
            raise AssertionError(
                f"self-check {key}: status {got[key]} journal {journals[key]}, "
                f"expected {status} {journal}"
            )
    return (
        "self-check passed (all-success: 6 steps COMPLETED; ReserveInventory refused: "
        "VoidAuthorization then CancelOrder, COMPENSATED)."
    )


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]
