"""``sagabus bench``: the options and the report; the measurement is ``benchmarks.bench``, imported
only when the command runs.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from cli.base import (
    Failed,
    run_async,
    settings,
)


@click.command()
@click.option("--sagas", type=click.IntRange(1, 10_000_000), default=2000, show_default=True)
@click.option(
    "--window",
    type=click.IntRange(1, 100_000),
    default=200,
    show_default=True,
    help="At most this many sagas in flight.",
)
@click.option("--pm-instances", type=click.IntRange(1, 2), default=1, show_default=True)
@click.option(
    "--warmup",
    type=click.IntRange(0, 1_000_000),
    default=None,
    help="Sagas run before measuring (default: a tenth of --sagas, at most 500).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--skip-floor", is_flag=True, help="Measure sagabus only.")
@click.option(
    "--peers/--no-peers",
    default=None,
    help="Also run the peer saga engines of benchmarks.peers (default: when it imports).",
)
@click.option(
    "--peer-sagas",
    type=click.IntRange(1, 1_000_000),
    default=None,
    help="Sagas each peer runs (default: --sagas); a slow peer can be measured on fewer.",
)
@click.option(
    "--sample-s",
    type=click.FloatRange(0.05, 3600),
    default=None,
    help="RSS sampling interval (default: 1 s, or 5 s from 20,000 sagas).",
)
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep each process's stderr here (default: discarded).",
)
@click.option("--keep", is_flag=True, help="Keep the bench database and vhosts.")
def bench(
    sagas: int,
    window: int,
    pm_instances: int,
    warmup: int | None,
    as_json: bool,
    skip_floor: bool,
    peers: bool | None,
    peer_sagas: int | None,
    sample_s: float | None,
    log_dir: Path | None,
    keep: bool,
) -> None:
    """Throughput, latency, CPU and memory of N successful sagas, against the floor."""
    import secrets

    from benchmarks import bench as b

    base = settings()
    with_peers = b.resolve_peers(peers)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    opts = b.Options(
        sagas=sagas,
        window=window,
        pm_instances=pm_instances,
        warmup=warmup if warmup is not None else min(500, sagas // 10),
        peers=with_peers,
        sample_s=sample_s or (5.0 if sagas >= 20_000 else 1.0),
        log_dir=log_dir,
        keep=keep,
    )
    run = secrets.token_hex(3)
    machine = b.Machine()
    facts = b.machine_facts()

    def progress(line: str) -> None:
        if not as_json:
            click.echo(line, err=True)

    try:
        result = run_async(
            lambda: b.run(
                base,
                opts,
                run=run,
                machine=machine,
                facts=facts,
                skip_floor=skip_floor,
                peer_sagas=peer_sagas,
                progress=progress,
            )
        )
    except asyncio.CancelledError:
        click.echo(f"sagabus bench {run}: interrupted; its processes and scratch removed", err=True)
        raise SystemExit(143) from None
    if as_json:
        click.echo(json.dumps(result, default=str))
    else:
        b.print_human(result)
    if not b.succeeded(result):
        raise Failed(
            f"{result['sagabus']['completed']}/{sagas} sagas COMPLETED "
            f"({result['sagabus'].get('failures')})"
        )
