"""Base model for every message body on the wire."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class Message(BaseModel):
    """A message body. Subclasses set ``TYPE`` to their versioned wire name.

    Bodies are frozen and reject unknown fields: a producer that sends something we do not
    understand gets a dead letter with the validation error, never a silent partial read.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    TYPE: ClassVar[str] = ""
    #: "command" (addressed to one owner), "reply" (answer to the process manager) or
    #: "fact" (public, fanned out).
    KIND: ClassVar[str] = ""
