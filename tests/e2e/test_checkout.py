"""The checkout saga end to end: every service in-process on the real broker and database,
sagas started the way an external AMQP client starts them."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aio_pika
import pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import topology
from messaging.codec import START_NAMESPACE
from messaging.service import Runtime
from messaging.settings import Settings
from participants.analytics import service as analytics
from participants.inventory import service as inventory
from participants.notification import service as notification
from participants.order import service as order
from participants.payment import service as payment
from participants.shipping import service as shipping
from participants.shipping.carrier import UNAVAILABLE_POSTAL_CODE, UNDELIVERABLE_POSTAL_CODE
from process_manager import ops, store
from process_manager.definitions import checkout as checkout_saga
from schemas.checkout import StartCheckout, saga_id_for_order
from schemas.envelope import HeaderNames
from schemas.inventory import InventoryReserved, ReserveInventory
from schemas.payment import AuthorizePayment, PaymentAuthorized
from tests.support import (
    DeadLetters,
    checkout,
    copy_of_outbox_row,
    count,
    headers_of,
    one,
    paused,
    publish,
    queue_depth,
    rows,
    sent_outbox_row,
    wait_for,
    wait_terminal,
    wait_until,
)

pytestmark = pytest.mark.e2e

PM_QUEUE = topology.QUEUES["process-manager"]
STEPS = [s.name for s in checkout_saga.V2.steps]
ALL_FORWARD = ["started", *(f"{name} succeeded" for name in STEPS)]


async def seed(engine: AsyncEngine, sku: str, units: int) -> None:
    async with engine.begin() as conn:
        await inventory.seed(conn, {sku: units})


async def start(settings: Settings, *commands: StartCheckout) -> None:
    await ops.publish_starts(settings.amqp_url, [ops.start_message(c) for c in commands])


async def stock(engine: AsyncEngine, sku: str) -> int:
    return int((await one(engine, inventory.stock, sku=sku)).available)


async def ledger(engine: AsyncEngine, order_id: str) -> list[str]:
    return [r.kind for r in await rows(engine, payment.ledger, order_id=order_id)]


async def notified(engine: AsyncEngine, order_id: str, template: str) -> Any:
    async def probe() -> Any:
        found = await rows(engine, notification.notifications, order_id=order_id)
        return found[0] if found else None

    row = await wait_for(probe, what=f"a notification for {order_id}")
    assert row.template == template
    return row


def applied(status: dict[str, Any]) -> list[str]:
    return [h["note"] for h in status["history"] if h["outcome"] == "applied"]


async def assert_compensated_cleanly(engine: AsyncEngine, order_id: str) -> None:
    """What every compensated saga leaves behind: a cancelled order, no money moved."""
    assert (await one(engine, order.orders, order_id=order_id)).status == "CANCELLED"
    assert "capture" not in await ledger(engine, order_id)
    await notified(engine, order_id, "order_cancelled")


# -- the outcomes --------------------------------------------------------------------------------


async def test_success(
    services: Runtime, engine: AsyncEngine, database: Settings, uid: str
) -> None:
    sku = f"SKU-OK-{uid}"
    await seed(engine, sku, 5)
    cmd = checkout(f"ok-{uid}", sku=sku, quantity=2, price=1250)
    analytics_inbox = services.consumers["analytics"].inbox
    async with engine.connect() as conn:
        before = (
            await conn.execute(
                analytics.outcomes.select().where(analytics.outcomes.c.outcome == "completed")
            )
        ).first()
    completed_before = before.count if before else 0

    await start(database, cmd)
    status = await wait_terminal(engine, cmd.order_id)

    assert status["state"] == "COMPLETED"
    assert status["outcome"] == "completed"
    assert status["completed_steps"] == STEPS
    assert status["failure_reason"] is None
    assert applied(status) == ALL_FORWARD
    assert status["trace_id"] and len(status["trace_id"]) == 32
    placed = await one(engine, order.orders, order_id=cmd.order_id)
    assert (placed.status, placed.amount_minor, placed.currency) == ("COMPLETED", 2500, "EUR")
    paid = await one(engine, payment.payments, order_id=cmd.order_id)
    assert (paid.status, paid.amount_minor) == ("CAPTURED", 2500)
    assert await ledger(engine, cmd.order_id) == ["authorize", "capture"]
    capture = (await rows(engine, payment.ledger, order_id=cmd.order_id, kind="capture"))[0]
    assert capture.amount_minor == 2500
    assert (await one(engine, inventory.reservations, order_id=cmd.order_id)).status == "RESERVED"
    assert await stock(engine, sku) == 3
    shipment = await one(engine, shipping.shipments, order_id=cmd.order_id)
    assert shipment.status == "CREATED" and shipment.tracking_number
    booking = await one(engine, shipping.bookings, order_id=cmd.order_id)
    assert (booking.status, booking.tracking_number) == ("BOOKED", shipment.tracking_number)
    # the public OrderCompleted fact reached both choreographed consumers
    note = await notified(engine, cmd.order_id, "order_confirmed")
    assert note.customer_token == cmd.customer_id

    async def counted() -> bool:
        return await count(engine, analytics_inbox, message_id=note.fact_id) == 1

    await wait_for(counted, what="analytics to count the fact")
    async with engine.connect() as conn:
        after = (
            await conn.execute(
                analytics.outcomes.select().where(analytics.outcomes.c.outcome == "completed")
            )
        ).one()
    assert after.count >= completed_before + 1
    assert after.amount_minor >= 2500


async def test_payment_declined(
    services: Runtime, engine: AsyncEngine, database: Settings, uid: str
) -> None:
    sku = f"SKU-DECL-{uid}"
    await seed(engine, sku, 5)
    cmd = checkout(f"decl-{uid}", sku=sku, token="tok_decline")

    await start(database, cmd)
    status = await wait_terminal(engine, cmd.order_id)

    assert status["state"] == "COMPENSATED"
    assert status["failure_reason"] == "authorization failed: PaymentDeclined (card_declined)"
    assert status["completed_steps"] == ["order", "risk"]
    assert status["compensated_steps"] == ["cancel_order"]
    assert (await one(engine, payment.payments, order_id=cmd.order_id)).status == "DECLINED"
    assert await ledger(engine, cmd.order_id) == []
    assert await count(engine, inventory.reservations, order_id=cmd.order_id) == 0
    assert await stock(engine, sku) == 5
    assert await count(engine, shipping.shipments, order_id=cmd.order_id) == 0
    await assert_compensated_cleanly(engine, cmd.order_id)


async def test_out_of_stock(
    services: Runtime, engine: AsyncEngine, database: Settings, uid: str
) -> None:
    sku = f"SKU-NONE-{uid}"
    await seed(engine, sku, 1)
    cmd = checkout(f"oos-{uid}", sku=sku, quantity=2)

    await start(database, cmd)
    status = await wait_terminal(engine, cmd.order_id)

    assert status["state"] == "COMPENSATED"
    assert status["failure_reason"] == "inventory failed: InventoryUnavailable"
    assert status["completed_steps"] == ["order", "risk", "authorization"]
    assert status["compensated_steps"] == ["void_authorization", "cancel_order"]
    assert (await one(engine, payment.payments, order_id=cmd.order_id)).status == "VOIDED"
    assert await ledger(engine, cmd.order_id) == ["authorize", "void"]
    reservation = await one(engine, inventory.reservations, order_id=cmd.order_id)
    assert (reservation.status, reservation.short_skus) == ("UNAVAILABLE", [sku])
    assert await stock(engine, sku) == 1
    await assert_compensated_cleanly(engine, cmd.order_id)


@pytest.mark.parametrize(
    ("postal_code", "reason"),
    [
        (UNDELIVERABLE_POSTAL_CODE, "address undeliverable"),
        (UNAVAILABLE_POSTAL_CODE, "carrier failed 3 times: carrier unavailable (503)"),
    ],
    ids=["rejected", "carrier-unavailable"],
)
async def test_shipping_failure_releases_stock_and_voids_payment(
    services: Runtime,
    engine: AsyncEngine,
    database: Settings,
    uid: str,
    postal_code: str,
    reason: str,
) -> None:
    assert database.shipping_max_attempts == 3  # the reason above counts the session's attempts
    sku = f"SKU-SHIP-{uid}"
    await seed(engine, sku, 4)
    cmd = checkout(f"ship-{uid}", sku=sku, quantity=3, postal_code=postal_code)
    retried = services.consumers["shipping"].counts["retried"]

    await start(database, cmd)
    status = await wait_terminal(engine, cmd.order_id)

    assert status["state"] == "COMPENSATED"
    assert status["failure_reason"] == f"shipment failed: ShipmentFailed ({reason})"
    assert status["completed_steps"] == ["order", "risk", "authorization", "inventory"]
    assert status["compensated_steps"] == [
        "release_inventory",
        "void_authorization",
        "cancel_order",
    ]
    assert await stock(engine, sku) == 4
    assert (await one(engine, inventory.reservations, order_id=cmd.order_id)).status == "RELEASED"
    assert (await one(engine, payment.payments, order_id=cmd.order_id)).status == "VOIDED"
    assert await ledger(engine, cmd.order_id) == ["authorize", "void"]
    assert (await one(engine, shipping.shipments, order_id=cmd.order_id)).status == "FAILED"
    assert await count(engine, shipping.bookings, order_id=cmd.order_id) == 0
    transient_retries = services.consumers["shipping"].counts["retried"] - retried
    assert transient_retries == (0 if postal_code == UNDELIVERABLE_POSTAL_CODE else 2)
    await assert_compensated_cleanly(engine, cmd.order_id)


# -- duplicates ----------------------------------------------------------------------------------


async def test_duplicate_start_with_the_same_message_id(
    services: Runtime, engine: AsyncEngine, database: Settings, uid: str
) -> None:
    sku = f"SKU-DUP-{uid}"
    await seed(engine, sku, 5)
    cmd = checkout(f"dup-{uid}", sku=sku)
    message_id = uuid.uuid4()
    pm = services.consumers["process-manager"]
    duplicates = pm.counts["duplicates"]

    await ops.publish_starts(
        database.amqp_url, [ops.start_message(cmd, message_id=message_id) for _ in range(3)]
    )
    status = await wait_terminal(engine, cmd.order_id)

    assert status["state"] == "COMPLETED"
    await wait_until(lambda: pm.counts["duplicates"] >= duplicates + 2, what="duplicates dropped")
    assert await count(engine, pm.inbox, message_id=message_id) == 1
    starts = [h for h in status["history"] if h["message_type"] == StartCheckout.TYPE]
    assert [(h["outcome"], h["message_id"]) for h in starts] == [("applied", str(message_id))]
    assert await count(engine, store.sagas, order_id=cmd.order_id) == 1
    assert await stock(engine, sku) == 4


async def test_duplicate_start_for_the_same_order_with_a_new_message_id(
    services: Runtime,
    engine: AsyncEngine,
    database: Settings,
    uid: str,
    dead_letters: DeadLetters,
) -> None:
    sku = f"SKU-DUP2-{uid}"
    await seed(engine, sku, 5)
    cmd = checkout(f"dup2-{uid}", sku=sku)
    first, second = uuid.uuid4(), uuid.uuid4()

    await ops.publish_starts(database.amqp_url, [ops.start_message(cmd, message_id=first)])

    async def exists() -> bool:
        return await count(engine, store.sagas, order_id=cmd.order_id) == 1

    await wait_for(exists, what="the saga to exist")
    # the same order again, even with other details: it starts nothing new
    other = cmd.model_copy(update={"payment_token": "tok_decline"})
    await ops.publish_starts(database.amqp_url, [ops.start_message(other, message_id=second)])

    async def duplicate_recorded() -> dict[str, Any] | None:
        s = await wait_terminal(engine, cmd.order_id)
        return s if any(h["message_id"] == str(second) for h in s["history"]) else None

    status = await wait_for(duplicate_recorded, what="the second start in the history")
    assert status["state"] == "COMPLETED"
    # the same body once more, under a third id: a plain duplicate, dropped
    third = uuid.uuid4()
    await ops.publish_starts(database.amqp_url, [ops.start_message(cmd, message_id=third)])

    async def third_recorded() -> dict[str, Any] | None:
        s = await wait_terminal(engine, cmd.order_id)
        return s if any(h["message_id"] == str(third) for h in s["history"]) else None

    status = await wait_for(third_recorded, what="the third start in the history")
    starts = [
        (h["message_id"], h["outcome"], h["note"])
        for h in status["history"]
        if h["message_type"] == StartCheckout.TYPE
    ]
    assert starts == [
        (str(first), "applied", "started"),
        (
            str(second),
            "rejected",
            "conflict: a StartCheckout for this key with a different body; "
            "the body stored first runs",
        ),
        (str(third), "ignored", "duplicate StartCheckout: a checkout saga exists for this key"),
    ]
    # the conflicting one is dead-lettered with its reason; the duplicate is not
    dl = await dead_letters.wait(PM_QUEUE.dlq, str(second))
    assert headers_of(dl)[HeaderNames.ERROR_MESSAGE].startswith("conflict: ")
    assert headers_of(dl)[HeaderNames.FAILURE_KIND] == "permanent"
    assert await dead_letters.absent(PM_QUEUE.dlq, str(third))
    assert applied(status) == ALL_FORWARD
    assert (await one(engine, payment.payments, order_id=cmd.order_id)).payment_token == "tok_visa"
    assert await ledger(engine, cmd.order_id) == ["authorize", "capture"]


@pytest.mark.parametrize(
    ("service", "command", "reply"),
    [
        ("payment", AuthorizePayment.TYPE, PaymentAuthorized.TYPE),
        ("inventory", ReserveInventory.TYPE, InventoryReserved.TYPE),
    ],
)
async def test_command_delivered_twice_has_one_effect(
    services: Runtime,
    engine: AsyncEngine,
    database: Settings,
    amqp: AbstractRobustConnection,
    uid: str,
    service: str,
    command: str,
    reply: str,
) -> None:
    """While the participant is down its command waits in its queue, together with a redelivered
    copy (same message id) and a re-sent copy (new message id, same idempotency key)."""
    sku = f"SKU-TWICE-{uid}"
    await seed(engine, sku, 5)
    cmd = checkout(f"twice-{uid}", sku=sku, quantity=2)
    saga_id = saga_id_for_order(cmd.order_id)
    queue = topology.QUEUES[service].name

    async with paused(services, service):
        await start(database, cmd)
        original = await sent_outbox_row(
            engine, services.relays["process-manager"].outbox.table, saga_id, command
        )
        resent_id = uuid.uuid4()
        await publish(
            amqp, topology.COMMANDS_EXCHANGE, original.routing_key, copy_of_outbox_row(original)
        )
        await publish(
            amqp,
            topology.COMMANDS_EXCHANGE,
            original.routing_key,
            copy_of_outbox_row(original, message_id=resent_id),
        )

        async def all_waiting() -> bool:
            return await queue_depth(amqp, queue) == 3

        await wait_for(all_waiting, what=f"three copies in {queue}")

    status = await wait_terminal(engine, cmd.order_id)

    assert status["state"] == "COMPLETED"
    assert applied(status) == ALL_FORWARD
    inbox = services.consumers[service].inbox
    assert await count(engine, inbox, message_id=original.message_id) == 1
    assert await ledger(engine, cmd.order_id) == ["authorize", "capture"]
    assert (await one(engine, payment.payments, order_id=cmd.order_id)).status == "CAPTURED"
    assert (await one(engine, inventory.reservations, order_id=cmd.order_id)).status == "RESERVED"
    assert await stock(engine, sku) == 3
    # One reply applied; the re-send's reply, if any, ignored as stale. (A payment re-send that
    # races the original is currently dead-lettered instead of answered: see
    # tests/integration/test_participant_races.py.)
    replies = [h["outcome"] for h in status["history"] if h["message_type"] == reply]
    assert replies[0] == "applied"
    assert set(replies[1:]) <= {"ignored"}


# -- bad input and races -------------------------------------------------------------------------


async def test_malformed_start_is_dead_lettered_and_the_next_saga_completes(
    services: Runtime,
    engine: AsyncEngine,
    database: Settings,
    amqp: AbstractRobustConnection,
    dead_letters: DeadLetters,
    uid: str,
) -> None:
    valid = json.loads(checkout(f"bad-{uid}").model_dump_json())
    bad = {
        "not-json": (b"{'order_id': oops", "body is not JSON"),
        "schema-invalid": (
            json.dumps(
                {**valid, "items": [{"sku": "X", "quantity": 0, "unit_price_minor": 1}]}
            ).encode(),
            "invalid checkout.StartCheckout.v1: items.0.quantity: Input should be greater than or "
            "equal to 1",
        ),
    }
    sent = {}
    for name, (body, _) in bad.items():
        m = aio_pika.Message(
            body,
            content_type="application/json",
            type=StartCheckout.TYPE,
            message_id=str(uuid.uuid4()),
        )
        sent[name] = m
        await publish(amqp, topology.COMMANDS_EXCHANGE, topology.START_ROUTING_KEY, m)
    sku = f"SKU-AFTER-{uid}"
    await seed(engine, sku, 1)
    good = checkout(f"after-bad-{uid}", sku=sku)
    await start(database, good)

    for name, (body, reason) in bad.items():
        dead = await dead_letters.wait(PM_QUEUE.dlq, str(sent[name].message_id))
        h = headers_of(dead)
        assert dead.body == body
        assert h[HeaderNames.ERROR_CLASS] == "PermanentError"
        assert h[HeaderNames.ERROR_MESSAGE].startswith(reason), h[HeaderNames.ERROR_MESSAGE]
        assert h[HeaderNames.FAILED_QUEUE] == PM_QUEUE.name
        assert h[HeaderNames.ORIGINAL_ROUTING_KEY] == topology.START_ROUTING_KEY
    assert (await wait_terminal(engine, good.order_id))["state"] == "COMPLETED"
    assert await ops.saga_status(engine, f"bad-{uid}") is None


async def test_two_sagas_race_for_the_last_unit(
    services: Runtime, engine: AsyncEngine, database: Settings, uid: str
) -> None:
    sku = f"SKU-LAST-{uid}"
    await seed(engine, sku, 1)
    a, b = checkout(f"last-a-{uid}", sku=sku), checkout(f"last-b-{uid}", sku=sku)
    levels: list[int] = []
    done = asyncio.Event()

    async def watch_stock() -> None:
        while not done.is_set():
            levels.append(await stock(engine, sku))
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch_stock())
    try:
        await start(database, a, b)
        statuses = [await wait_terminal(engine, c.order_id) for c in (a, b)]
    finally:
        done.set()
        await watcher

    assert sorted(s["state"] for s in statuses) == ["COMPENSATED", "COMPLETED"]
    winner, loser = (a, b) if statuses[0]["state"] == "COMPLETED" else (b, a)
    assert await stock(engine, sku) == 0
    assert levels and min(levels) >= 0
    reservations = {
        c.order_id: (await one(engine, inventory.reservations, order_id=c.order_id))
        for c in (winner, loser)
    }
    assert reservations[winner.order_id].status == "RESERVED"
    assert reservations[loser.order_id].status == "UNAVAILABLE"
    assert await ledger(engine, winner.order_id) == ["authorize", "capture"]
    assert await ledger(engine, loser.order_id) == ["authorize", "void"]
    await assert_compensated_cleanly(engine, loser.order_id)


# -- the public contract, from a plain AMQP client -----------------------------------------------


def _publish_with_pika(amqp_url: str, body: str, times: int) -> None:
    """What the README tells any AMQP client to do (here: pika, publisher confirms on)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for _ in range(times):
            channel.basic_publish(
                exchange="sagabus.commands",
                routing_key="checkout.start",
                body=body.encode(),
                properties=pika.BasicProperties(
                    content_type="application/json",
                    type="checkout.StartCheckout.v1",
                    delivery_mode=2,
                ),
                mandatory=True,
            )
    finally:
        connection.close()


async def test_start_from_a_plain_pika_client(
    services: Runtime, engine: AsyncEngine, database: Settings, uid: str
) -> None:
    """A raw JSON body with only ``content_type`` and ``type`` set. Without a message id the id
    is derived from the order id, so a client that publishes twice starts one saga."""
    sku = f"SKU-PIKA-{uid}"
    await seed(engine, sku, 2)
    order_id = f"pika-{uid}"
    body = f"""{{
        "order_id": "{order_id}",
        "customer_id": "cus_42",
        "currency": "EUR",
        "items": [{{"sku": "{sku}", "quantity": 1, "unit_price_minor": 1999}}],
        "payment_token": "tok_visa",
        "shipping_address": {{"line1": "1 Main Street", "city": "Utrecht",
                              "postal_code": "3511AA", "country": "NL"}}
    }}"""

    pm = services.consumers["process-manager"]
    duplicates = pm.counts["duplicates"]

    await asyncio.to_thread(_publish_with_pika, database.amqp_url, body, 2)
    status = await wait_terminal(engine, order_id)

    assert status["state"] == "COMPLETED"
    assert status["saga_id"] == str(saga_id_for_order(order_id))
    derived = uuid.uuid5(START_NAMESPACE, order_id)
    starts = [h for h in status["history"] if h["message_type"] == StartCheckout.TYPE]
    assert [(h["message_id"], h["outcome"]) for h in starts] == [(str(derived), "applied")]
    await wait_until(lambda: pm.counts["duplicates"] >= duplicates + 1, what="the copy dropped")
    assert await count(engine, pm.inbox, message_id=derived) == 1
    assert (await one(engine, order.orders, order_id=order_id)).amount_minor == 1999
    assert await ledger(engine, order_id) == ["authorize", "capture"]
    assert await stock(engine, sku) == 1


async def test_starts_with_different_bodies_for_one_order_run_the_body_stored_first(
    services: Runtime, engine: AsyncEngine, database: Settings, uid: str, dead_letters: DeadLetters
) -> None:
    """Issue 10, item 2: two StartCheckout for one order with different bodies, published back
    to back on one channel, with two process managers consuming: exactly one saga, which runs
    the body stored first (its captured amount is that body's), and the other start is
    dead-lettered as a conflict and noted in the saga's history. Nothing is dropped silently."""
    from process_manager import bootstrap

    second_pm = Runtime(bootstrap.definitions(database, ["process-manager"]), database)
    await second_pm.start()
    try:
        sku = f"SKU-CONFLICT-{uid}"
        await seed(engine, sku, 100)
        pairs = []
        for i in range(8):
            cheap = checkout(f"conflict-{uid}-{i}", sku=sku, quantity=1, price=6889)
            dear = cheap.model_copy(
                update={"items": (cheap.items[0].model_copy(update={"quantity": 3}),)}
            )
            pairs.append((cheap, dear))
        messages = []
        ids: dict[str, tuple[str, str]] = {}
        for cheap, dear in pairs:
            a, b = uuid.uuid4(), uuid.uuid4()
            ids[cheap.order_id] = (str(a), str(b))
            messages += [
                ops.start_message(cheap, message_id=a),
                ops.start_message(dear, message_id=b),
            ]
        await ops.publish_starts(database.amqp_url, messages)

        for cheap, dear in pairs:
            status = await wait_terminal(engine, cheap.order_id)
            assert status["state"] == "COMPLETED", status
            saga = await one(engine, store.sagas, order_id=cheap.order_id)
            ran = StartCheckout.model_validate(saga.state["start"])
            assert ran in (cheap, dear)
            loser = dear if ran == cheap else cheap
            winner_id, loser_id = ids[cheap.order_id][:: 1 if ran == cheap else -1]
            captured = [
                r.amount_minor
                for r in await rows(engine, payment.ledger, order_id=cheap.order_id)
                if r.kind == "capture"
            ]
            assert captured == [ran.amount_minor] and ran.amount_minor != loser.amount_minor

            async def noted(order_id: str = cheap.order_id, mid: str = loser_id) -> Any:
                s = await wait_terminal(engine, order_id)
                return next((h for h in s["history"] if h["message_id"] == mid), None)

            note = await wait_for(noted, what="the conflicting start in the history")
            assert (note["outcome"], note["note"].split(":")[0]) == ("rejected", "conflict")
            dl = await dead_letters.wait(PM_QUEUE.dlq, loser_id)
            assert headers_of(dl)[HeaderNames.ERROR_MESSAGE].startswith("conflict: ")
            assert await dead_letters.absent(PM_QUEUE.dlq, winner_id)
    finally:
        await second_pm.stop()
