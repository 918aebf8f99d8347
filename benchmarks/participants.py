"""CPU per message of each participant's handler, measured in isolation.

Runs every participant's handlers directly (no broker), one message per transaction, against a
throwaway database, and prints the process CPU time spent inside the handler (statement
building, compiling, the driver, the event loop's share of the round trips), per message type.
The inbox and outbox statements of the consumer are not included: they are the same for every
handler.

    python -m benchmarks.participants [--sagas 400] [--database-url postgresql://...]

Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg

from messaging.codec import Incoming
from messaging.consumer import Context
from messaging.db import ensure_database, make_engine
from messaging.service import ServiceContext, ServiceDefinition, migrate
from messaging.settings import Settings
from participants.inventory import service as inventory
from process_manager import bootstrap
from schemas.base import Message
from schemas.common import LineItem, ShippingAddress
from schemas.envelope import Envelope
from schemas.inventory import ReleaseInventory, ReserveInventory
from schemas.order import CancelOrder, CompleteOrder, CreateOrder, OrderCompleted
from schemas.payment import (
    AuthorizePayment,
    CapturePayment,
    GetPaymentStatus,
    RefundPayment,
    VoidAuthorization,
)
from schemas.shipping import CancelShipment, CreateShipment

ADDRESS = ShippingAddress(
    line1="1 Bench Street", city="Utrecht", postal_code="3511AA", country="NL"
)
SKUS = ("BENCH-A", "BENCH-B", "BENCH-C")


def _flows(order_id: str) -> dict[str, list[list[Message]]]:
    """Per participant, the message sequences of one saga (a success and a compensation)."""
    items = (
        LineItem(sku=SKUS[0], quantity=1, unit_price_minor=500),
        LineItem(sku=SKUS[1], quantity=2, unit_price_minor=250),
    )
    o2 = order_id + "-c"
    fact = OrderCompleted(
        order_id=order_id, customer_id="cus_1", amount_minor=1000, currency="EUR", duration_ms=42
    )
    return {
        "order": [
            [
                CreateOrder(
                    order_id=order_id, customer_id="cus_1", amount_minor=1000, currency="EUR"
                ),
                CompleteOrder(order_id=order_id),
            ],
            [
                CreateOrder(order_id=o2, customer_id="cus_1", amount_minor=1000, currency="EUR"),
                CancelOrder(order_id=o2, reason="checkout_compensated"),
            ],
        ],
        "payment": [
            [
                AuthorizePayment(
                    order_id=order_id, amount_minor=1000, currency="EUR", payment_token="tok_visa"
                ),
                CapturePayment(order_id=order_id, amount_minor=1000, currency="EUR"),
                RefundPayment(order_id=order_id, amount_minor=1000, currency="EUR"),
            ],
            [
                AuthorizePayment(
                    order_id=o2, amount_minor=1000, currency="EUR", payment_token="tok_visa"
                ),
                VoidAuthorization(order_id=o2),
                GetPaymentStatus(order_id=o2),
            ],
        ],
        "inventory": [
            [ReserveInventory(order_id=order_id, items=items), ReleaseInventory(order_id=order_id)],
            [
                ReserveInventory(
                    order_id=o2, items=(LineItem(sku=SKUS[2], quantity=1, unit_price_minor=1),)
                )
            ],
        ],
        "shipping": [
            [
                CreateShipment(order_id=order_id, items=items, shipping_address=ADDRESS),
                CancelShipment(order_id=order_id),
            ],
        ],
        "notification": [[fact]],
        "analytics": [[fact]],
    }


#: every participant of the topology (a new one is measured once ``_flows`` has messages for it)
DEFINITIONS: dict[str, Callable[[Settings], ServiceDefinition]] = {
    name: make for name, make in bootstrap.FACTORIES.items() if name != bootstrap.PROCESS_MANAGER
}


def _envelope(body: Message, saga_id: uuid.UUID) -> Envelope:
    return Envelope(
        message_id=uuid.uuid4(),
        type=body.TYPE,
        saga_id=saga_id,
        correlation_id=saga_id,
        idempotency_key=f"{saga_id}:{body.TYPE}",
        step="bench",
        occurred_at=datetime.now(UTC),
    )


async def run(settings: Settings, sagas: int, warmup: int) -> None:
    engine = make_engine(settings)
    definitions = {name: make(settings) for name, make in DEFINITIONS.items()}
    await migrate(list(definitions.values()), engine)
    async with engine.begin() as conn:
        await inventory.seed(conn, {sku: 10_000_000 for sku in SKUS})
    # the services' background loops (the carrier's own pool is owned by one), as a runtime would
    stop = asyncio.Event()
    owners: list[asyncio.Task[None]] = [
        asyncio.create_task(loop(ServiceContext(d, settings, engine, None, None, None, stop)))  # type: ignore[arg-type]
        for d in definitions.values()
        for loop in d.background
    ]
    cpu: dict[tuple[str, str], list[float]] = defaultdict(list)
    totals: dict[str, float] = defaultdict(float)
    run_id = uuid.uuid4().hex[:8]
    try:
        for name, definition in definitions.items():
            for i in range(warmup + sagas):
                order_id = f"bench-{run_id}-{i}"
                saga_id = uuid.uuid4()
                for flow in _flows(order_id).get(name, ()):
                    for body in flow:
                        incoming = Incoming(_envelope(body, saga_id), body)
                        handler = definition.handlers[body.TYPE]
                        async with engine.begin() as conn:
                            await conn.exec_driver_sql("SELECT 1")  # the consumer's inbox claim
                            ctx = Context(conn, incoming, name)
                            t0 = time.process_time()
                            await handler(ctx)
                            spent = time.process_time() - t0
                        if i >= warmup:
                            cpu[(name, body.TYPE.split(".")[1])].append(spent)
                            totals[name] += spent
        print(f"{'participant':<13} {'message':<22} {'calls':>6} {'CPU µs/call':>12}")
        for (name, kind), calls in cpu.items():
            print(f"{name:<13} {kind:<22} {len(calls):>6} {statistics.fmean(calls) * 1e6:>12.0f}")
        print()
        print(f"{'participant':<13} {'CPU µs per saga (all its messages above)':>42}")
        for name, total in totals.items():
            print(f"{name:<13} {total / sagas * 1e6:>42.0f}")
    finally:
        for task in owners:
            task.cancel()
        for task in owners:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await engine.dispose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sagas", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    name = f"sagabus_bench_participants_{uuid.uuid4().hex[:8]}"
    url = args.database_url.rsplit("/", 1)[0] + "/" + name
    settings = Settings(database_url=url, db_pool_size=2)
    await ensure_database(settings)
    try:
        await run(settings, args.sagas, args.warmup)
    finally:
        conn = await asyncpg.connect(args.database_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
