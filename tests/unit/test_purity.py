"""The decision core (the engine, the definitions it runs, and the test kit that drives them)
imports no infrastructure and reads no clock, randomness or logger.

The import check runs in a fresh interpreter: in this process pytest's conftest has already
imported the database and broker libraries.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PURE_PACKAGES = (ROOT / "process_manager" / "engine", ROOT / "process_manager" / "definitions")
PURE_SOURCES = sorted(
    [
        # a command-line front end (``*_cli.py``) is a shell: it may time its run
        *(f for pkg in PURE_PACKAGES for f in pkg.glob("*.py") if not f.stem.endswith("_cli")),
        ROOT / "process_manager" / "testing.py",
    ]
)
PURE_MODULES = ["process_manager.engine", "process_manager.definitions", "process_manager.testing"]

INFRASTRUCTURE = ("aio_pika", "aiormq", "sqlalchemy", "asyncpg", "structlog", "opentelemetry")


def imported_by(module: str) -> list[str]:
    """Every module a fresh interpreter has loaded after importing ``module``."""
    code = f"import {module}, sys; print(sorted(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    loaded = ast.literal_eval(out.strip())
    assert isinstance(loaded, list) and module in loaded
    return loaded


def infrastructure_in(loaded: list[str]) -> list[str]:
    return sorted(m for m in loaded if m.split(".")[0] in INFRASTRUCTURE)


@pytest.mark.parametrize("module", [*PURE_MODULES, "schemas", "schemas.jsonschema"])
def test_core_imports_no_infrastructure(module: str) -> None:
    loaded = imported_by(module)
    assert infrastructure_in(loaded) == []
    assert not [m for m in loaded if m == "messaging" or m.startswith("messaging.")]


def test_the_import_check_can_see_infrastructure() -> None:
    # control: the codec does talk to the broker library, and the check notices
    assert "aio_pika" in infrastructure_in(imported_by("messaging.codec"))


IMPURE_MODULES = {"random", "secrets", "time", "logging", "structlog", "asyncio", "os", "socket"}
IMPURE_ATTRIBUTES = {"now", "utcnow", "today", "uuid1", "uuid4", "getrandbits", "monotonic"}
#: reading the clock is calling one of these; a ``now`` that was passed in is just a value
#: (``run.now``, the harness's ``clock.now``)
CLOCK_READS = {"now", "utcnow", "today"}


def impurities(source: str) -> list[str]:
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in IMPURE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in IMPURE_MODULES:
                found.append(node.module or "")
            found += [a.name for a in node.names if a.name in IMPURE_ATTRIBUTES]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in CLOCK_READS
        ):
            found.append(f".{node.func.attr}()")
        elif isinstance(node, ast.Attribute) and node.attr in IMPURE_ATTRIBUTES - CLOCK_READS:
            found.append(f".{node.attr}")
        elif isinstance(node, ast.AsyncFunctionDef | ast.Await):
            found.append(type(node).__name__)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"print", "open", "input"}
        ):
            found.append(f"{node.func.id}()")
    return found


def test_the_pure_sources_are_all_found() -> None:
    names = {f"{f.parent.name}/{f.name}" for f in PURE_SOURCES}
    assert {"engine/core.py", "engine/definition.py", "definitions/checkout.py"} <= names
    assert {"definitions/returns.py", "process_manager/testing.py"} <= names


@pytest.mark.parametrize("source", PURE_SOURCES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_engine_and_definitions_read_no_clock_randomness_or_logger(source: Path) -> None:
    assert impurities(source.read_text()) == []


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("from datetime import datetime\nx = datetime.now()", [".now()"]),
        ("from datetime import date\nx = date.today()", [".today()"]),
        ("x = run.now + step_timeout", []),
        ("import uuid\nf = uuid.uuid4", [".uuid4"]),
        ("import uuid\nx = uuid.uuid4()", [".uuid4"]),
        ("import random", ["random"]),
        ("from time import monotonic", ["time", "monotonic"]),
        ("async def f():\n    await g()", ["AsyncFunctionDef", "Await"]),
        ("print('hi')", ["print()"]),
    ],
)
def test_the_source_check_can_see_impurities(snippet: str, expected: list[str]) -> None:
    assert impurities(snippet) == expected
