"""Signed bookkeeping on sagabus's own failure routes.

A consumer that retries a message (through its own delay queue) or dead-letters it writes where
the message first came from and who sent it (``sagabus-original-*``), and when it comes back
believes those headers. The queue's own broker user is allowed to publish on those routes, so
with that password alone anybody could write such headers and have them believed: a payment
"retry" claiming to be a ``RefundPayment`` from the process manager. So the consumer signs what
it writes with a key of its own service (HMAC-SHA256, header ``sagabus-signature``) and, on the
way back, believes only what its key signed. The key lives in the service's own schema
(``sagabus_keys``), so a leaked broker password is not enough: the attacker also needs the
service's database credentials.

What is signed: the purpose (``retry`` or ``dead-letter``), the work queue, the message id, its
type, a digest of its body, the original exchange, routing key and sender, and for a retry its
retry count and retry-state headers (a dead-letter replay resets those).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import Any, Literal

from sqlalchemy import Column, DateTime, LargeBinary, MetaData, Table, Text, func
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.db import driver, qualified
from schemas.envelope import HeaderNames

Purpose = Literal["retry", "dead-letter"]
KEY_NAME = "failure-routes"
#: the DLQ collector's mark on a dead letter the broker itself made (``x-delivery-limit``):
#: no consumer signed it, and its route and sender are what the broker recorded
BROKER_MADE = "broker"


def keys_table(metadata: MetaData) -> Table:
    return Table(
        "sagabus_keys",
        metadata,
        Column("name", Text, primary_key=True),
        Column("secret", LargeBinary, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    )


async def load_key(engine: AsyncEngine, table: Table) -> bytes:
    """The service's key, made on first use (several instances agree on the first one)."""
    q = qualified(table)
    async with engine.begin() as conn:
        pg = await driver(conn)
        await pg.execute(
            f"INSERT INTO {q} (name, secret) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            KEY_NAME,
            secrets.token_bytes(32),
        )
        secret = await pg.fetchval(f"SELECT secret FROM {q} WHERE name = $1", KEY_NAME)
    assert isinstance(secret, bytes)
    return secret


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def signature(
    key: bytes,
    purpose: Purpose,
    *,
    queue: str,
    message_id: str | None,
    message_type: str | None,
    body: bytes,
    headers: Mapping[str, Any],
) -> str:
    parts = [
        purpose,
        queue,
        message_id or "",
        message_type or "",
        hashlib.sha256(body).hexdigest(),
        _text(headers.get(HeaderNames.ORIGINAL_EXCHANGE)),
        _text(headers.get(HeaderNames.ORIGINAL_ROUTING_KEY)),
        _text(headers.get(HeaderNames.ORIGINAL_USER_ID)),
    ]
    if purpose == "retry":
        parts.append(_text(headers.get(HeaderNames.RETRY_COUNT)))
        parts += sorted(
            f"{k}={_text(v)}"
            for k, v in headers.items()
            if k.startswith(HeaderNames.RETRY_STATE_PREFIX)
        )
    canonical = "\x1f".join(p.replace("\x1f", " ") for p in parts)
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


def verify(key: bytes, purpose: Purpose, claimed: Any, **fields: Any) -> bool:
    return isinstance(claimed, str | bytes) and hmac.compare_digest(
        _text(claimed), signature(key, purpose, **fields)
    )
