"""Base model for every message body on the wire."""

from __future__ import annotations

import uuid
from typing import ClassVar, Self

from pydantic import BaseModel, ConfigDict

#: Namespace of saga ids derived from (saga type, business key). Never change it: it keys every
#: saga (the checkout's ids, ``uuid5(ns, "checkout:<order_id>")``, predate saga definitions).
SAGA_NAMESPACE = uuid.UUID("6f1f3c2e-3f0e-4a53-9d0c-5a8b2d4c7e10")


def saga_id_for(saga_type: str, business_key: str) -> uuid.UUID:
    """One business key, one saga of each type, whoever sends the start."""
    return uuid.uuid5(SAGA_NAMESPACE, f"{saga_type}:{business_key}")


class Message(BaseModel):
    """A message body. Subclasses set ``TYPE`` to their versioned wire name.

    Bodies are frozen and reject unknown fields: a producer that sends something we do not
    understand gets a dead letter with the validation error, never a silent partial read.
    Nothing is stripped or coerced: ``from_json`` accepts exactly what the published JSON Schema
    accepts (no ``"2"`` or ``2.0`` for an integer, no ``1`` for a boolean).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    TYPE: ClassVar[str] = ""
    #: "command" (addressed to one owner), "reply" (answer to the process manager) or
    #: "fact" (public, fanned out).
    KIND: ClassVar[str] = ""
    #: on a saga's start command: the field whose value is the saga's business key
    SAGA_KEY: ClassVar[str] = ""

    @property
    def saga_type(self) -> str:
        """The saga a start command starts (the first word of its type)."""
        return self.TYPE.split(".", 1)[0]

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        """A body from its wire form, validated strictly (pydantic's strict mode for JSON)."""
        return cls.model_validate_json(data, strict=True)
