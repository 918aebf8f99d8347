"""Payment tokens and addresses never reach a log line: SQLAlchemy errors carry no parameters
(``hide_parameters``), and the services' structlog chain masks personal fields and tokens, also
inside error texts where PostgreSQL itself quotes the failing row."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import structlog
from sqlalchemy import exc, text
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import telemetry

pytestmark = pytest.mark.integration


def _render(**event: Any) -> str:
    """One log line, rendered by the services' own processor chain."""
    out: Any = dict(event)
    for processor in telemetry.log_processors(structlog.processors.JSONRenderer()):
        out = processor(None, "error", out)
    assert isinstance(out, str)
    return out


async def _table(engine: AsyncEngine, uid: str) -> str:
    name = f"public.it_logmask_{uid}"
    async with engine.begin() as conn:
        await conn.execute(
            text(
                f"CREATE TABLE {name} (order_id text PRIMARY KEY, payment_token text,"
                " line1 text, amount bigint CHECK (amount >= 0))"
            )
        )
    return name


async def test_sql_errors_hide_parameters_and_logs_mask_what_postgresql_quotes(
    engine: AsyncEngine, uid: str
) -> None:
    token, street = f"tok_secret_{uid}", f"{uid} Private Lane"
    table = await _table(engine, uid)
    insert = text(f"INSERT INTO {table} VALUES (:o, :t, :l, :a)")
    try:
        async with engine.begin() as conn:
            await conn.execute(insert, {"o": f"o-{uid}", "t": token, "l": street, "a": 1})
        # a duplicate key: the statement's parameters would name the token and the street
        with pytest.raises(exc.IntegrityError) as duplicate:
            async with engine.begin() as conn:
                await conn.execute(insert, {"o": f"o-{uid}", "t": token, "l": street, "a": 1})
        message = str(duplicate.value)
        assert "SQL parameters hidden" in message
        assert token not in message and street not in message

        # a CHECK violation: PostgreSQL's own DETAIL quotes the whole failing row
        with pytest.raises(exc.IntegrityError) as check:
            async with engine.begin() as conn:
                await conn.execute(insert, {"o": f"p-{uid}", "t": token, "l": street, "a": -1})
        assert token in str(check.value) or street in str(check.value), str(check.value)

        for line in (
            _render(event="handler_failed", error=f"IntegrityError: {check.value}"),
            _render(event="handler_failed", exc_info=check.value),
            _render(
                event="saga_debug",
                checkout={
                    "order_id": f"p-{uid}",
                    "payment_token": token,
                    "shipping_address": {"line1": street, "postal_code": "3511AA"},
                },
                note=f"authorizing with {token}",
            ),
        ):
            assert token not in line and street not in line, line
            assert "3511AA" not in line
        structured = json.loads(_render(event="x", payment_token=token, order_id=f"p-{uid}"))
        assert structured["payment_token"] == "***"
        assert structured["order_id"] == f"p-{uid}"  # ids stay: they are how to find a saga
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP TABLE {table}"))


def test_standard_library_records_are_masked_too() -> None:
    record = logging.LogRecord(
        "sqlalchemy", logging.ERROR, __file__, 1, "failed with %s", ("tok_visa_4242",), None
    )
    assert telemetry._MaskingFilter().filter(record)
    assert "tok_visa_4242" not in record.getMessage()
