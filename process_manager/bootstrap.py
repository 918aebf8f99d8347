"""Every deployable service by name: the one place that wires the definitions together.

The services are those of the topology (``messaging.topology.SERVICES``), each found by its
name: the process manager in ``process_manager.service``, a participant ``<name>`` in
``participants.<name>.service`` (``-`` spelt ``_``). Each module has ``definition(settings)``;
a participant's also names its schema ``SCHEMA``. A new service is one entry in the topology and
one package, and nothing here changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

from messaging.service import ServiceDefinition
from messaging.settings import Settings
from messaging.topology import SERVICES

PROCESS_MANAGER = "process-manager"


def module_name(service: str) -> str:
    """The module that defines ``service``."""
    if service == PROCESS_MANAGER:
        return "process_manager.service"
    return f"participants.{service.replace('-', '_')}.service"


def module(service: str) -> ModuleType:
    return importlib.import_module(module_name(service))


def schema(service: str) -> str:
    """The one database schema ``service`` keeps its tables in."""
    if service == PROCESS_MANAGER:
        from process_manager import store

        return store.SCHEMA
    found: str = module(service).SCHEMA
    return found


FACTORIES: dict[str, Callable[[Settings], ServiceDefinition]] = {
    name: module(name).definition for name in SERVICES
}


def definitions(
    settings: Settings, names: list[str] | tuple[str, ...] | None = None
) -> list[ServiceDefinition]:
    chosen = list(FACTORIES) if not names else list(names)
    unknown = [n for n in chosen if n not in FACTORIES]
    if unknown:
        raise KeyError(", ".join(unknown))
    return [FACTORIES[n](settings) for n in chosen]
