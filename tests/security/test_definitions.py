"""The definitions file ``sagabus provision --definitions`` writes (for brokers that load
definitions at boot): RabbitMQ accepts it, its password hashes log in, its permissions hold, and
its topology is exactly what ``topology.declare`` declares.

And docker-compose.yml, read as data: no password is written in it (every one is a required
``${VAR:?...}`` reference to .env), every published port is bound to 127.0.0.1, the broker loads
no definitions, the one-shot ``provision`` job creates every broker user with its password from
the environment, and every service connects as its own broker user and database role."""

from __future__ import annotations

import json
import re
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
from click.testing import CliRunner

from cli.provision import provision as provision_command
from messaging import topology
from messaging.management import Management
from messaging.provision import broker as provision
from messaging.provision import database as provision_db
from messaging.settings import Settings
from tests import support
from tests.security.conftest import ADMIN_URL, AMQP_BASE, delete_users

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "docker-compose.yml"
RABBITMQ_CONF = ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf"
ENV_EXAMPLE = ROOT / ".env.example"
#: a variable compose refuses to start without: ${VAR:?message}
REQUIRED = re.compile(r"\$\{([A-Z][A-Z0-9_]*):\?[^}]*\}")


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
    exported = Management(ADMIN_URL).call("GET", f"definitions/{support.vhost_path(vhost)}")
    assert _objects(provision.topology_definitions(settings, vhost)) == _objects(exported)


def test_a_broker_loading_the_definitions_enforces_them(
    scratch: tuple[str, str], tmp_path: Path
) -> None:
    vhost, prefix = scratch
    path = tmp_path / "definitions.json"
    result = CliRunner().invoke(
        provision_command,
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
    Management(ADMIN_URL).call("POST", "definitions", doc)

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


# -- docker-compose.yml ------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def _environment(spec: dict[str, Any]) -> dict[str, str]:
    env = spec.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE form
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _interpolated(value: str) -> str:
    """The value with each required variable ${VAR:?...} replaced by <VAR>; anything else
    (a literal, ${VAR}, ${VAR:-default}, $VAR) stays as it is."""
    return REQUIRED.sub(lambda m: f"<{m.group(1)}>", value)


def _ref(var: str) -> str:
    """What a required reference to ``var`` becomes in ``_interpolated``."""
    return f"<{var}>"


def _url(value: str) -> urllib.parse.SplitResult:
    return urllib.parse.urlsplit(_interpolated(value))


def _admin_user() -> str:
    return _environment(_compose()["rabbitmq"])["RABBITMQ_DEFAULT_USER"]


def _depends_on(spec: dict[str, Any]) -> dict[str, Any]:
    deps = spec.get("depends_on") or {}
    return {d: {} for d in deps} if isinstance(deps, list) else dict(deps)


def test_compose_holds_no_password_literal() -> None:
    """Every password-bearing value is a required reference to a variable of .env: a password
    variable is one, and every URL with credentials has one (and only one) as its password."""
    text = COMPOSE.read_text()
    for literal in ("-secret", "sagabus:sagabus", "guest:guest", "--demo-passwords"):
        assert literal not in text
    checked = 0
    for name, spec in _compose().items():
        for key, value in _environment(spec).items():
            if "PASS" in key:
                assert REQUIRED.fullmatch(value), f"{name}: {key}={value}"
                checked += 1
            if "://" in value:
                password = _url(value).password
                if password is not None:
                    assert re.fullmatch(r"<[A-Z][A-Z0-9_]*>", password), f"{name}: {key}"
                    checked += 1
        # nothing secret on a command line (others can see it in the process list)
        for arg in [
            *(spec.get("command") or []),
            *((spec.get("healthcheck") or {}).get("test") or []),
        ]:
            assert "${" not in str(arg), f"{name}: {arg}"
            if "://" in str(arg):
                assert _url(str(arg)).password is None, f"{name}: {arg}"
    assert checked >= 30  # 10 broker + 9 database passwords, and the URLs that use them


def test_compose_publishes_ports_on_127_0_0_1_only() -> None:
    published = 0
    for name, spec in _compose().items():
        assert spec.get("network_mode") != "host", name
        for port in spec.get("ports") or []:
            if isinstance(port, dict):  # the long syntax
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"
            published += 1
    assert published == 6  # 5672, 15672, 5432, 16686, 4317, 4318


def test_compose_broker_loads_no_definitions() -> None:
    """The administrator comes from the environment, and the broker no longer imports a file of
    users with fixed password hashes at boot; rabbitmq.conf keeps its other settings."""
    rabbitmq = _compose()["rabbitmq"]
    env = _environment(rabbitmq)
    assert env["RABBITMQ_DEFAULT_USER"] == "sagabus"
    assert _interpolated(env["RABBITMQ_DEFAULT_PASS"]) == _ref("RABBITMQ_ADMIN_PASSWORD")
    mounts = rabbitmq["volumes"]
    assert "./deploy/rabbitmq/rabbitmq.conf:/etc/rabbitmq/rabbitmq.conf:ro" in mounts
    assert not [m for m in mounts if "definitions" in m]
    settings = [
        line.split("=", 1)[0].strip()
        for line in RABBITMQ_CONF.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert "load_definitions" not in settings
    assert "\nmax_message_size = 1048576\n" in RABBITMQ_CONF.read_text()
    assert "\nconsumer_timeout = 1800000\n" in RABBITMQ_CONF.read_text()


def test_compose_provision_job_creates_every_broker_user_from_the_environment() -> None:
    compose = _compose()
    job = compose["provision"]
    command = job["command"]
    assert command[0] == "provision"
    assert "--amqp-host=rabbitmq:5672" in command
    for absent in ("--admin-url", "--demo-passwords", "--no-topology", "--no-apply"):
        assert not [a for a in command if a.split("=")[0] == absent], absent
    env = _environment(job)
    admin = _url(env["SAGABUS_RABBITMQ_ADMIN_URL"])
    assert (admin.scheme, admin.hostname, admin.port) == ("http", "rabbitmq", 15672)
    assert admin.username == _admin_user()
    assert admin.password == _ref("RABBITMQ_ADMIN_PASSWORD")
    given = {k for k in env if k.startswith(provision.PASSWORD_ENV_PREFIX)}
    assert given == {provision.password_env_key(p) for p in provision.GRANTS}
    for key in given:  # each one passed through from .env, under its own name
        assert _interpolated(env[key]) == _ref(key), key
    assert _depends_on(job)["migrate"]["condition"] == "service_completed_successfully"
    assert job["restart"] == "no"


def test_compose_runs_each_service_as_its_own_user() -> None:
    """Each service connects as its own broker user and database role, with the password the
    provision job sets for that user (the same variable of .env), after that job succeeded."""
    compose = _compose()
    ran = set()
    for name, spec in compose.items():
        command = spec.get("command") or []
        env = _environment(spec)
        if command[:1] == ["run"]:
            (service,) = command[1:]
            principal = service
            assert env["SAGABUS_DECLARE_TOPOLOGY"] == "false", name
            ran.add(service)
        elif name == "cli":
            principal = "operator"
        elif command == ["migrate"]:
            amqp = _url(env["SAGABUS_AMQP_URL"])
            assert amqp.username == _admin_user()
            assert amqp.password == _ref("RABBITMQ_ADMIN_PASSWORD")
            continue
        else:
            assert "SAGABUS_AMQP_URL" not in env, name
            continue
        amqp = _url(env["SAGABUS_AMQP_URL"])
        assert amqp.username == f"{provision.DEFAULT_USER_PREFIX}{principal}", name
        assert amqp.password == _ref(provision.password_env_key(principal)), name
        assert (amqp.hostname, amqp.port) == ("rabbitmq", 5672), name
        database = _url(env["SAGABUS_DATABASE_URL"])
        assert database.username == provision_db.role_name(principal, "sagabus_"), name
        assert database.password == _ref(provision_db.password_env_key(principal)), name
        depends = _depends_on(spec)
        assert depends["provision"]["condition"] == "service_completed_successfully", name
    assert ran == set(provision.GRANTS) - {"client", "operator"}


def test_env_example_names_every_variable_compose_requires() -> None:
    code = [line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#")]
    required = set(REQUIRED.findall("\n".join(code)))
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"[A-Z_]+=", line)]
    assert {line.split("=", 1)[0] for line in lines} == required
    assert all(line.endswith("=") for line in lines)  # no value, demo or otherwise
    assert {provision.password_env_key(p) for p in provision.GRANTS} <= required
