"""The attacker's suite (issue 9): each case is a real AMQP connection, with pika, as one of the
users ``sagabus provision`` made, against services that each run as their own restricted user.

Every case lies to the system in one way: a reply forged on the start route, a reply sent by a
participant that does not own its type, a genuine reply replayed with a token that is no longer
current, a start whose message id collides with an internal one, internal ``sagabus-*`` headers
set from outside, and oversized bodies. Each must be refused by the broker, dead-lettered with
its reason, or recorded and never applied, and the saga, the payment ledger and the stock must
stay as an honest run leaves them.

"Nothing happened" is asserted only after a positive signal: the forged message is in the
dead-letter store (the collector runs, as its own user), or it is in the saga's history, or a
later control message went through.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pika
import pika.exceptions
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import deadletters, topology
from messaging import metrics as metrics_mod
from messaging.codec import Incoming
from messaging.consumer import Context
from messaging.service import Runtime
from messaging.settings import Settings
from participants.inventory import service as inventory
from participants.payment import service as payment
from participants.shipping import service as shipping
from process_manager import ops, store
from process_manager.definitions.checkout import V2
from process_manager.engine import command_id
from schemas.base import Message
from schemas.checkout import StartCheckout, saga_id_for_order
from schemas.envelope import Envelope, HeaderNames
from schemas.inventory import InventoryReserved
from schemas.payment import PaymentAuthorized, PaymentCaptured, RefundPayment
from tests.security.conftest import Provisioned
from tests.support import checkout, one, paused, rows, wait_for

pytestmark = pytest.mark.integration

#: the header a dispatched command carries and its reply echoes (issue 9, "Reply tokens")
REPLY_TOKEN = "sagabus-reply-token"
PM_QUEUE = topology.QUEUES["process-manager"].name
TERMINAL = ("COMPLETED", "COMPENSATED", "FAILED_NEEDS_MANUAL")
#: every state a saga can be in once it has started (wait_state for "it exists")
STATES = (
    "PENDING_ORDER",
    "PENDING_RISK",
    "PENDING_PAYMENT",
    "PENDING_INVENTORY",
    "PENDING_SHIPMENT",
    "PENDING_CAPTURE",
    "COMPLETING",
    "COMPENSATING",
    "COMPLETED",
    "COMPENSATED",
    "FAILED_NEEDS_MANUAL",
)
SECURITY_METRIC = "sagabus_messages_rejected_security_total"
#: the forward steps of the checkout new sagas run
FORWARD = V2.steps
#: the fence of the first AuthorizePayment of an undisturbed saga
AUTHORIZATION_FENCE = 1 + [s.name for s in FORWARD].index("authorization")
#: the fence of the first CapturePayment of an undisturbed saga
CAPTURE_FENCE = 1 + [s.name for s in FORWARD].index("capture")


# -- pika, in a thread --------------------------------------------------------------------------


def _publish_sync(
    url: str, exchange: str, routing_key: str, body: bytes, properties: pika.BasicProperties
) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()  # basic_publish raises when the broker refuses the message
        channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)
    finally:
        if connection.is_open:
            connection.close()


async def publish(
    url: str, exchange: str, routing_key: str, body: bytes, properties: pika.BasicProperties
) -> None:
    await asyncio.to_thread(_publish_sync, url, exchange, routing_key, body, properties)


async def refused(
    url: str, exchange: str, routing_key: str, body: bytes, properties: pika.BasicProperties
) -> pika.exceptions.AMQPError:
    """Publish, expecting the broker to close the channel (or connection) on it."""
    try:
        await publish(url, exchange, routing_key, body, properties)
    except (
        pika.exceptions.ChannelClosedByBroker,
        pika.exceptions.ConnectionClosedByBroker,
    ) as e:
        return e
    raise AssertionError(f"the broker accepted the publish to {exchange}/{routing_key}")


def user_of(provisioned: Provisioned, principal: str) -> str:
    """The broker user name of ``principal`` (``<prefix><principal>``)."""
    username = urllib.parse.urlparse(provisioned.url(principal)).username
    assert username is not None
    return urllib.parse.unquote(username)


def props(
    type_: str,
    *,
    saga_id: uuid.UUID | None = None,
    fence: int | None = None,
    message_id: str | None = None,
    user_id: str | None = None,
    headers: dict[str, Any] | None = None,
) -> pika.BasicProperties:
    h: dict[str, Any] = {}
    if saga_id is not None:
        h[HeaderNames.SAGA_ID] = str(saga_id)
    if fence is not None:
        h[HeaderNames.FENCE] = fence
    h.update(headers or {})
    return pika.BasicProperties(
        content_type="application/json",
        delivery_mode=2,
        message_id=message_id or str(uuid.uuid4()),
        correlation_id=str(saga_id) if saga_id else None,
        type=type_,
        timestamp=int(datetime.now(UTC).timestamp()),
        user_id=user_id,
        headers=h,
    )


def start_body(cmd: StartCheckout) -> bytes:
    return cmd.model_dump_json().encode()


async def start(provisioned: Provisioned, cmd: StartCheckout, **kwargs: Any) -> str:
    """Start a saga as the ``client`` user, with pika; the message id."""
    p = props(StartCheckout.TYPE, **kwargs)
    await publish(
        provisioned.url("client"),
        topology.COMMANDS_EXCHANGE,
        topology.START_ROUTING_KEY,
        start_body(cmd),
        p,
    )
    assert p.message_id is not None
    return str(p.message_id)


# -- looking at what happened -------------------------------------------------------------------


async def seed(engine: AsyncEngine, sku: str, units: int) -> None:
    async with engine.begin() as conn:
        await inventory.seed(conn, {sku: units})


async def status_of(engine: AsyncEngine, order_id: str) -> dict[str, Any] | None:
    return await ops.saga_status(engine, order_id)


def _story(s: dict[str, Any] | None) -> str:
    if s is None:
        return "no saga"
    lines = [f"{s['state']} (seq {s['seq']}, reason {s['failure_reason']!r})"]
    lines += [
        f"  {h['seq']} {h['message_type']} {h['from']}->{h['to']} {h['outcome']}: {h['note']}"
        for h in s["history"]
    ]
    return "\n".join(lines)


async def wait_state(
    engine: AsyncEngine, order_id: str, *states: str, timeout: float = 30
) -> dict[str, Any]:
    """Wait until the saga of ``order_id`` is in one of ``states``; fail with its story."""
    last: dict[str, Any] | None = None

    async def probe() -> Any:
        nonlocal last
        last = await status_of(engine, order_id)
        return last if last and last["state"] in states else None

    try:
        found: dict[str, Any] = await wait_for(
            probe, timeout=timeout, what=f"{order_id} in {states}"
        )
        return found
    except AssertionError:
        raise AssertionError(
            f"saga of {order_id} not in {states} after {timeout}s:\n{_story(last)}"
        ) from None


async def current(engine: AsyncEngine, order_id: str) -> dict[str, Any]:
    s = await status_of(engine, order_id)
    assert s is not None, f"no saga for {order_id}"
    return s


async def history_of(engine: AsyncEngine, message_id: str) -> list[Any]:
    return await rows(engine, store.history, message_id=uuid.UUID(message_id))


async def fate(engine: AsyncEngine, message_id: str, *, timeout: float = 20) -> tuple[str, Any]:
    """What became of a message the process manager received: ``("dead-lettered", row)`` once the
    collector stored it, or ``("history", rows)`` once the saga recorded it."""

    async def probe() -> Any:
        dl = await rows(engine, deadletters.dead_letters, message_id=message_id)
        if dl:
            return "dead-lettered", dl[0]
        h = await history_of(engine, message_id)
        if h:
            return "history", h
        return None

    found: tuple[str, Any] = await wait_for(
        probe, timeout=timeout, what=f"{message_id} dead-lettered or recorded"
    )
    return found


def describe(found: tuple[str, Any]) -> str:
    kind, value = found
    if kind == "dead-lettered":
        return f"dead-lettered ({value.failure_kind}): {value.error_message}"
    return "recorded in the history: " + "; ".join(
        f"{h.outcome} {h.from_status}->{h.to_status} {h.note!r}" for h in value
    )


def assert_security_dead_letter(found: tuple[str, Any], reason: str) -> Any:
    kind, row = found
    assert kind == "dead-lettered", f"expected a dead letter ({reason}), but {describe(found)}"
    assert row.queue == PM_QUEUE
    assert row.failure_kind == "security", describe(found)
    assert row.error_message.startswith(reason), describe(found)
    assert row.headers.get(HeaderNames.FAILURE_KIND) == "security"
    return row


def assert_rejected_for_token(found: tuple[str, Any]) -> None:
    kind, value = found
    assert kind == "history", f"expected a history row 'rejected', but {describe(found)}"
    assert [h.outcome for h in value] == ["rejected"], describe(found)
    assert all(h.from_status == h.to_status for h in value), describe(found)
    note = value[0].note.lower()
    assert "token" in note, describe(found)


async def ledger_kinds(engine: AsyncEngine, order_id: str) -> list[str]:
    return sorted(r.kind for r in await rows(engine, payment.ledger, order_id=order_id))


async def available(engine: AsyncEngine, sku: str) -> int:
    return int((await one(engine, inventory.stock, sku=sku)).available)


def security_rejections(runtime: Runtime, service: str) -> float:
    """``sagabus_messages_rejected_security_total{service}`` summed over its reasons, from the
    process's registry and from the runtime's scrape-time collector."""
    families = list(metrics_mod.metrics().registry.collect())
    families += list(metrics_mod._RuntimeCollector(runtime).collect())
    return sum(
        s.value
        for f in families
        for s in f.samples
        if s.name == SECURITY_METRIC and s.labels.get("service") == service
    )


def outbox_of(restricted: dict[str, Runtime], service: str) -> Any:
    return restricted[service].definitions[0].outbox


async def outbox_row(engine: AsyncEngine, table: Any, saga_id: uuid.UUID, message_type: str) -> Any:
    async def probe() -> Any:
        found = await rows(engine, table, saga_id=saga_id, message_type=message_type)
        return found[-1] if found else None

    return await wait_for(probe, what=f"{message_type} of {saga_id} in {table.fullname}")


def fresh(tag: str) -> tuple[str, str]:
    uid = uuid.uuid4().hex[:10]
    return f"atk-{tag}-{uid}", f"SKU-ATK-{uid}"


# -- 1. forged replies on the start route --------------------------------------------------------


async def test_replies_forged_on_the_start_route_are_dead_lettered(
    restricted: dict[str, Runtime], provisioned: Provisioned, sec_engine: AsyncEngine
) -> None:
    """As ``client``: PaymentAuthorized (fence 3) and PaymentCaptured (fence 6) for a saga whose
    card is declined, while payment is down. Today's route takes any type; it must take only
    StartCheckout."""
    order_id, sku = fresh("start-route")
    await seed(sec_engine, sku, 2)
    cmd = checkout(order_id, sku=sku, token="tok_decline")
    saga_id = saga_id_for_order(order_id)
    amount = cmd.amount_minor
    before = security_rejections(restricted["process-manager"], "process-manager")

    async with paused(restricted["payment"], "payment"):
        await start(provisioned, cmd)
        await wait_state(sec_engine, order_id, "PENDING_PAYMENT")

        forged = []
        for body, fence in (
            (
                PaymentAuthorized(
                    order_id=order_id, authorization_id="auth_x", amount_minor=amount
                ),
                AUTHORIZATION_FENCE,
            ),
            (
                PaymentCaptured(order_id=order_id, authorization_id="auth_x", amount_minor=amount),
                CAPTURE_FENCE,
            ),
        ):
            p = props(body.TYPE, saga_id=saga_id, fence=fence)
            await publish(
                provisioned.url("client"),
                topology.COMMANDS_EXCHANGE,
                topology.START_ROUTING_KEY,
                body.model_dump_json().encode(),
                p,
            )
            assert p.message_id is not None
            found = await fate(sec_engine, p.message_id)
            row = assert_security_dead_letter(found, "forbidden route")
            assert row.message_type == body.TYPE
            assert row.body == body.model_dump_json().encode()
            forged.append(p.message_id)

        s = await current(sec_engine, order_id)

        assert s["state"] == "PENDING_PAYMENT", _story(s)
        for message_id in forged:
            assert await history_of(sec_engine, message_id) == []
        assert security_rejections(restricted["process-manager"], "process-manager") >= before + 2

    # payment comes back and declines the card: the saga compensates, nothing was charged
    s = await wait_state(sec_engine, order_id, *TERMINAL)
    assert s["state"] == "COMPENSATED", _story(s)
    assert "capture" not in await ledger_kinds(sec_engine, order_id)
    assert await rows(sec_engine, shipping.shipments, order_id=order_id) == []
    assert await available(sec_engine, sku) == 2


# -- 2. replies forged by a participant that does not own the type ------------------------------


async def test_a_participant_cannot_reply_for_another(
    restricted: dict[str, Runtime], provisioned: Provisioned, sec_engine: AsyncEngine
) -> None:
    order_id, sku = fresh("not-owner")
    await seed(sec_engine, sku, 2)
    cmd = checkout(order_id, sku=sku, token="tok_decline")
    saga_id = saga_id_for_order(order_id)
    authorized = (
        PaymentAuthorized(
            order_id=order_id, authorization_id="auth_x", amount_minor=cmd.amount_minor
        )
        .model_dump_json()
        .encode()
    )
    inventory_url = provisioned.url("inventory")

    async with paused(restricted["payment"], "payment"):
        await start(provisioned, cmd)
        await wait_state(sec_engine, order_id, "PENDING_PAYMENT")

        # (a) inventory publishes under payment's routing key: topic permissions refuse it
        e = await refused(
            inventory_url,
            topology.REPLIES_EXCHANGE,
            PaymentAuthorized.TYPE,
            authorized,
            props(PaymentAuthorized.TYPE, saga_id=saga_id, fence=AUTHORIZATION_FENCE),
        )
        assert e.args[0] == 403 and "ACCESS_REFUSED" in str(e.args[1]), e

        # (c) inventory claims to be the payment user: RabbitMQ validates user_id
        reserved = InventoryReserved(order_id=order_id, reservation_id=order_id)
        e = await refused(
            inventory_url,
            topology.REPLIES_EXCHANGE,
            reserved.TYPE,
            reserved.model_dump_json().encode(),
            props(
                reserved.TYPE,
                saga_id=saga_id,
                fence=AUTHORIZATION_FENCE,
                user_id=user_of(provisioned, "payment"),
            ),
        )
        assert e.args[0] == 406 and "PRECONDITION_FAILED" in str(e.args[1]), e

        # (b) payment's type under inventory's own routing key: the route does not fit the type
        p = props(
            PaymentAuthorized.TYPE,
            saga_id=saga_id,
            fence=AUTHORIZATION_FENCE,
            user_id=user_of(provisioned, "inventory"),
        )
        await publish(
            inventory_url,
            topology.REPLIES_EXCHANGE,
            InventoryReserved.TYPE,
            authorized,
            p,
        )
        assert p.message_id is not None
        assert_security_dead_letter(await fate(sec_engine, p.message_id), "forbidden route")

        s = await current(sec_engine, order_id)

        assert s["state"] == "PENDING_PAYMENT", _story(s)
        # started, order created, risk approved: nothing else applied
        assert [h["outcome"] for h in s["history"]] == ["applied"] * 3, _story(s)

    s = await wait_state(sec_engine, order_id, *TERMINAL)
    assert s["state"] == "COMPENSATED", _story(s)
    assert "capture" not in await ledger_kinds(sec_engine, order_id)
    assert await rows(sec_engine, shipping.shipments, order_id=order_id) == []
    assert await available(sec_engine, sku) == 2


@pytest.mark.parametrize("token", [None, "wrong"], ids=["no-token", "wrong-token"])
async def test_the_owner_without_the_dispatch_token_is_rejected(
    restricted: dict[str, Runtime],
    provisioned: Provisioned,
    sec_engine: AsyncEngine,
    token: str | None,
) -> None:
    """(d) As the payment user itself, on the right route and with its own user_id: a
    PaymentAuthorized with the current fence but without the token of the dispatch."""
    order_id, sku = fresh("token")
    await seed(sec_engine, sku, 2)
    cmd = checkout(order_id, sku=sku, token="tok_decline")
    saga_id = saga_id_for_order(order_id)
    body = PaymentAuthorized(
        order_id=order_id, authorization_id="auth_x", amount_minor=cmd.amount_minor
    )

    async with paused(restricted["payment"], "payment"):
        await start(provisioned, cmd)
        s = await wait_state(sec_engine, order_id, "PENDING_PAYMENT")
        headers = {REPLY_TOKEN: uuid.uuid4().hex + uuid.uuid4().hex} if token else {}
        p = props(
            body.TYPE,
            saga_id=saga_id,
            fence=s["seq"],
            user_id=user_of(provisioned, "payment"),
            headers=headers,
        )
        await publish(
            provisioned.url("payment"),
            topology.REPLIES_EXCHANGE,
            body.TYPE,
            body.model_dump_json().encode(),
            p,
        )
        assert p.message_id is not None
        assert_rejected_for_token(await fate(sec_engine, p.message_id))
        s = await current(sec_engine, order_id)
        assert s["state"] == "PENDING_PAYMENT", _story(s)

    s = await wait_state(sec_engine, order_id, *TERMINAL)
    assert s["state"] == "COMPENSATED", _story(s)
    assert "capture" not in await ledger_kinds(sec_engine, order_id)
    assert await rows(sec_engine, shipping.shipments, order_id=order_id) == []
    assert await available(sec_engine, sku) == 2


async def test_the_operator_cannot_replay_a_forged_reply_into_the_process_manager(
    restricted: dict[str, Runtime], provisioned: Provisioned, sec_engine: AsyncEngine
) -> None:
    """The operator may publish on ``sagabus.replay`` into any work queue, and a replay is judged
    by the original route it carries. A PaymentAuthorized that claims to come from
    ``sagabus.replies`` is still not from the payment user, and has no dispatch token: it must not
    be applied (dead-lettered as a security event, or recorded as rejected)."""
    order_id, sku = fresh("replay")
    await seed(sec_engine, sku, 2)
    cmd = checkout(order_id, sku=sku, token="tok_decline")
    saga_id = saga_id_for_order(order_id)
    body = PaymentAuthorized(
        order_id=order_id, authorization_id="auth_x", amount_minor=cmd.amount_minor
    )

    async with paused(restricted["payment"], "payment"):
        await start(provisioned, cmd)
        await wait_state(sec_engine, order_id, "PENDING_PAYMENT")
        p = props(
            body.TYPE,
            saga_id=saga_id,
            fence=AUTHORIZATION_FENCE,
            user_id=user_of(provisioned, "operator"),
            headers={
                HeaderNames.ORIGINAL_EXCHANGE: topology.REPLIES_EXCHANGE,
                HeaderNames.ORIGINAL_ROUTING_KEY: body.TYPE,
                HeaderNames.REPLAYED_FROM: str(uuid.uuid4()),
            },
        )
        exchange, key = topology.replay_route(PM_QUEUE)
        await publish(
            provisioned.url("operator"), exchange, key, body.model_dump_json().encode(), p
        )
        assert p.message_id is not None
        found = await fate(sec_engine, p.message_id)
        if found[0] == "dead-lettered":
            assert found[1].failure_kind == "security", describe(found)
            assert found[1].error_message.startswith("forbidden"), describe(found)
        else:
            assert_rejected_for_token(found)
        s = await current(sec_engine, order_id)
        assert s["state"] == "PENDING_PAYMENT", _story(s)

    s = await wait_state(sec_engine, order_id, *TERMINAL)
    assert s["state"] == "COMPENSATED", _story(s)
    assert "capture" not in await ledger_kinds(sec_engine, order_id)


# -- 3. a genuine reply replayed later with a stale token ----------------------------------------


async def test_every_dispatch_carries_its_own_token_and_the_reply_echoes_it(
    restricted: dict[str, Runtime], provisioned: Provisioned, sec_engine: AsyncEngine
) -> None:
    order_id, sku = fresh("tokens")
    await seed(sec_engine, sku, 1)
    cmd = checkout(order_id, sku=sku)
    await start(provisioned, cmd)
    s = await wait_state(sec_engine, order_id, *TERMINAL)
    assert s["state"] == "COMPLETED", _story(s)
    saga_id = saga_id_for_order(order_id)

    commands = await rows(sec_engine, outbox_of(restricted, "process-manager"), saga_id=saga_id)
    assert len(commands) == len(FORWARD)
    tokens = {str(c.message_id): c.headers.get(REPLY_TOKEN) for c in commands}
    assert all(isinstance(t, str) and len(t) >= 16 for t in tokens.values()), tokens
    assert len(set(tokens.values())) == len(tokens), "each dispatch has a token of its own"
    for participant in sorted({spec.participant for spec in FORWARD}):
        for reply in await rows(sec_engine, outbox_of(restricted, participant), saga_id=saga_id):
            if reply.exchange != topology.REPLIES_EXCHANGE:
                continue  # a public fact
            cause = reply.headers.get(HeaderNames.CAUSATION_ID)
            assert reply.headers.get(REPLY_TOKEN) == tokens[cause], (participant, reply.headers)


async def test_a_genuine_reply_replayed_later_is_not_applied(
    restricted: dict[str, Runtime], provisioned: Provisioned, sec_engine: AsyncEngine
) -> None:
    """Saga X completes. Its genuine PaymentAuthorized (with X's token) is copied from payment's
    outbox and sent again, as the payment user, with a new message id: to X, where it is late;
    then retargeted to saga Y, which awaits a PaymentAuthorized at the same fence, where only the
    token tells it apart. Then Y's own earlier dispatch token (CreateOrder's, read from the
    process manager's outbox after Y moved on) on a PaymentAuthorized: rejected as well."""
    payment_user = user_of(provisioned, "payment")
    payment_url = provisioned.url("payment")
    pm_outbox = outbox_of(restricted, "process-manager")

    x_order, x_sku = fresh("replay-x")
    await seed(sec_engine, x_sku, 1)
    await start(provisioned, checkout(x_order, sku=x_sku))
    s = await wait_state(sec_engine, x_order, *TERMINAL)
    assert s["state"] == "COMPLETED", _story(s)
    x_saga = saga_id_for_order(x_order)
    genuine = await outbox_row(
        sec_engine, outbox_of(restricted, "payment"), x_saga, PaymentAuthorized.TYPE
    )
    x_headers = dict(genuine.headers)

    # to X itself, later: a stale fence, and the saga is finished
    p = props(PaymentAuthorized.TYPE, user_id=payment_user, headers=x_headers)
    p.correlation_id = str(genuine.correlation_id)
    await publish(payment_url, topology.REPLIES_EXCHANGE, PaymentAuthorized.TYPE, genuine.body, p)
    assert p.message_id is not None
    found = await fate(sec_engine, p.message_id)
    assert found[0] == "history", describe(found)
    assert {h.outcome for h in found[1]} <= {"ignored", "rejected"}, describe(found)
    s = await current(sec_engine, x_order)
    assert s["state"] == "COMPLETED"
    assert await ledger_kinds(sec_engine, x_order) == ["authorize", "capture"]
    assert await available(sec_engine, x_sku) == 0

    # to Y, waiting for exactly this type at exactly this fence
    y_order, y_sku = fresh("replay-y")
    await seed(sec_engine, y_sku, 2)
    y_cmd = checkout(y_order, sku=y_sku, token="tok_decline")
    y_saga = saga_id_for_order(y_order)
    async with paused(restricted["payment"], "payment"):
        await start(provisioned, y_cmd)
        s = await wait_state(sec_engine, y_order, "PENDING_PAYMENT")
        assert s["seq"] == x_headers[HeaderNames.FENCE]
        y_authorize = await outbox_row(sec_engine, pm_outbox, y_saga, "payment.AuthorizePayment.v1")
        body = json.loads(genuine.body)
        body.update(order_id=y_order, amount_minor=y_cmd.amount_minor)
        headers = {
            **x_headers,
            HeaderNames.SAGA_ID: str(y_saga),
            HeaderNames.CAUSATION_ID: str(y_authorize.message_id),
            HeaderNames.IDEMPOTENCY_KEY: y_authorize.headers.get(HeaderNames.IDEMPOTENCY_KEY),
        }
        p = props(PaymentAuthorized.TYPE, saga_id=y_saga, user_id=payment_user, headers=headers)
        await publish(
            payment_url,
            topology.REPLIES_EXCHANGE,
            PaymentAuthorized.TYPE,
            json.dumps(body).encode(),
            p,
        )
        assert p.message_id is not None
        assert_rejected_for_token(await fate(sec_engine, p.message_id))

        # Y's own earlier dispatch: the CreateOrder token, now that Y awaits payment
        y_create = await outbox_row(sec_engine, pm_outbox, y_saga, "order.CreateOrder.v1")
        stale = y_create.headers.get(REPLY_TOKEN)
        assert stale, f"CreateOrder carries no {REPLY_TOKEN}: {y_create.headers}"
        p = props(
            PaymentAuthorized.TYPE,
            saga_id=y_saga,
            fence=s["seq"],
            user_id=payment_user,
            headers={REPLY_TOKEN: stale},
        )
        await publish(
            payment_url,
            topology.REPLIES_EXCHANGE,
            PaymentAuthorized.TYPE,
            json.dumps(body).encode(),
            p,
        )
        assert p.message_id is not None
        assert_rejected_for_token(await fate(sec_engine, p.message_id))
        s = await current(sec_engine, y_order)
        assert s["state"] == "PENDING_PAYMENT", _story(s)

    s = await wait_state(sec_engine, y_order, *TERMINAL)
    assert s["state"] == "COMPENSATED", _story(s)
    assert "capture" not in await ledger_kinds(sec_engine, y_order)
    assert await rows(sec_engine, shipping.shipments, order_id=y_order) == []
    assert await available(sec_engine, y_sku) == 2


# -- 4. message-id collision with internal ids ---------------------------------------------------


def derived_reply_id(saga_id: uuid.UUID, step_index: int, start_cmd: StartCheckout) -> uuid.UUID:
    """The message id a participant gives its success reply to the first send of forward step
    ``step_index`` of an undisturbed saga, computed by the same code that derives it: the
    process manager's ``command_id`` and the consumer's ``Context.derived_envelope``."""
    spec = FORWARD[step_index]
    seq = step_index + 1  # every forward dispatch of an undisturbed saga takes the next fence
    command = spec.build(start_cmd)
    env = Envelope(
        message_id=command_id(saga_id, spec.name, seq, 1),
        type=command.TYPE,
        saga_id=saga_id,
        correlation_id=saga_id,
        idempotency_key=f"{saga_id}:{spec.name}",
        step=spec.name,
        fence=seq,
        occurred_at=datetime.now(UTC),
    )
    ctx = Context(None, Incoming(env, command), spec.participant)  # type: ignore[arg-type]
    reply: Message = spec.success[0].model_construct()
    return ctx.derived_envelope(reply).message_id


async def test_a_start_cannot_take_the_message_id_of_another_sagas_reply(
    restricted: dict[str, Runtime], provisioned: Provisioned, sec_engine: AsyncEngine
) -> None:
    """Customer B's starts carry, as their message ids, the ids the system will derive for every
    reply of customer A's saga. They go first; then A starts. Both finish normally, and A never
    waits for a step timeout (a dropped OrderCreated would leave it waiting)."""
    a_order, sku = fresh("collide-a")
    n = len(FORWARD)
    await seed(sec_engine, sku, n + 2)
    a_cmd = checkout(a_order, sku=sku)
    a_saga = saga_id_for_order(a_order)
    ids = [derived_reply_id(a_saga, i, a_cmd) for i in range(n)]

    b_orders = [f"{a_order}-b{i}" for i in range(n)]
    for b_order, message_id in zip(b_orders, ids, strict=True):
        await start(provisioned, checkout(b_order, sku=sku), message_id=str(message_id))
    for b_order in b_orders:
        await wait_state(sec_engine, b_order, *STATES)

    await start(provisioned, a_cmd)
    # well within the step timeout (30 s): a dropped reply would be re-sent only after it
    s = await wait_state(sec_engine, a_order, *TERMINAL, timeout=20)
    assert s["state"] == "COMPLETED", _story(s)
    assert [h["outcome"] for h in s["history"]] == ["applied"] * (n + 1), _story(s)
    assert s["seq"] == n, _story(s)  # no step was sent twice
    for b_order in b_orders:
        b = await wait_state(sec_engine, b_order, *TERMINAL)
        assert b["state"] == "COMPLETED", _story(b)
    assert await ledger_kinds(sec_engine, a_order) == ["authorize", "capture"]
    assert await available(sec_engine, sku) == 1


# -- 5. internal headers set from outside, on the start route -----------------------------------


@contextmanager
def publish_failures(runtime: Runtime, service: str) -> Iterator[list[BaseException]]:
    """Every publish of ``service`` (its consumer's retries and dead letters, its relay) that
    raises while the block runs: a channel closed by ACCESS_REFUSED shows up here."""
    publisher = runtime.consumers[service].publisher
    original = publisher.publish
    failures: list[BaseException] = []

    async def spy(*args: Any, **kwargs: Any) -> None:
        try:
            await original(*args, **kwargs)
        except BaseException as e:
            failures.append(e)
            raise

    publisher.publish = spy  # type: ignore[method-assign]
    try:
        yield failures
    finally:
        del publisher.publish  # the class's method again


@pytest.mark.parametrize(
    "injected",
    [
        pytest.param(
            {
                HeaderNames.RETRY_COUNT: -1,
                HeaderNames.FENCE: 99,
                HeaderNames.ORIGINAL_EXCHANGE: topology.COMMANDS_EXCHANGE,
                HeaderNames.ORIGINAL_ROUTING_KEY: "payment.AuthorizePayment",
                HeaderNames.FAILED_QUEUE: topology.QUEUES["payment"].name,
                HeaderNames.REPLAYED_FROM: str(uuid.uuid4()),
            },
            id="forged-route-and-fence",
        ),
        pytest.param(
            {
                HeaderNames.RETRY_COUNT: "x",
                HeaderNames.ATTEMPT: 0,
                HeaderNames.FENCE: "ninety-nine",
                HeaderNames.CAUSATION_ID: "not-a-uuid",
                HeaderNames.OCCURRED_AT: "yesterday",
                HeaderNames.STEP: "capture",
                REPLY_TOKEN: "guessed",
            },
            id="malformed-internal-headers",
        ),
    ],
)
async def test_internal_headers_on_the_start_route_are_ignored(
    restricted: dict[str, Runtime],
    provisioned: Provisioned,
    sec_engine: AsyncEngine,
    injected: dict[str, Any],
) -> None:
    """A start with ``sagabus-*`` headers that only sagabus itself may set, one of them naming
    another saga: the saga still runs normally, under the id derived from its order id."""
    other_order, sku = fresh("other")
    await seed(sec_engine, sku, 2)
    await start(provisioned, checkout(other_order, sku=sku))
    other = await wait_state(sec_engine, other_order, "COMPLETED", "COMPENSATED")
    other_history = len(other["history"])

    order_id = f"{other_order}-injected"
    headers = {**injected, HeaderNames.SAGA_ID: str(saga_id_for_order(other_order))}
    message_id = await start(provisioned, checkout(order_id, sku=sku), headers=headers)
    found = await fate(sec_engine, message_id)
    assert found[0] == "history", describe(found)
    s = await wait_state(sec_engine, order_id, *TERMINAL)
    assert s["state"] == "COMPLETED", _story(s)
    assert s["saga_id"] == str(saga_id_for_order(order_id))
    assert s["seq"] == len(FORWARD), _story(s)
    create = await outbox_row(
        sec_engine,
        outbox_of(restricted, "process-manager"),
        saga_id_for_order(order_id),
        "order.CreateOrder.v1",
    )
    assert create.headers[HeaderNames.FENCE] == 1
    assert create.headers[HeaderNames.ATTEMPT] == 1
    # the other saga never heard of it
    other = await current(sec_engine, other_order)
    assert len(other["history"]) == other_history
    assert await ledger_kinds(sec_engine, order_id) == ["authorize", "capture"]
    assert await available(sec_engine, sku) == 0


@pytest.mark.parametrize(
    "injected",
    [
        pytest.param({HeaderNames.RETRY_COUNT: -1}, id="retry-count--1"),
        pytest.param({HeaderNames.RETRY_COUNT: -100}, id="retry-count--100"),
        pytest.param({HeaderNames.RETRY_COUNT: "x"}, id="retry-count-x"),
        pytest.param({HeaderNames.RETRY_COUNT: 10**6}, id="retry-count-huge"),
        pytest.param(
            {
                HeaderNames.ORIGINAL_EXCHANGE: topology.REPLIES_EXCHANGE,
                HeaderNames.ORIGINAL_ROUTING_KEY: PaymentAuthorized.TYPE,
            },
            id="original-route",
        ),
    ],
)
async def test_internal_headers_cannot_steer_the_retries_of_a_failing_start(
    restricted: dict[str, Runtime],
    provisioned: Provisioned,
    sec_settings: Settings,
    sec_engine: AsyncEngine,
    injected: dict[str, Any],
) -> None:
    """A start the process manager fails to store (a NUL character in the address, which
    PostgreSQL's jsonb refuses) goes through its retries. Headers set by the client must not
    choose the retry route (``-1``: a delay queue the process manager may not publish to, and an
    ACCESS_REFUSED channel closure each time; ``-100``: an IndexError), skip the retries, or
    rewrite the original route recorded on the dead letter. The process manager keeps its
    connection and keeps working."""
    runtime = restricted["process-manager"]
    order_id, sku = fresh("poison")
    await seed(sec_engine, sku, 1)
    poison = checkout(order_id, sku=sku)
    poison = poison.model_copy(
        update={"shipping_address": poison.shipping_address.model_copy(update={"line1": "1\x00A"})}
    )

    with publish_failures(runtime, "process-manager") as failures:
        message_id = await start(provisioned, poison, headers=injected)

        async def dead() -> Any:
            found = await rows(sec_engine, deadletters.dead_letters, message_id=message_id)
            return found[0] if found else None

        row = await wait_for(dead, what="the failing start in the dead-letter store")
        assert row.queue == PM_QUEUE
        assert row.failure_kind in ("retries_exhausted", "permanent"), (
            row.failure_kind,
            row.error_message,
        )
        assert 0 <= row.retry_count <= sec_settings.max_attempts, row.retry_count
        assert row.original_exchange == topology.COMMANDS_EXCHANGE, row.original_exchange
        assert row.original_routing_key == topology.START_ROUTING_KEY, row.original_routing_key

        # it keeps processing: a start sent afterwards completes
        control, control_sku = fresh("control")
        await seed(sec_engine, control_sku, 1)
        await start(provisioned, checkout(control, sku=control_sku))
        s = await wait_state(sec_engine, control, *TERMINAL)
        assert s["state"] == "COMPLETED", _story(s)

    assert failures == [], f"publishes of the process manager failed: {failures!r}"
    assert runtime.connection is not None and not runtime.connection.is_closed
    assert await status_of(sec_engine, order_id) is None
    assert await available(sec_engine, sku) == 1


# -- 6. oversized messages ------------------------------------------------------------------------


def padded(cmd: StartCheckout, size: int) -> bytes:
    """A valid StartCheckout padded to ``size`` bytes with insignificant whitespace."""
    body = start_body(cmd)
    return body + b" " * (size - len(body))


async def test_a_body_over_the_brokers_limit_is_refused(
    restricted: dict[str, Runtime], provisioned: Provisioned, sec_engine: AsyncEngine
) -> None:
    order_id, sku = fresh("huge")
    e = await refused(
        provisioned.url("client"),
        topology.COMMANDS_EXCHANGE,
        topology.START_ROUTING_KEY,
        padded(checkout(order_id, sku=sku), 2 * 1024 * 1024),
        props(StartCheckout.TYPE),
    )
    assert e.args[0] == 406 and "PRECONDITION_FAILED" in str(e.args[1]), e
    assert await status_of(sec_engine, order_id) is None


async def test_a_body_over_the_services_limit_is_dead_lettered(
    restricted: dict[str, Runtime],
    provisioned: Provisioned,
    sec_settings: Settings,
    sec_engine: AsyncEngine,
) -> None:
    order_id, sku = fresh("big")
    await seed(sec_engine, sku, 1)
    body = padded(checkout(order_id, sku=sku), 16 * 1024)
    assert len(body) > sec_settings.max_message_bytes
    p = props(StartCheckout.TYPE)
    await publish(
        provisioned.url("client"), topology.COMMANDS_EXCHANGE, topology.START_ROUTING_KEY, body, p
    )
    assert p.message_id is not None
    found = await fate(sec_engine, p.message_id)
    assert found[0] == "dead-lettered", describe(found)
    row = found[1]
    assert row.queue == PM_QUEUE
    assert f"exceeds limit of {sec_settings.max_message_bytes}" in row.error_message
    assert row.body == body
    assert await status_of(sec_engine, order_id) is None
    assert await available(sec_engine, sku) == 1


# -- 7. a participant's own failure routes -------------------------------------------------------


@pytest.mark.parametrize("route", ["retry", "dead-letter"])
async def test_a_participant_cannot_forge_a_command_through_its_own_failure_routes(
    restricted: dict[str, Runtime],
    provisioned: Provisioned,
    sec_engine: AsyncEngine,
    route: str,
) -> None:
    """The payment user may publish into its own delay queues (and its own DLQ, which the operator
    may replay). A copy there that claims to be a ``RefundPayment`` first sent by the process
    manager on ``sagabus.commands`` must not be believed: the consumer believes only bookkeeping
    that its own service key signed (``messaging.signing``), and the key is not in the broker."""
    order_id, _ = fresh("forge-retry")
    body = RefundPayment(order_id=order_id, amount_minor=100, currency="EUR")
    pm_user = user_of(provisioned, "process-manager")
    forged_headers: dict[str, Any] = {
        HeaderNames.ORIGINAL_EXCHANGE: topology.COMMANDS_EXCHANGE,
        HeaderNames.ORIGINAL_ROUTING_KEY: "payment.RefundPayment",
        HeaderNames.ORIGINAL_USER_ID: pm_user,
        HeaderNames.RETRY_COUNT: 1,
        HeaderNames.SIGNATURE: "0" * 64,
        HeaderNames.DEAD_LETTERED_BY: "broker",  # the collector's mark, claimed
    }
    p = props(
        body.TYPE,
        saga_id=saga_id_for_order(order_id),
        fence=9,
        user_id=user_of(provisioned, "payment"),
        headers=forged_headers,
    )
    spec = topology.QUEUES["payment"]
    consumer = restricted["payment"].consumers["payment"]
    before = consumer.counts["rejected_security"]
    if route == "retry":
        payload = body.model_dump_json().encode()
        await publish(
            provisioned.url("payment"),
            *topology.retry_route(spec, 1),
            payload,
            retry_props(p),
        )
    else:
        # into its own DLQ, as if it had dead-lettered the message; the operator then replays it
        payload = body.model_dump_json().encode()
        await publish(
            provisioned.url("payment"), *topology.dead_letter_route(spec.name), payload, p
        )
        assert p.message_id is not None

        async def stored() -> Any:
            found = await rows(sec_engine, deadletters.dead_letters, message_id=p.message_id)
            return found[0] if found else None

        row = await wait_for(stored, what="the forged copy collected")
        # the collector did not believe the claimed mark: only the broker's own dead letters
        assert row.headers.get(HeaderNames.DEAD_LETTERED_BY) != "broker"
        message, span = deadletters.replay_message(row, deadletters_tracer())
        span.end()
        connection = await aio_pika.connect(provisioned.url("operator"))
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(topology.REPLAY_EXCHANGE, ensure=False)
            await exchange.publish(message, routing_key=spec.name, mandatory=True)

    async def refused_as_forged() -> bool:
        return consumer.counts["rejected_security"] > before

    await wait_for(refused_as_forged, what="the forged copy refused as a security event")
    # no refund was ever made for the order
    assert await rows(sec_engine, payment.ledger, order_id=order_id) == []


def retry_props(p: pika.BasicProperties) -> pika.BasicProperties:
    """The same properties, expiring at once in the delay queue (back through the default
    exchange into the work queue, as a real retry comes back)."""
    p.expiration = "10"
    return p


def deadletters_tracer() -> Any:
    from messaging import telemetry

    return telemetry.tracer("test-operator")


async def test_a_forged_reply_with_the_genuine_replys_id_does_not_shadow_it(
    restricted: dict[str, Runtime], provisioned: Provisioned, sec_engine: AsyncEngine
) -> None:
    """Reply ids are derived, so whoever may publish a reply type can predict the id of the
    genuine reply. A token-less forgery sent first under that id is rejected, and must not leave
    the id claimed in the inbox: the genuine reply, arriving later, is applied."""
    order_id, sku = fresh("shadow")
    await seed(sec_engine, sku, 2)
    cmd = checkout(order_id, sku=sku)
    saga_id = saga_id_for_order(order_id)
    # the reply to AuthorizePayment
    genuine_id = derived_reply_id(saga_id, AUTHORIZATION_FENCE - 1, cmd)
    body = PaymentAuthorized(
        order_id=order_id, authorization_id="auth_x", amount_minor=cmd.amount_minor
    )
    async with paused(restricted["payment"], "payment"):
        await start(provisioned, cmd)
        s = await wait_state(sec_engine, order_id, "PENDING_PAYMENT")
        p = props(
            body.TYPE,
            saga_id=saga_id,
            fence=s["seq"],
            message_id=str(genuine_id),
            user_id=user_of(provisioned, "payment"),
        )
        await publish(
            provisioned.url("payment"),
            topology.REPLIES_EXCHANGE,
            body.TYPE,
            body.model_dump_json().encode(),
            p,
        )
        assert_rejected_for_token(await fate(sec_engine, str(genuine_id)))
    # payment answers for real, under the same id: applied, the saga completes
    s = await wait_state(sec_engine, order_id, *TERMINAL)
    assert s["state"] == "COMPLETED", _story(s)
    outcomes = [h.outcome for h in await history_of(sec_engine, str(genuine_id))]
    assert outcomes == ["rejected", "applied"], outcomes
