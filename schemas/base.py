"""Base model for every message body on the wire."""

from __future__ import annotations

from typing import ClassVar, Self

from pydantic import BaseModel, ConfigDict


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

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        """A body from its wire form, validated strictly (pydantic's strict mode for JSON)."""
        return cls.model_validate_json(data, strict=True)
