"""The ``sagabus`` command line as an operator runs it: a subprocess with ``SAGABUS_*`` set."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.service import Runtime
from messaging.settings import Settings
from participants.inventory import service as inventory
from process_manager import ops
from process_manager.definitions.checkout import V2
from tests.support import checkout, env_for, wait_terminal

pytestmark = pytest.mark.e2e

UNREACHABLE_AMQP = "amqp://guest:guest@127.0.0.1:1/"
UNREACHABLE_DB = "postgresql://postgres@127.0.0.1:1/sagabus"


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def _entry_point() -> list[str]:
    script = Path(sys.executable).with_name("sagabus")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli"]


async def sagabus(*args: str, amqp_url: str, database_url: str) -> Result:
    proc = await asyncio.create_subprocess_exec(
        *_entry_point(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env_for(amqp_url, database_url, os.environ),
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def test_status_json_shows_state_and_history(
    services: Runtime, engine: AsyncEngine, database: Settings, uid: str
) -> None:
    sku = f"SKU-CLI-{uid}"
    async with engine.begin() as conn:
        await inventory.seed(conn, {sku: 1})
    cmd = checkout(f"cli-{uid}", sku=sku)
    await ops.publish_starts(database.amqp_url, [ops.start_message(cmd)])
    await wait_terminal(engine, cmd.order_id)

    result = await sagabus(
        "status",
        "--json",
        cmd.order_id,
        amqp_url=database.amqp_url,
        database_url=database.database_url,
    )

    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["order_id"] == cmd.order_id
    assert data["state"] == "COMPLETED"
    assert data["outcome"] == "completed"
    assert data["terminal"] is True
    assert data["completed_steps"] == [s.name for s in V2.steps]
    notes = [h["note"] for h in data["history"]]
    assert notes == ["started", *(f"{s.name} succeeded" for s in V2.steps)]
    assert data["history"][-1]["to"] == "COMPLETED"
    # the same saga by its saga id
    by_id = await sagabus(
        "status",
        "--json",
        data["saga_id"],
        amqp_url=database.amqp_url,
        database_url=database.database_url,
    )
    assert json.loads(by_id.out)["order_id"] == cmd.order_id


async def test_status_of_an_unknown_saga_fails_with_one_line(database: Settings) -> None:
    result = await sagabus(
        "status", "no-such-order", amqp_url=database.amqp_url, database_url=database.database_url
    )

    assert result.code == 1
    assert result.err_lines == ["sagabus: error: no saga 'no-such-order'"]
    assert result.out == ""


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["status"], "Missing argument 'SAGA'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["list", "--limit", "0"], "--limit"),
        (["list", "--older-than", "5x"], "not a duration"),
        (["start", "--item", "SKU-ONLY"], "expected SKU:QTY"),
        (["start", "--item", "SKU:1", "--message-id", "nope"], "not a UUID"),
        (["inventory", "seed", "SKU=-1"], "expected SKU=QTY"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(v),
)
async def test_bad_arguments_give_one_line_and_exit_2(
    database: Settings, args: list[str], fragment: str
) -> None:
    result = await sagabus(*args, amqp_url=database.amqp_url, database_url=database.database_url)

    assert result.code == 2, result
    assert len(result.err_lines) == 1, result.err
    assert result.err_lines[0].startswith("sagabus: error: ")
    assert fragment in result.err_lines[0]
    assert "Traceback" not in result.err


@pytest.mark.parametrize(
    ("args", "amqp", "db"),
    [
        (["status", "x"], None, UNREACHABLE_DB),
        (["list"], None, UNREACHABLE_DB),
        (["start", "--item", "SKU:1"], UNREACHABLE_AMQP, None),
        (["health"], UNREACHABLE_AMQP, None),
    ],
    ids=["status-db", "list-db", "start-amqp", "health-amqp"],
)
async def test_unreachable_service_exits_3_without_traceback(
    database: Settings, args: list[str], amqp: str | None, db: str | None
) -> None:
    result = await sagabus(
        *args, amqp_url=amqp or database.amqp_url, database_url=db or database.database_url
    )

    assert result.code == 3, result
    assert "Traceback" not in result.err
    last = result.err_lines[-1]
    assert last.startswith("sagabus: error: cannot reach "), result.err
    assert "Connect call failed" in last or "refused" in last.lower()
    assert ":1" in last  # names the address that was tried
    assert "guest:guest" not in result.err  # the password is redacted


@pytest.mark.parametrize(
    "args", [["start", "--item", "SKU:1"], ["health"]], ids=["start", "health"]
)
async def test_unreachable_broker_is_reported_in_exactly_one_line(
    database: Settings, args: list[str]
) -> None:
    result = await sagabus(*args, amqp_url=UNREACHABLE_AMQP, database_url=database.database_url)

    assert result.code == 3
    assert len(result.err_lines) == 1, result.err
