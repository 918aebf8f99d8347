"""Declaring the topology is idempotent, and it declares what the module docstring promises."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
import pytest_asyncio

from messaging import topology
from messaging.settings import Settings
from tests import support
from tests.support import mgmt_json, queue_depth, vhost_path

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def fresh(settings: Settings, uid: str) -> AsyncIterator[Settings]:
    """Settings pointing at a vhost of this test's own, with nothing declared and no consumers."""
    vhost = f"sagabus-test-topology-{uid}"
    support.create_vhost(vhost)
    yield settings.model_copy(update={"amqp_url": f"amqp://guest:guest@127.0.0.1:5672/{vhost}"})
    support.delete_vhost(vhost)


def _message() -> aio_pika.Message:
    return aio_pika.Message(b"{}", message_id=str(uuid.uuid4()), type="order.CreateOrder.v1")


async def test_declaring_twice_is_harmless_and_queues_keep_their_messages(fresh: Settings) -> None:
    connection = await aio_pika.connect_robust(fresh.amqp_url)
    async with connection:
        channel = await connection.channel()
        await topology.declare(channel, fresh)
        work, dead = _message(), _message()
        await support.publish(connection, topology.COMMANDS_EXCHANGE, "payment.CreateOrder", work)
        await support.publish(connection, topology.DEAD_LETTER_EXCHANGE, "sagabus.order", dead)

        await topology.declare(channel, fresh)
        await topology.declare_all(fresh)  # as every service and `sagabus migrate` do

        payment, order = topology.QUEUES["payment"], topology.QUEUES["order"]
        assert await queue_depth(connection, payment.name) == 1
        assert await queue_depth(connection, order.dlq) == 1
        check = await connection.channel()
        got = await (await check.get_queue(payment.name, ensure=False)).get(no_ack=True)
        assert got.message_id == work.message_id
        got = await (await check.get_queue(order.dlq, ensure=False)).get(no_ack=True)
        assert got.message_id == dead.message_id


async def test_declared_topology_matches_the_data(fresh: Settings) -> None:
    connection = await aio_pika.connect_robust(fresh.amqp_url)
    async with connection:
        await topology.declare(await connection.channel(), fresh)
    vhost = vhost_path(fresh.amqp_url.rsplit("/", 1)[1])

    exchanges = {e["name"]: e for e in mgmt_json(f"exchanges/{vhost}")}
    for name, kind in topology.EXCHANGES.items():
        assert exchanges[name]["type"] == kind.value
        assert exchanges[name]["durable"] is True

    queues = {q["name"]: q for q in mgmt_json(f"queues/{vhost}")}
    bindings = {
        (b["source"], b["destination"], b["routing_key"])
        for b in mgmt_json(f"bindings/{vhost}")
        if b["source"]
    }
    expected_names: set[str] = set()
    expected_bindings: set[tuple[str, str, str]] = set()
    for spec in topology.QUEUES.values():
        work = queues[spec.name]
        assert work["arguments"] == topology.work_queue_arguments(spec, fresh)
        assert queues[spec.dlq]["arguments"]["x-queue-type"] == "quorum"
        # consumers and the broker dead-letter to the DLQ, consumers retry to the delay queues,
        # replays go back to the work queue: each by a routing key that starts with its name
        assert (topology.DEAD_LETTER_EXCHANGE, spec.dlq, spec.name) in bindings
        assert (topology.BROKER_DEAD_LETTER_EXCHANGE, spec.dlq, spec.name) in bindings
        assert (topology.REPLAY_EXCHANGE, spec.name, spec.name) in bindings
        for exchange, key in spec.bindings:
            assert (exchange, spec.name, key) in bindings
        for name in spec.retry_queues:
            retry = queues[name]["arguments"]
            assert retry["x-dead-letter-exchange"] == ""
            assert retry["x-dead-letter-routing-key"] == spec.name
            assert (topology.RETRY_EXCHANGE, name, name) in bindings
        expected_names |= {spec.name, spec.dlq, *spec.retry_queues}
        expected_bindings |= set(spec.all_bindings())
    assert set(queues) == expected_names
    assert bindings == expected_bindings
