"""Configuration of every deployable, read from ``SAGABUS_*`` environment variables.

Built once in the entry point and passed down; nothing reads the environment at import time.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAGABUS_", extra="ignore", frozen=True)

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    #: declare the whole broker topology at start-up; false for a service that runs as a
    #: restricted broker user (``sagabus provision``), whose topology an admin declared already
    declare_topology: bool = True
    database_url: str = "postgresql://postgres@127.0.0.1:5432/sagabus"
    #: database pool per process
    db_pool_size: int = Field(default=5, ge=1, le=200)
    #: unacknowledged deliveries per consumer
    prefetch: int = Field(default=64, ge=1, le=1000)
    #: most deliveries one consumer handles in one database transaction (1: one per message)
    consumer_batch: int = Field(default=32, ge=1, le=1000)
    #: database transactions one consumer runs at the same time
    consumer_transactions: int = Field(default=2, ge=1, le=100)
    #: largest message body accepted; larger ones are dead-lettered unprocessed
    max_message_bytes: int = Field(default=256 * 1024, ge=1024)

    #: delay before retry N (the last one repeats); jittered by +/- retry_jitter
    retry_delays_ms: tuple[int, ...] = (500, 2_000, 10_000, 30_000)
    retry_jitter: float = Field(default=0.2, ge=0, lt=1)
    #: deliveries of one message that fail transiently before it is dead-lettered
    max_attempts: int = Field(default=6, ge=1, le=100)
    #: broker-side bound on redeliveries (quorum x-delivery-limit): stops a crash loop
    delivery_limit: int = Field(default=20, ge=1)

    outbox_batch: int = Field(default=200, ge=1, le=10_000)
    outbox_poll_s: float = Field(default=1.0, gt=0)
    #: after a drain that published rows, wait this long before the next one (0: never)
    outbox_linger_s: float = Field(default=0.002, ge=0, le=1)
    #: publish committed rows straight from the process that wrote them (the sweep remains the
    #: safety net); false: only the sweep publishes
    outbox_dispatch: bool = True
    #: the sweep's poll leaves rows younger than this to the process dispatching them
    outbox_dispatch_grace_s: float = Field(default=5.0, ge=0, le=3600)

    #: retention (``messaging.retention``; 0 keeps rows for ever): processed-message ids must
    #: outlive every late copy (delay queues, dead-letter replays); sent outbox rows are history
    inbox_retention_s: float = Field(default=14 * 86_400, ge=0)
    outbox_retention_s: float = Field(default=86_400, ge=0)
    retention_interval_s: float = Field(default=600, gt=0)
    #: retention of business rows (``RetentionRule``s; 0 keeps them for ever): finished sagas
    #: with their history and closed manual cases; dead letters whatever their status;
    #: participants' rows of finished business. Rows that guard against late duplicates are
    #: kept at least as long as the inbox and dead-letter windows (docs/personal-data.md)
    saga_retention_s: float = Field(default=90 * 86_400, ge=0)
    dead_letter_retention_s: float = Field(default=30 * 86_400, ge=0)
    participant_retention_s: float = Field(default=90 * 86_400, ge=0)

    #: process manager: per step timeout and bounded re-sends
    step_timeout_s: float = Field(default=30.0, gt=0)
    max_step_attempts: int = Field(default=3, ge=1)
    compensation_timeout_s: float = Field(default=30.0, gt=0)
    max_compensation_attempts: int = Field(default=5, ge=1)
    #: after the pivot (capture) a step is only ever late: sends before a human is called, each
    #: wait twice the last (from step_timeout_s), at most retriable_max_delay_s
    max_retriable_attempts: int = Field(default=20, ge=1)
    retriable_max_delay_s: float = Field(default=600.0, gt=0)
    timeout_poll_s: float = Field(default=0.5, gt=0)
    #: a saga alive longer than this is moved to FAILED_NEEDS_MANUAL by the sweeper
    saga_ttl_s: float = Field(default=3600.0, gt=0)
    #: the definition version new sagas start on, per saga type (``checkout=1``); a type not
    #: named starts on its newest registered version. Sagas in flight keep theirs.
    saga_versions: str = ""
    sweeper_interval_s: float = Field(default=30.0, gt=0)

    #: shipping: the simulated carrier
    carrier_failure_rate: float = Field(default=0.0, ge=0, le=1)
    carrier_latency_ms: int = Field(default=0, ge=0)
    #: share of bookings the carrier makes and then "loses the answer" to
    carrier_lose_response_rate: float = Field(default=0.0, ge=0, le=1)
    #: shipping: deliveries of CreateShipment that may hit a carrier error before giving up
    shipping_max_attempts: int = Field(default=4, ge=1)
    #: risk: an order above this amount (minor units, any currency) is rejected
    risk_max_amount_minor: int = Field(default=1_000_000, ge=0)
    #: risk: customer ids on the block list, comma separated; added to ``risk.blocked_customers``
    #: at start (never removed from it: a customer is unblocked there, by an operator)
    risk_blocked_customers: str = "cus_blocked"

    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "info"
    #: this process's instance id in spans (``service.instance.id``) and logs (``instance``);
    #: unset: ``<host>-<pid>``
    service_instance: str | None = None
    #: serve Prometheus metrics on this port (``/metrics``); unset: no endpoint
    metrics_port: int | None = Field(default=None, ge=1, le=65535)

    @property
    def sqlalchemy_url(self) -> str:
        url = self.database_url
        for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+asyncpg://" + url[len(prefix) :]
        raise ValueError(f"SAGABUS_DATABASE_URL must be a postgresql:// URL, got {url!r}")

    @property
    def asyncpg_url(self) -> str:
        return "postgresql://" + self.sqlalchemy_url[len("postgresql+asyncpg://") :]
