"""Trust comes from the route, not from the message.

A delivery is believed only for the route it came by and the broker-validated user that sent
it, never for what its own headers say about itself:

- **The route.** ``topology.ACCEPTED`` says, per queue, the one (exchange, routing key) each type
  may arrive by. A message that came back from one of the queue's own delay queues (through the
  default exchange, which no provisioned user may publish to) or through ``sagabus.replay`` (the
  operator's) is judged by the original route it carries; a message that came any other way is
  judged by the route it came by, and our own bookkeeping headers on it (retry count, retry
  state, original route and sender, error headers) are dropped as forged.
- **The start route** is the public entry point: every ``sagabus-*`` header on it is ignored.
- **The sender.** RabbitMQ rejects a publish whose ``user_id`` property is not the connection's
  user, so ``user_id`` is the authenticated sender. With provisioned users (``<prefix><service>``)
  a message is accepted only from the principal that owns its type (a payment reply only from
  ``<prefix>payment``). Retries, dead letters and replays are published by other users, so the
  first sender travels with them in ``sagabus-original-user-id``, which is believed only on those
  routes. Under a user that is not a provisioned one (the development ``guest``) this check is
  off, and the service says so when it starts.

Anything else is a :class:`Forbidden`: dead-lettered with its reason (``forbidden route`` or
``forbidden sender``), logged as ``message_rejected_security`` and counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from aio_pika.abc import AbstractIncomingMessage

from messaging import signing, topology
from messaging.errors import PermanentError
from schemas.envelope import HeaderNames

Via = Literal["direct", "retry", "replay"]

#: bookkeeping headers that only sagabus's own failure routes may carry
_RETRY_ONLY = (
    HeaderNames.RETRY_COUNT,
    HeaderNames.ORIGINAL_EXCHANGE,
    HeaderNames.ORIGINAL_ROUTING_KEY,
    HeaderNames.ORIGINAL_USER_ID,
    HeaderNames.ERROR_CLASS,
    HeaderNames.ERROR_MESSAGE,
    HeaderNames.FAILED_QUEUE,
    HeaderNames.FAILED_AT,
    HeaderNames.FAILURE_KIND,
    HeaderNames.REPLAYED_FROM,
    HeaderNames.SIGNATURE,
    HeaderNames.DEAD_LETTERED_BY,
)
#: what a message that came round a delay queue or through a replay may keep of them
_KEPT: dict[Via, frozenset[str]] = {
    "direct": frozenset(),
    "retry": frozenset(_RETRY_ONLY) - {HeaderNames.DEAD_LETTERED_BY},
    "replay": frozenset(
        {
            HeaderNames.ORIGINAL_EXCHANGE,
            HeaderNames.ORIGINAL_ROUTING_KEY,
            HeaderNames.ORIGINAL_USER_ID,
            HeaderNames.REPLAYED_FROM,
            HeaderNames.SIGNATURE,
            HeaderNames.DEAD_LETTERED_BY,
        }
    ),
}


class Forbidden(PermanentError):
    """A message that did not come the way its type must: a security event."""

    def __init__(self, reason: Literal["forbidden route", "forbidden sender"], detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason

    @property
    def metric_reason(self) -> str:
        return self.reason.replace(" ", "_")


@dataclass(frozen=True)
class Arrival:
    """What is believed of a delivery before its body is looked at."""

    #: the route the message is judged by (for a retry or a replay: the one it first came by)
    route: topology.Route
    via: Via
    #: the headers that are believed (forged bookkeeping dropped; none of ours on the start route)
    headers: dict[str, Any]
    #: the broker-validated user that first published it; None if it set no ``user_id``
    sender: str | None
    #: transient failures so far (0 unless it came back from a delay queue), clamped
    retries: int

    @property
    def start(self) -> bool:
        return topology.is_start_route(self.route.exchange, self.route.routing_key)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def clamp_retries(value: Any, most: int) -> int:
    """A retry count from a header, never trusted to be sane: a non-integer is 0, and the
    result lies in ``[0, most]``."""
    if isinstance(value, bool) or not isinstance(value, int | str | bytes):
        return 0
    try:
        n = int(value)
    except ValueError:
        return 0
    return max(0, min(n, most))


def _believed(headers: Mapping[str, Any], via: Via, *, start: bool) -> dict[str, Any]:
    kept = _KEPT[via]
    out: dict[str, Any] = {}
    for name, value in headers.items():
        if name.startswith(HeaderNames.RETRY_STATE_PREFIX):
            if via == "retry":
                out[name] = value
            continue
        if name in _RETRY_ONLY:
            if name in kept:
                out[name] = value
            continue
        if start and name.startswith(HeaderNames.PREFIX):
            continue  # the public entry point: nothing of ours is believed from outside
        out[name] = value
    return out


def arrival(
    delivery: AbstractIncomingMessage,
    queue: str,
    *,
    own_user: str | None,
    max_retries: int,
    key: bytes | None = None,
) -> Arrival:
    """Where ``delivery`` came from, which of its headers are believed, who sent it.

    Raises :class:`Forbidden` for a retry or replay that does not say where it first came from,
    a retry that this service did not make, and (with the service's ``key``) a retry or replay
    whose bookkeeping this service did not sign (``messaging.signing``). A replay of a dead
    letter the broker itself made carries the collector's mark instead of a signature."""
    raw = dict(delivery.headers or {})
    exchange = delivery.exchange or ""
    routing_key = delivery.routing_key or ""
    via: Via
    if exchange == "" and routing_key == queue:
        via = "retry"  # back from one of this queue's delay queues (the broker dead-letters it)
        if own_user is not None and delivery.user_id != own_user:
            raise Forbidden(
                "forbidden route",
                f"a retry of {queue} must be published by {own_user}, not {delivery.user_id!r}",
            )
    elif exchange == topology.REPLAY_EXCHANGE:
        via = "replay"
    else:
        via = "direct"
    if via == "direct":
        route = topology.Route(exchange, routing_key)
        sender = delivery.user_id
    else:
        original_exchange = _text(raw.get(HeaderNames.ORIGINAL_EXCHANGE))
        original_key = _text(raw.get(HeaderNames.ORIGINAL_ROUTING_KEY))
        if not original_exchange or original_key is None:
            raise Forbidden(
                "forbidden route",
                f"a {via} on {queue} that does not carry its original exchange and routing key",
            )
        route = topology.Route(original_exchange, original_key)
        sender = _text(raw.get(HeaderNames.ORIGINAL_USER_ID))
        if key is not None and not _signed(delivery, queue, raw, via, key):
            raise Forbidden(
                "forbidden route",
                f"a {via} on {queue} whose original route and sender this service did not sign",
            )
    start = topology.is_start_route(route.exchange, route.routing_key)
    headers = _believed(raw, via, start=start)
    retries = (
        clamp_retries(headers.get(HeaderNames.RETRY_COUNT), max_retries) if via == "retry" else 0
    )
    return Arrival(route, via, headers, sender, retries)


def _signed(
    delivery: AbstractIncomingMessage, queue: str, raw: dict[str, Any], via: Via, key: bytes
) -> bool:
    fields = {
        "queue": queue,
        "message_id": delivery.message_id,
        "message_type": delivery.type,
        "body": delivery.body,
        "headers": raw,
    }
    claimed = raw.get(HeaderNames.SIGNATURE)
    if via == "retry":
        return signing.verify(key, "retry", claimed, **fields)
    if signing.verify(key, "dead-letter", claimed, **fields):
        return True
    if signing.verify(key, "retry", claimed, **fields):
        return True  # a retry copy that crashed its consumer until the broker dead-lettered it
    # a dead letter the broker made (a crash loop), stored by the collector, which marks only
    # those it took from the broker's own dead-letter exchange
    return _text(raw.get(HeaderNames.DEAD_LETTERED_BY)) == signing.BROKER_MADE


def check(arrival: Arrival, queue: str, type_name: str, *, sender_prefix: str | None) -> None:
    """Raise :class:`Forbidden` unless ``type_name`` may arrive on ``queue`` by the arrival's
    route and (when senders are checked) from the principal that owns it."""
    allowed = topology.accepted_route(queue, type_name)
    if allowed is None:
        raise Forbidden("forbidden route", f"{type_name} is never accepted on {queue}")
    route, principal = allowed
    if arrival.route != route:
        raise Forbidden(
            "forbidden route",
            f"{type_name} arrived by {arrival.route.exchange}/{arrival.route.routing_key}; "
            f"it may only come by {route.exchange}/{route.routing_key}",
        )
    if sender_prefix is None or principal == topology.ANY_SENDER:
        return
    expected = sender_prefix + principal
    if arrival.sender != expected:
        raise Forbidden(
            "forbidden sender",
            f"{type_name} must be sent by {expected}, not {arrival.sender or 'an unnamed user'}",
        )


def sender_prefix(own_user: str, service: str) -> str | None:
    """The provisioned users' prefix, from this service's own broker user (``sagabus-payment``
    for ``payment`` gives ``sagabus-``); None when the user is not a provisioned one (the
    development ``guest``), and the sender check is then off."""
    if own_user.endswith(service):
        return own_user[: len(own_user) - len(service)]
    return None


def as_received(delivery: AbstractIncomingMessage) -> Arrival:
    """A delivery judged by the route it physically came by, none of our bookkeeping believed:
    how a refused retry or replay is dead-lettered (so that replaying it is refused again)."""
    route = topology.Route(delivery.exchange or "", delivery.routing_key or "")
    start = topology.is_start_route(route.exchange, route.routing_key)
    headers = _believed(dict(delivery.headers or {}), "direct", start=start)
    return Arrival(route, "direct", headers, delivery.user_id, 0)
