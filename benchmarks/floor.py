"""The benchmark's floor: the saga's message pattern with nothing but the messaging.

The same hops as a successful checkout, on the same broker, with the same topology (quorum work
queues with their dead-letter routes), persistent messages, publisher confirms and manual acks,
but no database, no outbox, no inbox and no state at all (the step a saga awaits travels in its
messages' headers):

    client --StartCheckout--> pm --CreateOrder--> order --OrderCreated--> pm
        --AuthorizePayment--> payment --> pm --ReserveInventory--> inventory --> pm
        --CreateShipment--> shipping --> pm --CapturePayment--> payment --> pm
        --CompleteOrder--> order --OrderCompleted (fact, fan-out)--> notification, analytics
                                 --OrderCompleted (reply)--> pm

Every consumer publishes what it sends (and waits for the broker's confirm) before it acks the
delivery that caused it, which is the order sagabus keeps too (there: commit, ack, then the relay
publishes with confirms). Each role runs as its own process, like the services in ``sagabus
bench``, so the CPU of each can be measured:

    python -m benchmarks.floor pm --amqp-url amqp://guest:guest@127.0.0.1/vhost

The process manager writes one line per finished saga to stdout, ``D <saga id> <latency ms>``
(latency: start taken to completion reply taken, by the wall clock, so that with two process
managers one may start a saga and the other finish it), which is how the bench counts.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from messaging import topology
from messaging.settings import Settings

#: the forward steps of the checkout: (participant, command type, reply type)
STEPS: tuple[tuple[str, str, str], ...] = (
    ("order", "order.CreateOrder.v1", "order.OrderCreated.v1"),
    ("payment", "payment.AuthorizePayment.v1", "payment.PaymentAuthorized.v1"),
    ("inventory", "inventory.ReserveInventory.v1", "inventory.InventoryReserved.v1"),
    ("shipping", "shipping.CreateShipment.v1", "shipping.ShipmentCreated.v1"),
    ("payment", "payment.CapturePayment.v1", "payment.PaymentCaptured.v1"),
    ("order", "order.CompleteOrder.v1", "order.OrderCompleted.v1"),
)
REPLY_OF = {command: reply for _, command, reply in STEPS}
FACT_AFTER = "order.CompleteOrder.v1"
#: headers the floor's messages carry instead of state: the step awaited, when the saga began
STEP_INDEX = "bench-step-index"
STARTED = "bench-started"
#: the process manager's role, then every other service of the topology: those whose queue takes
#: facts only read them, and a participant with no step here consumes nothing
ROLES = ("pm", *(s for s in topology.SERVICES if s != "process-manager"))


def _message(
    body: bytes, type_: str, saga_id: str, correlation_id: str, headers: dict[str, Any]
) -> aio_pika.Message:
    """Properties and headers shaped like sagabus's envelope, so the bytes on the wire match."""
    now = datetime.now(UTC)
    h: dict[str, Any] = {
        "sagabus-saga-id": saga_id,
        "sagabus-attempt": 1,
        "sagabus-fence": 0,
        "sagabus-occurred-at": now.isoformat(),
        "traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01",
    }
    h.update(headers)
    return aio_pika.Message(
        body=body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(uuid.uuid4()),
        type=type_,
        correlation_id=correlation_id,
        timestamp=now,
        headers=h,
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Role:
    def __init__(self, role: str, settings: Settings) -> None:
        self.role = role
        self.settings = settings
        self.exchanges: dict[str, AbstractExchange] = {}
        self.done: list[str] = []
        queue = topology.QUEUES["process-manager" if role == "pm" else role]
        #: a queue bound only to the facts exchange (notification, analytics)
        self.facts_only = role != "pm" and all(
            exchange == topology.FACTS_EXCHANGE for exchange, _ in queue.bindings
        )

    async def run(self, stop: asyncio.Event) -> None:
        connection = await aio_pika.connect_robust(self.settings.amqp_url)
        async with connection:
            declare = await connection.channel()
            await topology.declare(declare, self.settings)
            await declare.close()
            publish_channel = await connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            for name in topology.EXCHANGES:
                self.exchanges[name] = await publish_channel.get_exchange(name, ensure=False)
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self.settings.prefetch)
            queue_name = topology.QUEUES["process-manager" if self.role == "pm" else self.role].name
            queue = await channel.get_queue(queue_name, ensure=False)
            await queue.consume(self.on_message)
            flusher = asyncio.create_task(self.flush_loop(stop))
            print("READY", flush=True)
            await stop.wait()
            flusher.cancel()
            self.flush()

    async def flush_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(0.05)
            self.flush()

    def flush(self) -> None:
        if self.done:
            sys.stdout.write("".join(self.done))
            sys.stdout.flush()
            self.done.clear()

    async def publish(self, exchange: str, key: str, message: aio_pika.Message) -> None:
        await self.exchanges[exchange].publish(message, routing_key=key, mandatory=True)

    async def on_message(self, delivery: AbstractIncomingMessage) -> None:
        saga_id = _text((delivery.headers or {}).get("sagabus-saga-id") or "")
        type_ = delivery.type or ""
        if self.role == "pm":
            await self.pm(delivery, type_, saga_id)
        elif self.facts_only:
            json.loads(delivery.body)
        else:
            await self.participant(delivery, type_, saga_id)
        await delivery.ack()

    async def pm(self, delivery: AbstractIncomingMessage, type_: str, saga_id: str) -> None:
        # What the saga must remember travels in the messages (the step index, when it began,
        # the order), so that with two process managers either can take any reply.
        if type_ == "checkout.StartCheckout.v1":
            body = json.loads(delivery.body)
            saga_id = str(uuid.uuid5(uuid.NAMESPACE_URL, body["order_id"]))
            start = {"order_id": body["order_id"], "items": body["items"]}
            await self.command(saga_id, 0, time.time(), start)
            return
        headers = dict(delivery.headers or {})
        index = int(_text(headers[STEP_INDEX]))
        started = float(_text(headers[STARTED]))
        start = json.loads(delivery.body)["start"]
        if STEPS[index][2] != type_:
            raise RuntimeError(f"floor: {type_} while awaiting {STEPS[index][2]}")
        if index + 1 < len(STEPS):
            await self.command(saga_id, index + 1, started, start)
            return
        self.done.append(f"D {saga_id} {(time.time() - started) * 1000:.3f}\n")

    async def command(
        self, saga_id: str, index: int, started: float, start: dict[str, Any]
    ) -> None:
        participant, type_, _ = STEPS[index]
        step = type_.split(".")[1]
        body = {"order_id": start["order_id"], "start": start}
        message = _message(
            json.dumps(body).encode(),
            type_,
            saga_id,
            saga_id,
            {
                "sagabus-idempotency-key": f"{saga_id}:{step}",
                "sagabus-step": step,
                STEP_INDEX: index,
                STARTED: repr(started),
            },
        )
        exchange, key = topology.command_route(participant, type_)
        await self.publish(exchange, key, message)

    async def participant(
        self, delivery: AbstractIncomingMessage, type_: str, saga_id: str
    ) -> None:
        command = json.loads(delivery.body)
        headers = dict(delivery.headers or {})
        echo = {STEP_INDEX: headers[STEP_INDEX], STARTED: _text(headers[STARTED])}
        reply_type = REPLY_OF[type_]
        body = json.dumps(
            {"order_id": command["order_id"], "ref": str(uuid.uuid4()), "start": command["start"]}
        ).encode()
        correlation = delivery.correlation_id or saga_id
        sends = [
            self.publish(
                *topology.reply_route(reply_type),
                _message(body, reply_type, saga_id, correlation, echo),
            )
        ]
        if type_ == FACT_AFTER:
            fact = _message(body, reply_type, saga_id, correlation, {})
            sends.append(self.publish(*topology.fact_route(reply_type), fact))
        # both at once, like the relay's batch: confirms are pipelined
        await asyncio.gather(*sends)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ROLES:
        sys.exit(f"usage: python -m benchmarks.floor {{{'|'.join(ROLES)}}}")
    settings = Settings()

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Role(args[0], settings).run(stop)

    asyncio.run(go())


if __name__ == "__main__":
    main()
