"""The permission model of ``messaging/provision/broker.py`` against the wire contract: every
message a service sends is allowed for it, and for nobody who does not send it. (RabbitMQ's
regexes are PCRE; these are plain enough that Python's ``re`` reads them the same way.)"""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from messaging import topology
from messaging.provision import broker as provision
from messaging.provision.broker import GRANTS, NOTHING, PARTICIPANTS
from schemas.registry import REGISTRY

pytestmark = pytest.mark.unit

REPLIES = sorted(t for t, m in REGISTRY.items() if m.KIND in ("reply", "fact"))
COMMANDS = sorted(
    t
    for t, m in REGISTRY.items()
    if m.KIND == "command" and t.split(".")[0] not in topology.SAGA_TYPES
)
#: every queue in the topology
QUEUES = [
    name for spec in topology.QUEUES.values() for name in (spec.name, spec.dlq, *spec.retry_queues)
]
EXCHANGES = [*topology.EXCHANGES, provision.DEFAULT_EXCHANGE]
#: every binding of the topology: (exchange, queue, routing key)
BINDINGS = [b for spec in topology.QUEUES.values() for b in spec.all_bindings()]
#: the exchanges a failed message travels through, and the default exchange
FAILURE_EXCHANGES = (
    topology.RETRY_EXCHANGE,
    topology.DEAD_LETTER_EXCHANGE,
    topology.BROKER_DEAD_LETTER_EXCHANGE,
    topology.REPLAY_EXCHANGE,
)


def may_publish(principal: str, exchange: str, key: str) -> bool:
    grant = GRANTS[principal]
    resource = exchange or provision.DEFAULT_EXCHANGE
    if not re.search(grant.write, resource):
        return False
    topics = [t for t in grant.topics if t.exchange == exchange]
    # RabbitMQ: no topic permission for an exchange means every routing key
    return all(re.search(t.write, key) for t in topics)


def test_the_participants_are_the_services_that_take_commands() -> None:
    assert sorted(PARTICIPANTS) == ["inventory", "order", "payment", "risk", "shipping"]


@pytest.mark.parametrize("type_name", REPLIES)
def test_only_the_sender_may_publish_a_reply(type_name: str) -> None:
    exchange, key = topology.reply_route(type_name)
    sender = type_name.split(".")[0]
    allowed = {p for p in GRANTS if may_publish(p, exchange, key)}
    assert allowed == {sender}


@pytest.mark.parametrize("type_name", COMMANDS)
def test_only_the_process_manager_may_send_a_command(type_name: str) -> None:
    participant = type_name.split(".")[0]
    exchange, key = topology.command_route(participant, type_name)
    allowed = {p for p in GRANTS if may_publish(p, exchange, key)}
    assert allowed == {"process-manager"}


def test_process_manager_may_not_command_a_participant_that_does_not_exist() -> None:
    assert not may_publish("process-manager", topology.COMMANDS_EXCHANGE, "billing.Charge")
    assert not may_publish("process-manager", topology.COMMANDS_EXCHANGE, "orderx.Create")


@pytest.mark.parametrize("saga", topology.SAGA_TYPES)
def test_only_clients_start_sagas(saga: str) -> None:
    exchange, key = topology.COMMANDS_EXCHANGE, topology.start_routing_key(saga)
    assert {p for p in GRANTS if may_publish(p, exchange, key)} == {"client", "operator"}


def test_every_saga_type_has_a_start_route() -> None:
    assert topology.SAGA_TYPES == ("checkout", "returns")
    assert topology.START_ROUTING_KEYS == {"checkout.start", "returns.start"}


def test_only_order_publishes_facts() -> None:
    exchange, key = topology.fact_route("order.OrderCompleted.v1")
    assert {p for p in GRANTS if may_publish(p, exchange, key)} == {"order"}


@pytest.mark.parametrize("service", topology.SERVICES)
def test_only_a_consumer_may_dead_letter_and_retry_its_own_messages(service: str) -> None:
    spec = topology.QUEUES[service]
    routes = [
        topology.dead_letter_route(spec.name),
        *(topology.retry_route(spec, t) for t in range(1, topology.RETRY_TIERS + 1)),
    ]
    for exchange, key in routes:
        assert {p for p in GRANTS if may_publish(p, exchange, key)} == {service}, key


def test_only_the_operator_may_replay_and_only_into_work_queues() -> None:
    for spec in topology.QUEUES.values():
        exchange, key = topology.replay_route(spec.name)
        assert {p for p in GRANTS if may_publish(p, exchange, key)} == {"operator"}
        for other in (spec.dlq, *spec.retry_queues):
            assert not may_publish("operator", exchange, other)


@pytest.mark.parametrize("principal", sorted(GRANTS))
def test_nobody_may_write_to_an_exchange_that_routes_by_queue_name_unchecked(
    principal: str,
) -> None:
    """The default exchange and the broker's direct dead-letter exchange take no topic
    permissions: writing to either would reach any queue (or any DLQ) by name."""
    grant = GRANTS[principal]
    for exchange in (provision.DEFAULT_EXCHANGE, topology.BROKER_DEAD_LETTER_EXCHANGE):
        assert not re.search(grant.write, exchange), exchange


@pytest.mark.parametrize("principal", sorted(GRANTS))
def test_failure_routes_reach_only_the_principals_own_queues(principal: str) -> None:
    """Every queue a principal can put a message into through a retry, dead-letter or replay
    route (the binding keys there are literal, so a key that matches routes to that queue)."""
    reachable = {
        queue
        for exchange, queue, key in BINDINGS
        if exchange in FAILURE_EXCHANGES and may_publish(principal, exchange, key)
    }
    if principal in topology.QUEUES:
        spec = topology.QUEUES[principal]
        assert reachable == {spec.dlq, *spec.retry_queues}
    elif principal == "operator":
        assert reachable == {spec.name for spec in topology.QUEUES.values()}
    else:
        assert reachable == set()


@pytest.mark.parametrize("principal", sorted(GRANTS))
def test_each_principal_reads_exactly_its_queues(principal: str) -> None:
    grant = GRANTS[principal]
    readable = sorted(q for q in QUEUES if re.search(grant.read, q))
    assert readable == sorted(grant.consumes)
    expected = (
        [topology.QUEUES[principal].name]
        if principal in topology.QUEUES
        else sorted(s.dlq for s in topology.QUEUES.values())
        if principal == "dead-letters"
        else []
    )
    assert readable == expected


@pytest.mark.parametrize("principal", sorted(GRANTS))
def test_nobody_may_configure_anything(principal: str) -> None:
    grant = GRANTS[principal]
    assert grant.configure == NOTHING
    assert not any(re.search(grant.configure, r) for r in [*QUEUES, *EXCHANGES])


@pytest.mark.parametrize("principal", sorted(GRANTS))
def test_write_names_only_the_exchanges_it_publishes_to(principal: str) -> None:
    grant = GRANTS[principal]
    writable = {e for e in EXCHANGES if re.search(grant.write, e)}
    published = {e or provision.DEFAULT_EXCHANGE for e in grant.publishes}
    assert writable == published
    # a queue name is never an exchange name, so write on queues grants nothing extra, but
    # the regexes should not match one either
    assert not any(re.search(grant.write, q) for q in QUEUES)


def test_topic_permissions_cover_every_topic_exchange_a_service_writes_to() -> None:
    """Without a topic permission RabbitMQ allows every routing key, so each writer of a topic
    exchange other than ``checkout.start`` publishers must have one."""
    topic_exchanges = {n for n, k in topology.EXCHANGES.items() if k.value == "topic"}
    for grant in GRANTS.values():
        for exchange in topic_exchanges & set(grant.publishes):
            assert exchange in {t.exchange for t in grant.topics}, (grant.principal, exchange)


def test_plan_keeps_known_passwords_and_existing_users() -> None:
    known = {"sagabus-payment": "pw"}
    accounts = {
        a.grant.principal: a
        for a in provision.plan(known=known, existing=["sagabus-payment", "sagabus-order"])
    }
    assert (accounts["payment"].password, accounts["payment"].action) == ("pw", "updated")
    assert (accounts["order"].password, accounts["order"].action) == (None, "kept")
    assert accounts["shipping"].action == "created"
    assert len(accounts["shipping"].password or "") >= 24
    rotated = provision.plan(known=known, existing=["sagabus-payment"], rotate=True)
    assert all(a.password not in (None, "pw") for a in rotated)


def test_env_file_round_trips_and_is_private(tmp_path: Path) -> None:
    accounts = provision.plan(user_prefix="p-")
    accounts[0].password = "we:ird/@pw%"
    path = tmp_path / "amqp.env"
    provision.write_secret_file(path, provision.env_file_text(accounts, "h:5672", "v/x"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert provision.read_env_file(path) == {a.user: a.password for a in accounts}
    assert "@h:5672/v%2Fx\n" in path.read_text()


def test_amqp_url_of_the_default_vhost() -> None:
    account = provision.plan(known={"sagabus-payment": "pw"}, principals=["payment"])[0]
    assert account.amqp_url("rabbitmq:5672", "/") == "amqp://sagabus-payment:pw@rabbitmq:5672/"
