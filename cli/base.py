"""What every command of ``sagabus`` shares: settings, exit codes, the async runner.

Bad arguments and unreachable services end in one line on stderr and a non-zero exit:
2 for usage errors, 3 for an unreachable broker or database, 1 for a failed operation.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import click

from messaging.errors import StartRefused
from messaging.settings import Settings

T = TypeVar("T")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class Unreachable(click.ClickException):
    exit_code = EXIT_UNREACHABLE


class Failed(click.ClickException):
    exit_code = EXIT_FAILED


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")


def parse_duration(value: str) -> timedelta:
    m = _DURATION.match(value.strip())
    if not m:
        raise click.BadParameter(f"{value!r} is not a duration like 30s, 5m, 2h or 1d")
    n, unit = float(m.group(1)), m.group(2)
    return timedelta(
        milliseconds=n if unit == "ms" else 0,
        seconds=n if unit == "s" else 0,
        minutes=n if unit == "m" else 0,
        hours=n if unit == "h" else 0,
        days=n if unit == "d" else 0,
    )


class Duration(click.ParamType):  # type: ignore[type-arg,unused-ignore]
    name = "duration"

    def convert(self, value: Any, param: Any, ctx: Any) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(value)
        except click.BadParameter as e:
            self.fail(e.message, param, ctx)


def settings() -> Settings:
    from process_manager import definitions

    try:
        s = Settings()
    except Exception as e:  # pydantic validation of SAGABUS_* variables
        raise click.UsageError(f"invalid SAGABUS_* configuration: {e}".splitlines()[0]) from None
    try:
        definitions.parse_pins(s.saga_versions)
    except (ValueError, LookupError) as e:
        raise click.UsageError(
            f"invalid SAGABUS_* configuration: SAGABUS_SAGA_VERSIONS: {e}"
        ) from None
    return s


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return asyncio.run(fn())  # type: ignore[arg-type]
    except (OSError, ConnectionError) as e:
        raise Unreachable(_describe_unreachable(e)) from None
    except StartRefused as e:
        # an upgrade the administrator has not applied yet, or sagas of a version this build
        # does not have: one line, exit 1, no traceback
        raise click.ClickException(str(e).splitlines()[0]) from None
    except Exception as e:
        name = type(e).__module__ + "." + type(e).__name__
        if any(k in name for k in ("aiormq", "pamqp", "asyncpg", "sqlalchemy")) and _is_connect(e):
            raise Unreachable(_describe_unreachable(e)) from None
        raise


def _is_connect(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(
        k in text
        for k in (
            "connect",
            "refused",
            "does not exist",
            "authentication",
            "access_refused",
            "vhost",
            "unreachable",
        )
    )


def _describe_unreachable(e: BaseException) -> str:
    s = Settings()
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    target = (
        "RabbitMQ" if "amqp" in f"{type(e).__module__} {msg}".lower() else "PostgreSQL or RabbitMQ"
    )
    return (
        f"cannot reach {target} ({msg}); check SAGABUS_AMQP_URL={_redact(s.amqp_url)} and "
        f"SAGABUS_DATABASE_URL={_redact(s.database_url)}"
    )


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):([^@]+)@", r"//\1:***@", url)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def with_engine(fn: Callable[[Any], Awaitable[T]]) -> T:
    s = settings()

    async def go() -> T:
        from messaging.db import make_engine

        engine = make_engine(s)
        try:
            return await fn(engine)
        finally:
            await engine.dispose()

    return run_async(go)
