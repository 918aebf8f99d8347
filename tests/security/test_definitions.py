"""The definitions file ``sagabus provision --definitions`` writes (and docker-compose loads at
boot): RabbitMQ accepts it, its password hashes log in, its permissions hold, its topology is
exactly what ``topology.declare`` declares, and the committed compose file is up to date."""

from __future__ import annotations

import json
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
from click.testing import CliRunner

from messaging import topology
from messaging.settings import Settings
from process_manager import provision
from tests import support
from tests.security.conftest import ADMIN_URL, AMQP_BASE, delete_users

pytestmark = pytest.mark.integration

COMPOSE_DEFINITIONS = Path(__file__).parents[2] / "deploy" / "rabbitmq" / "definitions.json"


def _amqp(vhost: str, user: str | None = None, password: str | None = None) -> str:
    base = AMQP_BASE.rstrip("/")
    if user is not None:
        scheme, rest = base.split("://", 1)
        base = f"{scheme}://{user}:{password}@{rest.split('@', 1)[-1]}"
    return f"{base}/{support.vhost_path(vhost)}"


@pytest.fixture
def scratch() -> Iterator[tuple[str, str]]:
    """A vhost name and a user prefix, both removed afterwards."""
    sid = uuid.uuid4().hex[:8]
    vhost, prefix = f"sagabus-defs-{sid}", f"sagabus-defs-{sid}-"
    yield vhost, prefix
    support.delete_vhost(vhost)
    delete_users(prefix)


def _objects(doc: dict[str, Any]) -> dict[str, Any]:
    """Exchanges, queues and bindings, comparable (the vhost and list order dropped)."""

    def norm(items: list[dict[str, Any]], keys: tuple[str, ...]) -> list[str]:
        return sorted(json.dumps({k: i[k] for k in keys}, sort_keys=True) for i in items)

    return {
        "exchanges": norm(
            [e for e in doc["exchanges"] if not e["name"].startswith("amq.")],
            ("name", "type", "durable", "auto_delete", "internal", "arguments"),
        ),
        "queues": norm(doc["queues"], ("name", "durable", "auto_delete", "arguments")),
        "bindings": norm(
            doc["bindings"],
            ("source", "destination", "destination_type", "routing_key", "arguments"),
        ),
    }


async def test_definitions_topology_is_what_topology_declare_declares(
    scratch: tuple[str, str],
) -> None:
    vhost, _ = scratch
    support.create_vhost(vhost)
    settings = Settings(amqp_url=_amqp(vhost))
    await topology.declare_all(settings)
    exported = provision.Management(ADMIN_URL).call(
        "GET", f"definitions/{support.vhost_path(vhost)}"
    )
    assert _objects(provision.topology_definitions(settings, vhost)) == _objects(exported)


def test_a_broker_loading_the_definitions_enforces_them(
    scratch: tuple[str, str], tmp_path: Path
) -> None:
    vhost, prefix = scratch
    path = tmp_path / "definitions.json"
    result = CliRunner().invoke(
        provision.command,
        [
            "--no-apply",
            "--vhost",
            vhost,
            "--user-prefix",
            prefix,
            "--definitions",
            str(path),
            "--definitions-admin",
            f"{prefix}admin:admin-pw",
            "--output",
            str(tmp_path / "amqp.env"),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert path.stat().st_mode & 0o777 == 0o600  # random passwords: the hashes stay private
    doc = json.loads(path.read_text())
    passwords = provision.read_env_file(tmp_path / "amqp.env")
    assert set(passwords) == {f"{prefix}{p}" for p in provision.GRANTS}

    # what a node does with load_definitions at boot, through the management API
    provision.Management(ADMIN_URL).call("POST", "definitions", doc)

    def connect(user: str, password: str) -> pika.BlockingConnection:
        return pika.BlockingConnection(pika.URLParameters(_amqp(vhost, user, password)))

    admin = connect(f"{prefix}admin", "admin-pw")
    admin.channel().queue_declare("sagabus.scratch", durable=True)  # an administrator
    admin.close()
    user = f"{prefix}payment"
    payment = connect(user, passwords[user])
    payment.channel().basic_get(topology.QUEUES["payment"].name)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        payment.channel().basic_get(topology.QUEUES["inventory"].name)
    assert refused.value.reply_text.startswith("ACCESS_REFUSED")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        payment.channel().queue_declare("sagabus.scratch-2")
    assert refused.value.reply_text.startswith("ACCESS_REFUSED")
    payment.close()
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        connect(user, "not-the-password")


def test_password_hash_is_rabbitmqs_salted_sha256() -> None:
    import base64
    import hashlib

    salt = b"\x90\x8d\xc6\x0a"
    raw = base64.b64decode(provision.password_hash("test12", salt))
    assert raw[:4] == salt and raw[4:] == hashlib.sha256(salt + b"test12").digest()
    assert provision.password_hash("x") != provision.password_hash("x")  # random salts


def test_compose_definitions_are_generated_and_current() -> None:
    """deploy/rabbitmq/definitions.json is this command's output with the demo passwords;
    regenerate it (see deploy/rabbitmq/README.md) when the topology or the model changes."""
    committed = json.loads(COMPOSE_DEFINITIONS.read_text())
    settings = Settings(delivery_limit=Settings.model_fields["delivery_limit"].default)
    known = {f"sagabus-{p}": provision.demo_password(p) for p in provision.GRANTS}
    accounts = provision.plan(known=known)
    expected = provision.definitions(
        accounts, settings, vhost="/", admin=("sagabus", "sagabus"), fixed_salts=True
    )
    assert committed == expected


def test_compose_runs_each_service_as_its_own_user() -> None:
    yaml = pytest.importorskip("yaml")
    root = COMPOSE_DEFINITIONS.parents[2]
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]
    users = {u["name"] for u in json.loads(COMPOSE_DEFINITIONS.read_text())["users"]}
    ran = set()
    for name, spec in compose.items():
        command = spec.get("command") or []
        env = spec.get("environment") or {}
        if command[:1] == ["run"]:
            (service,) = command[1:]
            url = urllib.parse.urlsplit(env["SAGABUS_AMQP_URL"])
            assert url.username == f"sagabus-{service}", name
            assert url.password == provision.demo_password(service), name
            assert env["SAGABUS_DECLARE_TOPOLOGY"] == "false", name
            ran.add(service)
        elif command == ["migrate"]:
            assert urllib.parse.urlsplit(env["SAGABUS_AMQP_URL"]).username == "sagabus"
    assert ran == set(provision.GRANTS) - {"client", "operator"}
    assert {f"sagabus-{s}" for s in ran} | {"sagabus"} <= users
    mounts = compose["rabbitmq"]["volumes"]
    assert "./deploy/rabbitmq/definitions.json:/etc/rabbitmq/definitions.json:ro" in mounts
    conf = (root / "deploy" / "rabbitmq" / "rabbitmq.conf").read_text()
    assert "\nload_definitions = /etc/rabbitmq/definitions.json\n" in conf
