"""Every saga definition this process manager can run, by (name, version).

A saga runs to its end on the version it started with: its stored (type, version) chooses the
definition on every message. New sagas start on the newest version of their type, unless the
deployment pins one (``SAGABUS_SAGA_VERSIONS``, for example ``checkout=1``). A version stays
registered while sagas may still run on it; a process manager refuses to start when its
database holds live sagas of a version it does not have.
"""

from __future__ import annotations

from collections.abc import Mapping

from process_manager.definitions import checkout, returns
from process_manager.engine import Definition

#: every registered definition, oldest version first
ALL: tuple[Definition, ...] = (checkout.V1, checkout.V2, returns.V1)

BY_REF: dict[tuple[str, int], Definition] = {(d.name, d.version): d for d in ALL}
NAMES: tuple[str, ...] = tuple(dict.fromkeys(d.name for d in ALL))
BY_START_TYPE: dict[str, str] = {d.start.TYPE: d.name for d in ALL}


class UnknownDefinition(LookupError):
    pass


def get(name: str, version: int) -> Definition:
    try:
        return BY_REF[(name, version)]
    except KeyError:
        raise UnknownDefinition(f"no saga definition {name}.v{version} is registered") from None


def versions(name: str) -> tuple[int, ...]:
    return tuple(sorted(v for n, v in BY_REF if n == name))


def current(name: str, pinned: Mapping[str, int] | None = None) -> Definition:
    """The definition new sagas of type ``name`` start on."""
    found = versions(name)
    if not found:
        raise UnknownDefinition(f"no saga definition named {name!r}")
    version = (pinned or {}).get(name, found[-1])
    return get(name, version)


def parse_pins(text: str) -> dict[str, int]:
    """``checkout=1,returns=1`` -> {"checkout": 1, "returns": 1}; checks each is registered."""
    pins: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, version = part.partition("=")
        if not sep or not version.strip().isdigit():
            raise ValueError(f"{part!r}: expected <saga>=<version>, for example checkout=1")
        get(name.strip(), int(version))
        pins[name.strip()] = int(version)
    return pins


def parse_ref(ref: str) -> tuple[str, int]:
    """``checkout.v2`` -> ("checkout", 2)."""
    name, _, version = ref.rpartition(".v")
    if not name or not version.isdigit():
        raise ValueError(f"{ref!r} is not a definition reference like checkout.v2")
    return name, int(version)
