"""Every wire type by its versioned name."""

from __future__ import annotations

from schemas import checkout, inventory, order, payment, returns, risk, shipping
from schemas.base import Message


class UnknownMessageType(LookupError):
    pass


def _collect() -> dict[str, type[Message]]:
    found: dict[str, type[Message]] = {}
    for module in (checkout, returns, order, payment, inventory, shipping, risk):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Message) and value.TYPE:
                if value.TYPE in found and found[value.TYPE] is not value:
                    raise RuntimeError(f"duplicate wire type {value.TYPE}")
                found[value.TYPE] = value
    return dict(sorted(found.items()))


REGISTRY: dict[str, type[Message]] = _collect()


def model_for(type_name: str) -> type[Message]:
    try:
        return REGISTRY[type_name]
    except KeyError:
        raise UnknownMessageType(f"unknown message type {type_name!r}") from None
