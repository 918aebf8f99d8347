"""``sagabus demo``: every service in this process, N sagas of every scenario, every outcome
checked (``process_manager.demo``).
"""

from __future__ import annotations

import sys

import click
from rich.console import Console

from cli.base import (
    EXIT_FAILED,
    run_async,
    settings,
)


@click.command()
@click.option("--sagas", type=click.IntRange(1, 100_000), default=200, show_default=True)
@click.option("--seed", type=int, default=None, help="Scenario mix seed (default: time).")
@click.option("--verbose", is_flag=True, help="Show the services' logs.")
@click.option(
    "--single-user",
    is_flag=True,
    help="Run every service as the one user of SAGABUS_AMQP_URL and SAGABUS_DATABASE_URL "
    "instead of provisioning a broker user and a database role per service.",
)
@click.option(
    "--admin-url",
    default="http://guest:guest@127.0.0.1:15672",
    show_default=True,
    envvar="SAGABUS_RABBITMQ_ADMIN_URL",
    show_envvar=True,
    help="RabbitMQ management API with an administrator's credentials, to provision the "
    "services' users.",
)
def demo(sagas: int, seed: int | None, verbose: bool, single_user: bool, admin_url: str) -> None:
    """Run every service, start N sagas of every scenario, check every outcome.

    Each service runs as its own broker user and database role (provisioned afresh, with
    new passwords, every run) unless --single-user."""
    from messaging import telemetry
    from messaging.management import Management
    from process_manager.demo import run_demo

    try:
        Management(admin_url)
    except ValueError as e:
        raise click.UsageError(f"--admin-url {e}") from None
    s = settings()
    telemetry.configure_logging(
        "console" if verbose else s.log_format, s.log_level if verbose else "error"
    )
    ok = run_async(
        lambda: run_demo(
            s, sagas, Console(), seed=seed, single_user=single_user, admin_url=admin_url
        )
    )
    if not ok:
        sys.exit(EXIT_FAILED)
