"""Real connections with the users ``sagabus provision`` made: each may consume only its own
queue and publish only to its own exchanges and routing keys; RabbitMQ refuses the rest with
ACCESS_REFUSED and closes the channel.

These use pika's blocking client: what is checked is the broker, and pika reports a refusal
without leaving an unretrieved future behind (aiormq does, and its garbage collection at the
wrong moment trips a CPython 3.11.7 bug in pytest's assertion rewriting)."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.exceptions
import pytest

from messaging import topology
from messaging.management import Management
from messaging.provision import broker as provision
from tests import support
from tests.security.conftest import ADMIN_URL, Provisioned, run_provision

pytestmark = pytest.mark.integration

Channel = Any  # pika.adapters.blocking_connection.BlockingChannel


@pytest.fixture
def channel_as(provisioned: Provisioned) -> Iterator[Callable[[str], Channel]]:
    """A fresh confirm-mode channel, on a connection as ``principal``'s own user."""
    connections: dict[str, pika.BlockingConnection] = {}

    def open_channel(principal: str) -> Channel:
        connection = connections.get(principal)
        if connection is None or connection.is_closed:
            params = pika.URLParameters(provisioned.url(principal))
            connection = connections[principal] = pika.BlockingConnection(params)
        channel = connection.channel()
        channel.confirm_delivery()
        return channel

    yield open_channel
    for c in connections.values():
        if c.is_open:
            c.close()


def publish(channel: Channel, exchange: str, key: str) -> None:
    """With confirms: returns once the broker has taken it, raises if it refuses."""
    channel.basic_publish(
        exchange,
        key,
        b"{}",
        pika.BasicProperties(message_id=str(uuid.uuid4()), type="x.Probe.v1"),
    )


def consume(channel: Channel, queue: str) -> None:
    tag = channel.basic_consume(queue, lambda *_: None)
    channel.basic_cancel(tag)


def basic_get(channel: Channel, queue: str) -> None:
    method, _, _ = channel.basic_get(queue)
    if method is not None:
        channel.basic_nack(method.delivery_tag, requeue=True)


def purge(provisioned: Provisioned, *queues: str) -> None:
    """Empty ``queues`` as the admin."""
    connection = pika.BlockingConnection(pika.URLParameters(provisioned.admin_url))
    try:
        channel = connection.channel()
        for q in queues:
            channel.queue_purge(q)
    finally:
        connection.close()


def refused(action: Callable[[], None], *what: str) -> None:
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        action()
    assert e.value.reply_code == 403
    assert e.value.reply_text.startswith("ACCESS_REFUSED"), e.value.reply_text
    for w in what:
        assert w in e.value.reply_text


def test_payment_cannot_consume_or_get_from_inventorys_queue(channel_as: Any) -> None:
    queue = topology.QUEUES["inventory"].name
    refused(lambda: consume(channel_as("payment"), queue), f"queue '{queue}'")
    refused(lambda: basic_get(channel_as("payment"), queue), f"queue '{queue}'")
    # nor another service's dead letters; nor even its own delay queues (they only expire)
    for other in (topology.QUEUES["inventory"].dlq, topology.QUEUES["payment"].retry_queue(1)):
        refused(functools.partial(basic_get, channel_as("payment"), other), f"queue '{other}'")


def test_a_passive_declare_needs_no_permission(channel_as: Any) -> None:
    """Which is why the tests above consume and get: a passive declare proves nothing."""
    channel_as("payment").queue_declare(topology.QUEUES["inventory"].name, passive=True)


def test_payment_cannot_publish_another_services_command(channel_as: Any) -> None:
    refused(
        lambda: publish(
            channel_as("payment"), topology.COMMANDS_EXCHANGE, "inventory.ReserveInventory"
        ),
        f"exchange '{topology.COMMANDS_EXCHANGE}'",
    )
    # not even its own commands, nor a saga start: only the process manager commands
    for key in ("payment.CapturePayment", topology.START_ROUTING_KEY):
        refused(functools.partial(publish, channel_as("payment"), topology.COMMANDS_EXCHANGE, key))


def test_payment_cannot_reply_as_another_participant(channel_as: Any) -> None:
    key = "inventory.InventoryReserved.v1"
    refused(
        lambda: publish(channel_as("payment"), topology.REPLIES_EXCHANGE, key),
        f"topic '{key}'",
        f"exchange '{topology.REPLIES_EXCHANGE}'",
    )


def test_payment_can_do_its_own_work(provisioned: Provisioned, channel_as: Any) -> None:
    spec = topology.QUEUES["payment"]
    channel = channel_as("payment")
    channel.basic_qos(prefetch_count=4)  # the consumer sets qos: no permission needed
    consume(channel, spec.name)
    basic_get(channel, spec.name)
    # a reply, a retry into each delay tier and a dead letter: what its relay and consumer publish
    publish(channel, topology.REPLIES_EXCHANGE, "payment.PaymentAuthorized.v1")
    # only its own reply types' keys, not any key that starts with its name
    refused(lambda: publish(channel_as("payment"), topology.REPLIES_EXCHANGE, "payment.Probe.v1"))
    for tier in range(1, topology.RETRY_TIERS + 1):
        publish(channel, *topology.retry_route(spec, tier))
    publish(channel, *topology.dead_letter_route(spec.name))
    purge(provisioned, *spec.retry_queues, spec.dlq)  # the probes are not for the collector


def test_payment_cannot_retry_or_dead_letter_into_another_services_queues(
    channel_as: Any,
) -> None:
    """The retry and dead-letter exchanges are topic exchanges: payment's topic permissions
    there match only its own queue's keys."""
    inventory = topology.QUEUES["inventory"]
    for tier in range(1, topology.RETRY_TIERS + 1):
        exchange, key = topology.retry_route(inventory, tier)
        refused(
            functools.partial(publish, channel_as("payment"), exchange, key),
            f"topic '{key}'",
            f"exchange '{exchange}'",
        )
    exchange, key = topology.dead_letter_route(inventory.name)
    refused(
        functools.partial(publish, channel_as("payment"), exchange, key),
        f"topic '{key}'",
        f"exchange '{exchange}'",
    )
    # nor a key of its own name with something after it, nor a wildcard
    payment = topology.QUEUES["payment"]
    for exchange, key in (
        (topology.RETRY_EXCHANGE, f"{payment.retry_queue(1)}.x"),
        (topology.RETRY_EXCHANGE, "#"),
        (topology.DEAD_LETTER_EXCHANGE, f"{payment.name}.x"),
        (topology.DEAD_LETTER_EXCHANGE, payment.dlq),
    ):
        refused(functools.partial(publish, channel_as("payment"), exchange, key), f"'{key}'")


@pytest.mark.parametrize("principal", sorted(provision.GRANTS))
def test_nobody_may_publish_to_the_default_exchange(channel_as: Any, principal: str) -> None:
    """The default exchange routes to any queue by name and takes no topic permission: no
    principal may write to it, nor to the direct exchange only the broker dead-letters through."""
    target = topology.QUEUES["inventory"].retry_queue(4)
    refused(lambda: publish(channel_as(principal), "", target), "exchange 'amq.default'")
    refused(
        lambda: publish(
            channel_as(principal), topology.BROKER_DEAD_LETTER_EXCHANGE, "sagabus.inventory"
        ),
        f"exchange '{topology.BROKER_DEAD_LETTER_EXCHANGE}'",
    )


def test_operator_replays_into_work_queues_only(provisioned: Provisioned, channel_as: Any) -> None:
    inventory = topology.QUEUES["inventory"]
    publish(channel_as("operator"), *topology.replay_route(inventory.name))
    purge(provisioned, inventory.name)
    exchange = topology.REPLAY_EXCHANGE
    for key in (inventory.dlq, inventory.retry_queue(1), "#"):
        refused(functools.partial(publish, channel_as("operator"), exchange, key), f"'{key}'")
    for principal in ("payment", "client", "dead-letters"):
        refused(
            functools.partial(publish, channel_as(principal), exchange, inventory.name),
            f"exchange '{exchange}'",
        )


def test_process_manager_commands_participants_and_nothing_else(channel_as: Any) -> None:
    # exactly the command routes of the topology's table, nothing else of the participants'
    for route in topology.publishes("process-manager"):
        publish(channel_as("process-manager"), route.exchange, route.routing_key)
    for participant in provision.PARTICIPANTS:
        refused(
            functools.partial(
                publish,
                channel_as("process-manager"),
                topology.COMMANDS_EXCHANGE,
                f"{participant}.Probe",
            )
        )
    refused(
        lambda: publish(
            channel_as("process-manager"), topology.FACTS_EXCHANGE, "order.OrderCompleted.v1"
        ),
        f"exchange '{topology.FACTS_EXCHANGE}'",
    )
    refused(
        lambda: publish(
            channel_as("process-manager"),
            topology.REPLIES_EXCHANGE,
            "payment.PaymentAuthorized.v1",
        )
    )
    refused(
        lambda: publish(
            channel_as("process-manager"), topology.COMMANDS_EXCHANGE, topology.START_ROUTING_KEY
        )
    )


def test_only_order_publishes_facts(channel_as: Any) -> None:
    publish(channel_as("order"), topology.FACTS_EXCHANGE, "order.Probe.v1")
    for principal in ("payment", "notification", "analytics", "dead-letters", "client"):
        refused(functools.partial(publish, channel_as(principal), topology.FACTS_EXCHANGE, "x"))


def test_client_may_only_start_sagas(channel_as: Any) -> None:
    publish(channel_as("client"), topology.COMMANDS_EXCHANGE, topology.START_ROUTING_KEY)
    refused(
        lambda: publish(channel_as("client"), topology.COMMANDS_EXCHANGE, "payment.RefundPayment")
    )
    refused(lambda: publish(channel_as("client"), "", topology.QUEUES["payment"].name))
    refused(lambda: basic_get(channel_as("client"), topology.QUEUES["process-manager"].name))


def test_dead_letter_collector_reads_dlqs_only(channel_as: Any) -> None:
    for spec in topology.QUEUES.values():
        basic_get(channel_as("dead-letters"), spec.dlq)
    refused(lambda: basic_get(channel_as("dead-letters"), topology.QUEUES["payment"].name))
    refused(lambda: publish(channel_as("dead-letters"), "", topology.QUEUES["payment"].name))


@pytest.mark.parametrize("principal", sorted(provision.GRANTS))
def test_no_principal_can_declare_bind_or_delete(channel_as: Any, principal: str) -> None:
    queue = topology.QUEUES["payment"].name
    refused(lambda: channel_as(principal).queue_declare(f"sagabus.{principal}.rogue"))
    refused(lambda: channel_as(principal).queue_delete(queue))
    refused(lambda: channel_as(principal).queue_bind(queue, topology.FACTS_EXCHANGE))
    refused(
        lambda: channel_as(principal).exchange_declare(
            topology.FACTS_EXCHANGE, "fanout", durable=True
        )
    )


def test_provision_again_changes_nothing(provisioned: Provisioned, channel_as: Any) -> None:
    mgmt = Management(ADMIN_URL)
    v = support.vhost_path(provisioned.vhost)

    def state() -> tuple[Any, ...]:
        return (
            sorted(
                (p["user"], p["configure"], p["write"], p["read"])
                for p in mgmt.call("GET", f"vhosts/{v}/permissions")
            ),
            sorted(
                (p["user"], p["exchange"], p["write"], p["read"])
                for p in mgmt.call("GET", f"vhosts/{v}/topic-permissions")
            ),
            sorted(
                (q["name"], sorted(q["arguments"].items())) for q in mgmt.call("GET", f"queues/{v}")
            ),
            sorted(
                (b["source"], b["destination"], b["routing_key"])
                for b in mgmt.call("GET", f"bindings/{v}")
            ),
        )

    before = state()
    env_before = provisioned.env_file.read_text()
    connected = channel_as("payment")  # connected before: keeps working
    out: Any = run_provision(
        "--vhost", provisioned.vhost, "--user-prefix", provisioned.user_prefix,
        "--admin-url", ADMIN_URL, "--output", str(provisioned.env_file),
    )  # fmt: skip
    assert state() == before
    assert provisioned.env_file.read_text() == env_before  # same passwords, kept from the file
    assert provisioned.env_file.stat().st_mode & 0o777 == 0o600
    assert {u["password"] for u in out["users"]} == {"updated"}
    assert all("amqp_url" not in u for u in out["users"])  # credentials went to the file only
    consume(connected, topology.QUEUES["payment"].name)
    fresh = pika.BlockingConnection(pika.URLParameters(provisioned.url("payment")))  # new login
    fresh.close()
