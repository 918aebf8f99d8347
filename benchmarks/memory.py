"""Does a service keep anything per message? Its resident memory over rounds of messages.

Runs one service in this process, against a scratch database and vhost, feeds it rounds of
the message it handles most (with the whole consumer path: decode, inbox, handler, outbox and
dispatch where it sends replies, spans, logs), waits until each round is processed, and prints
the process's resident memory after each. A service that keeps something per message grows by
about the same amount every round; one that does not levels off once its caches and the
allocator's arenas are warm.

    python -m benchmarks.memory [--service order|notification] [--rounds 4] [--messages 10000]

Figures are printed, never asserted. The scratch database and vhost are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import secrets
import uuid
from datetime import UTC, datetime

import aio_pika

from benchmarks.bench import (
    _with_database,
    _with_vhost,
    create_vhost,
    delete_vhost,
    drop_database,
)
from messaging import telemetry, topology
from messaging.codec import encode
from messaging.db import ensure_database, make_engine
from messaging.service import Runtime
from messaging.settings import Settings
from participants.notification import service as notification
from participants.order import service as order
from schemas.base import Message
from schemas.envelope import Envelope
from schemas.order import CreateOrder, OrderCompleted


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _message(service: str) -> tuple[Message, str, str]:
    """(body, exchange, routing key) of one fresh message for ``service``."""
    order_id = f"mem-{uuid.uuid4().hex[:12]}"
    if service == "order":
        body: Message = CreateOrder(
            order_id=order_id, customer_id="cus_1", amount_minor=100, currency="EUR"
        )
        return (body, *topology.command_route("order", body.TYPE))
    body = OrderCompleted(
        order_id=order_id, customer_id="cus_1", amount_minor=100, currency="EUR", duration_ms=5
    )
    return (body, *topology.fact_route(body.TYPE))


async def run(service: str, rounds: int, messages: int, warmup: int) -> None:
    base = Settings()
    run_id = secrets.token_hex(3)
    vhost, database = f"sagabus-mem-{run_id}", f"sagabus_mem_{run_id}"
    s = base.model_copy(
        update={
            "amqp_url": _with_vhost(base.amqp_url, vhost),
            "database_url": _with_database(base.database_url, database),
            "log_level": "warning",
        }
    )
    telemetry.configure_logging("json", "warning")
    create_vhost(base.amqp_url, vhost)
    engine = make_engine(s)
    definition = (order if service == "order" else notification).definition(s)
    runtime = Runtime([definition], s, engine=engine)
    try:
        await ensure_database(s)
        await runtime.start()
        connection = await aio_pika.connect(s.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            consumer = runtime.consumers[service]
            sent = 0

            async def feed(n: int) -> None:
                nonlocal sent
                for _ in range(n):
                    body, exchange_name, key = _message(service)
                    saga = uuid.uuid4()
                    env = Envelope(
                        message_id=uuid.uuid4(),
                        type=body.TYPE,
                        saga_id=saga,
                        correlation_id=saga,
                        causation_id=None,
                        idempotency_key=f"{saga}:{service}",
                        step=service if service == "order" else None,
                        attempt=1,
                        fence=1,
                        occurred_at=datetime.now(UTC),
                    )
                    exchange = await channel.get_exchange(exchange_name, ensure=False)
                    await exchange.publish(encode(env, body), routing_key=key)
                sent += n
                deadline = asyncio.get_running_loop().time() + 600
                # the consumer's counters have no event to wait on: poll, with a deadline
                while consumer.counts["processed"] < sent:
                    if asyncio.get_running_loop().time() > deadline:
                        raise SystemExit(f"{service}: {sent} messages not processed in 600 s")
                    await asyncio.sleep(0.2)

            await feed(warmup)
            gc.collect()
            print(f"{service}: after {sent:>7,} messages (warm-up): {rss_mb():6.1f} MB", flush=True)
            for _ in range(rounds):
                await feed(messages)
                gc.collect()
                print(f"{service}: after {sent:>7,} messages: {rss_mb():6.1f} MB", flush=True)
    finally:
        await runtime.stop()
        await engine.dispose()
        await drop_database(base, database)
        delete_vhost(base.amqp_url, vhost)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--service", choices=("order", "notification"), default="order")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    a = parser.parse_args()
    for name, value in (("--rounds", a.rounds), ("--messages", a.messages)):
        if value < 1:
            parser.error(f"{name} must be at least 1")
    asyncio.run(run(a.service, a.rounds, a.messages, a.warmup))


if __name__ == "__main__":
    main()
