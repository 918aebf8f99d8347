"""The dead-letter store: a collector moves messages from every ``<queue>.dlq`` into PostgreSQL,
where operators query, group, replay and purge them with SQL behind the CLI.

Nothing is lost and nothing loops: a dead letter is acked on its DLQ only after its row commits.
Whatever a client put in it, it is stored: header values are sanitised (NUL characters and
invalid UTF-8 replaced, nested tables cut at a depth, long values capped, keys made text) and
parsed defensively (a ``sagabus-failed-at`` or ``sagabus-retry-count`` that is not a time or a
number is kept as text, never a crash), and when the sanitised copy was not what arrived, the
headers as received are kept as text next to it (``headers_raw``, ``storage_note``). If the row
still cannot be stored after ``MAX_STORE_ATTEMPTS`` attempts with the database up, a raw row is
stored instead (the body's bytes, the properties, the scalar headers, every header as text, and
the storage error as its reason, failure kind ``unstorable``) and the dead letter is acked. An
unreachable database is not the dead letter's fault: the collector waits for it, holding the
delivery, and counts no attempt.

Ids (:func:`dead_letter_id`) are derived from the message id, the DLQ and a digest of everything
the dead letter carries, so a redelivered dead letter is stored once, across collector restarts.
A replay republishes the original body, properties and message id to the queue that failed it
(through the replay exchange, where only that queue is bound to its name, so the other
subscribers of a fan-out do not see it again), waits for the broker's confirm, and only then
marks the row replayed. Killed midway, a replay at worst republishes a message the broker already
has; consumers' inboxes drop that duplicate.

Personal data: what the store shows (``list``, ``show``, ``groups``, a replay's report) has
payment tokens and addresses masked, in the body, the headers and the error text; a replay
publishes the stored bytes, unmasked. ``headers_raw`` is stored masked: it is there to be read,
never replayed. Rows expire after ``dead_letter_retention_s`` (``RETAINED``), and ``sagabus
erase`` redacts the stored bodies of an erased customer.
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import math
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage
from opentelemetry import trace
from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    Uuid,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import telemetry, topology
from messaging.consumer import is_transient_db_error
from messaging.publisher import Publisher
from messaging.retention import RetentionRule
from messaging.signing import BROKER_MADE
from messaging.telemetry import mask_json_body, mask_personal, mask_text
from schemas.envelope import HeaderNames

log = structlog.get_logger("sagabus.dead_letters")

SCHEMA = "dead_letters"
SERVICE = "dead-letters"
metadata = MetaData(schema=SCHEMA)
DL_NAMESPACE = uuid.UUID("c0c5a8f2-4f5d-4a3b-8f38-4a8f1f0e5d77")

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("message_id", Text, nullable=True, index=True),
    Column("message_type", Text, nullable=True),
    Column("saga_id", Text, nullable=True, index=True),
    Column("queue", Text, nullable=False),
    Column("original_exchange", Text, nullable=True),
    Column("original_routing_key", Text, nullable=True),
    Column("error_class", Text, nullable=False),
    Column("error_message", Text, nullable=False),
    Column("failure_kind", Text, nullable=False),
    Column("fingerprint", Text, nullable=False, index=True),
    Column("retry_count", Integer, nullable=False),
    Column("trace_id", Text, nullable=True),
    Column("headers", JSONB, nullable=False),
    #: the headers as received, as text (masked), when ``headers`` is not a faithful copy
    Column("headers_raw", Text, nullable=True),
    #: what storing changed (sanitised values, a raw row's reason); ``None``: stored as it came
    Column("storage_note", Text, nullable=True),
    Column("properties", JSONB, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("failed_at", DateTime(timezone=True), nullable=False),
    Column("collected_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    #: open | replayed | purged (purged rows are archived, never deleted)
    Column("status", Text, nullable=False, index=True),
    Column("replay_count", Integer, nullable=False, server_default="0"),
    Column("last_replayed_at", DateTime(timezone=True), nullable=True),
    Column("last_replayed_by", Text, nullable=True),
    Column("purged_at", DateTime(timezone=True), nullable=True),
    Column("purged_by", Text, nullable=True),
)

#: attempts to store a dead letter's row, with the database up, before its raw row is stored
MAX_STORE_ATTEMPTS = 3
#: the longest header string (or text field) kept; longer ones are cut, and the cut noted
MAX_TEXT = 16_384
#: the longest id-like text (message id, type, saga id, queue, route) kept
MAX_ID_TEXT = 1_024
#: nested header tables and arrays deeper than this are kept as text
MAX_DEPTH = 8
#: entries of one header table or array kept
MAX_ITEMS = 1_000
#: the longest ``headers_raw`` kept
MAX_RAW = 65_536
#: waits while the database is unreachable: first, and longest
WAIT_FIRST_S = 0.5
WAIT_MAX_S = 5.0
#: the broker adds or changes these on a redelivery; they are no part of a dead letter's identity
_REDELIVERY_HEADERS = frozenset({"x-delivery-count"})
UNSTORABLE = "unstorable"
_ROUTE_HEADERS = (
    HeaderNames.ORIGINAL_EXCHANGE,
    HeaderNames.ORIGINAL_ROUTING_KEY,
    HeaderNames.ORIGINAL_USER_ID,
)
_TEXT_PROPERTIES = (
    "content_type",
    "content_encoding",
    "correlation_id",
    "message_id",
    "type",
    "app_id",
    "reply_to",
)


def _add_missing_columns(target: MetaData, connection: Any, **_: Any) -> None:
    """Columns added since the table was first created (``create_all`` skips existing tables).
    Altered only when missing: the operator's role, which runs this at every ``dlq`` command,
    may read the table but not alter it."""
    present = {
        name
        for (name,) in connection.execute(
            text(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = :schema AND table_name = 'dead_letters'"
            ),
            {"schema": SCHEMA},
        )
    }
    if not present:
        return
    for name in ("headers_raw", "storage_note"):
        if name not in present:
            connection.execute(
                text(f'ALTER TABLE "{SCHEMA}".dead_letters ADD COLUMN IF NOT EXISTS {name} text')
            )


event.listen(metadata, "after_create", _add_missing_columns)


#: every stored dead letter, whatever its status, expires after ``dead_letter_retention_s`` (no
#: row here absorbs a duplicate: a replay's copy meets the consumers' inboxes and idempotency)
#: an open dead letter is work nobody has done yet: it stays until it is replayed or purged
RETAINED = (
    RetentionRule(
        dead_letters,
        "collected_at",
        "dead_letter_retention_s",
        where="status <> 'open'",
        guard=False,
    ),
)

_UUIDISH = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
_NUMBER = re.compile(r"\d+")
_HEXISH = re.compile(r"\b(?=[\w-]*\d)[\w-]{8,}\b")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def normalise(message: str) -> str:
    """Strip ids, numbers, quoted values and detail lines so the same failure groups together."""
    m = (message.strip().splitlines() or [""])[0]
    m = _UUIDISH.sub("<id>", m)
    m = _HEXISH.sub("<id>", m)
    m = _QUOTED.sub("<value>", m)
    return _NUMBER.sub("<n>", m)[:300]


def fingerprint(error_class: str, message: str, queue: str, message_type: str | None) -> str:
    key = "\x1f".join([error_class, normalise(message), queue, message_type or ""])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


# -- sanitising: whatever a client sent, a value PostgreSQL stores --------------------------------


class _Notes:
    """What sanitising changed, for ``storage_note`` (a few lines, not one per value)."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, note: str) -> None:
        if note not in self.items and len(self.items) < 20:
            self.items.append(note)

    def text(self) -> str | None:
        return "; ".join(self.items) or None


def _text(value: Any, notes: _Notes | None = None, where: str = "", cap: int = MAX_TEXT) -> str:
    """``value`` as text PostgreSQL accepts: bytes decoded (invalid UTF-8 replaced), NUL
    characters and lone surrogates replaced, cut at ``cap`` characters. Never raises."""
    try:
        if isinstance(value, bytes | bytearray | memoryview):
            raw = bytes(value)
            s = raw.decode("utf-8", "replace")
            if notes is not None and "\ufffd" in s and "\ufffd".encode() not in raw:
                notes.add(f"{where}: invalid UTF-8 replaced")
        elif isinstance(value, str):
            s = value
        else:
            s = str(value)
    except Exception as e:  # a str() that raises: keep what can be said about it
        s = f"<unprintable {type(value).__name__}: {type(e).__name__}>"
        if notes is not None:
            notes.add(f"{where}: unprintable value")
    if "\x00" in s:
        s = s.replace("\x00", "\ufffd")
        if notes is not None:
            notes.add(f"{where}: NUL characters replaced")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "replace").decode("utf-8")
        if notes is not None:
            notes.add(f"{where}: invalid characters replaced")
    if len(s) > cap:
        if notes is not None:
            notes.add(f"{where}: cut at {cap} characters")
        s = s[:cap] + f"...[{len(s) - cap} more characters]"
    return s


def _opt_text(value: Any, cap: int = MAX_ID_TEXT) -> str | None:
    return None if value is None else _text(value, cap=cap)


def _clean(value: Any, notes: _Notes, where: str, depth: int = 0) -> Any:
    """A JSON value PostgreSQL's JSONB accepts, as close to ``value`` as that allows."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if -(2**63) <= value < 2**63:
            return value
        notes.add(f"{where}: integer out of range kept as text")
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        notes.add(f"{where}: {value} kept as text")
        return str(value)
    if isinstance(value, str | bytes | bytearray | memoryview):
        return _text(value, notes, where)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict | list | tuple):
        if depth >= MAX_DEPTH:
            notes.add(f"{where}: nested deeper than {MAX_DEPTH} levels, kept as text")
            return _text(_repr(value), notes, where)
        if len(value) > MAX_ITEMS:
            notes.add(f"{where}: only the first {MAX_ITEMS} entries kept")
        if isinstance(value, dict):
            return _clean_table(value, notes, where, depth + 1)
        return [
            _clean(v, notes, f"{where}[{i}]", depth + 1)
            for i, v in enumerate(list(value)[:MAX_ITEMS])
        ]
    return _text(value, notes, where)


def _key(key: Any, notes: _Notes, where: str) -> str:
    if not isinstance(key, str):
        notes.add(f"{where}: a {type(key).__name__} key kept as text")
    return _text(key, notes, where or "header name", cap=256)


def _clean_table(table: dict[Any, Any], notes: _Notes, where: str, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in list(table.items())[:MAX_ITEMS]:
        key = _key(k, notes, where)
        path = f"{where}.{key}" if where else key
        if key in out:
            notes.add(f"{path}: two names made the same by sanitising, the last kept")
        out[key] = _clean(v, notes, path, depth)
    return out


def sanitise_headers(headers: dict[Any, Any]) -> tuple[dict[str, Any], str | None]:
    """Headers PostgreSQL stores as JSONB, and a note of what that changed (``None``: nothing
    that JSON could have kept)."""
    notes = _Notes()
    return _clean_table(headers, notes, "", 0), notes.text()


def _repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception as e:  # RecursionError on an absurdly nested table, a bad __repr__
        return f"<unprintable {type(value).__name__}: {type(e).__name__}>"


def raw_headers_text(headers: Any) -> str:
    """The headers as received, as text (Python's escapes: ``\\x00`` for a NUL, ``b'\\xff'`` for
    bytes), personal data masked, capped: to be read in ``dlq show``, never replayed."""
    return mask_text(_text(_repr(headers), cap=MAX_RAW))


# -- parsing client-set values: a bad one is kept as text, never a crash --------------------------


def parse_time(value: Any) -> datetime | None:
    """An aware time from a header (an ISO 8601 string or an AMQP timestamp), or ``None``."""
    if isinstance(value, datetime):
        t = value
    elif isinstance(value, str | bytes | bytearray):
        try:
            t = datetime.fromisoformat(_text(value, cap=64).strip())
        except (ValueError, TypeError):
            return None
    else:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def parse_count(value: Any) -> int | None:
    """A count from a header (an integer, or its text) the column holds, or ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        n = value
    elif isinstance(value, str | bytes | bytearray):
        try:
            n = int(_text(value, cap=64).strip())
        except ValueError:
            return None
    else:
        return None
    return n if 0 <= n < 2**31 else None


def _trace_id(traceparent: str | None) -> str | None:
    parts = (traceparent or "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and all(c in "0123456789abcdef" for c in parts[1]):
        return parts[1]
    return None


# -- ids --------------------------------------------------------------------------------------


def _feed(digest: Any, value: Any, depth: int = 0) -> None:
    """Feed a canonical, typed encoding of a header value into ``digest`` (tables by sorted
    key, so the order a client wrote them in does not matter)."""
    if depth > 64:
        digest.update(b"deep:" + _repr(value).encode("utf-8", "backslashreplace"))
    elif isinstance(value, dict):
        items = sorted(((_repr(k), v) for k, v in value.items()), key=lambda kv: kv[0])
        digest.update(b"{%d" % len(items))
        for k, v in items:
            digest.update(b"k" + k.encode("utf-8", "backslashreplace") + b"\x1f")
            _feed(digest, v, depth + 1)
        digest.update(b"}")
    elif isinstance(value, list | tuple):
        digest.update(b"[%d" % len(value))
        for v in value:
            _feed(digest, v, depth + 1)
        digest.update(b"]")
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        digest.update(b"b%d:" % len(raw) + raw)
    else:
        s = value if isinstance(value, str) else f"{type(value).__name__}:{_repr(value)}"
        raw = s.encode("utf-8", "surrogatepass")
        digest.update(b"s%d:" % len(raw) + raw)


def _properties(delivery: AbstractIncomingMessage) -> dict[str, Any]:
    """The properties a replay sends, as stored (text sanitised; see ``storage_note``)."""
    ts = delivery.timestamp
    return {
        "content_type": _opt_text(delivery.content_type),
        "content_encoding": _opt_text(delivery.content_encoding),
        "correlation_id": _opt_text(delivery.correlation_id),
        "message_id": _opt_text(delivery.message_id),
        "type": _opt_text(delivery.type),
        "timestamp": ts.isoformat() if isinstance(ts, datetime) else None,
        "app_id": _opt_text(delivery.app_id),
        "priority": delivery.priority if isinstance(delivery.priority, int) else None,
        "reply_to": _opt_text(delivery.reply_to),
    }


def dead_letter_id(delivery: AbstractIncomingMessage, dlq: str) -> uuid.UUID:
    """The id of a dead letter: the same for every copy of one DLQ message, and different for
    every dead-lettering, whoever runs the collector and however often it restarts.

    It is ``uuid5`` of the message id, the DLQ, and a SHA-256 of everything the DLQ message
    carries: its headers (less ``x-delivery-count``, which the broker changes on each
    redelivery), its properties and its body. A redelivery after a collector crash (between
    the insert and the ack) carries the same bytes, so it maps to the same row and is stored
    once. Two dead-letterings of one message differ in something the digest covers: a consumer
    stamps ``sagabus-failed-at`` (to the microsecond) on each, the broker writes a new
    ``x-death`` (its time and count), and a replay carries its own ``traceparent`` and
    ``sagabus-replayed-from``. Neither the channel's delivery tag (which restarts at 1 on every
    channel) nor the collector's clock is used. Two messages that are identical in every byte,
    headers and properties included, cannot be told apart by anyone and are stored once.
    """
    digest = hashlib.sha256()
    try:
        headers = {
            k: v for k, v in (delivery.headers or {}).items() if k not in _REDELIVERY_HEADERS
        }
        _feed(digest, headers)
        _feed(
            digest,
            [
                delivery.content_type,
                delivery.content_encoding,
                delivery.correlation_id,
                delivery.message_id,
                delivery.type,
                delivery.timestamp,
                delivery.app_id,
                delivery.user_id,
                delivery.priority,
                delivery.reply_to,
                delivery.expiration,
            ],
        )
    except Exception as e:  # never: but an id must always come out
        digest.update(f"unreadable:{type(e).__name__}".encode())
    digest.update(delivery.body)
    message_id = _text(delivery.message_id) if delivery.message_id is not None else ""
    return uuid.uuid5(DL_NAMESPACE, f"v2|{message_id}|{_text(dlq)}|{digest.hexdigest()}")


# -- rows ---------------------------------------------------------------------------------------


def _first_death(headers: dict[Any, Any]) -> dict[Any, Any]:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return dict(deaths[0])
    return {}


def _believe_the_broker(
    headers: dict[Any, Any],
    death: dict[Any, Any],
    delivery: AbstractIncomingMessage,
    queue: str,
) -> None:
    """The route and sender a replay of a dead letter the broker made will be judged by.

    Only the broker publishes on ``sagabus.dead-letter``, but the message's own headers (its
    ``x-death`` included) are the publisher's to write, so nothing is taken from them: the
    route is the one its type may arrive by on the queue (``topology.ACCEPTED``), and the sender
    is its ``user_id``, which RabbitMQ validated when it was first published and keeps. The
    collector's mark (``sagabus-dead-lettered-by: broker``) tells the consumer so. A retry copy
    that crashed its consumer (it came back from a delay queue, ``x-death`` exchange ``""``)
    keeps the bookkeeping its consumer signed, which the consumer checks on the replay."""
    if _opt_text(death.get("exchange")) == "":
        return  # a signed retry copy: judged by its signature
    for name in (*_ROUTE_HEADERS, HeaderNames.SIGNATURE):
        headers.pop(name, None)
    accepted = topology.accepted_route(queue, _opt_text(delivery.type) or "")
    if accepted is not None:
        headers[HeaderNames.ORIGINAL_EXCHANGE] = accepted[0].exchange
        headers[HeaderNames.ORIGINAL_ROUTING_KEY] = accepted[0].routing_key
    if delivery.user_id:
        headers[HeaderNames.ORIGINAL_USER_ID] = _text(delivery.user_id, cap=MAX_ID_TEXT)
    headers[HeaderNames.DEAD_LETTERED_BY] = BROKER_MADE


def row_from_delivery(
    delivery: AbstractIncomingMessage, dlq: str, *, now: datetime | None = None
) -> dict[str, Any]:
    """The row of a dead letter. Client-set values are read defensively: a bad one is kept, as
    text, in the headers, and noted in ``storage_note``."""
    received = delivery.headers or {}
    headers: dict[Any, Any] = dict(received)
    # the collector's own mark: never believed from the message
    headers.pop(HeaderNames.DEAD_LETTERED_BY, None)
    notes = _Notes()
    queue = _text(dlq.removesuffix(".dlq"), cap=MAX_ID_TEXT)
    broker_made = delivery.exchange == topology.BROKER_DEAD_LETTER_EXCHANGE
    error_class = _opt_text(headers.get(HeaderNames.ERROR_CLASS), MAX_TEXT)
    error_message = _opt_text(headers.get(HeaderNames.ERROR_MESSAGE), MAX_TEXT)
    kind = _opt_text(headers.get(HeaderNames.FAILURE_KIND))
    if error_class is None or broker_made:
        # Dead-lettered by the broker itself (x-delivery-limit, rejected, expired): read x-death.
        # A retry copy that then crashed its consumer carries the error of its last retry, but
        # the broker made this dead letter.
        death = _first_death(headers)
        reason = _opt_text(death.get("reason")) or "unknown"
        error_class = f"broker:{reason}"
        error_message = {
            "delivery_limit": "redelivered too often (x-delivery-limit): the consumer kept failing",
            "rejected": "rejected by a consumer without requeue",
            "expired": "expired before it was consumed",
        }.get(reason, f"dead-lettered by the broker: {reason}")
        kind = "broker"
    if broker_made:
        # the DLQ says which work queue it came from (x-death is the publisher's to write)
        _believe_the_broker(headers, _first_death(headers), delivery, queue)
    failed_at_value = headers.get(HeaderNames.FAILED_AT)
    failed_at = parse_time(failed_at_value)
    if failed_at is None:
        if failed_at_value is not None:
            notes.add(f"{HeaderNames.FAILED_AT} is not a time: kept as text, collected-at used")
        failed_at = now or datetime.now(UTC)
    retry_value = headers.get(HeaderNames.RETRY_COUNT)
    retry_count = parse_count(retry_value)
    if retry_count is None:
        if retry_value is not None:
            notes.add(f"{HeaderNames.RETRY_COUNT} is not a count: kept as text, 0 used")
        retry_count = 0
    clean, changed = sanitise_headers(headers)
    properties = _properties(delivery)
    sanitised = [name for name in _TEXT_PROPERTIES if properties[name] != getattr(delivery, name)]
    if sanitised:
        changed = "; ".join(filter(None, [changed, f"properties {', '.join(sanitised)} sanitised"]))
    if changed:
        notes.add(changed)
    message_id = properties["message_id"]
    message_type = properties["type"]
    error_class = error_class or "unknown"
    error_message = error_message or ""
    traceparent = clean.get(HeaderNames.TRACEPARENT)
    note = notes.text()
    return {
        "id": dead_letter_id(delivery, dlq),
        "message_id": message_id,
        "message_type": message_type,
        "saga_id": _opt_text(headers.get(HeaderNames.SAGA_ID)),
        "queue": queue,
        "original_exchange": _opt_text(headers.get(HeaderNames.ORIGINAL_EXCHANGE)),
        "original_routing_key": _opt_text(headers.get(HeaderNames.ORIGINAL_ROUTING_KEY)),
        "error_class": error_class,
        "error_message": error_message,
        "failure_kind": kind or "permanent",
        "fingerprint": fingerprint(error_class, error_message, queue, message_type),
        "retry_count": retry_count,
        "trace_id": _trace_id(traceparent if isinstance(traceparent, str) else None),
        "headers": clean,
        "headers_raw": raw_headers_text(received) if changed else None,
        "storage_note": note,
        "properties": properties,
        "body": delivery.body,
        "failed_at": failed_at,
        "status": "open",
    }


def _scalar_headers(headers: dict[Any, Any]) -> dict[str, Any]:
    """Only the flat, scalar headers (what a replay needs: route, sender, saga, trace), each a
    value JSONB surely takes."""
    out: dict[str, Any] = {}
    for k, v in list(headers.items())[:MAX_ITEMS]:
        key = _text(k, cap=256)
        if isinstance(v, bool) or v is None:
            out[key] = v
        elif isinstance(v, int) and -(2**63) <= v < 2**63:
            out[key] = v
        elif isinstance(v, str | bytes | bytearray):
            out[key] = _text(v)
    return out


def raw_row(
    delivery: AbstractIncomingMessage,
    dlq: str,
    dl_id: uuid.UUID,
    error: BaseException,
    *,
    bare: bool = False,
) -> dict[str, Any]:
    """The row stored when the usual one could not be: the body's bytes, the properties, the
    scalar headers (``bare``: none, and only the message id and type), the headers as text, and
    the storage error as its reason."""
    received = delivery.headers or {}
    queue = _text(dlq.removesuffix(".dlq"), cap=MAX_ID_TEXT)
    reason = _text(f"{type(error).__name__}: {error}", cap=MAX_TEXT)
    original = "" if bare else _text(received.get(HeaderNames.ERROR_MESSAGE) or "", cap=2_000)
    message = f"could not be stored as it arrived: {reason}" + (
        f" (it failed with: {original})" if original else ""
    )
    headers: dict[str, Any] = {}
    properties: dict[str, Any] = {
        "message_id": _opt_text(delivery.message_id),
        "type": _opt_text(delivery.type),
    }
    if not bare:
        headers = _scalar_headers(dict(received))
        properties = _properties(delivery)
        try:
            headers.pop(HeaderNames.DEAD_LETTERED_BY, None)
            if delivery.exchange == topology.BROKER_DEAD_LETTER_EXCHANGE:
                queue = dlq.removesuffix(".dlq")
                _believe_the_broker(headers, _first_death(dict(received)), delivery, queue)
        except Exception:  # a route nobody can vouch for is dropped: its replay is refused
            for name in _ROUTE_HEADERS:
                headers.pop(name, None)
    error_class = f"collector:{UNSTORABLE}"
    return {
        "id": dl_id,
        "message_id": properties["message_id"],
        "message_type": properties["type"],
        "saga_id": None if bare else _opt_text(received.get(HeaderNames.SAGA_ID)),
        "queue": queue,
        "original_exchange": _opt_text(headers.get(HeaderNames.ORIGINAL_EXCHANGE)),
        "original_routing_key": _opt_text(headers.get(HeaderNames.ORIGINAL_ROUTING_KEY)),
        "error_class": error_class,
        "error_message": message,
        "failure_kind": UNSTORABLE,
        "fingerprint": fingerprint(error_class, reason, queue, properties["type"]),
        "retry_count": 0,
        "trace_id": None,
        "headers": headers,
        "headers_raw": raw_headers_text(received),
        "storage_note": (
            f"stored raw after {MAX_STORE_ATTEMPTS} failed attempts to store it: "
            + ("no headers and only the message id and type kept; " if bare else "")
            + "`headers` holds only the scalar headers a replay sends; every header as it "
            "arrived is in `headers_raw` (as text, masked)"
        ),
        "properties": properties,
        "body": delivery.body,
        "failed_at": datetime.now(UTC),
        "status": "open",
    }


# -- the collector ------------------------------------------------------------------------------


class Collector:
    """Consumes every DLQ and stores each dead letter once, then acks it.

    Each delivery is worked on until it is stored or its channel is gone (the broker then
    redelivers it, to the same id): an unreachable database is waited for, with no attempt
    counted; a row the database refuses is tried ``MAX_STORE_ATTEMPTS`` times (counted per
    dead-letter id, so a redelivery continues the count), then stored raw (:func:`raw_row`);
    if even that is refused, with no headers (``bare``). Only then is it acked. Deliveries are
    held, not requeued, while waiting: a requeue would count against a quorum queue's delivery
    limit (RabbitMQ 4 sets one by default) and could drop the dead letter."""

    def __init__(self, engine: AsyncEngine, tracer: trace.Tracer) -> None:
        self.engine = engine
        self.tracer = tracer
        self.collected = 0
        #: failed attempts to store the usual row, per dead-letter id
        self.failures: dict[uuid.UUID, int] = {}
        self.stored_raw = 0
        self._channel: aio_pika.abc.AbstractChannel | None = None

    async def start(
        self, connection: aio_pika.abc.AbstractRobustConnection, services: Sequence[str]
    ) -> None:
        channel = await connection.channel()
        self._channel = channel
        await channel.set_qos(prefetch_count=32)
        for service in services:
            dlq = topology.QUEUES[service].dlq
            # passive declare: restored with its consumer after a reconnect (see Consumer.start)
            queue = await channel.declare_queue(dlq, passive=True)
            await queue.consume(self._handler(dlq))

    async def stop(self) -> None:
        """Close the channel: unacked dead letters go back to their DLQs."""
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    def _handler(self, dlq: str) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def handle(delivery: AbstractIncomingMessage) -> None:
            await self.on_message(delivery, dlq)

        return handle

    async def insert(self, row: dict[str, Any]) -> None:
        """Insert a dead letter's row (a second copy of one is a no-op)."""
        async with self.engine.begin() as conn:
            await conn.execute(insert(dead_letters).values(**row).on_conflict_do_nothing())

    async def _database_unreachable(self, e: BaseException) -> bool:
        if is_transient_db_error(e):
            return True
        try:  # the database answers, so the row is the problem; or it does not
            async with asyncio.timeout(10):
                async with self.engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
        except Exception:
            return True
        return False

    async def on_message(self, delivery: AbstractIncomingMessage, dlq: str) -> None:
        dl_id = dead_letter_id(delivery, dlq)
        stage = "row"  # then "raw", then "bare"
        last_error: BaseException | None = None
        wait = WAIT_FIRST_S
        while True:
            try:
                delivery.channel  # noqa: B018 (raises once the channel is closed)
            except Exception:
                log.warning("dead_letter_collect_abandoned", dead_letter_id=str(dl_id), dlq=dlq)
                return  # the broker redelivers it, to this id
            try:
                if stage == "row":
                    row = row_from_delivery(delivery, dlq)
                else:
                    assert last_error is not None
                    row = raw_row(delivery, dlq, dl_id, last_error, bare=stage == "bare")
                await self._store(delivery, dlq, row)
                break
            except asyncio.CancelledError:
                raise
            except Exception as e:
                error = mask_text(f"{type(e).__name__}: {_text(e, cap=500)}")
                if await self._database_unreachable(e):
                    log.warning("dead_letter_store_waiting", dead_letter_id=str(dl_id), error=error)
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, WAIT_MAX_S)
                    continue
                wait = WAIT_FIRST_S
                if stage == "row":
                    n = self.failures[dl_id] = self.failures.get(dl_id, 0) + 1
                    log.error(
                        "dead_letter_store_failed",
                        dead_letter_id=str(dl_id),
                        attempt=n,
                        error=error,
                    )
                    if n >= MAX_STORE_ATTEMPTS:
                        stage, last_error = "raw", e
                    else:
                        await asyncio.sleep(0.1 * n)
                elif stage == "raw":
                    log.error(
                        "dead_letter_raw_store_failed", dead_letter_id=str(dl_id), error=error
                    )
                    stage = "bare"
                else:  # a bug: keep it on the DLQ, and say so loudly, until it is fixed
                    log.error(
                        "dead_letter_bare_store_failed", dead_letter_id=str(dl_id), error=error
                    )
                    await asyncio.sleep(WAIT_MAX_S)
        try:
            await delivery.ack()
        except Exception as e:  # the channel went away: the broker redelivers it, stored once
            log.warning("dead_letter_ack_failed", dead_letter_id=str(dl_id), error=repr(e))
            return
        self.failures.pop(dl_id, None)
        self.collected += 1
        if stage != "row":
            self.stored_raw += 1
        log.info(
            "dead_letter_collected" if stage == "row" else "dead_letter_stored_raw",
            dead_letter_id=str(dl_id),
            queue=row["queue"],
            message_id=row["message_id"],
            error_class=row["error_class"],
            saga_id=row["saga_id"],
        )

    async def _store(
        self, delivery: AbstractIncomingMessage, dlq: str, row: dict[str, Any]
    ) -> None:
        try:
            parent = telemetry.extract(
                {k: v for k, v in row["headers"].items() if isinstance(v, str)}
            )
        except Exception:
            parent = None
        with self.tracer.start_as_current_span(
            f"process {dlq}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes=telemetry.messaging_attributes(
                "process",
                destination=dlq,
                message_id=row["message_id"] or "",
                message_type=row["message_type"] or "",
                extra={
                    "sagabus.dead_letter.id": str(row["id"]),
                    "sagabus.dead_letter.error_class": row["error_class"],
                },
            ),
        ):
            await self.insert(row)


@dataclass(frozen=True)
class Filters:
    ids: tuple[uuid.UUID, ...] = ()
    queue: str | None = None
    message_type: str | None = None
    saga_id: str | None = None
    error: str | None = None
    since: timedelta | None = None
    group: str | None = None
    status: str | None = "open"
    #: only dead letters that failed within this window (``dlq replay``'s guard), not a filter
    #: of its own: ``any`` ignores it
    failed_within: timedelta | None = None

    def any(self) -> bool:
        return bool(
            self.ids
            or self.queue
            or self.message_type
            or self.saga_id
            or self.error
            or self.since
            or self.group
        )


def _where(stmt: Any, f: Filters) -> Any:
    t = dead_letters
    if f.ids:
        stmt = stmt.where(t.c.id.in_(f.ids))
    if f.queue:
        stmt = stmt.where(t.c.queue == f.queue)
    if f.message_type:
        stmt = stmt.where(t.c.message_type == f.message_type)
    if f.saga_id:
        stmt = stmt.where(t.c.saga_id == f.saga_id)
    if f.error:
        stmt = stmt.where(
            (t.c.error_message.ilike(f"%{f.error}%")) | (t.c.error_class.ilike(f"%{f.error}%"))
        )
    if f.since:
        stmt = stmt.where(t.c.failed_at >= datetime.now(UTC) - f.since)
    if f.group:
        stmt = stmt.where(t.c.fingerprint == f.group)
    if f.status:
        stmt = stmt.where(t.c.status == f.status)
    if f.failed_within:
        # the earlier of the two: a broker dead letter's failed_at is the publisher's to write
        stmt = stmt.where(
            func.least(t.c.failed_at, t.c.collected_at) >= datetime.now(UTC) - f.failed_within
        )
    return stmt


def replay_window(settings: Any) -> timedelta | None:
    """How old a dead letter may be and still be replayed safely: the shortest of the windows
    that keep what absorbs a late copy (processed-message ids, tombstones, finished sagas). An
    older one could, say, authorize a card for a saga compensated long ago whose tombstone has
    been pruned. None: every window is "for ever"."""
    windows = [
        float(getattr(settings, name))
        for name in ("inbox_retention_s", "participant_retention_s", "saga_retention_s")
    ]
    finite = [w for w in windows if w > 0]
    return timedelta(seconds=min(finite)) if finite else None


async def count_too_old(engine: AsyncEngine, f: Filters, window: timedelta) -> int:
    """Dead letters matching ``f`` that failed longer ago than ``window``."""
    t = dead_letters
    stmt = _where(select(func.count()).select_from(t), f).where(
        func.least(t.c.failed_at, t.c.collected_at) < datetime.now(UTC) - window
    )
    async with engine.connect() as conn:
        return int((await conn.execute(stmt)).scalar_one())


def to_json(row: Any, *, full: bool = False) -> dict[str, Any]:
    out = {
        "id": str(row.id),
        "message_id": row.message_id,
        "message_type": row.message_type,
        "saga_id": row.saga_id,
        "queue": row.queue,
        "error_class": row.error_class,
        "error_message": mask_text(row.error_message),
        "failure_kind": row.failure_kind,
        "group": row.fingerprint,
        "retry_count": row.retry_count,
        "failed_at": row.failed_at.isoformat(),
        "status": row.status,
        "replay_count": row.replay_count,
        "last_replayed_at": row.last_replayed_at.isoformat() if row.last_replayed_at else None,
        "last_replayed_by": row.last_replayed_by,
        "trace_id": row.trace_id,
    }
    if full:
        out["original_exchange"] = row.original_exchange
        out["original_routing_key"] = row.original_routing_key
        out["headers"] = mask_personal(row.headers)
        out["headers_faithful"] = row.headers_raw is None
        if row.headers_raw is not None:
            out["headers_note"] = (
                "the headers could not be stored exactly as they arrived"
                f" ({row.storage_note or 'sanitised'}): `headers` is what a replay sends,"
                " `headers_raw` what arrived (as text, masked)"
            )
            out["headers_raw"] = row.headers_raw
        elif row.storage_note:
            out["storage_note"] = row.storage_note
        out["properties"] = row.properties
        try:
            row.body.decode("utf-8")
        except UnicodeDecodeError:
            out["body_hex"] = row.body.hex()
        else:
            out["body"] = mask_json_body(row.body)
        out["purged_at"] = row.purged_at.isoformat() if row.purged_at else None
        out["purged_by"] = row.purged_by
    return out


async def list_dead_letters(engine: AsyncEngine, f: Filters, limit: int) -> list[dict[str, Any]]:
    stmt = _where(select(dead_letters), f).order_by(dead_letters.c.failed_at.desc()).limit(limit)
    async with engine.connect() as conn:
        return [to_json(r) for r in (await conn.execute(stmt)).all()]


async def show(engine: AsyncEngine, dl_id: uuid.UUID) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        row = (await conn.execute(select(dead_letters).where(dead_letters.c.id == dl_id))).first()
    return to_json(row, full=True) if row else None


async def groups(engine: AsyncEngine, f: Filters) -> list[dict[str, Any]]:
    t = dead_letters
    stmt = _where(
        select(
            t.c.fingerprint,
            t.c.error_class,
            t.c.queue,
            t.c.message_type,
            func.count().label("count"),
            func.min(t.c.error_message).label("example"),
            func.min(t.c.failed_at).label("first"),
            func.max(t.c.failed_at).label("last"),
        ).group_by(t.c.fingerprint, t.c.error_class, t.c.queue, t.c.message_type),
        f,
    ).order_by(func.count().desc())
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    return [
        {
            "group": r.fingerprint,
            "count": r.count,
            "error_class": r.error_class,
            "queue": r.queue,
            "message_type": r.message_type,
            "example": mask_text(normalise(r.example)),
            "first_failed_at": r.first.isoformat(),
            "last_failed_at": r.last.isoformat(),
        }
        for r in rows
    ]


_STRIP = {
    HeaderNames.ERROR_CLASS,
    HeaderNames.ERROR_MESSAGE,
    HeaderNames.FAILED_QUEUE,
    HeaderNames.FAILED_AT,
    HeaderNames.FAILURE_KIND,
    HeaderNames.RETRY_COUNT,
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-delivery-count",
}


def replay_message(row: Any, tracer: trace.Tracer) -> tuple[aio_pika.Message, trace.Span]:
    # A retry copy the broker dead-lettered (a crash loop) carries its consumer's retry
    # signature, which covers its retry count and retry state: they stay on the replay for the
    # consumer to check, and the consumer starts the replay's retries afresh anyway.
    signed_retry = (
        getattr(row, "failure_kind", None) == "broker"
        and HeaderNames.SIGNATURE in row.headers
        and HeaderNames.DEAD_LETTERED_BY not in row.headers
    )
    headers = {
        k: v
        for k, v in row.headers.items()
        if (k not in _STRIP or (signed_retry and k == HeaderNames.RETRY_COUNT))
        and (signed_retry or not k.startswith(HeaderNames.RETRY_STATE_PREFIX))
    }
    original = telemetry.extract(row.headers)
    original_ctx = trace.get_current_span(original).get_span_context()
    exchange, key = topology.replay_route(row.queue)
    span = tracer.start_span(
        f"publish {row.queue}",
        context=original,
        kind=trace.SpanKind.PRODUCER,
        links=[trace.Link(original_ctx, {"sagabus.link": "replayed_message"})]
        if original_ctx.is_valid
        else [],
        attributes=telemetry.messaging_attributes(
            "publish",
            destination=exchange,
            routing_key=key,
            message_id=row.message_id or "",
            message_type=row.message_type or "",
            extra={"sagabus.dead_letter.id": str(row.id), "sagabus.replay": "true"},
        ),
    )
    headers.update(telemetry.inject(trace.set_span_in_context(span)))
    headers[HeaderNames.REPLAYED_FROM] = str(row.id)
    p = row.properties
    ts = p.get("timestamp")
    message = aio_pika.Message(
        body=row.body,
        headers=headers,
        content_type=p.get("content_type"),
        content_encoding=p.get("content_encoding"),
        correlation_id=p.get("correlation_id"),
        message_id=p.get("message_id"),
        type=p.get("type"),
        timestamp=datetime.fromisoformat(ts) if ts else None,
        app_id=p.get("app_id"),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    return message, span


async def replay(
    engine: AsyncEngine,
    publisher: Publisher,
    f: Filters,
    *,
    limit: int,
    rate: float | None = None,
    dry_run: bool = False,
    tracer: trace.Tracer | None = None,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Replay matching open dead letters one at a time: lock, publish, confirm, mark, commit."""
    tracer = tracer or telemetry.tracer("cli")
    who = getpass.getuser()
    done: list[dict[str, Any]] = []
    if dry_run:
        return await list_dead_letters(engine, f, limit)
    while len(done) < limit:
        async with engine.begin() as conn:
            row = (
                await conn.execute(
                    _where(select(dead_letters), f)
                    .order_by(dead_letters.c.failed_at)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
            ).first()
            if row is None:
                break
            message, span = replay_message(row, tracer)
            try:
                await publisher.publish(*topology.replay_route(row.queue), message)
            finally:
                span.end()
            await conn.execute(
                update(dead_letters)
                .where(dead_letters.c.id == row.id)
                .values(
                    status="replayed",
                    replay_count=dead_letters.c.replay_count + 1,
                    last_replayed_at=datetime.now(UTC),
                    last_replayed_by=who,
                )
            )
        done.append(to_json(row))
        log.info(
            "dead_letter_replayed",
            dead_letter_id=str(row.id),
            queue=row.queue,
            message_id=row.message_id,
        )
        if progress is not None:
            progress()
        if rate:
            await asyncio.sleep(1 / rate)
    return done


async def purge(engine: AsyncEngine, f: Filters, *, limit: int) -> int:
    t = dead_letters
    who = getpass.getuser()
    async with engine.begin() as conn:
        ids = select(t.c.id).where(t.c.status == "open")
        ids = _where(ids, f).limit(limit).scalar_subquery()
        result = await conn.execute(
            update(t)
            .where(t.c.id.in_(ids))
            .values(status="purged", purged_at=datetime.now(UTC), purged_by=who)
        )
    return int(result.rowcount)
