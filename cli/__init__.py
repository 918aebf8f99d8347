"""The ``sagabus`` command line.

Bad arguments and unreachable services end in one line on stderr and a non-zero exit:
2 for usage errors, 3 for an unreachable broker or database, 1 for a failed operation.

One module per group of commands: ``sagas`` (start, return, status, list, cases, stats,
resume, compensate, definitions), ``deadletters`` (dlq), ``setup`` (migrate, run, health,
inventory, erase),
``provision``, ``demo`` and ``bench`` (which imports ``benchmarks`` only when it runs).
"""

from __future__ import annotations

import sys

import click

from cli import bench, deadletters, demo, provision, sagas, setup
from messaging.management import ManagementError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sagabus")
def cli() -> None:
    """sagabus: saga process manager (checkout, returns) on RabbitMQ and PostgreSQL."""


for command in (
    setup.migrate,
    setup.run,
    setup.health,
    setup.inventory,
    setup.erase,
    provision.provision,
    sagas.start,
    sagas.status,
    sagas.list_cmd,
    sagas.stats,
    sagas.resume,
    sagas.compensate,
    sagas.cases,
    sagas.return_cmd,
    sagas.definitions,
    deadletters.dlq,
    demo.demo,
    bench.bench,
):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    import logging

    # Client libraries log connection failures themselves; the CLI reports them in one line.
    # `run` and `demo` configure logging for the services they host.
    from messaging import telemetry

    telemetry.configure_logging("auto", "warning")  # to stderr; stdout stays for results
    for noisy in ("aiormq", "aio_pika", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    try:
        cli.main(args=argv, prog_name="sagabus", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("sagabus: aborted", err=True)
        sys.exit(130)
    except ManagementError as e:
        # the broker's management API (provisioning for `demo`), in one line
        click.echo(f"sagabus: error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        msg = e.format_message().replace("\n", " ")
        if isinstance(e, click.UsageError) and e.ctx is not None and e.ctx.command_path:
            msg = f"{e.ctx.command_path}: {msg}"
        click.echo(f"sagabus: error: {msg}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


__all__ = ["cli", "main"]
