"""Every deployable service by name: the one place that wires the definitions together."""

from __future__ import annotations

from collections.abc import Callable

from messaging.service import ServiceDefinition
from messaging.settings import Settings
from participants.analytics import service as analytics
from participants.inventory import service as inventory
from participants.notification import service as notification
from participants.order import service as order
from participants.payment import service as payment
from participants.shipping import service as shipping
from process_manager import service as process_manager

FACTORIES: dict[str, Callable[[Settings], ServiceDefinition]] = {
    "process-manager": process_manager.definition,
    "order": order.definition,
    "payment": payment.definition,
    "inventory": inventory.definition,
    "shipping": shipping.definition,
    "notification": notification.definition,
    "analytics": analytics.definition,
}


def definitions(
    settings: Settings, names: list[str] | tuple[str, ...] | None = None
) -> list[ServiceDefinition]:
    chosen = list(FACTORIES) if not names else list(names)
    unknown = [n for n in chosen if n not in FACTORIES]
    if unknown:
        raise KeyError(", ".join(unknown))
    return [FACTORIES[n](settings) for n in chosen]
