"""Every service runs as its own restricted broker user (``SAGABUS_DECLARE_TOPOLOGY=false``;
the admin declared the topology when provisioning) and sagas still finish end to end: success,
retries through the delay queues, compensation, facts to the choreographed consumers. Oversize
and unknown-type messages are dead-lettered unprocessed, and the collector, as its own user,
stores them."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import deadletters, topology
from messaging.service import Runtime
from messaging.settings import Settings
from participants.inventory import service as inventory
from participants.notification import service as notification
from participants.payment import service as payment
from participants.shipping.carrier import UNAVAILABLE_POSTAL_CODE
from process_manager import ops
from schemas.envelope import HeaderNames
from schemas.payment import AuthorizePayment
from tests.security.conftest import Provisioned
from tests.support import checkout, one, rows, wait_for, wait_terminal

pytestmark = pytest.mark.integration


async def seed(engine: AsyncEngine, sku: str, units: int) -> None:
    async with engine.begin() as conn:
        await inventory.seed(conn, {sku: units})


async def test_services_start_without_configure_permission(
    restricted: dict[str, Runtime], sec_settings: Settings
) -> None:
    assert not sec_settings.declare_topology
    for name, runtime in restricted.items():
        assert runtime.connection is not None and not runtime.connection.is_closed, name


async def test_a_saga_completes_with_every_service_on_its_own_user(
    restricted: dict[str, Runtime], provisioned: Provisioned, sec_engine: AsyncEngine
) -> None:
    uid = uuid.uuid4().hex[:10]
    sku = f"SKU-SEC-{uid}"
    await seed(sec_engine, sku, 2)
    cmd = checkout(f"sec-{uid}", sku=sku)
    # started the way an external client starts one, as the client user
    await ops.publish_starts(provisioned.url("client"), [ops.start_message(cmd)])

    status = await wait_terminal(sec_engine, cmd.order_id)
    assert status["state"] == "COMPLETED", status
    assert (await one(sec_engine, inventory.stock, sku=sku)).available == 1
    kinds = sorted(r.kind for r in await rows(sec_engine, payment.ledger, order_id=cmd.order_id))
    assert kinds == ["authorize", "capture"]

    # the public fact reached both choreographed consumers
    saga_id = uuid.UUID(status["saga_id"])
    analytics_inbox = restricted["analytics"].definitions[0].inbox

    async def facts_arrived() -> bool:
        n = await rows(sec_engine, notification.notifications, order_id=cmd.order_id)
        a = await rows(sec_engine, analytics_inbox, saga_id=saga_id)
        return bool(n and a)

    await wait_for(facts_arrived, what="OrderCompleted at notification and analytics")
    # nothing of this saga was refused or dead-lettered on the way (other tests' probes may be)
    assert await rows(sec_engine, deadletters.dead_letters, saga_id=str(saga_id)) == []


async def test_retries_and_compensation_work_on_restricted_users(
    restricted: dict[str, Runtime], provisioned: Provisioned, sec_engine: AsyncEngine
) -> None:
    uid = uuid.uuid4().hex[:10]
    sku = f"SKU-SEC-{uid}"
    await seed(sec_engine, sku, 1)
    cmd = checkout(f"sec-{uid}", sku=sku, postal_code=UNAVAILABLE_POSTAL_CODE)
    retried = restricted["shipping"].consumers["shipping"].counts["retried"]
    await ops.publish_starts(provisioned.url("client"), [ops.start_message(cmd)])

    status = await wait_terminal(sec_engine, cmd.order_id)
    assert status["state"] == "COMPENSATED", status
    # the carrier was retried through shipping's delay queues (the default exchange)
    assert restricted["shipping"].consumers["shipping"].counts["retried"] > retried
    assert (await one(sec_engine, inventory.stock, sku=sku)).available == 1
    kinds = sorted(r.kind for r in await rows(sec_engine, payment.ledger, order_id=cmd.order_id))
    assert "capture" not in kinds


def _command(body: bytes, type_: str) -> aio_pika.Message:
    return aio_pika.Message(
        body=body,
        content_type="application/json",
        message_id=str(uuid.uuid4()),
        correlation_id=str(uuid.uuid4()),
        type=type_,
        timestamp=datetime.now(UTC),
        headers={HeaderNames.SAGA_ID: str(uuid.uuid4())},
    )


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("oversize", "exceeds limit of"),
        ("unknown-type", "unknown message type 'payment.Teleport.v1'"),
    ],
)
async def test_oversize_and_unknown_messages_are_dead_lettered_unprocessed(
    restricted: dict[str, Runtime],
    provisioned: Provisioned,
    sec_settings: Settings,
    sec_engine: AsyncEngine,
    case: str,
    reason: str,
) -> None:
    order_id = f"sec-{case}-{uuid.uuid4().hex[:8]}"
    valid = {
        "order_id": order_id,
        "amount_minor": 100,
        "currency": "EUR",
        "payment_token": "tok_visa",
    }
    if case == "oversize":
        # a valid command, padded past the limit with insignificant whitespace
        body = json.dumps(valid).encode()
        body += b" " * (sec_settings.max_message_bytes + 1 - len(body))
        sent = _command(body, AuthorizePayment.TYPE)
    else:
        sent = _command(json.dumps(valid).encode(), "payment.Teleport.v1")
    # sent as the process manager sends it: under its own, broker-validated user_id
    sent.user_id = f"{provisioned.user_prefix}process-manager"
    consumer = restricted["payment"].consumers["payment"]
    processed = consumer.counts["processed"]

    # a command like the process manager sends it, as the process manager's user
    connection = await aio_pika.connect(provisioned.url("process-manager"))
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.COMMANDS_EXCHANGE, ensure=False)
        await exchange.publish(sent, routing_key="payment.AuthorizePayment", mandatory=True)

    async def stored() -> Any:
        found = await rows(sec_engine, deadletters.dead_letters, message_id=sent.message_id)
        return found[0] if found else None

    row = await wait_for(stored, what=f"the {case} message in the dead-letter store")
    assert row.queue == topology.QUEUES["payment"].name
    assert row.failure_kind == "permanent"
    assert row.error_class == "PermanentError"
    assert reason in row.error_message
    assert row.body == sent.body  # unchanged
    assert consumer.counts["processed"] == processed  # never handled
    assert await rows(sec_engine, payment.payments, order_id=order_id) == []
