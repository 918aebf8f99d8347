"""``sagabus provision`` with the broker passwords in the environment
(``SAGABUS_AMQP_PASSWORD_<PRINCIPAL>``), as the compose stack's ``provision`` job runs it: it sets
exactly those passwords on the broker, on new and existing users alike, and never prints them."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest
from click.testing import CliRunner, Result

from cli.provision import provision as provision_command
from messaging.provision import broker as provision
from tests import support
from tests.security.conftest import ADMIN_URL, AMQP_BASE, delete_users

pytestmark = pytest.mark.integration


@pytest.fixture
def scratch() -> Iterator[tuple[str, str]]:
    """A vhost name and a user prefix of this test's own, both removed afterwards."""
    sid = uuid.uuid4().hex[:8]
    vhost, prefix = f"sagabus-envpw-{sid}", f"sagabus-envpw-{sid}-"
    yield vhost, prefix
    support.delete_vhost(vhost)
    delete_users(prefix)


def _passwords(principals: Iterable[str] = tuple(provision.GRANTS)) -> dict[str, str]:
    """principal -> a fresh password (URL-safe, as .env.example asks)."""
    return {p: f"{p}-{secrets.token_hex(12)}" for p in principals}


def _environ(passwords: dict[str, str]) -> dict[str, str]:
    return {provision.password_env_key(p): pw for p, pw in passwords.items()}


def _provision(env: dict[str, str], *args: str) -> Result:
    result = CliRunner().invoke(provision_command, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _connect(vhost: str, user: str, password: str) -> None:
    scheme, rest = AMQP_BASE.rstrip("/").split("://", 1)
    host = rest.split("@", 1)[-1]
    url = (
        f"{scheme}://{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
        f"@{host}/{support.vhost_path(vhost)}"
    )
    pika.BlockingConnection(pika.URLParameters(url)).close()


def _refused(vhost: str, user: str, password: str) -> bool:
    try:
        _connect(vhost, user, password)
    except pika.exceptions.ProbableAuthenticationError:
        return True
    return False


def _assert_not_printed(output: str, passwords: dict[str, str]) -> None:
    for pw in passwords.values():
        assert pw not in output
        assert urllib.parse.quote(pw, safe="") not in output


def test_provision_sets_exactly_the_passwords_from_the_environment(
    scratch: tuple[str, str],
) -> None:
    vhost, prefix = scratch
    args = ["--vhost", vhost, "--user-prefix", prefix, "--admin-url", ADMIN_URL]

    # new users: every one from the environment but the client, which gets a random one
    first = _passwords([p for p in provision.GRANTS if p != "client"])
    result = _provision(_environ(first), *args)
    _assert_not_printed(result.output, first)
    for p, pw in first.items():
        user = f"{prefix}{p}"
        assert f"# {user}: password from {provision.password_env_key(p)}" in result.output
        assert f"{provision.ENV_KEY_PREFIX}{p.upper().replace('-', '_')}=" not in result.output
        _connect(vhost, user, pw)
    assert _refused(vhost, f"{prefix}payment", first["order"])
    client_url = next(
        line.split("=", 1)[1]
        for line in result.output.splitlines()
        if line.startswith(f"{provision.ENV_KEY_PREFIX}CLIENT=")
    )
    client = urllib.parse.urlsplit(client_url)
    assert client.username is not None and client.password is not None
    _connect(vhost, urllib.parse.unquote(client.username), urllib.parse.unquote(client.password))

    # existing users: the passwords from the environment are set again (rotated), also with
    # --rotate, which does not override them; nothing secret in the JSON report either
    second = _passwords()
    result = _provision(_environ(second), *args, "--rotate", "--json")
    _assert_not_printed(result.output, second)
    report = json.loads(result.output)
    assert {u["user"] for u in report["users"]} == {f"{prefix}{p}" for p in provision.GRANTS}
    for row in report["users"]:
        assert (row["password"], row["password_from"]) == ("updated", "environment")
        assert "amqp_url" not in row
    for p, pw in second.items():
        _connect(vhost, f"{prefix}{p}", pw)
    for p, pw in first.items():
        assert _refused(vhost, f"{prefix}{p}", pw), p

    # the same environment again: idempotent, the same passwords still work
    _provision(_environ(second), *args)
    _connect(vhost, f"{prefix}process-manager", second["process-manager"])


def test_passwords_from_the_environment_go_to_the_secret_files_only(tmp_path: Path) -> None:
    """--output and --definitions hold them (mode 0600, random salts); stdout does not."""
    passwords = _passwords()
    out, defs = tmp_path / "amqp.env", tmp_path / "definitions.json"
    result = _provision(
        _environ(passwords),
        "--no-apply", "--user-prefix", "sagabus-", "--amqp-host", "rabbitmq:5672",
        "--output", str(out), "--definitions", str(defs),
    )  # fmt: skip
    _assert_not_printed(result.output, passwords)
    assert provision.read_env_file(out) == {f"sagabus-{p}": pw for p, pw in passwords.items()}
    assert out.stat().st_mode & 0o777 == 0o600
    assert defs.stat().st_mode & 0o777 == 0o600
    users = {u["name"]: u for u in json.loads(defs.read_text())["users"]}
    for p, pw in passwords.items():
        raw = base64.b64decode(users[f"sagabus-{p}"]["password_hash"])
        assert raw[4:] == hashlib.sha256(raw[:4] + pw.encode()).digest(), p


def test_a_password_variable_naming_no_user_is_refused() -> None:
    result = CliRunner().invoke(
        provision_command,
        ["--no-apply"],
        env={"SAGABUS_AMQP_PASSWORD_PROCES_MANAGER": "typo"},
    )
    assert result.exit_code == 2
    assert "SAGABUS_AMQP_PASSWORD_PROCES_MANAGER" in result.output
    assert "typo" not in result.output


def test_plan_precedence() -> None:
    """Environment, then demo, then the env file (unless rotate), then kept, then new."""
    existing = ["sagabus-order", "sagabus-payment", "sagabus-inventory"]
    known = {"sagabus-order": "from-file", "sagabus-payment": "from-file"}
    environ = {"order": "from-env"}

    def by_principal(accounts: list[provision.Account]) -> dict[str, tuple[object, ...]]:
        return {a.grant.principal: (a.source, a.action, a.password) for a in accounts}

    plain = by_principal(provision.plan(known=known, existing=existing, environ=environ))
    assert plain["order"] == ("environment", "updated", "from-env")
    assert plain["payment"] == ("file", "updated", "from-file")
    assert plain["inventory"] == ("", "kept", None)
    assert plain["shipping"][:2] == ("new", "created")

    rotated = by_principal(
        provision.plan(known=known, existing=existing, environ=environ, rotate=True)
    )
    assert rotated["order"] == ("environment", "updated", "from-env")
    assert rotated["payment"][:2] == ("new", "updated")
    assert rotated["payment"][2] != "from-file"
    assert rotated["inventory"][:2] == ("new", "updated")

    demo = by_principal(provision.plan(known=known, existing=existing, environ=environ, demo=True))
    assert demo["order"] == ("environment", "updated", "from-env")
    assert demo["payment"] == ("demo", "updated", provision.demo_password("payment"))
